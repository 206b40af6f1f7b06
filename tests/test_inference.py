"""Whole-image and overlap-tile prediction, test-time augmentation, sharding."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from unet_jax.evaluation import evaluator
from unet_jax.inference import tiled
from unet_jax import sharding
from unet_jax.inference import tiling
from unet_jax.models import UNet
from unet_jax.models import whole_image

from unet_sizes import output_size, valid_input_sizes


def model_padding(shape, *, depth, padding):
  return whole_image.model_padding(UNet(depth=depth, padding=padding), shape)


def predict_logits(apply, images, *, depth, padding):
  """One pass over whole mirror-padded images, cut back to them (as evaluation runs)."""
  spatial = images.shape[1:-1]
  pads = model_padding(spatial, depth=depth, padding=padding)
  padded = whole_image.mirror_pad(np.asarray(images), [(0, 0), *pads, (0, 0)])
  return whole_image.crop_to(apply(jnp.asarray(padded)), spatial)


def _random_variables(model, input_shape, seed=0):
  """He-scaled random variables without running `model.init` (op-by-op init compiles slowly)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'var' in name or 'scale' in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
    return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize('padding,depth', [('VALID', 2), ('VALID', 1), ('SAME', 2)])
def test_model_padding_makes_a_runnable_input_covering_the_image(padding, depth):
  for size in (5, 17, 40, 64):
    (before, after), = model_padding((size,), depth=depth, padding=padding)
    padded = size + before + after
    assert output_size(padded, depth=depth, padding=padding) >= size
    if padding == 'VALID':
      assert before == (padded - output_size(padded, depth=depth, padding=padding)) // 2
    else:
      assert before == 0


def test_valid_net_output_lines_up_with_the_image():
  """Any valid sub-window of the padded image predicts the same pixels as the full pass."""
  model = UNet(num_classes=2, width=2, depth=2, padding='VALID')
  image = np.random.default_rng(0).normal(size=(1, 30, 26, 1)).astype(np.float32)
  variables = _random_variables(model, (1, 44, 44, 1))
  apply = functools.partial(jax.jit(model.apply), variables)
  full = np.asarray(predict_logits(apply, image, depth=2, padding='VALID'))
  assert full.shape == (1, 30, 26, 2)
  pads = model_padding((30, 26), depth=2, padding='VALID')
  padded = whole_image.mirror_pad(image, [(0, 0), *pads, (0, 0)])
  size = valid_input_sizes(depth=2, count=1)[0]
  out = output_size(size, depth=2, padding='VALID')
  border = (size - out) // 2
  # Pooling makes the net equivariant to shifts by multiples of 2**depth only.
  last = lambda extent: (extent - size) // 4 * 4
  for top, left in [(0, 0), (4, 8), (last(padded.shape[1]), last(padded.shape[2]))]:
    window = padded[:, top:top + size, left:left + size]
    local = np.asarray(apply(jnp.asarray(window)))
    r0, c0 = top + border - pads[0][0], left + border - pads[1][0]
    rows = [r for r in range(r0, r0 + out) if 0 <= r < 30]
    cols = [c for c in range(c0, c0 + out) if 0 <= c < 26]
    np.testing.assert_allclose(local[0, rows[0] - r0:rows[-1] - r0 + 1,
                                     cols[0] - c0:cols[-1] - c0 + 1],
                               full[0, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1],
                               rtol=1e-5, atol=1e-5)


def test_same_net_prediction_equals_a_plain_forward_pass():
  model = UNet(num_classes=3, width=2, depth=2, padding='SAME')
  image = np.random.default_rng(1).normal(size=(2, 32, 24, 1)).astype(np.float32)
  variables = _random_variables(model, image.shape)
  apply = functools.partial(jax.jit(model.apply), variables)
  np.testing.assert_allclose(predict_logits(apply, image, depth=2, padding='SAME'),
                             apply(jnp.asarray(image)), rtol=1e-6)
  probs = whole_image.head_probabilities(apply(jnp.asarray(image)))
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


# Overlap-tile prediction (TiledPredictor).

def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _pixelwise(variables, x):
  """A SAME "model" whose logits at a pixel depend only on that pixel."""
  del variables
  return jnp.concatenate([jnp.sin(3 * x), x**2 - 1, 0.5 * x], axis=-1)


SAME_IDENTITY = tiling.TileGeometry(output_size=lambda s: s, valid_input_size=lambda s: s,
                                    size_multiple=4)


