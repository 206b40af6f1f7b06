"""Writes the procedural EM-like data set as ISBI 2012-layout TIFF stacks.

  python data/procedural.py --out /tmp/em_like --num-images 30 --size 512 --seed 0

writes `train-volume.tif` (N, H, W) uint8 and `train-labels.tif` (N, H, W) uint8 with the ISBI
polarity (255 = cell interior, 0 = membrane), so the images can be inspected in any TIFF viewer
(Fiji, napari) or trained on through the same loader as the real data. With `--num-test-images M`
it also writes `test-volume.tif`, drawn as images N..N+M-1 of the same seed so that they differ
from the training images. Image i depends only on (seed, i); see `unet_jax.datasets.procedural`.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
from typing import Sequence

try:
  from unet_jax.datasets import procedural
except ImportError:  # Run from a checkout without the package installed.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from unet_jax.datasets import procedural


def _load_isbi_module():
  """Imports the sibling data/isbi2012.py, which is a script rather than a package module."""
  path = pathlib.Path(__file__).resolve().with_name('isbi2012.py')
  spec = importlib.util.spec_from_file_location('unet_jax_data_isbi2012', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='procedural.py', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--num-images', type=int, default=30, help='training images to write')
  parser.add_argument('--num-test-images', type=int, default=0,
                      help='also write test-volume.tif with this many images (0 = none)')
  parser.add_argument('--size', type=int, nargs='+', default=[512],
                      help='image side, or HEIGHT WIDTH')
  parser.add_argument('--seed', type=int, default=0, help='non-negative random seed')
  parser.add_argument('--cell-diameter', type=float, default=28.0)
  parser.add_argument('--membrane-width', type=float, default=3.0)
  parser.add_argument('--organelles-per-cell', type=float, default=0.5)
  parser.add_argument('--blur-sigma', type=float, default=1.0)
  parser.add_argument('--noise-std', type=float, default=12.0)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if len(args.size) not in (1, 2):
    parser.error('--size takes one value or two (HEIGHT WIDTH)')
  if args.num_test_images < 0:
    parser.error('--num-test-images must be >= 0')
  size = args.size[0] if len(args.size) == 1 else tuple(args.size)
  options = dict(size=size, seed=args.seed, cell_diameter=args.cell_diameter,
                 membrane_width=args.membrane_width,
                 organelles_per_cell=args.organelles_per_cell, blur_sigma=args.blur_sigma,
                 noise_std=args.noise_std)
  try:
    images, labels = procedural.make_em_like(args.num_images + args.num_test_images, **options)
  except ValueError as error:
    parser.error(str(error))
  isbi = _load_isbi_module()
  out = pathlib.Path(args.out)
  jobs = [(isbi.TRAIN_VOLUME, images[:args.num_images]),
          (isbi.TRAIN_LABELS, labels[:args.num_images])]
  if args.num_test_images:
    jobs.append((isbi.TEST_VOLUME, images[args.num_images:]))
  for name, stack in jobs:
    isbi.write_stack(out / name, stack)
    print(f'wrote {out / name}: {stack.shape} {stack.dtype}')
  stats = procedural.describe(images[:args.num_images], labels[:args.num_images])
  print(f"membrane fraction {stats['membrane_fraction']:.4f}, mean intensity membrane "
        f"{stats['membrane_mean']:.1f}, interior {stats['interior_mean']:.1f}")
  return 0


if __name__ == '__main__':
  sys.exit(main())
