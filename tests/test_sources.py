"""Data sources: image/mask folders, TFDS ArrayRecord datasets, 3D volumes, and bad-data errors."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tifffile
from PIL import Image

from unet_jax import storage
from unet_jax.datasets import loaders
from unet_jax.datasets import dataset as dataset_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_tfds_isbi():
  spec = importlib.util.spec_from_file_location('data_script_tfds_isbi', REPO / 'data' /
                                                'tfds_isbi.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tfds_isbi = _load_tfds_isbi()


def _dirs(tmp_path):
  images, masks = tmp_path / 'images', tmp_path / 'masks'
  images.mkdir()
  masks.mkdir()
  return images, masks


def _nuclei_folder(tmp_path, nuclei_dir, mask_name='img2d.tif'):
  images, masks = _dirs(tmp_path)
  os.symlink(os.path.join(nuclei_dir, 'img2d.tif'), images / 'img2d.tif')
  os.symlink(os.path.join(nuclei_dir, 'mask2d.tif'), masks / mask_name)
  return images, masks


# ---------------------------------------------------------------- folders of images and masks


def test_nuclei_sample_binary(tmp_path, nuclei_dir):
  images, masks = _nuclei_folder(tmp_path, nuclei_dir)
  data = loaders.load_folder(str(images), str(masks), num_classes=2, mask_mode='binary')
  raw = tifffile.imread(os.path.join(nuclei_dir, 'img2d.tif'))
  mask = tifffile.imread(os.path.join(nuclei_dir, 'mask2d.tif'))
  assert data.images.shape == (1, 512, 512, 1) and data.images.dtype == np.uint8
  assert data.labels.shape == (1, 512, 512) and data.labels.dtype == np.uint8
  # uint16 holding 0..235 is 8-bit data: cast unchanged, not stretched.
  np.testing.assert_array_equal(data.images[0, ..., 0], raw.astype(np.uint8))
  np.testing.assert_array_equal(data.labels[0], (mask > 0).astype(np.uint8))
  assert abs(data.labels.mean() - 0.199) < 0.001  # data README: 19.9 % foreground
  image = data.images[0, ..., 0].astype(np.float64)
  fg, bg = image[data.labels[0] == 1].mean(), image[data.labels[0] == 0].mean()
  assert fg > 2 * bg  # nuclei are bright (README: 67.4 vs 22.9)
  assert fg == pytest.approx(67.4, abs=0.1) and bg == pytest.approx(22.9, abs=0.1)


def test_nuclei_sample_instances_with_mask_suffix(tmp_path, nuclei_dir):
  images, masks = _nuclei_folder(tmp_path, nuclei_dir, mask_name='img2d_mask.tif')
  data, instances = loaders.load_folder_with_instances(str(images), str(masks), num_classes=2,
                                                       mask_mode='instances')
  mask = tifffile.imread(os.path.join(nuclei_dir, 'mask2d.tif'))
  assert instances.shape == (1, 512, 512) and instances.dtype == np.int32
  np.testing.assert_array_equal(instances[0], mask.astype(np.int32))
  assert len(np.unique(instances)) - 1 == 125  # README: 125 distinct nuclei
  np.testing.assert_array_equal(data.labels, (instances > 0).astype(np.uint8))
  assert loaders.load_folder_with_instances(str(images), str(masks), num_classes=2,
                                            mask_mode='binary')[1] is None


def _png(path, array):
  Image.fromarray(array).save(path)


def test_rgb_classes_natural_order_mixed_formats_and_ignore_label(tmp_path):
  images, masks = _dirs(tmp_path)
  rng = np.random.default_rng(0)
  expected = {}
  for k, stem in enumerate(['img_10', 'img_2', 'img_1']):
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (12, 16), dtype=np.uint8)
    mask[0, :4] = 7  # declared ignore_label below
    _png(images / f'{stem}.png', image)
    if k == 0:
      tifffile.imwrite(masks / f'{stem}.tif', mask.astype(np.uint16))
    elif k == 1:  # a palette PNG: its indices are the class ids
      palette = Image.fromarray(mask).convert('P')
      palette.save(masks / f'{stem}_label.png')
    else:
      _png(masks / f'{stem}_mask.png', mask)
    expected[stem] = (image, np.where(mask == 7, 255, mask))
  (images / 'notes.txt').write_text('not an image')  # other files are ignored
  data = loaders.load_folder(str(images), str(masks), num_classes=3, ignore_label=7)
  assert data.images.shape == (3, 12, 16, 3)
  for i, stem in enumerate(['img_1', 'img_2', 'img_10']):
    np.testing.assert_array_equal(data.images[i], expected[stem][0])
    np.testing.assert_array_equal(data.labels[i], expected[stem][1])
  assert (data.labels[:, 0, :4] == dataset_lib.IGNORE_CLASS).all()


def test_16_bit_images_are_rescaled_by_global_percentiles(tmp_path):
  images, masks = _dirs(tmp_path)
  rng = np.random.default_rng(1)
  raws = [rng.integers(0, 4000, (10, 10), dtype=np.uint16) + 1000 * i for i in range(2)]
  for i, raw in enumerate(raws):
    _png(images / f'{i}.png', raw.astype(np.uint16))
    _png(masks / f'{i}.png', np.zeros((10, 10), np.uint8))
  data = loaders.load_folder(str(images), str(masks), num_classes=2, mask_mode='binary')
  everything = np.stack(raws).astype(np.float64)
  lo, hi = np.percentile(everything, [0.5, 99.5])
  reference = np.round(np.clip((everything - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(data.images[..., 0], reference)
  # One mapping for the whole set: the brighter second image stays brighter.
  assert data.images[1].mean() > data.images[0].mean() + 40


# ---------------------------------------------------------------- bad folders


def _pair(images, masks, stem='a', image=None, mask=None):
  _png(images / f'{stem}.png', np.zeros((8, 8), np.uint8) if image is None else image)
  _png(masks / f'{stem}.png', np.zeros((8, 8), np.uint8) if mask is None else mask)


def _load(images, masks, **kwargs):
  kwargs.setdefault('num_classes', 2)
  return loaders.load_folder(str(images), str(masks), **kwargs)


def test_error_image_mask_shape_mismatch(tmp_path):
  images, masks = _dirs(tmp_path)
  _pair(images, masks, mask=np.zeros((8, 9), np.uint8))
  with pytest.raises(ValueError, match=r'mask file .*masks/a\.png has shape \(8, 9\).*must match'):
    _load(images, masks)


def test_error_images_of_different_shapes_name_the_file(tmp_path):
  images, masks = _dirs(tmp_path)
  _pair(images, masks, 'a')
  _pair(images, masks, 'b', image=np.zeros((9, 8), np.uint8), mask=np.zeros((9, 8), np.uint8))
  with pytest.raises(ValueError, match=r'images/b\.png has shape \(9, 8, 1\).*not cropped or '
                                       r'resized'):
    _load(images, masks)


def test_error_corrupt_file(tmp_path):
  images, masks = _dirs(tmp_path)
  _pair(images, masks)
  (masks / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n this is no image')
  with pytest.raises(ValueError, match=r'mask file .*masks/a\.png is not a readable image'):
    _load(images, masks)


def test_error_empty_or_missing_directory(tmp_path):
  images, masks = _dirs(tmp_path)
  (images / 'README').write_text('no images here')
  with pytest.raises(ValueError, match=r'images_dir=.*images.* holds no image files'):
    _load(images, masks)
  _pair(images, masks)
  with pytest.raises(FileNotFoundError, match='masks_dir='):
    _load(images, tmp_path / 'absent')
  (masks / 'a.png').unlink()
  with pytest.raises(ValueError, match=r'masks_dir=.*masks.* holds no mask files'):
    _load(images, masks)


def test_error_mask_values_outside_declared_classes(tmp_path):
  images, masks = _dirs(tmp_path)
  mask = np.zeros((8, 8), np.uint8)
  mask[0, 0], mask[1, 1] = 3, 9
  _pair(images, masks, mask=mask)
  with pytest.raises(ValueError, match=r'masks/a\.png has values \[3, 9\] outside the declared '
                                       r'classes \[0, 3\)'):
    _load(images, masks, num_classes=3)
  with pytest.raises(ValueError, match=r'values \[3\] outside .* or 9'):
    _load(images, masks, num_classes=3, ignore_label=9)


def test_error_wrong_dtype_and_rank(tmp_path):
  images, masks = _dirs(tmp_path)
  _png(images / 'a.png', np.zeros((8, 8), np.uint8))
  tifffile.imwrite(masks / 'a.tif', np.zeros((8, 8), np.float32))
  with pytest.raises(ValueError, match=r'mask file .*masks/a\.tif has dtype float32'):
    _load(images, masks)
  (masks / 'a.tif').unlink()
  _png(masks / 'a.png', np.zeros((8, 8), np.uint8))
  (images / 'a.png').unlink()
  tifffile.imwrite(images / 'a.tif', np.zeros((5, 8, 8), np.uint8))  # a stack, not a 2D image
  with pytest.raises(ValueError, match=r'image file .*images/a\.tif has shape \(5, 8, 8\)'):
    _load(images, masks)


def test_error_missing_and_unmatched_masks(tmp_path):
  images, masks = _dirs(tmp_path)
  _pair(images, masks, 'a')
  _png(images / 'b.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match=r'image file .*images/b\.png has no mask'):
    _load(images, masks)
  _png(masks / 'b_mask.png', np.zeros((8, 8), np.uint8))
  _png(masks / 'c.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match=r'mask file .*masks/c\.png matches no image'):
    _load(images, masks)
  _png(masks / 'b.png', np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match=r'images/b\.png matches several masks'):
    _load(images, masks)


def test_error_bad_mode_and_class_count(tmp_path):
  images, masks = _dirs(tmp_path)
  _pair(images, masks)
  with pytest.raises(ValueError, match=r"mask_mode='labels' is not one of \('classes', "):
    _load(images, masks, mask_mode='labels')
  with pytest.raises(ValueError, match=r'num_classes=3'):
    _load(images, masks, mask_mode='binary', num_classes=3)


# ---------------------------------------------------------------- TFDS (ArrayRecord)


def _tiny_examples(n=5, size=32):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
  labels = (images > 127).astype(np.uint8) + (images > 200).astype(np.uint8)
  return images, labels


class TinySegmentation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Five 32×32 images (PNG-encoded Image feature) and class masks (zlib Tensor feature)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
        tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(32, 32, 1), dtype=np.uint8,
                                         encoding_format='png'),
            'mask': tfds.features.Tensor(shape=(32, 32), dtype=np.uint8, encoding='zlib')})))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, (image, label) in enumerate(zip(*_tiny_examples())):
      yield i, {'image': tfds_isbi.png_bytes(image), 'mask': label}


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinySegmentation(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_load_tfds_reads_array_record_without_tensorflow(tiny_tfds_dir):
  import sys  # pylint: disable=g-import-not-at-top
  data = loaders.load_tfds('tiny_segmentation', data_dir=tiny_tfds_dir, split='train',
                           label_key='mask', num_classes=3)
  images, labels = _tiny_examples()
  np.testing.assert_array_equal(data.images, images[..., None])
  np.testing.assert_array_equal(data.labels, labels)
  part = loaders.load_tfds('tiny_segmentation', data_dir=tiny_tfds_dir, split='train[3:]',
                           label_key='mask')
  np.testing.assert_array_equal(part.labels, labels[3:])
  assert 'tensorflow' not in sys.modules


def test_load_tfds_from_a_bucket_equals_the_local_read(tiny_tfds_dir, bucket):
  """array_record opens local files only; a gs:// data_dir is downloaded and read the same."""
  for folder, _, names in os.walk(tiny_tfds_dir):
    for name in names:
      local = os.path.join(folder, name)
      with open(local, 'rb') as f:
        storage.write_atomic(f'{bucket}/tfds/{os.path.relpath(local, tiny_tfds_dir)}', f.read())
  read = lambda data_dir: loaders.load_tfds('tiny_segmentation', data_dir=data_dir,
                                            split='train[1:]', label_key='mask', num_classes=3)
  local, remote = read(tiny_tfds_dir), read(f'{bucket}/tfds')
  np.testing.assert_array_equal(remote.images, local.images)
  np.testing.assert_array_equal(remote.labels, local.labels)


