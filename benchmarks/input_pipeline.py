r"""Is training input-bound? Loader images/s next to the training step's images/s.

For each config (the CPU ISBI config with the paper's full augmentation, and the paper config),
on the real 512×512 ISBI slices:
  - the grain loader with 0 workers (threads in this process) and with N worker processes,
    host augmentation (elastic, rotation, flips, intensity) on;
  - the same host chain (pad, augment, crop, normalise) on one thread without grain;
  - on-device augmentation: the same spec as one jitted function over a batch;
  - the training step of that config on this machine.
The last column says which is slower. Run:

  python benchmarks/input_pipeline.py --isbi_dir=../shared/data/isbi2012 [--workers=2]
      [--paper_step]   # also time one paper-model step (minutes on a CPU)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import grain
import jax
import numpy as np

from unet_jax import sharding
from unet_jax.augment import on_device
from unet_jax.augment import transforms
from unet_jax.config import overrides
from unet_jax.config import validation
from unet_jax.datasets import pipeline
from unet_jax.datasets import sources
from unet_jax.models import whole_image
from unet_jax.training import train_step

ISBI_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'experiments', 'isbi.py')
FULL_AUGMENT = ('elastic(p=0.9, sigma=10, grid=3)|rotate(p=0.5, degrees=15)|flip|rot90|'
                'brightness(p=0.3, delta=0.1)|contrast(p=0.3, min=0.8, max=1.2)|'
                'gamma(p=0.3, min=0.8, max=1.25)|noise(p=0.3, std=0.03)')


def _config(name: str, isbi_dir: str, workers: int):
  config = overrides.load_config_file(ISBI_CONFIG + (':cpu' if name == 'cpu' else ''))
  config.data.directory = isbi_dir
  config.data.augment = FULL_AUGMENT
  config.data.num_workers = workers
  config.mesh.data = 1
  if name == 'paper':
    config.batch_size = 1
  return config


def benchmark_host_ops(spec: str, image_size: Sequence[int], crop_size: Sequence[int], n: int, *,
                       border: int | Sequence[int] | None = None, order: int = 1,
                       seed: int = 0) -> float:
  """Examples per second of the full host training chain on one thread.

  The example is a uint8 image with a derived label; `border` defaults to the mirror padding
  needed for the crop to fit (e.g. 30 for a 572² crop of a 512² image).
  """
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (*image_size, 1), dtype=np.uint8)
  example = {'image': image, 'label': (image[..., 0] > 127).astype(np.uint8)}
  if border is None:
    border = max(0, max(-(-(c - s) // 2) for c, s in zip(crop_size, image_size)))
  chain = transforms.build_train_transforms(spec, crop_size=crop_size, border=border, mean=0.5,
                                            std=0.2, order=order)
  tick = time.perf_counter()
  for _ in range(n):
    out = example
    for op in chain:
      out = op.random_map(out, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(out)
  return n / (time.perf_counter() - tick)


def loader_rate(config, train_set, border, seconds: float) -> float:
  """Images per second out of the training iterator after a warm-up batch."""
  it = pipeline.train_iterator(train_set, config.data, batch_size=config.batch_size,
                               border=border, seed=0)
  next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += len(next(it)['label'])
  return count / (time.perf_counter() - start)


def device_augment_rate(config, batch, repeats: int = 5) -> float:
  fn = jax.jit(lambda rng, b: on_device.augment_batch(
      rng, b, spec=config.data.augment, mean=config.data.mean, std=config.data.std))
  jax.block_until_ready(fn(jax.random.key(0), batch))
  start = time.perf_counter()
  for i in range(repeats):
    jax.block_until_ready(fn(jax.random.key(i), batch))
  return repeats * len(batch['label']) / (time.perf_counter() - start)


def step_rate(config, setup: train_step.Setup, batch, repeats: int) -> float:
  state = train_step.initial_state(setup, 0)
  step = train_step.make_step_fn(config, setup)
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
  parser.add_argument('--host_examples', type=int, default=16,
                      help='examples through the one-thread host chain')
  parser.add_argument('--paper_step', action='store_true')
  args = parser.parse_args()

  rows = []
  for name in ('cpu', 'paper'):
    config = _config(name, args.isbi_dir, 0)
    validation.validate(config, spatial_rank=2)
    dataset = sources.load_dataset(config.data)
    train_set, _ = sources.split_dataset(dataset, config.data)
    setup = train_step.build(config, input_channels=dataset.images.shape[-1], spatial_rank=2)
    host0 = loader_rate(config, train_set, setup.border, args.seconds)
    config_n = _config(name, args.isbi_dir, args.workers)
    host_n = loader_rate(config_n, train_set, setup.border, args.seconds)
    one_thread = benchmark_host_ops(
        config.data.augment, dataset.images.shape[1:-1],
        whole_image.crop_shape(config.data.crop_size, 2), args.host_examples,
        border=setup.border, order=config.data.interpolation_order)
    plain = _config(name, args.isbi_dir, 0)
    plain.data.augment_on = 'device'  # the host only crops and normalises
    batch = next(pipeline.train_iterator(train_set, plain.data, batch_size=plain.batch_size,
                                         border=setup.border, seed=0))
    device = device_augment_rate(config, batch)
    step = (step_rate(config, setup, batch, 3) if name == 'cpu' or args.paper_step
            else float('nan'))
    rows.append((name, config.data.crop_size, config.batch_size, host0, host_n, one_thread,
                 device, step))

  print(f'\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__} on '
        f'{jax.default_backend()}; augmentation: {FULL_AUGMENT}\n')
  print(f'| config | crop | batch | loader, 0 workers (img/s) | loader, {args.workers} workers '
        '(img/s) | host chain, 1 thread (img/s) | on-device augment (img/s) | '
        'train step (img/s) | loader / step |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, crop, batch_size, host0, host_n, one_thread, device, step in rows:
    ratio = max(host0, host_n) / step if np.isfinite(step) else float('nan')
    print(f'| {name} | {crop} | {batch_size} | {host0:.1f} | {host_n:.1f} | {one_thread:.1f} | '
          f'{device:.1f} | {step:.2f} | {ratio:.1f}× |')
  print('\nloader / step > 1: the loader outpaces training, so training is not input-bound.')


if __name__ == '__main__':
  main()