@pytest.mark.parametrize('pipelined', [False, True])
@pytest.mark.parametrize('shape,tile,overlap,blend', [
    ((37, 50), 16, 0.5, 'gaussian'),
    ((37, 50), 16, 0.25, 'constant'),
    ((9, 6), 16, 0.25, 'gaussian'),      # smaller than one tile
    ((13, 21, 10), 8, 0.5, 'gaussian'),  # a volume
])
def test_same_tiles_stitch_to_the_whole_image_function(shape, tile, overlap, blend, pipelined):
  image = np.random.default_rng(0).normal(size=(*shape, 1)).astype(np.float32)
  predictor = tiled.TiledPredictor(_pixelwise, {}, geometry=SAME_IDENTITY, tile_size=tile,
                                   batch_size=3, overlap=overlap, blend=blend,
                                   pipelined=pipelined)
  assert len(predictor.plan(shape)) > 1 or max(shape) <= tile
  probs = predictor(image)
  assert probs.shape == (*shape, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs, _softmax(np.asarray(_pixelwise(None, image))), atol=1e-6)


def test_pipelined_and_one_batch_at_a_time_predictions_are_identical():
  model, variables = _valid_unet()
  image = np.random.default_rng(4).normal(size=(70, 61, 1)).astype(np.float32)
  default = tiled.TiledPredictor.for_model(model, variables, tile_size=44, batch_size=2)
  # On CPU devices the host adds each batch after it ran: its copying would share the cores.
  assert not default.pipelined
  pipelined = tiled.TiledPredictor.for_model(model, variables, tile_size=44, batch_size=2,
                                             pipelined=True)
  assert len(default.plan(image.shape[:-1])) > 2 * default.batch_size
  np.testing.assert_array_equal(pipelined(image), default(image))


def _valid_unet(depth=2):
  model = UNet(num_classes=2, width=2, depth=depth, padding='VALID')
  return model, _random_variables(model, (1, 44, 44, 1), seed=3)


@pytest.mark.parametrize('shape,tile', [((45, 50), 60), ((45, 50), 52), ((7, 5), 48)])
def test_valid_tiles_match_one_pass_over_the_mirror_padded_image(shape, tile):
  model, variables = _valid_unet()
  image = np.random.default_rng(1).normal(size=(*shape, 1)).astype(np.float32)
  predictor = tiled.TiledPredictor.for_model(model, variables, tile_size=tile, batch_size=4)
  assert len(predictor.plan(shape)) > 1 or max(shape) < 8
  probs = predictor(image)
  # Reference: one forward pass over the whole image, reflected (periodically) at the borders.
  pads = model_padding(shape, depth=2, padding='VALID')
  padded = np.pad(image, [*pads, (0, 0)], mode='reflect')
  logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(padded[None])))[0]
  reference = _softmax(logits[:shape[0], :shape[1]])
  np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
  # Evaluation's one mirror-padded pass agrees, also for images smaller than the border.
  whole = predict_logits(functools.partial(jax.jit(model.apply), variables), image[None],
                         depth=2, padding='VALID')
  np.testing.assert_allclose(probs, whole_image.head_probabilities(whole)[0], rtol=1e-5, atol=1e-6)


def test_an_image_of_one_tile_equals_a_plain_forward_pass():
  model = UNet(num_classes=3, width=2, depth=2, padding='SAME', norm='batch')
  image = np.random.default_rng(2).normal(size=(16, 24, 1)).astype(np.float32)
  variables = _random_variables(model, (1, 16, 24, 1))
  predictor = tiled.TiledPredictor.for_model(model, variables, tile_size=(16, 24))
  assert len(predictor.plan((16, 24))) == 1
  plain = jax.jit(model.apply)(variables, jnp.asarray(image[None]))
  np.testing.assert_allclose(predictor(image), whole_image.head_probabilities(plain)[0], rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(predictor.predict_tiles(image[None]), whole_image.head_probabilities(plain),
                             rtol=1e-6, atol=1e-7)
  model, variables = _valid_unet()
  image = image[:, :20, :1][:20]  # the output size of a 60-pixel tile
  predictor = tiled.TiledPredictor.for_model(model, variables, tile_size=60)
  assert len(predictor.plan((16, 20))) == 1
  padded = np.pad(image, [(20, 24), (20, 20), (0, 0)], mode='reflect')
  plain = jax.jit(model.apply)(variables, jnp.asarray(padded[None]))[0, :16]
  np.testing.assert_allclose(predictor(image), whole_image.head_probabilities(plain), rtol=1e-6,
                             atol=1e-7)


def test_valid_volume_matches_one_pass():
  model = UNet(num_classes=2, width=2, depth=1, padding='VALID')
  variables = _random_variables(model, (1, 20, 20, 20, 1), seed=1)
  shape = (11, 9, 6)
  image = np.random.default_rng(3).normal(size=(*shape, 1)).astype(np.float32)
  predictor = tiled.TiledPredictor.for_model(model, variables, tile_size=20, batch_size=4)
  assert len(predictor.plan(shape)) > 1
  pads = model_padding(shape, depth=1, padding='VALID')
  padded = np.pad(image, [*pads, (0, 0)], mode='reflect')
  logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(padded[None])))[0]
  np.testing.assert_allclose(predictor(image), _softmax(logits[:11, :9, :6]), rtol=1e-5,
                             atol=1e-6)


