"""Verifies and assembles the ISBI 2012 EM segmentation data in the layout unet-jax reads.

The loader expects one directory with three multi-page TIFF stacks:

  train-volume.tif   (30, 512, 512) uint8, grayscale EM slices
  train-labels.tif   (30, 512, 512) uint8, 255 = cell interior, 0 = membrane
  test-volume.tif    (30, 512, 512) uint8, optional, no labels were ever released

Usage:

  python data/isbi2012.py verify DIR
  python data/isbi2012.py stack --images IMGDIR --labels LBLDIR --out DIR
  python data/isbi2012.py stack --test IMGDIR --out DIR

`stack` turns folders of per-slice files named by their index (`0.png` ... `29.png`, or `.tif`),
as some public mirrors store them, into the stacks above, in numeric index order (so `10.png`
comes after `9.png`). `verify` checks presence, shape, dtype and label values, which are errors
(exit code 1), and compares sha256 digests with known copies, where a mismatch is only a warning:
re-encoded copies hold the same pixels in other bytes.

Needs only numpy, tifffile and Pillow. See data/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys
from typing import Sequence

import numpy as np
import tifffile
from PIL import Image

TRAIN_VOLUME = 'train-volume.tif'
TRAIN_LABELS = 'train-labels.tif'
TEST_VOLUME = 'test-volume.tif'

# Digests of the copies described in data/README.md (re-written with tifffile from the
# per-slice files of the zhixuhao/unet mirror; the challenge's own files have the same pixels
# but other bytes).
KNOWN_SHA256 = {
    TRAIN_VOLUME: '15a2c1389c50dead7f3fc8afecf9b6878bfef5091ca229a5f9a7ca4254418010',
    TRAIN_LABELS: '08a8b9ff46cde070334bfab1c8adb47423a85152804983c71d4537374b848269',
    TEST_VOLUME: '6613b9dfcf2c46a77d95381df4463327a3cfec09dac3e9db0dbfbb4412d8e9a0',
}
EXPECTED_SHAPE = (30, 512, 512)
LABEL_VALUES = (0, 255)
SLICE_SUFFIXES = ('.png', '.tif', '.tiff')


class DataError(Exception):
  """A problem with a data file that makes it unusable; the message names the file."""


def sha256_of(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def write_stack(path: pathlib.Path, stack: np.ndarray) -> None:
  """Writes a (Z, H, W) uint8 array as an uncompressed multi-page min-is-black TIFF.

  `metadata=None` and `software=False` leave out tifffile's JSON description and Software tag, as
  in the challenge files, so any TIFF reader sees plain pages. Stacking the per-slice files of the
  zhixuhao/unet mirror this way reproduces the digests in KNOWN_SHA256 byte for byte (with the
  tifffile release the project pins; other releases may lay out bytes differently).
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  tifffile.imwrite(path, stack, photometric='minisblack', metadata=None, software=False)


def read_stack(path: pathlib.Path) -> np.ndarray:
  try:
    return tifffile.imread(path)
  except Exception as error:  # tifffile raises several types for broken files.
    raise DataError(f'{path.name}: cannot be read as TIFF ({error})') from error


# ----------------------------------------------------------------------------------------------
# stack


def list_slices(directory: pathlib.Path) -> list[pathlib.Path]:
  """Returns the per-slice files of `directory` in numeric order of their integer names.

  Raises:
    DataError: if the directory is missing or empty, or two files share an index.
  """
  if not directory.is_dir():
    raise DataError(f'{directory}: not a directory')
  indexed = {}
  for path in directory.iterdir():
    if path.suffix.lower() not in SLICE_SUFFIXES or not path.stem.isdigit():
      continue
    index = int(path.stem)
    if index in indexed:
      raise DataError(f'{directory}: both {indexed[index].name} and {path.name} claim slice '
                      f'{index}')
    indexed[index] = path
  if not indexed:
    raise DataError(f'{directory}: no slice files named by their index, like 0.png or 0.tif')
  return [indexed[index] for index in sorted(indexed)]


def read_slice(path: pathlib.Path) -> np.ndarray:
  """Reads one slice as a (H, W) uint8 array.

  Colour files whose channels are all equal (grayscale saved as RGB) are accepted; anything that
  is not 8-bit gray is refused rather than converted, since a silent conversion could change label
  values.
  """
  try:
    if path.suffix.lower() == '.png':
      with Image.open(path) as image:
        array = np.asarray(image)
    else:
      array = tifffile.imread(path)
  except Exception as error:
    raise DataError(f'{path}: cannot be read ({error})') from error
  if array.ndim == 3 and array.shape[-1] in (3, 4) and all(
      np.array_equal(array[..., 0], array[..., c]) for c in range(1, 3)):
    array = array[..., 0]
  if array.ndim != 2:
    raise DataError(f'{path}: expected a single 2-D grayscale slice, got shape {array.shape}')
  if array.dtype != np.uint8:
    raise DataError(f'{path}: expected dtype uint8, got {array.dtype}')
  return array


def stack_slices(directory: pathlib.Path, *, labels: bool = False) -> np.ndarray:
  """Reads all slices of `directory` into one (Z, H, W) uint8 array, in numeric order."""
  paths = list_slices(directory)
  slices = [read_slice(path) for path in paths]
  shapes = {s.shape for s in slices}
  if len(shapes) != 1:
    raise DataError(f'{directory}: slices differ in shape: {sorted(shapes)}')
  stack = np.stack(slices)
  if labels:
    bad = np.setdiff1d(np.unique(stack), LABEL_VALUES)
    if bad.size:
      raise DataError(f'{directory}: label values {bad[:10].tolist()} are not in {LABEL_VALUES} '
                      '(255 = cell interior, 0 = membrane)')
  return stack


