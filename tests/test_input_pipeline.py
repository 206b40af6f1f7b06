"""Loader: shapes/dtypes, augmentation consistency, determinism, sharding, clear data errors."""

import os

import ml_collections
import numpy as np
import pytest
import tifffile

from experiments import isbi
from unet_jax.datasets import pipeline
from unet_jax.augment import transforms as T
from unet_jax.datasets import loaders
from unet_jax.datasets import sources
from unet_jax.datasets import dataset as dataset_lib
from unet_jax.augment import geometric as G


def _data_config(**overrides):
  config = isbi.get_config('cpu').data
  with config.unlocked():
    config.update(overrides)
  return config


def _derived_dataset(n=6, size=40, seed=0):
  """Labels derived from the image (label = image > 127) so any misalignment shows."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  labels = (images[..., 0] > 127).astype(np.uint8)
  return dataset_lib.Dataset(images, labels)


def _unnormalize(image, config):
  return np.round((image * config.std + config.mean) * 255).astype(np.int64)


@pytest.mark.parametrize('border', [0, 6])
def test_train_batches_shapes_dtypes_and_image_label_alignment(border):
  config = _data_config(crop_size=24)
  it = pipeline.train_iterator(_derived_dataset(), config, batch_size=3, border=border,
                                     seed=1)
  for _ in range(5):
    batch = next(it)
    assert batch['image'].shape == (3, 24, 24, 1) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (3, 24, 24) and batch['label'].dtype == np.int32
    raw = _unnormalize(batch['image'][..., 0], config)
    np.testing.assert_array_equal(batch['label'], (raw > 127).astype(np.int32))


def test_crops_come_from_the_image_and_augmentations_vary():
  data = _derived_dataset(n=1, size=32)
  config = _data_config(crop_size=32)
  it = pipeline.train_iterator(data, config, batch_size=1, border=0, seed=3)
  seen = set()
  original = data.images[0, ..., 0].astype(np.int64)
  variants = {np.rot90(np.flip(original, a) if a is not None else original, k).tobytes()
              for a in (None, 0, 1, (0, 1)) for k in range(4)}
  for _ in range(24):
    raw = _unnormalize(next(it)['image'][0, ..., 0], config)
    assert raw.tobytes() in variants  # every output is an exact flip/rotation of the input
    seen.add(raw.tobytes())
  assert len(seen) >= 4


def test_flip_and_rotation_apply_same_geometry_to_all_keys():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (5, 5, 2), dtype=np.uint8)
  example = {'image': image, 'label': image[..., 0].copy(), 'weight': image[..., 1] * 0.5,
             'id': 'keep'}
  for seed in range(8):
    for op in (G.RandomFlip(), G.RandomRot90(), T.RandomCrop((3, 4))):
      out = op.random_map(example, np.random.default_rng(seed))
      np.testing.assert_array_equal(out['label'], out['image'][..., 0])
      np.testing.assert_array_equal(out['weight'], out['image'][..., 1] * 0.5)
      assert out['id'] == 'keep'


def test_mirror_pad_reflects_like_numpy():
  x = np.arange(20, dtype=np.uint8).reshape(4, 5)
  out = T.MirrorPad(2).map({'image': x[..., None], 'label': x})
  np.testing.assert_array_equal(out['label'], np.pad(x, 2, mode='reflect'))
  np.testing.assert_array_equal(out['image'][..., 0], out['label'])


def test_non_square_rotation_keeps_shape():
  example = {'image': np.zeros((4, 6, 1)), 'label': np.zeros((4, 6), np.int32)}
  for seed in range(10):
    assert G.RandomRot90().random_map(example, np.random.default_rng(seed))['label'].shape == (4, 6)


def test_same_seed_same_batches_and_resume_from_iterator_state():
  data, config = _derived_dataset(), _data_config(crop_size=16)
  make = lambda: pipeline.train_iterator(data, config, batch_size=2, border=0, seed=7)
  a, b = make(), make()
  first = [next(a) for _ in range(6)]
  for x in first:
    np.testing.assert_array_equal(x['image'], next(b)['image'])
  c = make()
  [next(c) for _ in range(3)]
  state = c.get_state()
  d = make()
  d.set_state(state)
  for x in first[3:]:
    np.testing.assert_array_equal(x['image'], next(d)['image'])
  other = pipeline.train_iterator(data, config, batch_size=2, border=0, seed=8)
  assert not np.array_equal(next(other)['image'], first[0]['image'])


def test_process_slices_make_up_the_single_process_global_batch():
  n = 7
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 1), np.uint8)
  data = dataset_lib.Dataset(images, np.zeros((n, 8, 8), np.uint8))
  config = _data_config(crop_size=8, augment='brightness(p=0.5, delta=0.3)')
  whole = pipeline.train_iterator(data, config, batch_size=6, border=0, seed=0)
  parts = [pipeline.train_iterator(data, config, batch_size=2, border=0, seed=0,
                                         process_index=p, process_count=3) for p in range(3)]
  seen = set()
  for _ in range(5):
    expected = next(whole)['image']
    got = np.concatenate([next(part)['image'] for part in parts])
    np.testing.assert_array_equal(got, expected)  # same examples, same augmentation
    seen |= set(np.round(expected[:, 0, 0, 0] * 0.2 * 255 + 127.5).astype(int).tolist())
  assert len(seen) > 1
  assert parts[1].get_state() == whole.get_state()  # the state counts global steps


def test_eval_batches_pad_with_ignore_label_and_shard():
  data = _derived_dataset(n=5, size=16)
  batches = [list(pipeline.eval_batches(data, batch_size=2, pads=[(2, 2), (1, 3)], mean=0.5,
                                              std=0.2, process_index=p, process_count=2))
             for p in range(2)]
  assert len(batches[0]) == len(batches[1]) == 2  # equal counts across processes
  first = batches[0][0]
  assert first['image'].shape == (2, 20, 20, 1) and first['label'].shape == (2, 16, 16)
  np.testing.assert_array_equal(first['label'][0], data.labels[0])
  np.testing.assert_array_equal(first['label'][1], data.labels[2])
  assert (batches[1][1]['label'] == dataset_lib.IGNORE_LABEL).all()  # 5 examples, 6 slots
  labels = [b['label'] for proc in batches for b in proc]
  assert sum((l != dataset_lib.IGNORE_LABEL).all(axis=(1, 2)).sum() for l in labels) == 5


def test_split_holds_out_the_configured_indices():
  data = _derived_dataset(n=6)
  train, val = dataset_lib.split(data, (4, 5))
  assert len(train) == 4 and len(val) == 2
  np.testing.assert_array_equal(val.images, data.images[4:])
  for bad in [(), (6,), (-1,), tuple(range(6))]:
    with pytest.raises(ValueError, match='val_indices'):
      dataset_lib.split(data, bad)


def test_procedural_source_maps_membrane_to_class_one():
  config = _data_config(source='procedural')
  config.procedural.num_images = 2
  config.procedural.size = 64
  data = sources.load_dataset(config)
  assert data.images.shape == (2, 64, 64, 1) and data.images.dtype == np.uint8
  assert set(np.unique(data.labels)) == {0, 1}
  assert 0.05 < data.labels.mean() < 0.4  # membrane (class 1) is the minority


def test_real_isbi_stacks_load_with_the_documented_polarity(isbi_dir):
  data = loaders.load_isbi(isbi_dir)
  assert data.images.shape == (30, 512, 512, 1) and data.labels.shape == (30, 512, 512)
  assert abs(data.labels.mean() - 0.2196) < 0.001  # 21.96 % membrane per the data README
  membrane = data.images[..., 0][data.labels == 1].mean()
  interior = data.images[..., 0][data.labels == 0].mean()
  assert membrane < interior  # membranes are dark


def _write_pair(directory, images, labels):
  os.makedirs(directory, exist_ok=True)
  tifffile.imwrite(os.path.join(directory, 'train-volume.tif'), images, photometric='minisblack')
  tifffile.imwrite(os.path.join(directory, 'train-labels.tif'), labels, photometric='minisblack')


def test_missing_and_mismatched_files_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.data.directory'):
    loaders.load_isbi(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='train-volume.tif does not exist'):
    loaders.load_isbi(str(tmp_path))
  images = np.zeros((3, 16, 16), np.uint8)
  _write_pair(tmp_path / 'shape', images, np.zeros((3, 16, 12), np.uint8))
  with pytest.raises(ValueError, match=r'train-labels.tif has shape \(3, 16, 12\)'):
    loaders.load_isbi(str(tmp_path / 'shape'))
  _write_pair(tmp_path / 'values', images, np.full((3, 16, 16), 7, np.uint8))
  with pytest.raises(ValueError, match=r'train-labels.tif has values \[7\]'):
    loaders.load_isbi(str(tmp_path / 'values'))
  _write_pair(tmp_path / 'dtype', images.astype(np.float32), np.zeros((3, 16, 16), np.uint8))
  with pytest.raises(ValueError, match='train-volume.tif has dtype float32; expected uint8'):
    loaders.load_isbi(str(tmp_path / 'dtype'))
  os.makedirs(tmp_path / 'corrupt')
  (tmp_path / 'corrupt' / 'train-volume.tif').write_bytes(b'II*\x00garbage')
  tifffile.imwrite(tmp_path / 'corrupt' / 'train-labels.tif', np.zeros((3, 16, 16), np.uint8),
                   photometric='minisblack')
  with pytest.raises(ValueError, match='train-volume.tif is (empty or )?not a readable TIFF'):
    loaders.load_isbi(str(tmp_path / 'corrupt'))


def test_crop_larger_than_image_is_a_clear_error():
  it = pipeline.train_iterator(_derived_dataset(size=16), _data_config(crop_size=32),
                                     batch_size=1, border=0, seed=0)
  with pytest.raises(ValueError, match='crop size'):
    next(it)


def test_unknown_source_is_rejected():
  with pytest.raises(ValueError, match="config.data.source='tiff' is not one of"):
    sources.load_dataset(ml_collections.ConfigDict(dict(source='tiff')))


def test_weight_maps_are_cached_and_travel_with_the_geometry():
  config = _data_config(source='procedural', crop_size=48,
                        augment='elastic(p=1.0, sigma=6, grid=3)|rotate(p=1.0, degrees=20)|flip')
  config.procedural.num_images = 2
  config.procedural.size = 64
  config.weight_map.enabled = True
  data = sources.load_dataset(config)
  assert data.weights.shape == data.labels.shape and data.weights.dtype == np.float32
  # Membrane pixels between cells carry the large border weights, cell pixels only w_c.
  assert data.weights[data.labels == 1].max() > 5 * data.weights[data.labels == 0].max()
  it = pipeline.train_iterator(data, config, batch_size=2, border=0, seed=0)
  for _ in range(3):
    batch = next(it)
    assert batch['weight'].shape == batch['label'].shape == (2, 48, 48)
    cells = batch['weight'][batch['label'] == 0]
    membrane = batch['weight'][batch['label'] == 1]
    # Labels take the nearest pixel and weights are interpolated, so pixels next to a border
    # blend; misaligned maps would put membrane weights on cells and make these means similar.
    assert np.mean(cells < data.weights[data.labels == 0].max() + 1e-3) > 0.8
    assert membrane.mean() > 4 * cells.mean()


def test_augment_spec_typo_names_the_op():
  config = _data_config(crop_size=16, augment='flip|elastc(p=0.5)')
  with pytest.raises(ValueError, match="elastc"):
    pipeline.train_iterator(_derived_dataset(), config, batch_size=1, border=0, seed=0)


def test_folder_source_trains_on_the_real_nuclei_sample(tmp_path, nuclei_dir):
  import shutil  # pylint: disable=g-import-not-at-top
  from experiments import quickstart  # pylint: disable=g-import-not-at-top
  from unet_jax.training import loop  # pylint: disable=g-import-not-at-top
  for folder in ('images', 'masks'):
    os.makedirs(tmp_path / folder)
  for i in range(2):  # two copies so there is something to hold out
    shutil.copy(os.path.join(nuclei_dir, 'img2d.tif'), tmp_path / 'images' / f'n{i}.tif')
    shutil.copy(os.path.join(nuclei_dir, 'mask2d.tif'), tmp_path / 'masks' / f'n{i}.tif')
  config = quickstart.get_config('smoke')
  config.data.source = 'folder'
  config.data.images_dir = str(tmp_path / 'images')
  config.data.masks_dir = str(tmp_path / 'masks')
  config.data.class_names = ('background', 'nucleus')
  config.data.val_indices = (1,)
  config.data.crop_size = 64
  config.checkpoint.best_metric = 'dice_nucleus'
  config.eval.isbi_metrics = False
  config.eval_batch_size = 8
  data = sources.load_dataset(config.data)
  assert data.images.shape == (2, 512, 512, 1) and abs(data.labels.mean() - 0.199) < 0.001
  scores = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 0 <= scores['dice_nucleus'] <= 1 and 'dice_background' in scores
