r"""Overlap-tile inference throughput in megapixels per second on one large image.

  python benchmarks/inference.py                     # 2048×2048, both models, TTA none/dihedral
  python benchmarks/inference.py --budget=600        # measure more rows end to end

Models: the paper U-Net (width 64, depth 4, VALID, 572×572 tiles → 388×388) and the CPU model
of experiments/quickstart.py (width 16, depth 4, SAME, batch norm, 128×128 tiles with 25 % Gaussian-
blended overlap, the predict driver's default; also with 512×512 tiles). Random weights: the
speed does not depend on them.

Every row first compiles and times `--probe` tile batches. If the whole image would take longer
than `--budget` seconds, the row is extrapolated from that per-batch time (batches × transforms),
and the table says so; otherwise the whole image is predicted end to end (host tiling,
accumulation and TTA transforms included).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.inference import tiled
from unet_jax.models import UNet
from unet_jax.models import whole_image


@dataclasses.dataclass(frozen=True)
class Setup:
  name: str
  model: UNet
  tile: int
  batch_size: int


SETUPS = {
    'paper': lambda batch: Setup('paper (w64 d4 VALID)', UNet(num_classes=2, width=64, depth=4,
                                                               padding='VALID'), 572, batch),
    'cpu': lambda batch: Setup('isbi:cpu (w16 d4 SAME BN)', UNet(
        num_classes=2, width=16, depth=4, padding='SAME', norm='batch'), 128, batch * 4),
    'cpu512': lambda batch: Setup('isbi:cpu (w16 d4 SAME BN)', UNet(
        num_classes=2, width=16, depth=4, padding='SAME', norm='batch'), 512, batch),
}


def random_variables(model: UNet, tile: int, seed: int = 0):
  """He-scaled random variables from the abstract shapes (no compiled init needed)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, tile, tile, 1)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if any(k in jax.tree_util.keystr(path) for k in ('var', 'scale')):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
    return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def probe(predictor: tiled.TiledPredictor, tile: int, batches: int) -> float:
  """Seconds per tile batch (after compilation), the device call and the copy back."""
  x = np.random.default_rng(0).normal(size=(predictor.batch_size, tile, tile, 1))
  x = x.astype(np.float32)
  predictor.predict_tiles(x)  # compiles
  start = time.perf_counter()
  for _ in range(batches):
    predictor.predict_tiles(x)
  return (time.perf_counter() - start) / batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=2048)
  parser.add_argument('--models', default='paper,cpu,cpu512')
  parser.add_argument('--tta', default='none,dihedral')
  parser.add_argument('--batch', type=int, default=2, help='tiles per batch (×4 for 128 tiles)')
  parser.add_argument('--probe', type=int, default=1, help='timed batches per row')
  parser.add_argument('--budget', type=float, default=90.0,
                      help='seconds a row may take end to end before it is extrapolated')
  args = parser.parse_args()

  image = np.random.default_rng(1).normal(size=(args.size, args.size, 1)).astype(np.float32)
  megapixels = args.size * args.size / 1e6
  print(f'{args.size}×{args.size} image, {jax.device_count()} × {jax.devices()[0].device_kind}, '
        f'jax {jax.__version__}')
  header = ('| model | tile → out | TTA | tiles | batch | s / batch | seconds | MP/s | how |')
  rows = [header, '|' + ' --- |' * 9]
  for key in args.models.split(','):
    setup = SETUPS[key](args.batch)
    variables = random_variables(setup.model, setup.tile)
    predictor = tiled.TiledPredictor.for_model(setup.model, variables, tile_size=setup.tile,
                                               batch_size=setup.batch_size)
    plan = predictor.plan(image.shape[:-1])
    per_batch = probe(predictor, setup.tile, args.probe)
    for tta in args.tta.split(','):
      transforms = len(whole_image.tta_transforms(tta, 2))
      batches = -(-len(plan) // predictor.batch_size) * transforms
      estimate = per_batch * batches
      if estimate <= args.budget:
        start = time.perf_counter()
        predictor(image, tta=tta)
        seconds, how = time.perf_counter() - start, 'measured'
      else:
        seconds, how = estimate, f'extrapolated from {args.probe} batch(es)'
      rows.append(f'| {setup.name} | {setup.tile} → {plan.output_shape[0]} | {tta} | '
                  f'{len(plan) * transforms} | {predictor.batch_size} | {per_batch:.2f} | '
                  f'{seconds:.1f} | {megapixels / seconds:.3f} | {how} |')
      print(rows[-1], flush=True)
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
