"""Up-front validation of a whole config: every mistake that shows without data or compiling.

`validate(config, mode=...)` runs once before anything is built: launch.py calls it for a run,
predict and export, sweeps.py for every trial of a sweep, and the drivers of runs.py for every
K-fold run and checkpoint evaluation; the library itself raises plain ValueErrors. It raises `ConfigError`, a
ValueError whose message is one line that names the field, its value, what is wrong and what
would be valid:

  config.model.name='unett' is not one of the valid choices (did you mean 'unet'?); expected ...
  config.data.crop_size=570: input size 570 is invalid (...); expected one of the nearby ...

Names are checked against the tables of the modules that use them (models.MODELS,
losses.LOSSES, transforms.OPS, optimizers.OPTIMIZERS, sources.SOURCES, the samplers and
pruners of tuning/engines.py, …), sampler and pruner options by building them, crop sizes
against the model's own size arithmetic, batch sizes against the devices of the mesh, loss
options by tracing each loss on abstract inputs (jax.eval_shape: nothing is compiled), and
`checkpoint.best_metric` against the names the evaluation code itself produces. What needs the
data (label values, image shapes) is checked by the loaders (unet_jax/datasets/loaders.py), which name
the offending file. `flag_error` turns a failed parse of launch.py's `--config.*` overrides into
the same kind of line.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optuna

from unet_jax import sharding
from unet_jax import storage
from unet_jax.augment import transforms
from unet_jax.config import overrides
from unet_jax.datasets import procedural
from unet_jax.datasets import sources
from unet_jax.datasets.dataset import IGNORE_CLASS
from unet_jax.evaluation import evaluator
from unet_jax.evaluation import metrics
from unet_jax.training import losses
from unet_jax.tuning import engines
from unet_jax.config.schema import (ConfigError, choice_error, check_names_and_ranges,
                                    check_types, did_you_mean, get, has, is_number, seq)
from unet_jax.models import MODELS, build_model, model_options
from unet_jax.models import whole_image

MODES = ('train', 'eval', 'predict', 'export', 'compile')


def _check_classes(config: ml_collections.ConfigDict) -> int:
  """The number of classes, after checking every field that names a class id."""
  names = tuple(config.data.class_names)
  if not 2 <= len(names) < IGNORE_CLASS or len(set(names)) != len(names):
    raise ConfigError('config.data.class_names', names, 'is not a valid list of classes',
                      f'2 to {IGNORE_CLASS - 1} distinct names')
  count = len(names)
  ids = {'config.data.foreground_class': (config.data.foreground_class,),
         'config.data.weight_map.object_class': (config.data.weight_map.object_class,),
         'config.eval.membrane_class': (config.eval.membrane_class,),
         'config.eval.hausdorff_classes': tuple(config.eval.hausdorff_classes)}
  for field, values in ids.items():
    if any(not 0 <= v < count for v in values):
      value = values if field.endswith('classes') else values[0]
      raise ConfigError(field, value, f'names no class of config.data.class_names={names}',
                        f'class ids in [0, {count})')
  class_weights = config.data.weight_map.class_weights
  if not (class_weights == 'balanced' or (seq(is_number)(class_weights)
                                          and len(class_weights) == 2
                                          and min(class_weights) >= 0)):
    raise ConfigError('config.data.weight_map.class_weights', class_weights, 'is not valid',
                      "'balanced' or a pair (background weight, cell weight) of numbers ≥ 0")
  if (config.data.source == 'folder' and config.data.mask_mode != 'classes' and count != 2):
    raise ConfigError('config.data.mask_mode', config.data.mask_mode,
                      f'gives 2 classes but config.data.class_names has {count}',
                      "mask_mode='classes' for more than 2 classes")
  return count


def _check_model(config: ml_collections.ConfigDict, num_classes: int, spatial_rank: int):
  """The model, after checking its variant options and the crop against its size arithmetic."""
  name = config.model.name
  takes = model_options(name)
  shared = {k for k in config.model.keys() if k not in MODELS} - {'name', 'dtype'}
  unknown = sorted(shared - takes)
  if unknown:
    raise choice_error(f'config.model.{unknown[0]}', config.model[unknown[0]], sorted(takes),
                        f'the options {name!r} takes', key=unknown[0])
  # Every variant's sub-config, not only the chosen one's: a typo there bites once it is chosen.
  for variant in sorted(set(config.model.keys()) & set(MODELS)):
    variant_takes = model_options(variant)
    unknown = sorted(set(config.model[variant].keys()) - variant_takes)
    if unknown:
      raise choice_error(f'config.model.{variant}.{unknown[0]}',
                          config.model[variant][unknown[0]], sorted(variant_takes),
                          f'the options {variant!r} takes', key=unknown[0])
  try:
    model = build_model(config.model, num_classes=num_classes)
    model.size_multiple()  # builds the size geometry, which checks the options' combination
  except (ValueError, TypeError) as e:
    raise ConfigError('config.model.name', name, f'cannot be built from config.model: {e}',
                      f'options that {name!r} accepts together') from None
  crop = config.data.crop_size
  try:
    shape = whole_image.crop_shape(crop, spatial_rank)
  except ValueError:
    raise ConfigError('config.data.crop_size', crop,
                      f'has {len(np.ravel(crop))} sizes but config.data.source={config.data.source!r} '
                      f'gives {spatial_rank}D examples', f'one int or {spatial_rank} ints') from None
  for size in shape:
    try:
      out = model.output_size(size)
    except ValueError as e:
      reason, _, nearby = str(e).partition('; nearby valid sizes: ')
      raise ConfigError('config.data.crop_size', crop, f': {reason}',
                        f'one of the nearby valid sizes {nearby}' if nearby else
                        f'a size that config.model.name={name!r} takes') from None
    if (size - out) % 2:
      raise ConfigError('config.data.crop_size', crop,
                        f'gives an output of {out} that is not centred in the crop',
                        f'a size whose (input − output) is even, e.g. '
                        f'{model.valid_input_sizes(3, start=size)}')
  return model


def data_parallel_size(config: ml_collections.ConfigDict,
                       devices: Sequence[Any] | None = None) -> int:
  """Devices the batch is split over (config.mesh.data × config.mesh.fsdp), as make_mesh counts
  them among `devices` (default: jax.devices())."""
  available = jax.device_count() if devices is None else len(devices)
  fsdp, data = config.mesh.fsdp, config.mesh.data
  if available % fsdp:
    raise ConfigError('config.mesh.fsdp', fsdp, f'does not divide the {available} devices',
                      f'a divisor of {available}')
  data = available // fsdp if data == -1 else data
  if data * fsdp > available:
    raise ConfigError('config.mesh.data', config.mesh.data,
                      f'× config.mesh.fsdp={fsdp} needs {data * fsdp} devices but '
                      f'{available} are available', f'data × fsdp ≤ {available} (-1: all)')
  return data * fsdp


def _check_batches(config: ml_collections.ConfigDict, size: int, processes: int) -> None:
  unit = size * processes // math.gcd(size, processes)
  over = f'{size} devices the batch is split over (config.mesh.data × config.mesh.fsdp)' + (
      f' and of the {processes} processes' if processes > 1 else '')
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if value % unit:
      near = sorted({max(unit, value - value % unit), value - value % unit + unit})
      raise ConfigError(f'config.{field}', value, f'must be a positive multiple of the {over}',
                        f'a multiple of {unit}, e.g. {" or ".join(map(str, near))}')
  accum = config.optimizer.grad_accum_steps
  if config.batch_size % accum:
    divisors = [d for d in range(1, config.batch_size + 1) if config.batch_size % d == 0]
    raise ConfigError('config.optimizer.grad_accum_steps', accum,
                      f'must be ≥ 1 and divide config.batch_size={config.batch_size}',
                      f'one of {divisors}')


def _check_loss(config: ml_collections.ConfigDict, model: Any, num_classes: int) -> None:
  options = config.loss.options.to_dict()
  try:  # the loss module's own checks, in this module's one-line form
    terms = losses.check_terms(dict(config.loss.terms))
    losses.check_options(options, terms)
  except losses.LossConfigError as e:
    if e.what:  # a name that is not among the valid ones (possibly none)
      raise choice_error(e.field, e.value, e.choices, e.what, key=e.key) from None
    raise ConfigError(e.field, e.value, e.problem, e.expected) from None
  # Tracing each term on abstract inputs runs its own checks of shapes and option values.
  logits = jax.ShapeDtypeStruct((1, 8, 8, num_classes), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, 8, 8), jnp.int32)
  ignore = None if config.data.ignore_label is None else IGNORE_CLASS
  for name in losses.active_terms(terms):
    kwargs = dict(options.get(name, {}), ignore_label=ignore)
    try:
      jax.eval_shape(lambda x, y, fn=losses.LOSSES[name], kw=kwargs: fn(x, y, **kw), logits,
                     labels)
    except (ValueError, TypeError) as e:
      if name in options:
        raise ConfigError(f'config.loss.options.{name}', options[name],
                          f'is rejected by the {name!r} loss: {e}',
                          f'valid values of its options {list(losses.loss_options(name))}'
                          ) from None
      raise ConfigError(f'config.loss.terms.{name}', terms[name],
                        f'cannot be used with the {num_classes}-class logits of the model: {e}',
                        f'a loss for {num_classes}-class logits, e.g. cross_entropy') from None
  weights = config.loss.deep_supervision_weights
  heads = (model.levels() if getattr(model, 'deep_supervision', False)
           and getattr(model, 'prune_level', None) is None else 1)
  if weights is not None and (len(weights) != heads or not sum(weights) > 0):
    raise ConfigError('config.loss.deep_supervision_weights', tuple(weights),
                      f'does not fit the {heads} output head(s) of config.model',
                      f'{heads} numbers ≥ 0 with a positive sum, or None')


def evaluation_metric_names(config: ml_collections.ConfigDict) -> list[str]:
  """The score names evaluation produces for this config, by running its accumulators on a
  tiny synthetic batch (numpy only; nothing is compiled)."""
  names = tuple(config.data.class_names)
  confusion = np.eye(len(names), dtype=np.int64)
  keys = list(metrics.segmentation_scores(confusion, class_names=names))
  labels = np.zeros((1, 4, 4), np.int32)
  labels[:, 1:3, 1:3] = 1
  probabilities = np.full((1, 4, 4, len(names)), 1 / len(names), np.float32)
  for extra in evaluator.extra_metrics(config):
    extra.reset()
    extra.update(probabilities, labels)
    keys += list(extra.result())
  return keys


def _check_metric(config: ml_collections.ConfigDict) -> None:
  metric, mode = config.checkpoint.best_metric, config.checkpoint.best_mode
  names = evaluation_metric_names(config)
  if metric not in names:
    raise choice_error('config.checkpoint.best_metric', metric, names,
                        'the metrics evaluation produces')
  lower_is_better = 'error' in metric or metric.startswith('hd')
  if lower_is_better != (mode == 'min'):
    raise ConfigError('config.checkpoint.best_mode', mode,
                      f'keeps the worst checkpoints by config.checkpoint.best_metric={metric!r}',
                      f"best_mode={'min' if lower_is_better else 'max'!r}")


def _check_data(config: ml_collections.ConfigDict, *, data_paths: bool) -> None:
  data = config.data
  if data.folds < 2 and not data.val_indices:
    raise ConfigError('config.data.val_indices', data.val_indices, 'is empty',
                      'the indices of the validation examples')
  if data.source == 'procedural':
    takes = set(inspect.signature(procedural.make_em_like).parameters)
    unknown = sorted(set(data.procedural.keys()) - takes)
    if unknown:
      raise choice_error(f'config.data.procedural.{unknown[0]}', data.procedural[unknown[0]],
                          sorted(takes), 'the options of procedural.make_em_like', key=unknown[0])
    count = data.procedural.num_images
    val = set(data.val_indices)
    if data.folds < 2 and (max(val) >= count or len(val) >= count):
      raise ConfigError('config.data.val_indices', data.val_indices,
                        f'does not leave training examples among the '
                        f'config.data.procedural.num_images={count}',
                        f'indices in [0, {count}) that hold out fewer than {count}')
    if data.folds > count:
      raise ConfigError('config.data.folds', data.folds, f'exceeds the {count} examples',
                        f'2 to {count} folds')
  if not data_paths:
    return
  for field, value, problem, expected in sources.SOURCES[data.source].path_problems(data):
    for path in ([value] if isinstance(value, str) else value or ()):
      # A bucket that is missing or refuses this account is the cause to name, not the path.
      storage.check_readable(path, field=f'config.data.{field}')
    raise ConfigError(f'config.data.{field}', value, problem, expected)


def _check_augment(spec: str) -> None:
  """The spec parses with known ops, keywords and values (transforms.parse_augment)."""
  names = [re.match(r'\s*(\w*)', piece).group(1) for piece in spec.split('|') if piece.strip()]
  unknown = [name for name in names if name not in transforms.OPS]
  if unknown:
    raise ConfigError('config.data.augment', spec, f'has the unknown op {unknown[0]!r}'
                      f'{did_you_mean(unknown[0], transforms.OPS)}',
                      f'ops from {", ".join(sorted(transforms.OPS))}')
  try:
    transforms.parse_augment(spec)
  except ValueError as e:  # a bad keyword or value; the message names the op
    raise ConfigError('config.data.augment', spec,
                      f': {str(e).removeprefix(transforms.SPEC_FIELD + ": ")}',
                      'op(key=value, ...)|op|... with the keywords and ranges of '
                      'unet_jax/geometric.py and intensity.py') from None


def _check_sweep(config: ml_collections.ConfigDict) -> None:
  """The sampler and pruner build from their options; the heartbeat fits the grace period."""
  sweep = config.sweep
  for part, make in (('sampler', lambda: engines.make_sampler(sweep, seed=0)),
                     ('pruner', lambda: engines.make_pruner(sweep))):
    try:
      with warnings.catch_warnings():  # Optuna marks some of them experimental
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        make()
    except (TypeError, ValueError) as e:
      name = sweep[part].name
      table = engines.SAMPLERS if part == 'sampler' else engines.PRUNERS
      raise ConfigError(f'config.sweep.{part}.options', sweep[part].options.to_dict(),
                        f'is rejected by the {name!r} {part}: {" ".join(str(e).split())}',
                        f'keyword options of optuna\'s {table[name].__name__}') from None
  if sweep.grace_seconds <= sweep.heartbeat_seconds:
    raise ConfigError('config.sweep.grace_seconds', sweep.grace_seconds,
                      f'is not longer than config.sweep.heartbeat_seconds='
                      f'{sweep.heartbeat_seconds}, so live trials would be taken for dead',
                      f'several heartbeats, e.g. {sweep.heartbeat_seconds * 6}')


def validate(config: ml_collections.ConfigDict, *, mode: str = 'train',
             spatial_rank: int | None = None, data_paths: bool = True,
             devices: Sequence[Any] | None = None) -> None:
  """Raises ConfigError for the first mistake in `config`; loads no data, compiles nothing.

  Args:
    config: a whole config (see experiments/isbi.py).
    mode: one of MODES. 'predict' and 'export' read no data and use no training batches, so
      data paths and batch sizes are not checked for them; 'compile' checks the batches against
      `devices` and reads no data.
    spatial_rank: 2 or 3; default from config.data.source.
    data_paths: check that the source's files and folders exist (train and eval).
    devices: the devices the run will use (default: jax.devices()); ahead-of-time compiles pass
      the target's.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not one of {MODES}')
  check_types(config)
  check_names_and_ranges(config)
  num_classes = _check_classes(config)
  rank = spatial_rank or sources.spatial_rank(config.data)
  model = _check_model(config, num_classes, rank)
  _check_augment(config.data.augment)
  size = data_parallel_size(config, devices)
  if mode in ('train', 'eval', 'compile'):
    processes = jax.process_count() if devices is None else sharding.process_count(devices)
    _check_batches(config, size, processes)
  _check_loss(config, model, num_classes)
  _check_metric(config)
  _check_sweep(config)
  _check_data(config, data_paths=data_paths and mode in ('train', 'eval'))


