"""The training step: a pure function, and how a config binds, shards and jits it.

`train_step(state, batch, rng) -> (state, metrics)` is pure; the model, optimizer, loss and
options are bound with functools.partial (`make_step_fn`), the state is donated, and shardings
come from `jax.eval_shape` (`build`): the batch is split over the mesh, the state replicated or
split over 'fsdp'. The loop that drives it is `training/loop.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from unet_jax import checkpointing
from unet_jax import sharding
from unet_jax.augment import on_device
from unet_jax.datasets.dataset import IGNORE_CLASS
from unet_jax.models import blocks
from unet_jax.models import build_model
from unet_jax.models import whole_image
from unet_jax.training import losses
from unet_jax.training import optimizers


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
    final = whole_image.final_logits(outputs)
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


def build(config: ml_collections.ConfigDict, *, input_channels: int, spatial_rank: int,
          devices: Sequence[Any] | None = None) -> Setup:
  """Mesh, model, optimizer and the abstract, sharded state of a validated config (nothing is
  compiled; `init_fn` makes the real state).

  `devices`: the mesh's devices, default `jax.devices()`; an ahead-of-time compile passes a
  target's abstract ones, and the model's backend choices follow their platform.
  """
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  local_batch = sharding.check_batch_size(config.batch_size, mesh, field='config.batch_size')
  model = build_model(config.model, num_classes=len(config.data.class_names),
                      platforms=None if devices is None else {d.platform for d in devices})
  crop = whole_image.crop_shape(config.data.crop_size, spatial_rank)
  border = whole_image.mirror_border(model, crop)
  tx, schedule = optimizers.make_optimizer(config.optimizer, num_steps=config.num_steps)
  input_shape = (local_batch, *crop, input_channels)
  init_fn = functools.partial(init_state, model=model, tx=tx, input_shape=input_shape,
                              ema=config.optimizer.ema_decay > 0)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  state_sharding = sharding.state_shardings(abstract, mesh)
  return Setup(mesh, model, tx, schedule, init_fn, state_sharding,
               checkpointing.abstract_with_shardings(abstract, state_sharding), border)


# XLA:CPU spends ~20 s optimising the init program's threefry random-number code at its default
# LLVM level (2); level 1 compiles it 6× faster to the same bits (checked leaf by leaf), and the
# program runs once.
_CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def initial_state(setup: Setup, seed: int) -> TrainState:
  """The real train state of `setup`, initialised from `seed` and laid out on its mesh."""
  init = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)
  rng = jax.random.key(seed)
  options = _CPU_INIT_COMPILER_OPTIONS if sharding.on_cpu(setup.mesh) else None
  return init.lower(rng).compile(options)(rng)


def make_step_fn(config: ml_collections.ConfigDict, setup: Setup) -> Callable:
  """The jitted, sharded train step with the config's statics bound; the state is donated."""
  step = functools.partial(
      train_step, model=setup.model, tx=setup.tx, schedule=setup.schedule,
      loss_fn=losses.make_loss(
          dict(config.loss.terms), options=config.loss.options.to_dict(),
          deep_supervision_weights=config.loss.deep_supervision_weights,
          # Sources store ignored pixels as IGNORE_CLASS when config.data.ignore_label is set.
          ignore_label=None if config.data.ignore_label is None else IGNORE_CLASS),
      accum_steps=config.optimizer.grad_accum_steps, ema_decay=config.optimizer.ema_decay,
      skip_nonfinite=config.nonfinite == 'skip',
      augment=functools.partial(on_device.augment_batch, spec=config.data.augment,
                                mean=config.data.mean, std=config.data.std)
      if config.data.augment_on == 'device' else None)
  mesh = setup.mesh
  return jax.jit(step, in_shardings=(setup.state_sharding, sharding.batch_sharding(mesh),
                                     sharding.replicated(mesh)),
                 out_shardings=(setup.state_sharding, sharding.replicated(mesh)),
                 donate_argnums=(0,))
