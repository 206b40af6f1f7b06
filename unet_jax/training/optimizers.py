"""optax optimizers, learning-rate schedules and parameter EMA chosen by config.

`config.optimizer` fields:
  name            'adam' | 'adamw' | 'sgd'
  learning_rate   peak learning rate
  schedule        'constant' | 'cosine' | 'polynomial' | 'step', each after a linear warmup
  warmup_steps    linear warmup from 0 to learning_rate
  final_lr_fraction  cosine/polynomial end value as a fraction of the peak
  power           polynomial decay exponent
  step_boundaries fractions of num_steps at which the 'step' schedule multiplies by step_factor
  step_factor     multiplier at each boundary
  b1, b2          Adam moments
  momentum        SGD momentum (the paper used 0.99)
  weight_decay    decoupled decay (AdamW) or L2 added to the gradient (Adam, SGD); 0 disables
  decay_biases_and_norms  False applies weight decay to kernels only (the usual choice)
  grad_clip_norm  global-norm clipping; 0 disables
  ema_decay       exponential moving average of parameters, evaluated and checkpointed; 0 disables
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('constant', 'cosine', 'polynomial', 'step')
OPTIMIZERS = ('adam', 'adamw', 'sgd')


def make_schedule(config: Any, *, num_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) followed by the named decay over the remaining steps."""
  lr, warmup = config.learning_rate, config.warmup_steps
  decay_steps = max(num_steps - warmup, 1)
  end = lr * config.final_lr_fraction
  if config.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  elif config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.final_lr_fraction)
  elif config.schedule == 'polynomial':
    decay = optax.polynomial_schedule(lr, end, config.power, decay_steps)
  elif config.schedule == 'step':
    boundaries = {int(round(f * num_steps)) - warmup: config.step_factor
                  for f in config.step_boundaries}
    decay = optax.piecewise_constant_schedule(lr, {b: s for b, s in boundaries.items() if b > 0})
  else:
    raise ValueError(f'config.optimizer.schedule={config.schedule!r} is not one of {SCHEDULES}')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for kernels (rank ≥ 2), False for biases and normalisation scales/offsets."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: Any, *, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule); the schedule is returned too so its value can be logged."""
  if config.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name={config.name!r} is not one of {list(OPTIMIZERS)}')
  schedule = make_schedule(config, num_steps=num_steps)
  mask = None if config.decay_biases_and_norms else decay_mask
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.name == 'adamw':
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay, mask=mask))
  else:
    if config.weight_decay > 0:  # classic L2: added to the gradient before the update rule
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    if config.name == 'adam':
      parts.append(optax.adam(schedule, b1=config.b1, b2=config.b2))
    else:
      parts.append(optax.sgd(schedule, momentum=config.momentum or None))
  return optax.chain(*parts), schedule


def update_ema(ema: Any, params: Any, *, decay: float, step: jax.Array) -> Any:
  """EMA with the usual warmup of the decay, min(decay, (1 + t) / (10 + t)).

  Early in training the average would otherwise be dominated by the random initialisation.
  """
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)