def validate_points(config: ml_collections.ConfigDict, points: Sequence[Mapping[str, Any]], *,
                    mode: str = 'train') -> None:
  """Validates every point of a sweep (override dicts of dotted paths) applied to `config`."""
  if not points:
    raise ConfigError('sweep()', list(points), 'returned no points', 'a list of override dicts')
  for index, point in enumerate(points):
    try:
      for path, value in point.items():
        overrides.check_path(config, path, value)
      try:
        point_config = overrides.apply_overrides(config, point)
      except TypeError as e:  # ml_collections refuses a value of another type than the field's
        raise ConfigError('the point', dict(point), f'cannot be applied: {e}',
                          'values of the types of the fields they set') from None
      validate(point_config, mode=mode)
    except ConfigError as e:
      raise e.within(f'sweep point {index + 1} of {len(points)}: {dict(point)}') from None


_FLAG_VALUE = re.compile(r'^flag --config\.([\w.]+)=(.*?): (.*)$', re.S)


def flag_error(error: Exception, argv: Sequence[str]) -> str:
  """One line for a failed parse of launch.py's flags.

  ml_collections rejects an unknown `--config.a.b` key with a KeyError/AttributeError that names
  neither the flag nor the config, and a value of the wrong type with an absl flag error; both
  become `config.<field>=<value> ...; expected ...` with the closest fields or the field's type.
  """
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None and '--config' in argv[:-1]:
    spec = argv[argv.index('--config') + 1]
  given = [a[len('--config.'):].split('=', 1) for a in argv if a.startswith('--config.')]
  config = None
  if spec:
    try:
      config = overrides.load_config_file(spec)
    except Exception as e:  # pylint: disable=broad-except  (whatever the config file raised)
      return ' '.join(f'--config={spec} cannot be loaded: {type(e).__name__}: {e}'.split())
  match = _FLAG_VALUE.match(str(error))
  if config is not None and match and has(config, match.group(1)):
    path, raw, reason = match.groups()
    current = get(config, path)
    parent, _, leaf = path.rpartition('.')
    kind = (get(config, parent) if parent else config).get_type(leaf).__name__
    return str(ConfigError(f'config.{path}', raw, f'cannot be read as {kind} ({reason})',
                           f'{kind} like the config file\'s value {current!r}'))
  if config is not None:
    for path, *value in given:
      try:
        overrides.check_path(config, path, value[0] if value else True)
      except ConfigError as e:
        return str(e)
  return ' '.join(str(error).split()) or type(error).__name__
