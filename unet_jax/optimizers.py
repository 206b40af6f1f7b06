"""optax optimizers and learning-rate schedules chosen by config.

`config.optimizer` fields: name ('adam' | 'adamw' | 'sgd'), learning_rate, schedule ('constant' |
'cosine'), warmup_steps, b1, b2 (Adam), momentum (SGD; the paper used 0.99), weight_decay
(AdamW), grad_clip_norm (0 disables).
"""

from __future__ import annotations

from typing import Any

import optax

SCHEDULES = ('constant', 'cosine')


def make_schedule(config: Any, *, num_steps: int) -> optax.Schedule:
  lr, warmup = config.learning_rate, config.warmup_steps
  if config.schedule == 'constant':
    if warmup:
      return optax.linear_schedule(0.0, lr, warmup)
    return optax.constant_schedule(lr)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup,
                                              decay_steps=max(num_steps, warmup + 1),
                                              end_value=lr * config.final_lr_fraction)
  raise ValueError(f'config.optimizer.schedule={config.schedule!r} is not one of {SCHEDULES}')


def make_optimizer(config: Any, *, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule); the schedule is returned too so its value can be logged."""
  schedule = make_schedule(config, num_steps=num_steps)
  builders = {
      'adam': lambda: optax.adam(schedule, b1=config.b1, b2=config.b2),
      'adamw': lambda: optax.adamw(schedule, b1=config.b1, b2=config.b2,
                                   weight_decay=config.weight_decay),
      'sgd': lambda: optax.sgd(schedule, momentum=config.momentum, nesterov=False),
  }
  if config.name not in builders:
    raise ValueError(f'config.optimizer.name={config.name!r} is not one of {sorted(builders)}')
  tx = builders[config.name]()
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule
