"""The workdir of a run: writable, and holding no run of another config.

A workdir remembers its config (`config.json`); resuming it with another config beyond
RESUMABLE_CHANGES is refused unless the caller allows it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections


# Fields that may change between a run and its resumption: how long and how it is observed or
# laid out, not what is trained.
RESUMABLE_CHANGES = ('num_steps', 'log_every', 'eval_every', 'num_overlays', 'eval',
                     'data.num_workers', 'data.num_threads', 'data.prefetch', 'mesh',
                     'checkpoint.keep_best', 'early_stopping')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                  allow_config_change: bool) -> None:
  """Fails early on an unwritable workdir, or on resuming a run that had another config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise OSError(f'workdir {workdir} is not writable ({e.strerror}); checkpoints and logs go '
                  'there: choose another --workdir') from e
  saved_path = os.path.join(workdir, 'config.json')
  if allow_config_change or not os.path.exists(saved_path):
    return
  with open(saved_path, encoding='utf-8') as f:
    saved = _flatten(json.load(f))
  current = _flatten(json.loads(config.to_json_best_effort()))
  changed = sorted(k for k in saved.keys() | current.keys()
                   if saved.get(k) != current.get(k)
                   and not any(k == f or k.startswith(f + '.') for f in RESUMABLE_CHANGES))
  if changed:
    details = ', '.join(f'{k}: {saved.get(k)!r} → {current.get(k)!r}' for k in changed[:5])
    raise ValueError(f'workdir {workdir} holds a run with another config ({details}); use a new '
                     '--workdir, or pass --allow_config_change to resume it anyway')