def test_load_tfds_errors(tiny_tfds_dir, tmp_path):
  with pytest.raises(KeyError, match=r"example 0 has no feature 'label'.*\['image', 'mask'\]"):
    loaders.load_tfds('tiny_segmentation', data_dir=tiny_tfds_dir, split='train')
  with pytest.raises(ValueError, match=r'example 0 label has values \[2\] outside'):
    loaders.load_tfds('tiny_segmentation', data_dir=tiny_tfds_dir, split='train',
                      label_key='mask', num_classes=2)
  with pytest.raises(FileNotFoundError, match=r"'absent_set'.*cannot be opened: there is no"):
    loaders.load_tfds('absent_set', data_dir=tiny_tfds_dir, split='train')
  with pytest.raises(ValueError, match=r"tfds_split.*Unknown split 'validation'"):
    loaders.load_tfds('tiny_segmentation', data_dir=tiny_tfds_dir, split='validation')
  # A dataset prepared as TFRECORD (only its metadata says so here: writing TFRECORD needs
  # TensorFlow) cannot be read by random access.
  shutil.copytree(tiny_tfds_dir, tmp_path / 'tfrecord')
  info = tmp_path / 'tfrecord' / 'tiny_segmentation' / '1.0.0' / 'dataset_info.json'
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(ValueError, match="not stored as array_record.*file_format='array_record'"):
    loaders.load_tfds('tiny_segmentation', data_dir=str(tmp_path / 'tfrecord'), split='train')
  with pytest.raises(FileNotFoundError, match='tfds_data_dir='):
    loaders.load_tfds('tiny_segmentation', data_dir=str(tmp_path / 'nowhere'), split='train')


