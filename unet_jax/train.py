"""Training: a pure jitted step and the one loop that drives it.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function; the model, optimizer,
loss and options are bound with functools.partial, the state is donated, and shardings come from
`jax.eval_shape`: the batch is split over the mesh, the state replicated or split over 'fsdp'.

The loop evaluates every `eval_every` steps, checkpoints with the data iterator position and the
early-stopping record (so a resumed run continues exactly), stops early when the monitored
metric stalls, halts on a non-finite loss (or skips such steps), and on SIGTERM saves and returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from unet_jax import checkpointing
from unet_jax import device_augment
from unet_jax import evaluation
from unet_jax import input_pipeline
from unet_jax import losses
from unet_jax import metric_writers
from unet_jax import optimizers
from unet_jax import sharding
from unet_jax import sources
from unet_jax.models import blocks
from unet_jax.models import build_model

log = logging.getLogger('unet_jax')
NONFINITE_POLICIES = ('halt', 'skip')
AUGMENT_ON = ('host', 'device')


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # {} when config.optimizer.ema_decay == 0


def init_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...], ema: bool) -> TrainState:
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else {})


def _loss_and_grads(params, batch_stats, batch, rng, *, model, loss_fn):
  """Loss, its parts, accuracy, new batch statistics and gradients on one (micro-)batch."""

  def compute_loss(params):
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                   batch['image'], train=True, rngs={'dropout': rng},
                                   mutable=['batch_stats'])
    final = evaluation.final_logits(outputs)
    # A VALID net predicts the centre of its input crop; labels and weights follow it.
    crop = lambda x: blocks.center_crop(x[..., None], final.shape[1:-1])[..., 0]
    labels = crop(batch['label'])
    weights = crop(batch['weight']) if 'weight' in batch else None
    total, parts = loss_fn(outputs, labels, weights=weights)
    valid = (labels >= 0) & (labels < final.shape[-1])
    accuracy = jnp.sum((jnp.argmax(final, -1) == labels) & valid) / jnp.maximum(valid.sum(), 1)
    return total, (parts, accuracy, updates.get('batch_stats', batch_stats))

  (loss, (parts, accuracy, new_stats)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(params)
  return loss, parts, accuracy, new_stats, grads


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
               schedule: optax.Schedule, accum_steps: int = 1, ema_decay: float = 0.0,
               skip_nonfinite: bool = False, augment: Callable | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch.

  `augment(rng, batch) -> batch`, when given, augments the batch on the device first (for hosts
  with few CPU cores per accelerator).

  With `accum_steps` > 1 the batch is processed as that many equal micro-batches whose
  gradients are averaged: the same update as the whole batch (for losses that average over
  examples, and without batch norm) in a fraction of the activation memory.
  """
  rng = jax.random.fold_in(rng, state.step)
  if augment is not None:
    augment_rng, rng = jax.random.split(rng)
    batch = augment(augment_rng, batch)
  grad_fn = functools.partial(_loss_and_grads, model=model, loss_fn=loss_fn)
  if accum_steps == 1:
    loss, parts, accuracy, batch_stats, grads = grad_fn(state.params, state.batch_stats, batch, rng)
  else:
    # Micro-batch i takes rows i, i + k, i + 2k, ...: every device contributes to each one.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]),
                               0, 1), batch)

    def body(carry, inputs):
      grads_sum, stats = carry
      micro_batch, index = inputs
      loss, parts, accuracy, stats, grads = grad_fn(
          state.params, stats, micro_batch, jax.random.fold_in(rng, index))
      return (jax.tree.map(jnp.add, grads_sum, grads), stats), (loss, parts, accuracy)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats), (loss, parts, accuracy) = jax.lax.scan(
        body, (zeros, state.batch_stats), (micro, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss, accuracy = loss.mean(), accuracy.mean()
    parts = jax.tree.map(jnp.mean, parts)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = (optimizers.update_ema(state.ema_params, params, decay=ema_decay, step=state.step)
         if ema_decay else state.ema_params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:  # keep every old value, only count the step
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
  metrics = {'loss': loss, 'pixel_accuracy': accuracy, 'grad_norm': grad_norm,
             'learning_rate': schedule(state.step), 'nonfinite_steps': 1 - finite.astype(jnp.int32),
             **{f'loss_{k}': v for k, v in parts.items()}}
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the loop and the eval mode both need: built once per run from the config."""

  mesh: jax.sharding.Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Callable[[jax.Array], TrainState]
  state_sharding: Any
  abstract_state: Any
  border: tuple[int, ...]


def crop_shape(config: ml_collections.ConfigDict, spatial_rank: int) -> tuple[int, ...]:
  """config.data.crop_size as one size per spatial dim (an int means a square/cube)."""
  crop = config.data.crop_size
  shape = tuple(crop) if isinstance(crop, (tuple, list)) else (int(crop),) * spatial_rank
  if len(shape) != spatial_rank:
    raise ValueError(f'config.data.crop_size={crop} has {len(shape)} sizes for data with '
                     f'{spatial_rank} spatial dims')
  return shape


def check_config(config: ml_collections.ConfigDict, spatial_rank: int = 2) -> tuple[int, ...]:
  """Checks the config up front (config_validation.validate, without the data paths, which the
  loaders check themselves); ConfigError names the field. Nothing is compiled.

  Returns the mirror border per spatial dim: what the model trims from a crop on each side.
  """
  from unet_jax import config_validation  # pylint: disable=g-import-not-at-top  (it imports us)
  config_validation.validate(config, spatial_rank=spatial_rank, data_paths=False)
  model = build_model(config.model, num_classes=len(config.data.class_names))
  crop = crop_shape(config, spatial_rank)
  return tuple((c - model.output_size(c)) // 2 for c in crop)


def build(config: ml_collections.ConfigDict, *, input_channels: int, spatial_rank: int) -> Setup:
  border = check_config(config, spatial_rank)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  local_batch = sharding.check_batch_size(config.batch_size, mesh, field='config.batch_size')
  model = build_model(config.model, num_classes=len(config.data.class_names))
  tx, schedule = optimizers.make_optimizer(config.optimizer, num_steps=config.num_steps)
  input_shape = (local_batch, *crop_shape(config, spatial_rank), input_channels)
  init_fn = functools.partial(init_state, model=model, tx=tx, input_shape=input_shape,
                              ema=config.optimizer.ema_decay > 0)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  state_sharding = sharding.state_shardings(abstract, mesh)
  return Setup(mesh, model, tx, schedule, init_fn, state_sharding,
               checkpointing.abstract_with_shardings(abstract, state_sharding), border)


def make_step_fn(config: ml_collections.ConfigDict, setup: Setup) -> Callable:
  """The jitted, sharded train step with the config's statics bound; the state is donated."""
  step = functools.partial(
      train_step, model=setup.model, tx=setup.tx, schedule=setup.schedule,
      loss_fn=losses.make_loss(
          dict(config.loss.terms), options=config.loss.options.to_dict(),
          deep_supervision_weights=config.loss.deep_supervision_weights,
          # Sources store ignored pixels as IGNORE_CLASS when config.data.ignore_label is set.
          ignore_label=None if config.data.ignore_label is None else sources.IGNORE_CLASS),
      accum_steps=config.optimizer.grad_accum_steps, ema_decay=config.optimizer.ema_decay,
      skip_nonfinite=config.nonfinite == 'skip',
      augment=functools.partial(device_augment.augment_batch, spec=config.data.augment,
                                mean=config.data.mean, std=config.data.std)
      if config.data.augment_on == 'device' else None)
  mesh = setup.mesh
  return jax.jit(step, in_shardings=(setup.state_sharding, sharding.batch_sharding(mesh),
                                     sharding.replicated(mesh)),
                 out_shardings=(setup.state_sharding, sharding.replicated(mesh)),
                 donate_argnums=(0,))


def make_manager(config: ml_collections.ConfigDict, workdir: str):
  return checkpointing.make_manager(
      os.path.join(workdir, 'checkpoints'), keep_best=config.checkpoint.keep_best,
      best_metric=config.checkpoint.best_metric, best_mode=config.checkpoint.best_mode,
      keep_latest=config.checkpoint.keep_latest)


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


def _spatial_rank(config: ml_collections.ConfigDict) -> int:
  return 3 if config.data.source in ('isbi_volume', 'volumes') else 2


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains to `config.num_steps` (resuming from `workdir`); returns the final validation scores.

  Returns an empty dict when stopped by SIGTERM after saving a checkpoint. A workdir that holds
  a run with another config (beyond RESUMABLE_CHANGES) is refused unless `allow_config_change`.
  """
  check_config(config, _spatial_rank(config))
  check_workdir(config, workdir, allow_config_change=allow_config_change)
  chief = jax.process_index() == 0
  dataset = input_pipeline.load_dataset(config.data)
  train_set, val_set = input_pipeline.split_dataset(dataset, config.data)
  setup = build(config, input_channels=dataset.images.shape[-1],
                spatial_rank=dataset.labels.ndim - 1)
  mesh = setup.mesh
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.key(config.seed))
  local_batch = config.batch_size // jax.process_count()
  train_iter = input_pipeline.train_iterator(
      train_set, config.data, batch_size=local_batch, border=setup.border, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = make_manager(config, workdir)
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
    log.info('%s from step %d; %d train / %d val examples; %d devices; %s parameters',
             'resuming' if start_step else 'starting', start_step, len(train_set), len(val_set),
             mesh.size, f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')

  step_fn = make_step_fn(config, setup)
  eval_fn = evaluation.make_eval_fn(setup.model, mesh, len(config.data.class_names))
  extras = evaluation.extra_metrics(config)
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
        scores = evaluation.evaluate(eval_fn, state, val_set, config, setup.model, mesh,
                                     extra_metrics=extras)
        writer.write_scalars(step, {f'val/{k}': v for k, v in scores.items()})
        bar.write(f'step {step}: ' + evaluation.format_scores(scores, config.data.class_names))
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
    scores = evaluation.evaluate(eval_fn, state, val_set, config, setup.model, mesh,
                                 extra_metrics=extras)
  if chief:
    with open(os.path.join(workdir, 'final_metrics.json'), 'w', encoding='utf-8') as f:
      json.dump({'step': int(state.step), 'stopped_early': stopped_early, **scores}, f, indent=2,
                sort_keys=True)
    log.info('final (step %d): %s', int(state.step),
             evaluation.format_scores(scores, config.data.class_names))
    if 'isbi_rand_error' in scores:
      log.info('ISBI 2012 metrics on the held-out slices: %s', evaluation.paper_comparison(scores))
  from unet_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib only at the end)
  plots.write_run_plots(state, setup.model, val_set, config, mesh, workdir, chief)
  writer.close()
  manager.close()
  return scores
