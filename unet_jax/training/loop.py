"""The one training loop: steps, evaluation, checkpoints, early stopping, preemption.

`train_and_evaluate(config, workdir)` trains to `config.num_steps`, resuming from the workdir.
It evaluates every `eval_every` steps, checkpoints with the data iterator position and the
early-stopping record (so a resumed run continues exactly), stops early when the monitored
metric stalls, halts on a non-finite loss (or skips such steps, `config.nonfinite`), and on
SIGTERM saves and returns. The config is validated by the caller (launch.py, runs.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from unet_jax import checkpointing
from unet_jax import sharding
from unet_jax.datasets import images as image_files
from unet_jax.datasets import pipeline
from unet_jax.datasets import sources
from unet_jax.evaluation import evaluator
from unet_jax.training import metric_writers
from unet_jax.training import plots
from unet_jax.training import train_step
from unet_jax.training import workdir as workdir_lib

log = logging.getLogger('unet_jax')
NONFINITE_POLICIES = ('halt', 'skip')


class _StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

  def __init__(self):
    self.received = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.received.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@contextlib.contextmanager
def _finish_saves_on_exit(manager):
  """Completes checkpoints still being written, also when the loop halts with an error."""
  try:
    yield
  finally:
    checkpointing.wait(manager)


class _EarlyStopping:
  """Counts evaluations without improvement of the monitored metric by at least min_delta."""

  def __init__(self, config: ml_collections.ConfigDict, record: dict[str, Any] | None):
    self.metric, self.sign = config.checkpoint.best_metric, (
        1.0 if config.checkpoint.best_mode == 'max' else -1.0)
    self.patience, self.min_delta = config.early_stopping.patience, config.early_stopping.min_delta
    record = record or {}
    self.best = record.get('best')
    self.stale = record.get('stale', 0)

  def update(self, scores: dict[str, float]) -> bool:
    """Records one evaluation; True when training should stop."""
    value = scores.get(self.metric, float('nan'))
    if np.isfinite(value) and (self.best is None
                               or self.sign * (value - self.best) > self.min_delta):
      self.best, self.stale = float(value), 0
    else:
      self.stale += 1
    return self.patience > 0 and self.stale >= self.patience

  def record(self) -> dict[str, Any]:
    return {'best': self.best, 'stale': self.stale}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains to `config.num_steps` (resuming from `workdir`); returns the final validation scores.

  Returns an empty dict when stopped by SIGTERM after saving a checkpoint. A workdir that holds
  a run with another config (beyond RESUMABLE_CHANGES) is refused unless `allow_config_change`.
  """
  workdir_lib.check_workdir(config, workdir, allow_config_change=allow_config_change)
  chief = jax.process_index() == 0
  dataset = sources.load_dataset(config.data)
  train_set, val_set = sources.split_dataset(dataset, config.data)
  setup = train_step.build(config, input_channels=dataset.images.shape[-1],
                spatial_rank=dataset.labels.ndim - 1)
  mesh = setup.mesh
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.key(config.seed))
  local_batch = config.batch_size // jax.process_count()
  train_iter = pipeline.train_iterator(
      train_set, config.data, batch_size=local_batch, border=setup.border, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.run_manager(config, workdir)
  restored = checkpointing.restore_latest(manager, setup.abstract_state)
  loop_record = None
  if restored is not None:
    state, extra = restored
    train_iter.set_state(extra['iterator'])
    loop_record = extra.get('early_stopping')
  early_stopping = _EarlyStopping(config, loop_record)
  start_step = int(state.step)
  if chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    # Prediction and export apply the intensity rule the model was trained with.
    image_files.save_scaling(dataset.scaling or image_files.IntensityScaling(), workdir)
    log.info('%s from step %d; %d train / %d val examples; %d devices; %s parameters',
             'resuming' if start_step else 'starting', start_step, len(train_set), len(val_set),
             mesh.size, f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')

  step_fn = train_step.make_step_fn(config, setup)
  eval_fn = evaluator.make_eval_fn(setup.model, mesh, len(config.data.class_names))
  extras = evaluator.extra_metrics(config)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  def save(step, scores=None):
    extra = {'iterator': train_iter.get_state(), 'early_stopping': early_stopping.record()}
    checkpointing.save(manager, step, state, extra,
                       metrics={k: v for k, v in (scores or {}).items() if np.isfinite(v)} or None)

  writer = metric_writers.MetricWriter(workdir, enabled=chief)
  bar = metric_writers.progress_bar(config.num_steps, start_step, enabled=chief)
  scores: dict[str, float] = {}
  pending: list[dict[str, jax.Array]] = []
  last_time, last_step = time.perf_counter(), start_step
  stopped_early = preempted = False
  with _StopSignal() as stop, _finish_saves_on_exit(manager):
    for step in range(start_step + 1, config.num_steps + 1):
      state, step_metrics = step_fn(state, sharding.to_global(next(train_iter), mesh), step_rng)
      pending.append(step_metrics)
      bar.update(1)
      eval_now = step % config.eval_every == 0 or step == config.num_steps
      save_now = bool(config.checkpoint.every) and step % config.checkpoint.every == 0
      # Steps that save also log: the non-finite check must pass before any state is written.
      if step % config.log_every == 0 or eval_now or save_now:
        summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        summary['nonfinite_steps'] *= len(pending)
        now = time.perf_counter()
        summary['images_per_second'] = (step - last_step) * config.batch_size / (now - last_time)
        last_time, last_step, pending = now, step, []
        if not np.isfinite(summary['loss']) and config.nonfinite == 'halt':
          raise FloatingPointError(
              f'loss is {summary["loss"]} at step {step} (or within the {config.log_every} steps '
              f'before it); the last good checkpoint is kept in {manager.directory}. Lower the '
              'learning rate, set config.optimizer.grad_clip_norm, or config.nonfinite="skip"')
        writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
        bar.set_postfix(loss=f'{summary["loss"]:.4f}', img_s=f'{summary["images_per_second"]:.1f}')
      if eval_now:
        scores = evaluator.evaluate(eval_fn, state, val_set, config, setup.model, mesh,
                                     extra_metrics=extras)
        writer.write_scalars(step, {f'val/{k}': v for k, v in scores.items()})
        bar.write(f'step {step}: ' + evaluator.format_scores(scores, config.data.class_names))
        stopped_early = early_stopping.update(scores)
        save(step, scores)
        last_time = time.perf_counter()  # evaluation time is not training throughput
        if stopped_early:
          log.info('early stopping at step %d: %s did not improve by more than %g for %d '
                   'evaluations (best %.4f)', step, early_stopping.metric,
                   early_stopping.min_delta, early_stopping.patience, early_stopping.best)
          break
      elif save_now:
        save(step)  # cheap and frequent: no metrics, so it never counts among the best
      if stop.received.is_set() or (jax.process_count() > 1 and manager.reached_preemption(step)):
        if not (eval_now or save_now):
          save(step)
        preempted = True
        log.info('SIGTERM at step %d: checkpoint saved; rerun the same command to resume', step)
        break
  bar.close()
  checkpointing.wait(manager)
  if preempted:
    writer.close()
    manager.close()
    return {}

  if not scores:  # resumed a finished run: evaluate what was restored
    scores = evaluator.evaluate(eval_fn, state, val_set, config, setup.model, mesh,
                                 extra_metrics=extras)
  if chief:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w', encoding='utf-8') as f:
      json.dump({'step': int(state.step), 'stopped_early': stopped_early, **scores}, f, indent=2,
                sort_keys=True)
    log.info('final (step %d): %s', int(state.step),
             evaluator.format_scores(scores, config.data.class_names))
    if 'isbi_rand_error' in scores:
      log.info('ISBI 2012 metrics on the held-out slices: %s', evaluator.paper_comparison(scores))
  plots.write_run_plots(state, setup.model, val_set, config, mesh, workdir, chief)
  writer.close()
  manager.close()
  return scores
