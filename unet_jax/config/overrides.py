"""Dotted-path edits of a config: sweep points, launch.py's --config.* overrides, config files.

  apply_overrides(config, {'optimizer.learning_rate': 1e-3})   a copy with the values set
  check_path(config, 'optimizer.learning_rate', value)         ConfigError naming close fields
  load_config_file('experiments/isbi.py:cpu')                  the config --config loads
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any, Mapping

import ml_collections

from unet_jax.config import schema
from unet_jax.config.schema import ConfigError


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-path overrides; an unknown path is an error naming it."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f'sweep override {path!r}: config has no field {part!r}')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'sweep override {path!r}: config has no field {leaf!r}; '
                       f'fields there: {sorted(node.keys())}')
    node[leaf] = value
  return config


def check_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """ConfigError naming the closest fields unless the dotted `path` is a field of `config`."""
  node, parents = config, ['config']
  for part in path.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      keys = sorted(node.keys()) if hasattr(node, 'keys') else []
      close = difflib.get_close_matches(part, keys, n=3)
      where = '.'.join(parents)
      if not close and schema.is_mapping(where.partition('.')[2]):
        # ml_collections cannot add a key to a locked config, but takes the whole mapping.
        raise ConfigError(
            f'config.{path}', value,
            f'cannot be set entry by entry ({where} holds its own entries, none named {part!r})',
            f"the whole mapping as one value, e.g. --{where}='{{\"{part}\": ...}}'")
      raise ConfigError(
          f'config.{path}', value, f'is not a config field ({where} has no field {part!r})',
          f'a field of {where} (closest: {", ".join(close)})' if close else
          f'a field of {where}: {", ".join(keys) or "(it has none)"}')
    node, parents = node[part], parents + [part]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of 'path/to/file.py[:arg]', as --config loads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
