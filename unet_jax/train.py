"""Training and evaluation: pure jitted steps and the loop that drives them.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(state, batch) -> confusion`
are pure functions; the model, optimizer and loss are bound with functools.partial, the state is
donated, and shardings come from `jax.eval_shape`: the batch is split over the mesh's 'data'
axis, everything else is replicated.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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
from unet_jax import inference
from unet_jax import input_pipeline
from unet_jax import losses
from unet_jax import metric_writers
from unet_jax import metrics as metrics_lib
from unet_jax import optimizers
from unet_jax import sharding
from unet_jax import visualize
from unet_jax.models import blocks
from unet_jax.models import build_model, output_size

log = logging.getLogger('unet_jax')


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               input_shape: tuple[int, ...]) -> TrainState:
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; labels are center-cropped to the output size."""
  rng = jax.random.fold_in(rng, state.step)

  def compute_loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, rngs={'dropout': rng},
                                  mutable=['batch_stats'])
    labels = blocks.center_crop(batch['label'][..., None], logits.shape[1:-1])[..., 0]
    total, terms = loss_fn(logits, labels)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return total, (terms, accuracy, updates.get('batch_stats', {}))

  (loss, (terms, accuracy, batch_stats)), grads = jax.value_and_grad(
      compute_loss, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  metrics = {'loss': loss, 'pixel_accuracy': accuracy, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': schedule(state.step), **{f'loss_{k}': v for k, v in terms.items()}}
  return new_state, metrics


def predict_classes(state: TrainState, images: jax.Array, *, model: nn.Module,
                    spatial_shape: tuple[int, ...]) -> jax.Array:
  """Argmax classes of mirror-padded images, cropped back to `spatial_shape`."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                       train=False)
  return jnp.argmax(inference.crop_to(logits, spatial_shape), axis=-1)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              num_classes: int) -> jax.Array:
  """The (C, C) confusion matrix of one global batch (padding examples are ignored)."""
  labels = batch['label']
  predictions = predict_classes(state, batch['image'], model=model,
                                spatial_shape=labels.shape[1:])
  return metrics_lib.confusion_matrix(predictions, labels, num_classes=num_classes)


def evaluate(eval_fn: Callable, state: TrainState, dataset: input_pipeline.Dataset,
             config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Exact scores over the whole split from one accumulated confusion matrix."""
  accumulator = metrics_lib.ConfusionAccumulator()
  for batch in _eval_batches(dataset, config, mesh):
    accumulator.update(eval_fn(state, sharding.to_global(batch, mesh)))
  return accumulator.result(config.data.class_names)


def _eval_batches(dataset, config, mesh):
  local_batch = sharding.check_batch_size(config.eval_batch_size, mesh,
                                          field='config.eval_batch_size')
  pads = inference.model_padding(dataset.labels.shape[1:], depth=config.model.depth,
                                 padding=config.model.padding)
  return input_pipeline.eval_batches(dataset, batch_size=local_batch, pads=pads,
                                     mean=config.data.mean, std=config.data.std,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())


def check_config(config: ml_collections.ConfigDict) -> int:
  """Checks combinations that would otherwise fail late; returns the mirror border for crops."""
  if config.model.padding not in blocks.PADDINGS:
    raise ValueError(f'config.model.padding={config.model.padding!r} is not one of '
                     f'{blocks.PADDINGS}')
  crop = config.data.crop_size
  try:
    out = output_size(crop, depth=config.model.depth, padding=config.model.padding)
  except ValueError as e:
    raise ValueError(f'config.data.crop_size={crop}: {e}') from None
  for field in ('num_steps', 'log_every', 'eval_every'):
    if config[field] < 1:
      raise ValueError(f'config.{field}={config[field]} must be ≥ 1')
  if config.checkpoint.best_metric.split('_', 1)[-1] not in (
      *config.data.class_names, 'mean', 'accuracy', 'error'):
    raise ValueError(f'config.checkpoint.best_metric={config.checkpoint.best_metric!r} names no '
                     f'evaluation metric; e.g. dice_{config.data.class_names[-1]}')
  return (crop - out) // 2


def _write_final(workdir: str, step: int, scores: dict[str, float]) -> None:
  with open(os.path.join(workdir, 'final_metrics.json'), 'w', encoding='utf-8') as f:
    json.dump({'step': step, **scores}, f, indent=2, sort_keys=True)


def _progress(total: int, initial: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, disable=not enabled, unit='step', dynamic_ncols=True,
              mininterval=2.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config.num_steps` steps (resuming from `workdir`), evaluates, returns final scores."""
  border = check_config(config)
  chief = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.num_devices)
  local_batch = sharding.check_batch_size(config.batch_size, mesh, field='config.batch_size')
  dataset = input_pipeline.load_dataset(config.data)
  train_set, val_set = input_pipeline.split(dataset, config.data.val_indices)
  class_names = tuple(config.data.class_names)
  model = build_model(config.model, num_classes=len(class_names))
  tx, schedule = optimizers.make_optimizer(config.optimizer, num_steps=config.num_steps)
  loss_fn = losses.make_loss(dict(config.loss.terms))

  crop_shape = (config.data.crop_size,) * (train_set.labels.ndim - 1)
  input_shape = (local_batch, *crop_shape, train_set.images.shape[-1])
  init_fn = functools.partial(init_state, model=model, tx=tx, input_shape=input_shape)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  abstract = jax.eval_shape(init_fn, init_rng)
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng)

  train_iter = input_pipeline.train_iterator(
      train_set, config.data, batch_size=local_batch, border=border, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  manager = checkpointing.make_manager(
      os.path.join(workdir, 'checkpoints'), keep_best=config.checkpoint.keep_best,
      best_metric=config.checkpoint.best_metric, best_mode=config.checkpoint.best_mode)
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(abstract, state_sharding))
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
  start_step = int(state.step)
  if chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    log.info('%s from step %d; %d train / %d val examples; %d devices; %s parameters',
                 'resuming' if start_step else 'starting', start_step, len(train_set),
                 len(val_set), mesh.size,
                 f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn, schedule=schedule),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model=model, num_classes=len(class_names)),
                    out_shardings=sharding.replicated(mesh))

  writer = metric_writers.MetricWriter(workdir, enabled=chief)
  bar = _progress(config.num_steps, start_step, chief)
  scores: dict[str, float] = {}
  pending = []
  last_time, last_step = time.perf_counter(), start_step
  for step in range(start_step + 1, config.num_steps + 1):
    batch = sharding.to_global(next(train_iter), mesh)
    state, step_metrics = step_fn(state, batch, step_rng)
    pending.append(step_metrics)
    bar.update(1)
    if step % config.log_every == 0 or step == config.num_steps:
      summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      now = time.perf_counter()
      summary['images_per_second'] = (step - last_step) * config.batch_size / (now - last_time)
      last_time, last_step, pending = now, step, []
      if not np.isfinite(summary['loss']):
        raise FloatingPointError(f'loss is {summary["loss"]} at step {step}; the last good '
                                 f'checkpoint is kept in {manager.directory}')
      writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
      bar.set_postfix(loss=f'{summary["loss"]:.4f}', img_s=f'{summary["images_per_second"]:.1f}')
    if step % config.eval_every == 0 or step == config.num_steps:
      scores = evaluate(eval_fn, state, val_set, config, mesh)
      writer.write_scalars(step, {f'val/{k}': v for k, v in scores.items()})
      bar.write(f'step {step}: ' + _format_scores(scores, class_names))
      checkpointing.save(manager, step, state, train_iter.get_state(),
                         metrics={k: v for k, v in scores.items() if np.isfinite(v)})
      last_time = time.perf_counter()  # evaluation time is not training throughput
  bar.close()
  checkpointing.wait(manager)

  if not scores:  # resumed a finished run: evaluate what was restored
    scores = evaluate(eval_fn, state, val_set, config, mesh)
  if chief:
    _write_final(workdir, int(state.step), scores)
    log.info('final (step %d): %s', int(state.step), _format_scores(scores, class_names))
  _write_overlays(state, model, val_set, config, mesh, workdir, chief)
  writer.close()
  manager.close()
  return scores


def _format_scores(scores: dict[str, float], class_names: tuple[str, ...]) -> str:
  keys = ['pixel_error', *(f'dice_{c}' for c in class_names), *(f'iou_{c}' for c in class_names)]
  return ', '.join(f'{k}={scores[k]:.4f}' for k in keys if k in scores)


def _write_overlays(state, model, dataset, config, mesh, workdir, chief) -> None:
  """PNGs of image | ground truth | prediction for the first validation examples.

  Every process predicts the same few images (replicated input), so no gathering is needed.
  """
  count = min(config.num_overlays, len(dataset))
  if count == 0:
    return
  subset = dataset.subset(range(count))
  pads = inference.model_padding(subset.labels.shape[1:], depth=config.model.depth,
                                 padding=config.model.padding)
  batch = next(input_pipeline.eval_batches(subset, batch_size=count, pads=pads,
                                           mean=config.data.mean, std=config.data.std))
  images = jax.make_array_from_process_local_data(sharding.replicated(mesh), batch['image'])
  predict = jax.jit(functools.partial(predict_classes, model=model,
                                      spatial_shape=subset.labels.shape[1:]),
                    out_shardings=sharding.replicated(mesh))
  classes = np.asarray(predict(state, images))
  if chief:
    visualize.write_panels(os.path.join(workdir, 'predictions'), subset.images, subset.labels,
                           classes)
