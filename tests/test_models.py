"""U-Net architecture: the paper's parameter count and sizes, size arithmetic, options."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.models import UNet, build_model
from unet_jax.models import blocks
import ml_collections

from unet_sizes import output_size, valid_input_size, valid_input_sizes


def _param_count(model, shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def _independent_unet_count(c_in, classes, width, depth):
  """Counts the paper architecture layer by layer, independent of the module code."""
  conv = lambda i, o, k: k * k * i * o + o
  total, channels = 0, c_in
  for level in range(depth + 1):
    w = width * 2**level
    total += conv(channels, w, 3) + conv(w, w, 3)
    channels = w
  for level in reversed(range(depth)):
    w = width * 2**level
    total += conv(channels, w, 2)  # 2×2 up-convolution halves the channels
    total += conv(2 * w, w, 3) + conv(w, w, 3)
    channels = w
  return total + conv(channels, classes, 1)


def test_paper_configuration_parameter_count_and_shape():
  model = UNet(num_classes=2, width=64, depth=4, padding='VALID')
  assert _param_count(model, (1, 572, 572, 1)) == 31_030_658
  assert _independent_unet_count(1, 2, 64, 4) == 31_030_658
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 572, 572, 1))))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 572, 572, 1))), variables)
  assert out.shape == (1, 388, 388, 2) and out.dtype == jnp.float32


@pytest.mark.parametrize('width,depth,classes', [(8, 2, 3), (4, 3, 2), (16, 1, 5)])
def test_parameter_count_matches_independent_count(width, depth, classes):
  model = UNet(num_classes=classes, width=width, depth=depth, padding='SAME')
  assert _param_count(model, (1, 32, 32, 1)) == _independent_unet_count(1, classes, width, depth)


@pytest.mark.parametrize('depth', [1, 2, 3, 4])
def test_size_helpers_agree_with_the_network(depth):
  model = UNet(num_classes=2, width=2, depth=depth, padding='VALID')
  for size in valid_input_sizes(depth=depth, count=3):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1))))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size + 2**depth, 1))),
                         variables)
    assert out.shape[1:3] == (output_size(size, depth=depth, padding='VALID'),
                              output_size(size + 2**depth, depth=depth, padding='VALID'))
  smallest = valid_input_sizes(depth=depth, count=1)[0]
  for bad in range(smallest - 3, smallest):
    with pytest.raises(ValueError, match='invalid|too small'):
      output_size(bad, depth=depth, padding='VALID')


def test_valid_sizes_are_exactly_those_output_size_accepts():
  accepted = []
  for size in range(1, 400):
    try:
      output_size(size, depth=3, padding='VALID')
      accepted.append(size)
    except ValueError:
      pass
  assert accepted == valid_input_sizes(depth=3, count=len(accepted))
  assert np.all(np.diff(accepted) == 8)


def test_valid_input_size_covers_requested_output():
  assert valid_input_size(388, depth=4, padding='VALID') == 572
  for want in (1, 100, 387, 389, 512):
    size = valid_input_size(want, depth=4, padding='VALID')
    assert output_size(size, depth=4, padding='VALID') >= want
    assert output_size(size - 16, depth=4, padding='VALID') < want if size - 16 >= 188 else True
  assert valid_input_size(500, depth=4, padding='SAME') == 512
  with pytest.raises(ValueError, match='multiple of 2\\*\\*depth'):
    output_size(100, depth=4, padding='SAME')


@pytest.mark.parametrize('upsample', ['transpose', 'resize'])
@pytest.mark.parametrize('norm', ['none', 'batch', 'group', 'layer'])
def test_same_padding_keeps_size_and_runs(upsample, norm):
  model = UNet(num_classes=3, width=8, depth=2, padding='SAME', upsample=upsample, norm=norm,
               dropout_rate=0.1)
  x = jax.random.normal(jax.random.key(1), (2, 24, 32, 1))
  variables = model.init(jax.random.key(0), x)
  out, _ = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)},
                       mutable=['batch_stats'])
  assert out.shape == (2, 24, 32, 3)
  assert np.isfinite(np.asarray(out)).all()
  assert ('batch_stats' in variables) == (norm == 'batch')


def test_valid_mode_crops_skips_and_3d_input_runs():
  model = UNet(num_classes=2, width=2, depth=1, padding='VALID')
  x = jnp.zeros((1, 20, 20, 20, 1))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (1, 4, 4, 4, 2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = UNet(num_classes=2, width=4, depth=2, padding='SAME', dtype=jnp.bfloat16)
  x = jnp.ones((1, 16, 16, 1))
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  assert model.apply(variables, x).dtype == jnp.float32


def test_center_crop_and_errors():
  x = jnp.arange(2 * 6 * 6 * 1).reshape(2, 6, 6, 1)
  np.testing.assert_array_equal(blocks.center_crop(x, (2, 4)), x[:, 2:4, 1:5])
  with pytest.raises(ValueError, match='center-crop'):
    blocks.center_crop(x, (3, 4))
  with pytest.raises(ValueError, match='even spatial sizes'):
    UNet(num_classes=2, width=2, depth=1, padding='SAME').init(jax.random.key(0),
                                                               jnp.zeros((1, 7, 8, 1)))


def test_build_model_by_name_and_errors():
  cfg = ml_collections.ConfigDict(dict(name='unet', width=4, depth=2, padding='SAME',
                                       dtype='bfloat16'))
  model = build_model(cfg, num_classes=3)
  assert isinstance(model, UNet) and model.num_classes == 3 and model.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="config.model.name='unett' is not one of "
                     "\\['attention_unet', 'multires_unet', 'res_unet', 'unet', 'unet_plus_plus', "
                     "'unetr'\\]"):
    build_model(ml_collections.ConfigDict(dict(name='unett')), num_classes=2)
  with pytest.raises(ValueError, match='does not take'):
    build_model(ml_collections.ConfigDict(dict(name='unet', widht=4)), num_classes=2)
  with pytest.raises(ValueError, match="padding='same' is not one of"):
    UNet(padding='same').init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
