"""Drivers over the one training loop: evaluate a checkpoint, sweeps, K-fold cross-validation.

A sweep is a list of override dicts (dotted config paths → values) that a config file returns
from `sweep()`; `grid` and `random_search` build such lists. Each point trains in a workdir of its
own, so a sweep interrupted half way resumes where it stopped. Results are written as CSV and
markdown, ranked by the monitored metric (config.checkpoint.best_metric), and plotted against
every swept hyperparameter in sweep.png (unet_jax/training/plots.py).

Each driver validates the configs it runs (every sweep point and fold up front, before the
first one trains), so a mistake in the last point is reported before hours of training.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from unet_jax import checkpointing
from unet_jax import storage
from unet_jax.config import validation
from unet_jax.config.overrides import apply_overrides
from unet_jax.datasets import sources
from unet_jax.evaluation import evaluator
from unet_jax.training import loop
from unet_jax.training import plots
from unet_jax.training import train_step
from unet_jax.training import workdir as workdir_lib

log = logging.getLogger('unet_jax')
SPLITS = ('val', 'train', 'all')
# Fields that define the trained model: evaluating with other values cannot use its checkpoint.
MODEL_FIELDS = ('model.', 'data.class_names', 'data.mean', 'data.std')
TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, float]]


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """Every combination: grid(**{'optimizer.learning_rate': [1e-3, 1e-4], 'model.width': [8]})."""
  names = list(axes)
  return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def random_search(count: int, *, seed: int = 0,
                  **axes: Callable[[np.random.Generator], Any]) -> list[dict[str, Any]]:
  """`count` points, each axis drawn by its sampler, e.g. lambda r: 10 ** r.uniform(-4, -2)."""
  rng = np.random.default_rng(seed)
  return [{name: _plain(sample(rng)) for name, sample in axes.items()} for _ in range(count)]


def _plain(value: Any) -> Any:
  return value.item() if isinstance(value, np.generic) else value


def _rank(rows: list[dict[str, Any]], config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  metric, maximise = config.checkpoint.best_metric, config.checkpoint.best_mode == 'max'

  def key(row):
    value = row.get(metric, float('nan'))
    return (not np.isfinite(value), -value if maximise else value)

  return sorted(rows, key=key)


def write_table(rows: list[dict[str, Any]], path_stem: str, *, columns: Sequence[str]) -> None:
  """`path_stem`.csv and `path_stem`.md with the given columns in order."""
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  storage.write_atomic(path_stem + '.csv', text.getvalue())
  fmt = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fmt(row.get(c, '')) for c in columns) + ' |' for row in rows]
  storage.write_atomic(path_stem + '.md', '\n'.join(lines) + '\n')


def _score_columns(config: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> list[str]:
  first = config.checkpoint.best_metric
  seen = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)} - {first})
  return [first, *seen]


def run_sweep(config: ml_collections.ConfigDict, workdir: str,
              points: Sequence[Mapping[str, Any]], *, train_fn: TrainFn = loop.train_and_evaluate
              ) -> list[dict[str, Any]]:
  """Trains each point in `workdir/NNN`; returns rows ranked by the monitored metric."""
  validation.validate_points(config, points)
  configs = [apply_overrides(config, p) for p in points]
  rows = []
  for index, (point, point_config) in enumerate(zip(points, configs)):
    run_dir = storage.join(workdir, f'{index:03d}')
    log.info('sweep point %d/%d: %s', index + 1, len(points), dict(point))
    scores = train_fn(point_config, run_dir)
    rows.append({'run': f'{index:03d}', **{k: _plain(v) for k, v in point.items()}, **scores})
  ranked = _rank(rows, config)
  if jax.process_index() == 0:
    columns = ['run', *points[0].keys(), *_score_columns(config, rows)]
    write_table(ranked, storage.join(workdir, 'sweep_results'), columns=columns)
    swept = list(dict.fromkeys(k for p in points for k in p))
    try:
      plots.plot_sweep(ranked, workdir, config.checkpoint.best_metric, params=swept,
                       maximise=config.checkpoint.best_mode == 'max')
    except Exception as e:  # pylint: disable=broad-except  (the ranking is written; keep it)
      log.warning('sweep.png not written to %s (%s: %s)', workdir, type(e).__name__, e)
  return ranked


def kfold_indices(count: int, folds: int) -> list[tuple[int, ...]]:
  """`folds` disjoint, contiguous validation folds covering range(count) (nearly equal sizes).

  Contiguous folds keep neighbouring slices of a stack together, so a validation slice never
  has its near-duplicate neighbour in training.
  """
  if not 2 <= folds <= count:
    raise ValueError(f'config.data.folds={folds} must be between 2 and the number of examples '
                     f'({count})')
  return [tuple(int(i) for i in part) for part in np.array_split(np.arange(count), folds)]


def run_kfold(config: ml_collections.ConfigDict, workdir: str, *,
              train_fn: TrainFn = loop.train_and_evaluate) -> dict[str, Any]:
  """Trains config.data.folds runs in `workdir/fold_K`; writes and returns mean ± std."""
  validation.validate(config)
  count = len(sources.load_dataset(config.data))
  folds = [apply_overrides(config, {'data.val_indices': val, 'data.folds': 0})
           for val in kfold_indices(count, config.data.folds)]
  for fold_config in folds:
    validation.validate(fold_config)
  rows = []
  for fold, fold_config in enumerate(folds):
    val = tuple(fold_config.data.val_indices)
    log.info('fold %d/%d: validation examples %s', fold + 1, config.data.folds, val)
    scores = train_fn(fold_config, storage.join(workdir, f'fold_{fold}'))
    rows.append({'fold': fold, **scores})
  keys = [k for k in _score_columns(config, rows) if all(k in r for r in rows)]
  summary = {k: {'mean': float(np.mean([r[k] for r in rows])),
                 'std': float(np.std([r[k] for r in rows]))} for k in keys}
  if jax.process_index() == 0:
    storage.write_atomic(storage.join(workdir, 'kfold.json'),
                         json.dumps({'folds': rows, 'summary': summary}, indent=2))
    table = rows + [{'fold': 'mean ± std',
                     **{k: f'{v["mean"]:.4f} ± {v["std"]:.4f}' for k, v in summary.items()}}]
    write_table(table, storage.join(workdir, 'kfold'), columns=['fold', *keys])
  log.info('%d-fold %s: %.4f ± %.4f', config.data.folds, config.checkpoint.best_metric,
           summary[keys[0]]['mean'], summary[keys[0]]['std'])
  return {'folds': rows, 'summary': summary}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, split: str = 'val',
                        checkpoint: str = 'best') -> dict[str, float]:
  """Scores a saved checkpoint ('best', 'latest' or a step number) on a split; writes JSON."""
  if split not in SPLITS:
    raise ValueError(f'--split={split!r} is not one of {SPLITS}')
  validation.validate(config, mode='eval')
  # Another model than the one trained would fail deep inside the restore; say which fields.
  changed = [d for d in workdir_lib.config_differences(config, workdir, ignore=())
             if d.startswith(MODEL_FIELDS)]
  if changed:
    raise ValueError(f'the config differs from the one {workdir} was trained with '
                     f'({"; ".join(changed[:5])}); evaluate with that config (its config.json)')
  dataset = sources.load_dataset(config.data)
  train_set, val_set = sources.split_dataset(dataset, config.data)
  subset = {'val': val_set, 'train': train_set, 'all': dataset}[split]
  setup = train_step.build(config, input_channels=dataset.images.shape[-1],
                           spatial_rank=dataset.labels.ndim - 1)
  # Read-only: evaluating next to a run that is still training never touches its saves.
  manager = checkpointing.run_manager(config, workdir, read_only=True)
  step = checkpointing.choose_step(manager, checkpoint)
  state, _ = checkpointing.restore(manager, step, setup.abstract_state)
  eval_fn = evaluator.make_eval_fn(setup.model, setup.mesh, len(config.data.class_names))
  scores = evaluator.evaluate(eval_fn, state, subset, config, setup.model, setup.mesh,
                               extra_metrics=evaluator.extra_metrics(config))
  if jax.process_index() == 0:
    path = storage.join(workdir, f'eval_{split}_step{step}.json')
    storage.write_atomic(path, json.dumps({'step': step, 'split': split, **scores}, indent=2,
                                          sort_keys=True))
    log.info('checkpoint %d on %s (%d examples): %s', step, split, len(subset),
             evaluator.format_scores(scores, config.data.class_names))
    if 'isbi_rand_error' in scores and config.data.source in evaluator.ISBI_SOURCES:
      log.info('ISBI 2012 metrics: %s', evaluator.paper_comparison(scores))
  manager.close()
  return scores
