r"""Quickstart: the CPU U-Net on the embedded procedural EM-like data (no download needed).

  python launch.py --config=experiments/quickstart.py --workdir=runs/quickstart

Expected result on a 2-core CPU: a few minutes; validation membrane Dice ≈ 0.9 on the 8
held-out procedural images, written to runs/quickstart/final_metrics.json with overlays in
runs/quickstart/predictions/.
"""

from __future__ import annotations

import ml_collections

from experiments import isbi


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """`arg`: '' (default) or 'smoke' (a few steps on tiny images, for tests)."""
  if arg not in ('', 'smoke'):
    raise ValueError(f'experiments/quickstart.py takes "" or "smoke", got {arg!r}')
  config = isbi.get_config('cpu')
  config.data.source = 'procedural'
  config.data.procedural.num_images = 48
  config.data.procedural.size = 256
  config.data.val_indices = tuple(range(40, 48))
  config.eval_batch_size = 8
  config.num_overlays = 4
  config.num_steps = 600
  config.eval_every = 200
  config.eval.tta = 'none'  # the ISBI recipe's 8-pass evaluation is not needed here
  config.model.depth = 4  # 128² crops of 256² images need no fifth pooling level
  config.optimizer.ema_decay = 0.0  # 600 steps: the ISBI recipe's average of the weights lags
  if arg == 'smoke':
    config.num_steps = 4
    config.log_every = 2
    config.eval_every = 2
    config.batch_size = 8  # divisible by the 8 simulated devices of the tests
    config.eval_batch_size = 8
    config.data.procedural.num_images = 6
    config.data.procedural.size = 64
    config.data.val_indices = (4, 5)
    config.data.crop_size = 32
    config.data.prefetch = 2
    config.model.width = 4
    config.model.depth = 2
    config.num_overlays = 2
  return config


def sweep() -> list[dict[str, object]]:
  """`--sweep` over the learning rate (two points, so it also serves as a quick check)."""
  return [{'optimizer.learning_rate': 1e-3}, {'optimizer.learning_rate': 4e-3}]