def test_tfds_isbi_builder_matches_the_tiff_loader(isbi_dir, tmp_path):
  path = tfds_isbi.build(isbi_dir, str(tmp_path))
  assert os.path.isdir(path)
  reference = loaders.load_isbi(isbi_dir)
  data = loaders.load_tfds('isbi2012', data_dir=str(tmp_path), split='train', num_classes=2)
  np.testing.assert_array_equal(data.images, reference.images)
  np.testing.assert_array_equal(data.labels, reference.labels)
  val = loaders.load_tfds('isbi2012', data_dir=str(tmp_path), split='train[25:]')
  np.testing.assert_array_equal(val.images, reference.images[25:])
  slices = [int(tfds.data_source('isbi2012', data_dir=str(tmp_path), split='train')[i]['slice'])
            for i in range(30)]
  assert slices == list(range(30))


# ---------------------------------------------------------------- 3D volumes


def _write_volumes(tmp_path, count=2, shape=(4, 12, 10)):
  rng = np.random.default_rng(2)
  paths, raws = ([], []), ([], [])
  for i in range(count):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    label = np.where(rng.random(shape) < 0.3, 0, 255).astype(np.uint8)
    for kind, array, store, keep in (('image', image, paths[0], raws[0]),
                                     ('label', label, paths[1], raws[1])):
      path = str(tmp_path / f'{kind}{i}.tif')
      tifffile.imwrite(path, array, photometric='minisblack')
      store.append(path)
      keep.append(array)
  return paths, raws


