"""The one training loop: steps, evaluation, checkpoints, early stopping, preemption.

`train_and_evaluate(config, workdir)` trains to `config.num_steps`, resuming from the workdir.
It evaluates every `eval_every` steps, checkpoints with the data iterator position and the
early-stopping record (so a resumed run continues exactly), stops early when the monitored
metric stalls, halts on a non-finite loss (or skips such steps, `config.nonfinite`), says so
when the run diverges (`config.divergence`), and on SIGTERM or Ctrl-C saves and returns. One
launcher at a time holds the workdir (training/workdir.py). The config is validated by the
caller (launch.py, runs.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from unet_jax import checkpointing
from unet_jax import sharding
from unet_jax import storage
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
DIVERGENCE_POLICIES = ('halt', 'warn')


class DivergenceError(FloatingPointError):
  """The loss ran far above where it started (config.divergence.policy='halt')."""


class _StopSignal:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks between steps,
  so both save a checkpoint and end the run cleanly."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = threading.Event()
    self.name = ''
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.name = signal.Signals(signum).name
    self.received.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


class _Divergence:
  """Says when a run diverges: the loss far above its first step's, or every validation pixel
  predicted as one class. The first halts under policy 'halt'; the second is always a warning,
  since an early, barely trained model may do it too."""

  def __init__(self, config: ml_collections.ConfigDict, record: dict[str, Any] | None):
    self.policy, self.factor = config.divergence.policy, config.divergence.loss_factor
    self.class_names = tuple(config.data.class_names)
    self.reference = (record or {}).get('reference_loss')

  def first_step(self, loss: float) -> None:
    if self.reference is None and np.isfinite(loss):
      self.reference = float(loss)

  def check_loss(self, step: int, loss: float) -> None:
    if self.reference is None or not np.isfinite(loss):
      return
    if loss > self.factor * max(abs(self.reference), 1e-8):
      message = (f'the run diverged: the loss is {loss:.6g} at step {step}, more than '
                 f'config.divergence.loss_factor={self.factor:g} × its first step\'s '
                 f'{self.reference:.6g}; lower config.optimizer.learning_rate or set '
                 'config.optimizer.grad_clip_norm')
      if self.policy == 'halt':
        raise DivergenceError(message + ' (the last checkpoint before it is kept)')
      log.warning(message)

  def check_scores(self, step: int, scores: dict[str, float]) -> None:
    recalls = [scores.get(f'recall_{c}') for c in self.class_names]
    if None in recalls or sorted(recalls) != [0.0] * (len(recalls) - 1) + [1.0]:
      return
    only = self.class_names[recalls.index(1.0)]
    log.warning('the model predicts every validation pixel as %r at step %d: it has collapsed '
                '(or not yet learned); if training goes on like this, lower '
                'config.optimizer.learning_rate', only, step)

  def record(self) -> dict[str, Any]:
    return {'reference_loss': self.reference}


@contextlib.contextmanager
def _finish_saves_on_exit(manager, writer: metric_writers.MetricWriter):
  """Completes checkpoints still being written, also when the loop halts with an error; then,
  on an error (a sweep's pruning included), closes the writer and the manager, whose threads
  would otherwise outlive the run in a process that goes on (a sweep worker)."""
  try:
    yield
  except BaseException:
    try:
      checkpointing.wait(manager)
    finally:
      for close in (writer.close, manager.close):
        with contextlib.suppress(Exception):  # the error that ended the run is the one to see
          close()
    raise
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
                       allow_config_change: bool = False, restart: bool = False,
                       on_eval: Callable[[int, dict[str, float]], None] | None = None
                       ) -> dict[str, float]:
  """Trains to `config.num_steps` (resuming from `workdir`); returns the final validation scores.

  Returns an empty dict when stopped by SIGTERM or SIGINT after saving a checkpoint. A workdir
  that holds a run with another config (beyond RESUMABLE_CHANGES) is refused unless
  `allow_config_change`, and one that another live launcher holds is refused. `restart` trains
  from step 0 when the workdir has checkpoints but none is readable (they are kept in
  checkpoints_quarantine/). `on_eval(step, scores)` is called after each evaluation, once its
  checkpoint is saved; an exception it raises (a sweep's pruning) ends the run there.
  """
  workdir_lib.check_workdir(config, workdir, allow_config_change=allow_config_change)
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(config, workdir, restart=restart, on_eval=on_eval)


def _train(config: ml_collections.ConfigDict, workdir: str, *, restart: bool,
           on_eval: Callable[[int, dict[str, float]], None] | None) -> dict[str, float]:
  chief = jax.process_index() == 0
  dataset = sources.load_dataset(config.data)
  train_set, val_set = sources.split_dataset(dataset, config.data)
  setup = train_step.build(config, input_channels=dataset.images.shape[-1],
                spatial_rank=dataset.labels.ndim - 1)
  mesh = setup.mesh
  state = train_step.initial_state(setup, config.seed)
  local_batch = config.batch_size // jax.process_count()
  train_iter = pipeline.train_iterator(
      train_set, config.data, batch_size=local_batch, border=setup.border, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.run_manager(config, workdir)
  restored = checkpointing.restore_latest(manager, setup.abstract_state, restart=restart)
  extra = {}
  if restored is not None:
    state, extra = restored
    train_iter.set_state(extra['iterator'])
  early_stopping = _EarlyStopping(config, extra.get('early_stopping'))
  divergence = _Divergence(config, extra.get('divergence'))
  start_step = int(state.step)
  if chief:
    storage.write_atomic(storage.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    # Prediction and export apply the intensity rule the model was trained with.
    image_files.save_scaling(dataset.scaling or image_files.IntensityScaling(), workdir)
    log.info('%s from step %d; %d train / %d val examples; %d devices; %s parameters',
             'resuming' if start_step else 'starting', start_step, len(train_set), len(val_set),
             mesh.size, f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')

  step_fn = sharding.compile_then_wait(train_step.make_step_fn(config, setup),
                                       'train step compiled')
  eval_fn = sharding.compile_then_wait(
      evaluator.make_eval_fn(setup.model, mesh, len(config.data.class_names),
                             tta=config.eval.tta), 'eval step compiled')
  extras = evaluator.extra_metrics(config)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  def save(step, scores=None):
    extra = {'iterator': train_iter.get_state(), 'early_stopping': early_stopping.record(),
             'divergence': divergence.record()}
    writer.flush()  # the metrics of the steps a checkpoint covers are stored before it is
    checkpointing.save(manager, step, state, extra,
                       metrics={k: v for k, v in (scores or {}).items() if np.isfinite(v)} or None)

  writer = metric_writers.MetricWriter(workdir, enabled=chief)
  bar = metric_writers.progress_bar(config.num_steps, start_step, enabled=chief)
  scores: dict[str, float] = {}
  pending: list[dict[str, jax.Array]] = []
  last_time, last_step = time.perf_counter(), start_step
  stopped_early = preempted = False
  # Closing the bar ends its line, so an error message starts on a line of its own.
  with _StopSignal() as stop, _finish_saves_on_exit(manager, writer), contextlib.closing(bar):
    for step in range(start_step + 1, config.num_steps + 1):
      state, step_metrics = step_fn(state, sharding.to_global(next(train_iter), mesh), step_rng)
      pending.append(step_metrics)
      if step == start_step + 1:  # the first step compiled: its time is not the ETA's
        divergence.first_step(float(jax.device_get(step_metrics['loss'])))
        bar.unpause()
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
        divergence.check_loss(step, summary['loss'])
        writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
        bar.set_postfix(loss=f'{summary["loss"]:.4f}', img_s=f'{summary["images_per_second"]:.1f}')
      if eval_now:
        scores = evaluator.evaluate(eval_fn, state, val_set, config, setup.model, mesh,
                                     extra_metrics=extras)
        writer.write_scalars(step, {f'val/{k}': v for k, v in scores.items()})
        bar.write(f'step {step}: ' + evaluator.format_scores(scores, config.data.class_names))
        divergence.check_scores(step, scores)
        stopped_early = early_stopping.update(scores)
        save(step, scores)
        if on_eval:
          on_eval(step, scores)
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
        log.info('%s at step %d: checkpoint saved; rerun the same command to resume',
                 stop.name or 'preemption', step)
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
    storage.write_atomic(storage.join(workdir, 'final_metrics.json'), json.dumps(
        {'step': int(state.step), 'stopped_early': stopped_early, **scores}, indent=2,
        sort_keys=True))
    log.info('final (step %d): %s', int(state.step),
             evaluator.format_scores(scores, config.data.class_names))
    if 'isbi_rand_error' in scores and config.data.source in evaluator.ISBI_SOURCES:
      log.info('ISBI 2012 metrics on the held-out slices: %s', evaluator.paper_comparison(scores))
  plots.write_run_plots(state, setup.model, val_set, config, mesh, workdir, chief)
  writer.close()
  manager.close()
  return scores
