"""Predict mode end to end: a tiny trained checkpoint applied to PNG, TIFF stacks and folders."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tifffile
from PIL import Image

from experiments import quickstart
from unet_jax import checkpointing
from unet_jax.inference import export
from unet_jax.inference import predict
from unet_jax.training import loop
from unet_jax.models import build_model


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A 4-step smoke run (SAME U-Net, width 4, depth 2, batch norm, 32-pixel crops)."""
  config = quickstart.get_config('smoke')
  workdir = str(tmp_path_factory.mktemp('predict') / 'run')
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def _png(path, shape, seed, mode=None):
  array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
  return array


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_restore_reads_the_checkpointed_parameters(trained):
  config, workdir = trained
  restored = checkpointing.restore_for_inference(config, workdir, checkpoint='latest')
  assert (restored.step, restored.spatial_rank, restored.input_channels) == (4, 2, 1)
  raw = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '4', 'state'))
  pairs = zip(jax.tree.leaves(restored.variables['params']), jax.tree.leaves(raw['params']))
  for got, want in pairs:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert checkpointing.restore_for_inference(config, workdir, checkpoint='best').step in (2, 4)
  with pytest.raises(ValueError, match="'best', 'latest'"):
    checkpointing.restore_for_inference(config, workdir, checkpoint='first')


def test_png_image(trained, tmp_path):
  config, workdir = trained
  image = _png(tmp_path / 'cells.png', (32, 32), seed=0)
  summary = predict.run(config, workdir, str(tmp_path / 'cells.png'), str(tmp_path / 'out'),
                        checkpoint='latest', progress=False)
  assert summary.predicted == 1 and not summary.failed
  out = tmp_path / 'out'
  mask = np.asarray(Image.open(out / 'cells_mask.png'))
  probs = tifffile.imread(out / 'cells_probabilities.tif')
  overlay = np.asarray(Image.open(out / 'cells_overlay.png'))
  assert mask.shape == (32, 32) and mask.dtype == np.uint8
  assert probs.shape == (32, 32, 2) and probs.dtype == np.float32
  assert overlay.shape == (32, 32, 3)
  np.testing.assert_array_equal(mask, probs.argmax(-1))
  # One 32-pixel tile: the driver's output is the model applied to the normalised image.
  restored = checkpointing.restore_for_inference(config, workdir, checkpoint='latest')
  x = (image.astype(np.float32) / 255 - config.data.mean) / config.data.std
  logits = restored.model.apply(restored.variables, x[None, :, :, None], train=False)
  np.testing.assert_allclose(probs, _softmax(np.asarray(logits)[0]), rtol=1e-5, atol=1e-6)


def test_multipage_tiff_is_predicted_slice_by_slice(trained, tmp_path):
  config, workdir = trained
  stack = np.random.default_rng(1).integers(0, 256, (3, 36, 44), dtype=np.uint8)
  tifffile.imwrite(tmp_path / 'stack.tif', stack, photometric='minisblack')
  single = tmp_path / 'one'
  single.mkdir()
  tifffile.imwrite(single / 'slice1.tif', stack[1])
  predict.run(config, workdir, str(tmp_path / 'stack.tif'), str(tmp_path / 'out'), tta='flips',
              checkpoint='latest', progress=False)
  predict.run(config, workdir, str(single / 'slice1.tif'), str(tmp_path / 'out1'), tta='flips',
              checkpoint='latest', progress=False)
  mask = tifffile.imread(tmp_path / 'out' / 'stack_mask.tif')
  probs = tifffile.imread(tmp_path / 'out' / 'stack_probabilities.tif')
  assert mask.shape == (3, 36, 44) and mask.dtype == np.uint8
  assert probs.shape == (3, 36, 44, 2) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert sorted(os.listdir(tmp_path / 'out'))[:3] == ['stack_mask.tif', 'stack_overlay_000.png',
                                                      'stack_overlay_001.png']
  # Slice 1 of the stack is predicted as if it were its own file.
  alone = tifffile.imread(tmp_path / 'out1' / 'slice1_probabilities.tif')
  np.testing.assert_allclose(probs[1], alone, rtol=1e-5, atol=1e-6)


def test_an_isbi_model_writes_the_challenge_submission_stack(trained, tmp_path):
  config, workdir = trained
  stack = np.random.default_rng(2).integers(0, 256, (3, 32, 40), dtype=np.uint8)
  tifffile.imwrite(tmp_path / 'test-volume.tif', stack, photometric='minisblack')
  isbi = config.copy_and_resolve_references()
  isbi.data.source = 'isbi'  # predict reads no training data; the model is the same
  predict.run(isbi, workdir, str(tmp_path / 'test-volume.tif'), str(tmp_path / 'out'),
              checkpoint='latest', progress=False)
  probs = tifffile.imread(tmp_path / 'out' / 'test-volume_probabilities.tif')
  with tifffile.TiffFile(tmp_path / 'out' / 'test-volume_isbi_submission.tif') as tif:
    assert len(tif.pages) == 3 and tif.pages[0].dtype == np.float32
    submission = tif.asarray()
  assert submission.shape == (3, 32, 40)
  np.testing.assert_allclose(submission, 1 - probs[..., config.eval.membrane_class], atol=1e-6)
  assert 0 <= submission.min() and submission.max() <= 1
  # Other sources get no submission file.
  predict.run(config, workdir, str(tmp_path / 'test-volume.tif'), str(tmp_path / 'plain'),
              checkpoint='latest', progress=False)
  assert not list((tmp_path / 'plain').glob('*submission*'))