def test_load_volumes(tmp_path):
  (image_paths, label_paths), (images, labels) = _write_volumes(tmp_path)
  data = loaders.load_volumes(image_paths, label_paths)
  assert data.images.shape == (2, 4, 12, 10, 1) and data.labels.shape == (2, 4, 12, 10)
  np.testing.assert_array_equal(data.images[..., 0], np.stack(images))
  np.testing.assert_array_equal(data.labels, (np.stack(labels) == 0).astype(np.uint8))
  as_classes = loaders.load_volumes(image_paths, label_paths, label_mode='classes',
                                    num_classes=2, ignore_label=255)
  np.testing.assert_array_equal(as_classes.labels, np.where(np.stack(labels) == 255, 255, 0))


def test_load_volumes_errors(tmp_path):
  (image_paths, label_paths), _ = _write_volumes(tmp_path)
  with pytest.raises(ValueError, match=r'label0\.tif has values \[255\] outside'):
    loaders.load_volumes(image_paths, label_paths, label_mode='classes', num_classes=2)
  flat = str(tmp_path / 'flat.tif')
  tifffile.imwrite(flat, np.zeros((12, 10), np.uint8))
  with pytest.raises(ValueError, match=r'flat\.tif has shape \(12, 10\); expected a multi-page'):
    loaders.load_volumes([flat], label_paths[:1])
  other = str(tmp_path / 'other.tif')
  tifffile.imwrite(other, np.zeros((3, 12, 10), np.uint8), photometric='minisblack')
  with pytest.raises(ValueError, match=r'other\.tif has shape \(3, 12, 10\) but .*image0\.tif'):
    loaders.load_volumes([image_paths[0], other], label_paths)
  with pytest.raises(ValueError, match=r'label file .*label0\.tif has shape \(4, 12, 10\) but'):
    loaders.load_volumes([other], label_paths[:1])
  with pytest.raises(ValueError, match='one label volume per image volume'):
    loaders.load_volumes(image_paths, label_paths[:1])
  with pytest.raises(ValueError, match=r"label_mode='instances' is not one of"):
    loaders.load_volumes(image_paths, label_paths, label_mode='instances')


