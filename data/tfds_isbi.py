r"""Packs the ISBI 2012 training stacks into a TFDS dataset stored as ArrayRecord.

  python data/tfds_isbi.py --manual_dir ../shared/data/isbi2012 --data_dir ~/tensorflow_datasets

reads `train-volume.tif` and `train-labels.tif` from `--manual_dir` (checked as by the ISBI loader)
and writes `<data_dir>/isbi2012/1.0.0/` with one split, 'train': 30 examples in z order,
  image  (512, 512, 1) uint8  the EM section
  label  (512, 512, 1) uint8  class ids, 0 = cell interior, 1 = membrane (already mapped from
                              the ISBI polarity 255 = interior, 0 = membrane)
  slice  int32                the section's index in the stack.
Training reads it back without TensorFlow (`sources.load_tfds('isbi2012', data_dir=...,
split='train')`; 'train[:25]' and 'train[25:]' give the usual train / validation slices, since
the examples keep their z order).

Only tensorflow-datasets, array_record, numpy, tifffile and Pillow are needed, not TensorFlow:
TFDS encodes image arrays with `tf.image.encode_png`, so the builder hands it PNG bytes written
by Pillow instead, and writes `file_format='array_record'` (TFRECORD needs TensorFlow to read).
The `tfds build` command line imports TensorFlow at start-up in tensorflow-datasets 4.9.10, hence
this script's own entry point.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import sys
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

try:
  from unet_jax.datasets import loaders
except ImportError:  # Run from a checkout without the package installed.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from unet_jax.datasets import loaders

NAME = 'isbi2012'


def png_bytes(array: np.ndarray) -> bytes:
  """Lossless PNG of a (H, W) or (H, W, 1) uint8 array, encoded by Pillow."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array).reshape(array.shape[:2])).save(buffer, format='PNG')
  return buffer.getvalue()


# skip_registration: the dataset is read back from its files (tfds.data_source) without this
# module, and importing the module twice (script and test) must not clash in the TFDS registry.
class Isbi2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """ISBI 2012 EM segmentation training stack, one example per section."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Training stack; labels as class ids (1 = membrane).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put train-volume.tif and train-labels.tif of the ISBI 2012 challenge in one directory and '
      'pass it as manual_dir; data/README.md says where to get them and how to verify them.')

  def _info(self) -> tfds.core.DatasetInfo:
    mask = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png')
    return tfds.core.DatasetInfo(
        builder=self,
        description='ISBI 2012 serial-section EM with membrane labels: 0 = cell interior, '
                    '1 = membrane.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                         encoding_format='png'),
            'label': mask,
            'slice': tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        homepage='http://brainiac2.mit.edu/isbi_challenge/',
        disable_shuffling=True,  # keep z order so that split slicing selects sections
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, directory: str):
    dataset = loaders.load_isbi(directory)
    for z in range(len(dataset)):
      yield z, {'image': png_bytes(dataset.images[z]), 'label': png_bytes(dataset.labels[z]),
                'slice': np.int32(z)}


def build(manual_dir: str, data_dir: str) -> str:
  """Builds the dataset into `data_dir`; returns the directory of the written version."""
  builder = Isbi2012(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='tfds_isbi.py', description=__doc__.split('\n\n')[0])
  parser.add_argument('--manual_dir', required=True,
                      help='directory with train-volume.tif and train-labels.tif')
  parser.add_argument('--data_dir', required=True, help='TFDS data directory to write into')
  args = parser.parse_args(argv)
  print(build(args.manual_dir, args.data_dir))
  return 0


if __name__ == '__main__':
  sys.exit(main())