def run_stack(args: argparse.Namespace) -> int:
  if (args.images is None) != (args.labels is None):
    raise DataError('--images and --labels go together')
  if args.images is None and args.test is None:
    raise DataError('nothing to do: give --images and --labels, or --test, or all three')
  out = pathlib.Path(args.out)
  jobs = []
  if args.images is not None:
    images = stack_slices(pathlib.Path(args.images))
    labels = stack_slices(pathlib.Path(args.labels), labels=True)
    if images.shape != labels.shape:
      raise DataError(f'images {images.shape} and labels {labels.shape} differ in shape')
    jobs += [(TRAIN_VOLUME, images), (TRAIN_LABELS, labels)]
  if args.test is not None:
    jobs.append((TEST_VOLUME, stack_slices(pathlib.Path(args.test))))
  for name, stack in jobs:
    write_stack(out / name, stack)
    print(f'wrote {out / name}: {stack.shape} {stack.dtype}')
  return 0


# ----------------------------------------------------------------------------------------------
# verify


def check_volume(path: pathlib.Path, *, labels: bool) -> tuple[np.ndarray, list[str]]:
  """Checks one stack; returns it and warnings. Raises DataError on a wrong shape/dtype/value."""
  stack = read_stack(path)
  warnings = []
  if stack.ndim != 3:
    raise DataError(f'{path.name}: expected a (Z, H, W) stack, got shape {stack.shape}')
  if stack.dtype != np.uint8:
    raise DataError(f'{path.name}: expected dtype uint8, got {stack.dtype}')
  if stack.shape != EXPECTED_SHAPE:
    warnings.append(f'{path.name}: shape {stack.shape}, the challenge files are {EXPECTED_SHAPE}')
  if labels:
    bad = np.setdiff1d(np.unique(stack), LABEL_VALUES)
    if bad.size:
      raise DataError(f'{path.name}: label values {bad[:10].tolist()} are not in {LABEL_VALUES} '
                      '(255 = cell interior, 0 = membrane)')
  return stack, warnings


def check_digest(path: pathlib.Path) -> tuple[str, list[str]]:
  actual = sha256_of(path)
  expected = KNOWN_SHA256.get(path.name)
  if actual == expected:
    return f'{path.name}: sha256 OK ({actual})', []
  return f'{path.name}: sha256 {actual}', [
      f'{path.name}: sha256 differs from the known copy ({expected}); a re-encoded file has other '
      'bytes, so this is fine as long as the checks above pass']


def run_verify(args: argparse.Namespace) -> int:
  directory = pathlib.Path(args.dir)
  if not directory.is_dir():
    raise DataError(f'{directory}: not a directory')
  errors, warnings = [], []
  volumes = {}
  for name, required in ((TRAIN_VOLUME, True), (TRAIN_LABELS, True), (TEST_VOLUME, False)):
    path = directory / name
    if not path.is_file():
      if required:
        errors.append(f'{name}: missing from {directory}')
      else:
        print(f'{name}: absent (optional)')
      continue
    try:
      stack, found = check_volume(path, labels=name == TRAIN_LABELS)
    except DataError as error:
      errors.append(str(error))
      continue
    warnings += found
    volumes[name] = stack
    print(f'{name}: {stack.shape} {stack.dtype}, values {stack.min()}..{stack.max()}')
    line, found = check_digest(path)
    print(line)
    warnings += found

  if TRAIN_VOLUME in volumes and TRAIN_LABELS in volumes:
    images, labels = volumes[TRAIN_VOLUME], volumes[TRAIN_LABELS]
    if images.shape != labels.shape:
      errors.append(f'{TRAIN_LABELS}: shape {labels.shape} differs from {TRAIN_VOLUME} '
                    f'{images.shape}')
    else:
      membrane = labels == 0
      fraction = float(membrane.mean())
      print(f'membrane (label 0) fraction: {fraction:.4f}')
      if 0 < fraction < 1:
        on_membrane = float(images[membrane].mean())
        on_interior = float(images[~membrane].mean())
        print(f'mean intensity: membrane {on_membrane:.1f}, interior {on_interior:.1f}')
        # EM membranes are dark; a bright "membrane" class means the polarity is flipped.
        if on_membrane > on_interior:
          warnings.append(f'{TRAIN_LABELS}: label-0 pixels are brighter than label-255 pixels; '
                          'the labels may be inverted (expected 0 = membrane)')
      if fraction > 0.5:
        warnings.append(f'{TRAIN_LABELS}: {fraction:.0%} of pixels are 0 (membrane); expected a '
                        'minority, the labels may be inverted')

  for warning in warnings:
    print(f'WARNING: {warning}')
  for error in errors:
    print(f'ERROR: {error}', file=sys.stderr)
  if errors:
    return 1
  print('OK')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='isbi2012.py', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  verify = commands.add_parser('verify', help='check an ISBI 2012 directory')
  verify.add_argument('dir', help='directory holding train-volume.tif, train-labels.tif, ...')
  stack = commands.add_parser('stack', help='stack per-slice files into multi-page TIFFs')
  stack.add_argument('--images', help='folder of training image slices 0.png ... (or .tif)')
  stack.add_argument('--labels', help='folder of training label slices 0.png ... (or .tif)')
  stack.add_argument('--test', help='folder of test image slices 0.png ... (or .tif)')
  stack.add_argument('--out', required=True, help='output directory')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return run_verify(args) if args.command == 'verify' else run_stack(args)
  except DataError as error:
    print(f'ERROR: {error}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