def test_isbi_as_volume_and_z_split(isbi_dir):
  volume = loaders.isbi_as_volume(isbi_dir)
  slices = loaders.load_isbi(isbi_dir)
  assert volume.images.shape == (1, 30, 512, 512, 1) and volume.labels.shape == (1, 30, 512, 512)
  np.testing.assert_array_equal(volume.images[0], slices.images)
  np.testing.assert_array_equal(volume.labels[0], slices.labels)
  train, val = dataset_lib.split_volume_z(volume, (25, 26, 27, 28, 29))
  assert train.images.shape == (1, 25, 512, 512, 1) and val.labels.shape == (1, 5, 512, 512)
  np.testing.assert_array_equal(train.labels[0], slices.labels[:25])
  np.testing.assert_array_equal(val.images[0], slices.images[25:])
  train, val = dataset_lib.split_volume_z(volume, (2, 0, 1), gap=2)  # at the start, unordered
  np.testing.assert_array_equal(train.images[0], slices.images[5:])
  np.testing.assert_array_equal(val.images[0], slices.images[:3])
  for bad in [(10, 11, 12), (25, 27, 28, 29), (), (28, 29, 30)]:
    with pytest.raises(ValueError, match='contiguous range of z slices at the start or the end'):
      dataset_lib.split_volume_z(volume, bad)
  with pytest.raises(ValueError, match='leaves no z slices'):
    dataset_lib.split_volume_z(volume, range(0, 28), gap=2)
  with pytest.raises(ValueError, match=r'needs volumes \(N, D, H, W, C\)'):
    dataset_lib.split_volume_z(slices, (25,))
