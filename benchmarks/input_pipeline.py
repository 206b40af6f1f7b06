r"""Is training input-bound? Loader images/s next to the training step's images/s.

For each config (the CPU ISBI config with the paper's full augmentation, and the paper config),
on the real 512×512 ISBI slices:
  - the grain loader with 0 workers (threads in this process) and with N worker processes,
    host augmentation (elastic, rotation, flips, intensity) on;
  - on-device augmentation: the same spec as one jitted function over a batch;
  - the training step of that config on this machine.
The last column says which is slower. Run:

  python benchmarks/input_pipeline.py --isbi_dir=../shared/data/isbi2012 [--workers=2]
      [--paper_step]   # also time one paper-model step (minutes on a CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import isbi
from unet_jax import device_augment
from unet_jax import input_pipeline
from unet_jax import sharding
from unet_jax import train

FULL_AUGMENT = ('elastic(p=0.9, sigma=10, grid=3)|rotate(p=0.5, degrees=15)|flip|rot90|'
                'brightness(p=0.3, delta=0.1)|contrast(p=0.3, min=0.8, max=1.2)|'
                'gamma(p=0.3, min=0.8, max=1.25)|noise(p=0.3, std=0.03)')


def _config(name: str, isbi_dir: str, workers: int):
  config = isbi.get_config('cpu' if name == 'cpu' else '')
  config.data.directory = isbi_dir
  config.data.augment = FULL_AUGMENT
  config.data.num_workers = workers
  config.mesh.data = 1
  if name == 'paper':
    config.batch_size = 1
  return config


def loader_rate(config, train_set, border, seconds: float) -> float:
  """Images per second out of the training iterator after a warm-up batch."""
  it = input_pipeline.train_iterator(train_set, config.data, batch_size=config.batch_size,
                                     border=border, seed=0)
  next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += len(next(it)['label'])
  return count / (time.perf_counter() - start)


def device_augment_rate(config, batch, repeats: int = 5) -> float:
  fn = jax.jit(lambda rng, b: device_augment.augment_batch(
      rng, b, spec=config.data.augment, mean=config.data.mean, std=config.data.std))
  jax.block_until_ready(fn(jax.random.key(0), batch))
  start = time.perf_counter()
  for i in range(repeats):
    jax.block_until_ready(fn(jax.random.key(i), batch))
  return repeats * len(batch['label']) / (time.perf_counter() - start)


def step_rate(config, batch, repeats: int) -> float:
  setup = train.build(config, input_channels=1, spatial_rank=2)
  state = jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(jax.random.key(0))
  step = train.make_step_fn(config, setup)
  global_batch = sharding.to_global(batch, setup.mesh)
  state, metrics = step(state, global_batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(repeats):
    state, metrics = step(state, global_batch, jax.random.key(i))
  jax.block_until_ready(metrics)
  return repeats * config.batch_size / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--isbi_dir', default=os.environ.get('UNET_JAX_ISBI_DIR',
                                                            '../shared/data/isbi2012'))
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--seconds', type=float, default=8.0)
  parser.add_argument('--paper_step', action='store_true')
  args = parser.parse_args()

  rows = []
  for name in ('cpu', 'paper'):
    config = _config(name, args.isbi_dir, 0)
    dataset = input_pipeline.load_dataset(config.data)
    train_set, _ = input_pipeline.split_dataset(dataset, config.data)
    border = train.check_config(config, 2)
    host0 = loader_rate(config, train_set, border, args.seconds)
    config_n = _config(name, args.isbi_dir, args.workers)
    host_n = loader_rate(config_n, train_set, border, args.seconds)
    plain = _config(name, args.isbi_dir, 0)
    plain.data.augment_on = 'device'  # the host only crops and normalises
    batch = next(input_pipeline.train_iterator(train_set, plain.data, batch_size=plain.batch_size,
                                               border=border, seed=0))
    on_device = device_augment_rate(config, batch)
    step = (step_rate(config, batch, 3) if name == 'cpu' or args.paper_step else float('nan'))
    rows.append((name, config.data.crop_size, config.batch_size, host0, host_n, on_device, step))

  print(f'\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__} on '
        f'{jax.default_backend()}; augmentation: {FULL_AUGMENT}\n')
  print(f'| config | crop | batch | loader, 0 workers (img/s) | loader, {args.workers} workers '
        '(img/s) | on-device augment (img/s) | train step (img/s) | loader / step |')
  print('|---|---|---|---|---|---|---|---|')
  for name, crop, batch_size, host0, host_n, on_device, step in rows:
    ratio = max(host0, host_n) / step if np.isfinite(step) else float('nan')
    print(f'| {name} | {crop} | {batch_size} | {host0:.1f} | {host_n:.1f} | {on_device:.1f} | '
          f'{step:.2f} | {ratio:.1f}× |')
  print('\nloader / step > 1: the loader outpaces training, so training is not input-bound.')


if __name__ == '__main__':
  main()
