"""One intensity rule for training and prediction: fitted per dataset, saved with the run, applied
by predict and export to inputs of any dtype."""

import json
import os
import shutil

import numpy as np
import pytest
import tifffile

from experiments import quickstart
from unet_jax import checkpointing
from unet_jax.config import validation
from unet_jax.datasets import images as image_files
from unet_jax.datasets import procedural
from unet_jax.datasets import sources
from unet_jax.inference import export
from unet_jax.inference import predict
from unet_jax.training import loop


def _reference_uint8(images):
  """The documented rule written out in numpy: percentiles 0.5/99.5 → 0/255, clipped."""
  lo, hi = np.percentile(images.astype(np.float64), (0.5, 99.5))
  return np.round(np.clip((images - lo) * 255.0 / (hi - lo), 0, 255)).astype(np.uint8)


def test_the_rule_keeps_8_bit_data_and_stretches_the_rest():
  rng = np.random.default_rng(0)
  eight_bit_in_uint16 = rng.integers(0, 236, (2, 9, 9), dtype=np.uint16)
  scaling = image_files.IntensityScaling.fit(eight_bit_in_uint16)
  assert scaling.is_identity and scaling.dtype == 'uint16'
  np.testing.assert_array_equal(scaling.to_uint8(eight_bit_in_uint16), eight_bit_in_uint16)
  twelve_bit = rng.integers(0, 4096, (2, 30, 30), dtype=np.uint16)
  scaling = image_files.IntensityScaling.fit(twelve_bit)
  np.testing.assert_array_equal(scaling.to_uint8(twelve_bit), _reference_uint8(twelve_bit))
  restored = image_files.IntensityScaling.from_dict(json.loads(json.dumps(scaling.to_dict())))
  assert restored == scaling


def test_each_input_gets_the_training_rule_or_an_announced_one(caplog):
  rng = np.random.default_rng(1)
  train = rng.integers(0, 4096, (40, 40), dtype=np.uint16)
  scaling = image_files.IntensityScaling.fit(train)
  assert scaling.for_input(train[:10], 'a.tif') is scaling  # the training dtype: its rule
  as_float = scaling.to_unit(train)
  np.testing.assert_array_equal(scaling.for_input(as_float, 'b.tif').to_uint8(as_float),
                                scaling.to_uint8(train))  # training's own [0, 1] floats
  eight_bit = rng.integers(0, 256, (5, 5), dtype=np.uint8)
  assert scaling.for_input(eight_bit, 'c.png').to_uint8(eight_bit) is eight_bit
  # A 12-bit stack given to a model trained on 8-bit data is stretched by its own
  # percentiles, with a warning naming it, instead of being clipped to white.
  with caplog.at_level('WARNING', logger='unet_jax'):
    chosen = image_files.IntensityScaling().for_input(train, 'stack.tif')
  np.testing.assert_array_equal(chosen.to_uint8(train), _reference_uint8(train))
  assert 'stack.tif' in caplog.text and 'uint16' in caplog.text


@pytest.fixture(scope='module')
def trained_on_uint16(tmp_path_factory):
  """A smoke run of the folder source on 12-bit procedural images stored as uint16."""
  root = tmp_path_factory.mktemp('uint16')
  images, labels = procedural.make_em_like(num_images=4, size=64, seed=3)
  for folder in ('images', 'masks'):
    os.makedirs(root / folder)
  raw = images.astype(np.uint16) * 16 + 40  # 12-bit data whose range is not [0, 255]
  for i, (image, label) in enumerate(zip(raw, labels)):
    tifffile.imwrite(root / 'images' / f'e{i}.tif', image)
    tifffile.imwrite(root / 'masks' / f'e{i}.tif', (label == 0).astype(np.uint8))
  config = quickstart.get_config('smoke')
  config.data.source = 'folder'
  config.data.images_dir = str(root / 'images')
  config.data.masks_dir = str(root / 'masks')
  config.data.mask_mode = 'binary'
  config.data.val_indices = (3,)
  validation.validate(config)
  workdir = str(root / 'run')
  loop.train_and_evaluate(config, workdir)
  return config, workdir, raw


