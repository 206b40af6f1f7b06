"""Drivers over the one training loop: evaluate a checkpoint, K-fold cross-validation.

Each fold trains in a workdir of its own, so cross-validation interrupted half way resumes where
it stopped; the mean ± std of the scores is written as JSON and markdown. Each driver validates
the configs it runs (every fold up front, before the first one trains), so a mistake is
reported before hours of training. Sweeps are Optuna studies (unet_jax/sweeps.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from unet_jax import checkpointing
from unet_jax import sharding
from unet_jax import storage
from unet_jax.config import validation
from unet_jax.config.overrides import apply_overrides
from unet_jax.datasets import sources
from unet_jax.evaluation import evaluator
from unet_jax.training import loop
from unet_jax.training import metric_writers
from unet_jax.training import train_step
from unet_jax.training import workdir as workdir_lib

log = logging.getLogger('unet_jax')
SPLITS = ('val', 'train', 'all')
# Fields that define the trained model: evaluating with other values cannot use its checkpoint.
MODEL_FIELDS = ('model.', 'data.class_names', 'data.mean', 'data.std')
TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, float]]


def _score_columns(config: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> list[str]:
  first = config.checkpoint.best_metric
  seen = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)} - {first})
  return [first, *seen]


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
    metric_writers.write_table(table, storage.join(workdir, 'kfold'), columns=['fold', *keys])
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
  # Its first collective is the run's first: processes must not reach it far apart.
  eval_fn = sharding.compile_then_wait(
      evaluator.make_eval_fn(setup.model, setup.mesh, len(config.data.class_names),
                             tta=config.eval.tta), 'eval step compiled')
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
