"""The config's schema: field types, the name tables fields choose from, numeric ranges.

`ConfigError` is the one-line error of every config check (see validation.validate, which
runs `check_types` and `check_names_and_ranges` first). Names come from the tables of the
modules that use them, so a name added there is valid here at once.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from unet_jax import checkpointing
from unet_jax.augment import transforms
from unet_jax.datasets import loaders
from unet_jax.datasets import pipeline
from unet_jax.datasets import sources
from unet_jax.models import DTYPES, MODELS, blocks, whole_image
from unet_jax.training import loop
from unet_jax.training import optimizers
from unet_jax.tuning import engines


class ConfigError(ValueError):
  """A config mistake, in one line: `<field>=<value> <what is wrong>; expected <valid>`.

  `problem` starting with ':' follows the value directly (`config.data.crop_size=570: ...`);
  `context` (e.g. which sweep point) is appended in parentheses.
  """

  def __init__(self, field: str, value: Any, problem: str, expected: str, context: str = ''):
    self.field, self.value, self.problem, self.expected = field, value, problem, expected
    sep = '' if problem.startswith(':') else ' '
    message = f'{field}={value!r}{sep}{problem}; expected {expected}'
    super().__init__(' '.join((f'{message} ({context})' if context else message).split()))

  def within(self, context: str) -> ConfigError:
    """The same error with `context` appended."""
    return ConfigError(self.field, self.value, self.problem, self.expected, context)


def is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def seq(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda v: isinstance(v, (tuple, list)) and all(check(x) for x in v)


# (description, test) of the value kinds in FIELD_TYPES.
_INT = ('an int', is_int)
_NUMBER = ('a number', is_number)
_BOOL = ('a bool', lambda v: isinstance(v, bool))
_STR = ('a string', lambda v: isinstance(v, str))
_INTS = ('a tuple of ints', seq(is_int))
_NUMBERS = ('a tuple of numbers', seq(is_number))
_STRS = ('a tuple of strings', seq(lambda x: isinstance(x, str)))
_INT_OR_INTS = ('an int or a tuple of ints (one per spatial dim)',
                lambda v: is_int(v) or (seq(is_int)(v) and len(v) > 0))
_NUMBER_OR_NUMBERS = ('a number or one number per channel',
                      lambda v: is_number(v) or (seq(is_number)(v) and len(v) > 0))
_OPTIONAL_INT = ('None or an int', lambda v: v is None or is_int(v))
_OPTIONAL_NUMBERS = ('None or a tuple of numbers', lambda v: v is None or seq(is_number)(v))
_MAPPING = ('a ConfigDict (name → value)', lambda v: isinstance(v, (Mapping,
                                                                   ml_collections.ConfigDict)))

# The type of every field the training code reads (experiments/isbi.py sets them all). Checked on
# configs from files too, where ml_collections' typed overrides do not apply.
FIELD_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    'seed': _INT, 'num_steps': _INT, 'batch_size': _INT, 'eval_batch_size': _INT,
    'log_every': _INT, 'eval_every': _INT, 'num_overlays': _INT, 'nonfinite': _STR,
    'divergence.policy': _STR, 'divergence.loss_factor': _NUMBER,
    'data.source': _STR, 'data.directory': _STR, 'data.val_indices': _INTS, 'data.val_gap': _INT,
    'data.folds': _INT, 'data.class_names': _STRS, 'data.crop_size': _INT_OR_INTS,
    'data.augment': _STR, 'data.augment_on': _STR, 'data.interpolation_order': _INT,
    'data.crop': _STR, 'data.foreground_class': _INT, 'data.foreground_p': _NUMBER,
    'data.weight_map.enabled': _BOOL, 'data.weight_map.w0': _NUMBER,
    'data.weight_map.sigma': _NUMBER, 'data.weight_map.object_class': _INT,
    'data.mean': _NUMBER_OR_NUMBERS, 'data.std': _NUMBER_OR_NUMBERS, 'data.num_workers': _INT,
    'data.num_threads': _INT, 'data.prefetch': _INT, 'data.images_dir': _STR,
    'data.masks_dir': _STR, 'data.mask_mode': _STR, 'data.ignore_label': _OPTIONAL_INT,
    'data.image_paths': _STRS, 'data.label_paths': _STRS, 'data.label_mode': _STR,
    'model.name': _STR, 'model.width': _INT, 'model.depth': _INT, 'model.padding': _STR,
    'model.upsample': _STR, 'model.norm': _STR, 'model.activation': _STR,
    'model.dropout_rate': _NUMBER, 'model.dtype': _STR,
    'loss.terms': _MAPPING, 'loss.options': _MAPPING,
    'loss.deep_supervision_weights': _OPTIONAL_NUMBERS,
    'eval.isbi_metrics': _BOOL, 'eval.membrane_class': _INT, 'eval.hausdorff_classes': _INTS,
    'eval.tta': _STR,
    'optimizer.name': _STR, 'optimizer.learning_rate': _NUMBER, 'optimizer.schedule': _STR,
    'optimizer.warmup_steps': _INT, 'optimizer.final_lr_fraction': _NUMBER,
    'optimizer.power': _NUMBER, 'optimizer.step_boundaries': _NUMBERS,
    'optimizer.step_factor': _NUMBER, 'optimizer.b1': _NUMBER, 'optimizer.b2': _NUMBER,
    'optimizer.momentum': _NUMBER, 'optimizer.weight_decay': _NUMBER,
    'optimizer.decay_biases_and_norms': _BOOL, 'optimizer.grad_clip_norm': _NUMBER,
    'optimizer.grad_accum_steps': _INT, 'optimizer.ema_decay': _NUMBER,
    'early_stopping.patience': _INT, 'early_stopping.min_delta': _NUMBER,
    'checkpoint.every': _INT, 'checkpoint.keep_latest': _INT, 'checkpoint.keep_best': _INT,
    'checkpoint.best_metric': _STR, 'checkpoint.best_mode': _STR,
    'mesh.data': _INT, 'mesh.fsdp': _INT,
    'sweep.sampler.name': _STR, 'sweep.sampler.options': _MAPPING, 'sweep.pruner.name': _STR,
    'sweep.pruner.options': _MAPPING, 'sweep.num_trials': _INT, 'sweep.seed': _INT,
    'sweep.heartbeat_seconds': _INT, 'sweep.grace_seconds': _INT, 'sweep.max_retries': _INT,
    'sweep.poll_seconds': _NUMBER,
}


def is_mapping(path: str) -> bool:
  """Whether the field at dotted `path` (without `config.`) holds entries of its own, name →
  value, rather than fixed fields."""
  return FIELD_TYPES.get(path) is _MAPPING


# Fields whose value names one entry of a module's table (optional fields are checked if set).
CHOICES: dict[str, Callable[[], Sequence[str]]] = {
    'nonfinite': lambda: loop.NONFINITE_POLICIES,
    'divergence.policy': lambda: loop.DIVERGENCE_POLICIES,
    'data.source': lambda: tuple(sources.SOURCES),
    'data.augment_on': lambda: pipeline.AUGMENT_ON,
    'data.crop': lambda: transforms.CROPS,
    'data.mask_mode': lambda: loaders.MASK_MODES,
    'data.label_mode': lambda: loaders.LABEL_MODES,
    'eval.tta': lambda: whole_image.TTA_MODES,
    'model.name': lambda: sorted(MODELS),
    'model.padding': lambda: blocks.PADDINGS,
    'model.upsample': lambda: blocks.UPSAMPLINGS,
    'model.norm': lambda: blocks.NORMS,
    'model.activation': lambda: sorted(blocks.ACTIVATIONS),
    'model.dtype': lambda: sorted(DTYPES),
    'model.conv_impl': lambda: blocks.CONV_IMPLS,
    'model.remat': lambda: blocks.REMAT_POLICIES,  # or a bool
    'optimizer.name': lambda: optimizers.OPTIMIZERS,
    'optimizer.schedule': lambda: optimizers.SCHEDULES,
    'checkpoint.best_mode': lambda: checkpointing.BEST_MODES,
    'sweep.sampler.name': lambda: tuple(engines.SAMPLERS),
    'sweep.pruner.name': lambda: tuple(engines.PRUNERS),
}


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = True) -> tuple[str, Callable[[float], bool]]:
  def test(v: float) -> bool:
    return (math.isfinite(v) and (low is None or (v > low if low_open else v >= low))
            and (high is None or (v < high if high_open else v <= high)))
  if high is None:
    text = f'{">" if low_open else "≥"} {low:g}'
  else:
    text = f'in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
  return text, test


# Numeric ranges; a tuple value is checked element by element.
RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    'seed': _range(0), 'num_steps': _range(1), 'batch_size': _range(1),
    'eval_batch_size': _range(1), 'log_every': _range(1), 'eval_every': _range(1),
    'num_overlays': _range(0), 'divergence.loss_factor': _range(1, low_open=True),
    'data.val_indices': _range(0), 'data.val_gap': _range(0),
    'data.interpolation_order': _range(0, 5, high_open=False),
    'data.foreground_p': _range(0, 1, high_open=False), 'data.std': _range(0, low_open=True),
    'data.weight_map.w0': _range(0), 'data.weight_map.sigma': _range(0, low_open=True),
    'data.num_workers': _range(0), 'data.num_threads': _range(0), 'data.prefetch': _range(0),
    'model.width': _range(1), 'model.depth': _range(1), 'model.dropout_rate': _range(0, 1),
    'loss.deep_supervision_weights': _range(0),
    # 0 is allowed: a frozen run (e.g. to measure the evaluation of the initial parameters).
    'optimizer.learning_rate': _range(0), 'optimizer.warmup_steps': _range(0),
    'optimizer.final_lr_fraction': _range(0, 1, high_open=False),
    'optimizer.power': _range(0, low_open=True),
    'optimizer.step_boundaries': _range(0, 1, low_open=True, high_open=False),
    'optimizer.step_factor': _range(0, low_open=True), 'optimizer.b1': _range(0, 1),
    'optimizer.b2': _range(0, 1), 'optimizer.momentum': _range(0, 1, high_open=False),
    'optimizer.weight_decay': _range(0), 'optimizer.grad_clip_norm': _range(0),
    'optimizer.grad_accum_steps': _range(1), 'optimizer.ema_decay': _range(0, 1),
    'early_stopping.patience': _range(0), 'early_stopping.min_delta': _range(0),
    'checkpoint.every': _range(0), 'checkpoint.keep_latest': _range(1),
    'checkpoint.keep_best': _range(0), 'mesh.fsdp': _range(1),
    'sweep.num_trials': _range(1), 'sweep.seed': _range(0), 'sweep.heartbeat_seconds': _range(1),
    'sweep.grace_seconds': _range(1), 'sweep.max_retries': _range(0),
    'sweep.poll_seconds': _range(0, low_open=True),
}


def get(config: Any, path: str) -> Any:
  """The field at the dotted `path` ('data.crop_size')."""
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def has(config: Any, path: str) -> bool:
  """Whether the dotted `path` names a field of `config`."""
  node = config
  for part in path.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return False
    node = node[part]
  return True


def did_you_mean(name: str, choices: Sequence[str]) -> str:
  """' (did you mean 'x'?)' for the closest of `choices` (case-insensitive), or ''."""
  by_lower = {str(c).lower(): str(c) for c in choices}
  close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
  return f' (did you mean {by_lower[close[0]]!r}?)' if close else ''


def choice_error(field: str, value: Any, choices: Sequence[str], what: str = 'the valid choices',
                 *, key: str | None = None) -> ConfigError:
  """`value` (or the field's last name `key`, for unknown keys) is not among `choices`."""
  probe = key if key is not None else value if isinstance(value, str) else ''
  return ConfigError(field, value, f'is not one of {what}{did_you_mean(probe, choices)}',
                     f'one of {", ".join(str(c) for c in choices)}' if choices else 'none')


def check_types(config: ml_collections.ConfigDict) -> None:
  """Every field of FIELD_TYPES is present with its type (model.remat: a bool or a name)."""
  for path, (kind, test) in FIELD_TYPES.items():
    if not has(config, path):
      raise ConfigError(f'config.{path}', None, 'is missing',
                        f'{kind} (experiments/isbi.py sets every field)')
    value = get(config, path)
    if not test(value):
      raise ConfigError(f'config.{path}', value, f'has type {type(value).__name__}', kind)
  remat = config.model.get('remat', 'none')
  if not isinstance(remat, (bool, str)):
    raise ConfigError('config.model.remat', remat, f'has type {type(remat).__name__}',
                      f'a bool or one of {blocks.REMAT_POLICIES}')


def check_names_and_ranges(config: ml_collections.ConfigDict) -> None:
  """Names are in their tables (CHOICES), numbers in their RANGES; after `check_types`."""
  for path, choices in CHOICES.items():
    if has(config, path):
      value = get(config, path)
      if not isinstance(value, bool) and value not in choices():
        raise choice_error(f'config.{path}', value, choices())
  for path, (text, test) in RANGES.items():
    value = get(config, path)
    values = value if isinstance(value, (tuple, list)) else () if value is None else (value,)
    bad = [v for v in values if not test(v)]
    if bad:
      entries = isinstance(value, (tuple, list))
      raise ConfigError(f'config.{path}', value,
                        f'is out of range{f" (entry {bad[0]!r})" if entries else ""}',
                        f'{"every entry " if entries else ""}{text}')
  if config.mesh.data != -1 and config.mesh.data < 1:
    raise ConfigError('config.mesh.data', config.mesh.data, 'is out of range',
                      '-1 (every device left after fsdp) or ≥ 1')
  if config.data.folds == 1 or config.data.folds < 0:
    raise ConfigError('config.data.folds', config.data.folds, 'is out of range',
                      '0 (no cross-validation) or ≥ 2 folds')