def test_a_uint16_model_predicts_the_same_masks_from_uint16_and_its_training_floats(
    trained_on_uint16, tmp_path):
  config, workdir, raw = trained_on_uint16
  saved = image_files.load_scaling(workdir)
  assert saved == sources.load_dataset(config.data).scaling and not saved.is_identity
  # What the training pipeline made of image 0, before mean/std: its [0, 1] float.
  training_float = sources.load_dataset(config.data).images[0, ..., 0].astype(np.float32) / 255
  np.testing.assert_array_equal(saved.to_unit(raw[0]), training_float)
  os.makedirs(tmp_path / 'in')
  tifffile.imwrite(tmp_path / 'in' / 'a_uint16.tif', raw[0])
  tifffile.imwrite(tmp_path / 'in' / 'b_float.tif', training_float)
  predict.run(config, workdir, str(tmp_path / 'in'), str(tmp_path / 'out'), checkpoint='latest',
              progress=False, write_overlays=False)
  p16 = tifffile.imread(tmp_path / 'out' / 'a_uint16_probabilities.tif')
  pfloat = tifffile.imread(tmp_path / 'out' / 'b_float_probabilities.tif')
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'out' / 'a_uint16_mask.tif'),
                                tifffile.imread(tmp_path / 'out' / 'b_float_mask.tif'))
  np.testing.assert_allclose(p16, pfloat, atol=1e-6)
  # The old rule (divide by the dtype maximum) gives the model a different, darker image.
  restored = checkpointing.restore_for_inference(config, workdir, checkpoint='latest')
  old = (raw[0].astype(np.float32) / 65535 - config.data.mean) / config.data.std
  old_probs = np.asarray(restored.model.apply(restored.variables, old[None, ..., None],
                                              train=False))
  assert np.abs(old_probs - p16[None]).max() > 1e-3
  files = export.run(config, workdir, str(tmp_path / 'model.stablehlo'), checkpoint='latest')
  signature = json.load(open(files[1], encoding='utf-8'))
  assert signature['metadata']['intensity_scaling'] == saved.to_dict()


def test_the_real_uint16_nuclei_image_predicts_as_its_uint8_copy(trained_on_uint16, tmp_path,
                                                                  nuclei_dir):
  """img2d.tif is uint16 holding 0–235: the rule a run fits on it keeps it as it is, and
  prediction sees the uint16 file exactly as its uint8 copy (the old dtype-maximum rule made it
  nearly black and predicted nothing)."""
  image = tifffile.imread(os.path.join(nuclei_dir, 'img2d.tif'))
  assert image.dtype == np.uint16 and image.max() <= 255
  for folder in ('images', 'masks'):
    os.makedirs(tmp_path / folder)
  mask = tifffile.imread(os.path.join(nuclei_dir, 'mask2d.tif'))
  for i, (r, c) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):  # the four quadrants
    tifffile.imwrite(tmp_path / 'images' / f'q{i}.tif', image[r:r + 256, c:c + 256])
    tifffile.imwrite(tmp_path / 'masks' / f'q{i}.tif', mask[r:r + 256, c:c + 256])
  config, workdir, _ = trained_on_uint16
  folder = config.data.copy_and_resolve_references()
  folder.images_dir, folder.masks_dir = str(tmp_path / 'images'), str(tmp_path / 'masks')
  folder.mask_mode = 'instances'
  fitted = sources.load_dataset(folder).scaling  # what training on the quadrants saves
  assert fitted == image_files.IntensityScaling('uint16', 0.0, 255.0)
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  image_files.save_scaling(fitted, str(run))
  os.makedirs(tmp_path / 'in')
  tifffile.imwrite(tmp_path / 'in' / 'as_uint16.tif', image[:128, :128])
  tifffile.imwrite(tmp_path / 'in' / 'as_uint8.tif', image[:128, :128].astype(np.uint8))
  predict.run(config, str(run), str(tmp_path / 'in'), str(tmp_path / 'out'),
              checkpoint='latest', progress=False, write_overlays=False, tile_size=64)
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'out' / 'as_uint16_probabilities.tif'),
                                tifffile.imread(tmp_path / 'out' / 'as_uint8_probabilities.tif'))