KERNEL = np.array([[0.3, -1.0, 0.2], [0.5, 1.5, 0.0], [-0.7, 0.1, 0.9]], np.float32)


def _valid_conv(variables, x):
  """A VALID "model": a 3×3 correlation with an asymmetric kernel (trims one pixel per border)."""
  y = jax.lax.conv_general_dilated(x, variables['kernel'][:, :, None, None], (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.concatenate([y, jnp.zeros_like(y)], axis=-1)


CONV_GEOMETRY = tiling.TileGeometry(output_size=lambda s: s - 2 if s > 2 else _too_small(s),
                                    valid_input_size=lambda o: o + 2, size_multiple=1)


def _too_small(size):
  raise ValueError(f'input size {size} is too small; valid sizes: [3, 4, 5]')


@pytest.mark.parametrize('mode', ['none', 'flips', 'dihedral'])
def test_tta_averages_the_inverse_transformed_predictions(mode):
  image = np.random.default_rng(4).normal(size=(13, 18, 1)).astype(np.float32)
  predictor = tiled.TiledPredictor(_valid_conv, {'kernel': jnp.asarray(KERNEL)},
                                       geometry=CONV_GEOMETRY, tile_size=8, batch_size=5)
  probs = predictor(image, tta=mode)
  # Predicting the transformed image and transforming back is correlating with the transformed
  # kernel, so the reference averages over the kernel's orbit under the same transforms.
  kernels = {'none': [KERNEL],
             'flips': [KERNEL, KERNEL[::-1], KERNEL[:, ::-1], KERNEL[::-1, ::-1]],
             'dihedral': [np.rot90(k, r) for k in (KERNEL, KERNEL[::-1]) for r in range(4)]}[mode]
  padded = np.pad(image[..., 0], 1, mode='reflect')
  reference = np.mean([_softmax(np.stack([signal.correlate2d(padded, k, mode='valid'),
                                           np.zeros((13, 18))], -1)) for k in kernels], axis=0)
  np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
  if mode != 'none':  # the augmentation really changes the result of an asymmetric model
    assert np.abs(probs - predictor(image)).max() > 1e-2


def test_tta_with_an_equivariant_model_is_exact():
  image = np.random.default_rng(5).normal(size=(10, 23, 7, 1)).astype(np.float32)
  predictor = tiled.TiledPredictor(_pixelwise, {}, geometry=SAME_IDENTITY, tile_size=8)
  expected = _softmax(np.asarray(_pixelwise(None, image)))
  for mode in ('flips', 'dihedral'):
    np.testing.assert_allclose(predictor(image, tta=mode), expected, atol=1e-6)
  symmetric = (KERNEL + KERNEL[::-1] + KERNEL[:, ::-1] + KERNEL[::-1, ::-1]) / 4
  symmetric = (symmetric + symmetric.T) / 2  # invariant under all 8 flips and rotations
  image = image[:, :, 0]
  predictor = tiled.TiledPredictor(_valid_conv, {'kernel': jnp.asarray(symmetric)},
                                       geometry=CONV_GEOMETRY, tile_size=9)
  np.testing.assert_allclose(predictor(image, tta='dihedral'), predictor(image), atol=1e-6)


def test_transforms_invert_and_are_distinct():
  x = np.random.default_rng(6).normal(size=(3, 4, 2))
  for mode, count in [('none', 1), ('flips', 4), ('dihedral', 8)]:
    transforms = whole_image.tta_transforms(mode, rank=2)
    assert len(transforms) == count
    outputs = {t.forward(x, 2).tobytes() + bytes(t.forward(x, 2).shape) for t in transforms}
    assert len(outputs) == count
    for t in transforms:
      np.testing.assert_array_equal(t.inverse(t.forward(x, 2), 2), x)
  with pytest.raises(ValueError, match='dihedral'):
    whole_image.tta_transforms('rot90', rank=2)


def test_one_and_eight_devices_agree():
  assert jax.device_count() == 8
  model = UNet(num_classes=2, width=2, depth=2, padding='SAME', norm='batch')
  variables = _random_variables(model, (1, 16, 16, 1), seed=2)
  image = np.random.default_rng(7).normal(size=(40, 36, 1)).astype(np.float32)
  results = []
  for devices in (1, 8):
    predictor = tiled.TiledPredictor.for_model(model, variables, tile_size=16, batch_size=5,
                                                   overlap=0.5, mesh=sharding.make_mesh(devices))
    assert predictor.batch_size == (5 if devices == 1 else 8)
    results.append(predictor(image, tta='flips'))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_predictor_errors_are_clear():
  with pytest.raises(ValueError, match='valid .*sizes'):
    tiled.TiledPredictor.for_model(UNet(depth=2, padding='VALID'), {}, tile_size=50)
  with pytest.raises(ValueError, match='gaussian'):
    tiled.TiledPredictor(_pixelwise, {}, geometry=SAME_IDENTITY, tile_size=8, blend='box')
  predictor = tiled.TiledPredictor(_pixelwise, {}, geometry=SAME_IDENTITY, tile_size=(8, 8))
  with pytest.raises(ValueError, match='spatial dims'):
    predictor(np.zeros((8, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match='one batch of 8'):
    predictor.predict_tiles(np.zeros((9, 8, 8, 1), np.float32))
  wrong = tiling.TileGeometry(lambda s: s - 2, lambda o: o + 2, 1)  # does not describe the model
  with pytest.raises(ValueError, match='geometry'):
    tiled.TiledPredictor(_pixelwise, {}, geometry=wrong, tile_size=8)(np.zeros((9, 9, 1)))


_EvalState = collections.namedtuple('_EvalState', 'params ema_params batch_stats')


@pytest.mark.parametrize('padding,depth,mode', [('VALID', 1, 'dihedral'), ('SAME', 2, 'flips')])
def test_evaluation_tta_matches_predicting_each_transformed_image(padding, depth, mode):
  """config.eval.tta: the eval step's mean over transforms of the padded batch equals, per
  transform, predicting the flipped/rotated raw image (mirror-padded for its own shape) and
  mapping the result back; a non-square image makes every rotation move the padding."""
  model = UNet(depth=depth, padding=padding, width=4, num_classes=3, norm='none')
  images = np.random.default_rng(7).normal(size=(2, 21, 30, 1)).astype(np.float32)
  spatial = images.shape[1:-1]
  in_shape = (1, model.valid_input_size(32), model.valid_input_size(32), 1)
  variables = _random_variables(model, in_shape)
  state = _EvalState(params=variables['params'], ema_params=None, batch_stats={})
  pads = whole_image.model_padding(model, spatial)
  padded = whole_image.mirror_pad(images, [(0, 0), *pads, (0, 0)])
  fn = jax.jit(functools.partial(evaluator.predict_probabilities, model=model,
                                 spatial_shape=spatial, tta=mode))
  got = np.asarray(fn(state, jnp.asarray(padded)))

  def one_pass(x):
    p = whole_image.model_padding(model, x.shape[1:-1])
    out = model.apply(variables, jnp.asarray(np.pad(x, [(0, 0), *p, (0, 0)], mode='reflect')),
                      train=False)
    return np.asarray(jax.nn.softmax(out[:, :x.shape[1], :x.shape[2]], -1))

  steps = {'flips': [(f, 0) for f in ((), (1,), (2,), (1, 2))],
           'dihedral': [(f, k) for f in ((), (2,)) for k in range(4)]}[mode]
  passes = []
  for flip, k in steps:
    x = np.rot90(np.flip(images, flip) if flip else images, k, axes=(1, 2))
    passes.append(np.flip(np.rot90(one_pass(np.ascontiguousarray(x)), -k, axes=(1, 2)), flip)
                  if flip else np.rot90(one_pass(np.ascontiguousarray(x)), -k, axes=(1, 2)))
  np.testing.assert_allclose(got, np.mean(passes, 0), atol=2e-5)
  plain = np.asarray(jax.jit(functools.partial(evaluator.predict_probabilities, model=model,
                                               spatial_shape=spatial))(state, jnp.asarray(padded)))
  np.testing.assert_allclose(plain, passes[0], atol=2e-5)
  assert np.abs(got - plain).max() > 1e-3  # the augmentation changed the prediction
