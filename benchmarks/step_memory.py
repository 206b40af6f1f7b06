"""Saved activations and XLA's memory plan of the U-Net train step per remat policy.

The memory table of benchmarks/train_step.py (run there after the speed tables): for each
`model.remat` policy, the activations saved for the backward pass (counted from the traced step,
any backend) and XLA's compiled estimate of the step's memory (arguments + outputs +
temporaries), at each width of the speed table and for the paper model at 572×572, batch 8.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unet_jax.models import UNet, blocks
from unet_jax.training import losses
from unet_jax.training import train_step

NUM_CLASSES = 2
DEPTH = 4
LEARNING_RATE = 1e-3


def step_memory(*, model: Any, batch: int, size: int, out_size: int,
                compile_step: bool) -> tuple[float, float | None]:
  """MiB of activations saved for the backward pass, and of XLA's compiled step (or None).

  The saved activations are the residuals of `jax.vjp` of the loss, counted on the traced
  step (no device memory is touched), so they show what a remat policy keeps on any backend.
  The compiled figure is XLA's plan for the whole train step on this backend: arguments,
  outputs and temporaries (without donation, so the state is counted twice).
  """
  tx = optax.adam(LEARNING_RATE)
  loss_fn = losses.make_loss({'cross_entropy': 1.0, 'dice': 1.0})
  data = {'image': jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch, out_size, out_size), jnp.int32)}
  state = jax.eval_shape(functools.partial(train_step.init_state, model=model, tx=tx,
                                           input_shape=(1, size, size, 1), ema=False),
                         jax.random.key(0))

  def loss(params, batch_stats, batch):
    variables = {'params': params, 'batch_stats': batch_stats}
    logits, _ = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    return loss_fn(logits, batch['label'])[0]

  def saved_for_backward(params, batch_stats, batch):
    return jax.tree.leaves(jax.vjp(lambda p: loss(p, batch_stats, batch), params)[1])

  residuals = jax.eval_shape(saved_for_backward, state.params, state.batch_stats, data)
  saved = sum(math.prod(r.shape) * r.dtype.itemsize for r in residuals) / 2**20
  if not compile_step:
    return saved, None
  step = functools.partial(train_step.train_step, model=model, tx=tx, loss_fn=loss_fn,
                           schedule=lambda _: LEARNING_RATE)
  analysis = jax.jit(step).lower(state, data, jax.random.key(1)).compile().memory_analysis()
  planned = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes) / 2**20
  return saved, planned


def run_memory(args: argparse.Namespace, widths: list[int]) -> None:
  """Saved activations and XLA's memory plan per remat policy (see the module docstring)."""
  policies = blocks.REMAT_POLICIES
  print(f'\nMemory per remat policy ({jax.devices()[0].device_kind}; MiB): activations saved '
        'for the backward pass / XLA\'s compiled plan of the train step\n')
  print('| model | batch | input | dtype | ' + ' | '.join(policies) + ' |')
  print('|' + ' --- |' * (4 + len(policies)))
  # XLA's compiled plan only for the smallest width: on CPU it barely depends on remat, and
  # compiling the wider steps three more times would double the benchmark's run time.
  rows = [(f'width {w}, SAME, {args.norm}', args.batch, args.size, 'float32', w, 'SAME', args.norm,
           w == min(widths)) for w in widths]
  # The paper model at the tile size of the paper; counted only (compiling it on a CPU is slow).
  rows += [('paper (width 64, VALID)', 8, 572, dtype, 64, 'VALID', 'none', False)
           for dtype in ('float32', 'bfloat16')]
  for name, batch, size, dtype, width, padding, norm, compile_step in rows:
    cells = []
    for policy in policies:
      model = UNet(num_classes=NUM_CLASSES, width=width, depth=DEPTH, padding=padding, norm=norm,
                   remat=policy, dtype=jnp.dtype(dtype))
      saved, planned = step_memory(model=model, batch=batch, size=size, compile_step=compile_step,
                                   out_size=model.output_size(size))
      cells.append(f'{saved:,.0f}' + (f' / {planned:,.0f}' if planned is not None else ''))
    print(f'| {name} | {batch} | {size}² | {dtype} | ' + ' | '.join(cells) + ' |', flush=True)