def test_folder_with_a_corrupt_file_and_a_colour_image(trained, tmp_path, caplog):
  config, workdir = trained
  folder = tmp_path / 'in'
  folder.mkdir()
  _png(folder / 'a.png', (40, 50), seed=2)
  (folder / 'b_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 20)
  _png(folder / 'c_colour.png', (20, 24, 3), seed=3)  # 3 different channels, model takes 1
  _png(folder / 'd_gray_as_rgb.png', (20, 24), seed=4, mode='L')
  Image.open(folder / 'd_gray_as_rgb.png').convert('RGB').save(folder / 'd_gray_as_rgb.png')
  (folder / 'notes.txt').write_text('not an image')
  with caplog.at_level(logging.WARNING, logger='unet_jax'):
    summary = predict.run(config, workdir, str(folder), str(tmp_path / 'out'), progress=False)
  assert summary.predicted == 2
  assert [os.path.basename(p) for p, _ in summary.failed] == ['b_corrupt.png', 'c_colour.png']
  assert 'channel(s) but the model takes 1' in summary.failed[1][1]
  assert 'b_corrupt.png' in caplog.text and 'c_colour.png' in caplog.text
  assert 'skipped 2' in caplog.text
  out = tmp_path / 'out'
  assert np.asarray(Image.open(out / 'a_mask.png')).shape == (40, 50)
  assert tifffile.imread(out / 'd_gray_as_rgb_probabilities.tif').shape == (20, 24, 2)
  assert not any(name.startswith(('b_', 'c_', 'notes')) for name in os.listdir(out))


def test_errors(trained, tmp_path):
  config, workdir = trained
  _png(tmp_path / 'x.png', (20, 20), seed=5)
  with pytest.raises(ValueError, match=r'tile_size=30 .*valid.*\[.*32'):
    predict.run(config, workdir, str(tmp_path / 'x.png'), str(tmp_path / 'out'), tile_size=30)
  (tmp_path / 'bad.png').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='no input could be predicted.*bad.png'):
    predict.run(config, workdir, str(tmp_path / 'bad.png'), str(tmp_path / 'out'), progress=False)
  with pytest.raises(FileNotFoundError):
    predict.run(config, workdir, str(tmp_path / 'missing.png'), str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match='checkpoints'):
    predict.run(config, str(tmp_path), str(tmp_path / 'x.png'), str(tmp_path / 'out'))


def test_export_from_the_checkpoint(trained, tmp_path):
  config, workdir = trained
  path = str(tmp_path / 'model.stablehlo')
  export.run(config, workdir, path, checkpoint='latest', tile_size=48)
  signature = export.read_signature(path)
  assert signature['input']['shape'] == ['b', 48, 48, 1]
  assert signature['metadata']['mean'] == config.data.mean
  assert signature['metadata']['tile_shape'] == signature['metadata']['output_shape'] == [48, 48]
  restored = checkpointing.restore_for_inference(config, workdir, checkpoint='latest')
  x = np.random.default_rng(6).normal(size=(2, 48, 48, 1)).astype(np.float32)
  logits = restored.model.apply(restored.variables, x, train=False)
  np.testing.assert_allclose(np.asarray(export.load(path).call(x)), _softmax(np.asarray(logits)),
                             rtol=1e-5, atol=1e-6)


def test_a_3d_model_predicts_a_stack_as_one_volume(tmp_path):
  """A checkpoint of a 3D, 2-channel U-Net: the layout is read from the saved kernels."""
  config = quickstart.get_config('smoke')
  model = build_model(config.model, num_classes=2)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 32, 2)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if any(k in jax.tree_util.keystr(path) for k in ('var', 'scale')):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
    return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  state = {'step': np.int32(7), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': {'count': np.int32(7)}}
  workdir = str(tmp_path / 'run3d')
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints'), keep_best=0,
                                       best_metric=config.checkpoint.best_metric)
  checkpointing.save(manager, 7, state, {})
  checkpointing.wait(manager)
  manager.close()

  volume = np.random.default_rng(1).integers(0, 256, (6, 20, 24, 2), dtype=np.uint8)
  tifffile.imwrite(tmp_path / 'volume.tif', volume, photometric='minisblack')
  gray = tmp_path / 'gray.tif'
  tifffile.imwrite(gray, volume[..., 0], photometric='minisblack')  # 1 channel: unsuitable
  summary = predict.run(config, workdir, str(tmp_path / 'volume.tif'), str(tmp_path / 'out'),
                        checkpoint='latest', progress=False)
  assert summary.step == 7
  probs = tifffile.imread(tmp_path / 'out' / 'volume_probabilities.tif')
  assert probs.shape == (6, 20, 24, 2)
  assert tifffile.imread(tmp_path / 'out' / 'volume_mask.tif').shape == (6, 20, 24)
  assert len([n for n in os.listdir(tmp_path / 'out') if 'overlay' in n]) == 6  # one per z
  # One 32³ tile over the volume mirror-padded at the far ends.
  x = (volume.astype(np.float32) / 255 - config.data.mean) / config.data.std
  x = np.pad(x, [(0, 26), (0, 12), (0, 8), (0, 0)], mode='reflect')
  logits = np.asarray(jax.jit(model.apply)(variables, x[None]))[0, :6, :20, :24]
  np.testing.assert_allclose(probs, _softmax(logits), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r'1 channel\(s\) but the model takes 2'):
    predict.run(config, workdir, str(gray), str(tmp_path / 'out'), progress=False)
