"""The U-Net family: size contract, parameter counts, training, bf16/remat, attention, U-Net++.

Shapes and parameter counts come from `jax.eval_shape` (tracing only, nothing is computed), so
large reference configurations cost no memory. Numerical tests use width 4, depth 2 and 16×16
inputs. Parameters are drawn with numpy instead of `model.init`: compiling flax's random
initialisers costs more than the tests themselves, and these tests are about the forward and
backward computation, not about initialisation.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unet_jax.models import (MODELS, UNETR, AttentionUNet, MultiResUNet, UNet,
                             UNetPlusPlus, blocks, build_model)
from unet_jax.models.attention_unet import AttentionGate

CONV_VARIANTS = ('unet', 'attention_unet', 'unet_plus_plus', 'res_unet', 'multires_unet')
SMALL_VIT = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)

# Tiny 2D configurations for the numerical tests; between them they exercise every norm, both
# up-samplings, dropout and deep supervision.
TINY = {
    'unet': dict(padding='SAME', norm='layer', dropout_rate=0.2),
    'attention_unet': dict(norm='batch'),
    'unet_plus_plus': dict(norm='group', deep_supervision=True),
    'res_unet': dict(norm='instance', upsample='resize'),
    'multires_unet': dict(norm='none'),
    'unetr': dict(SMALL_VIT, dropout_rate=0.1),
}


def _tiny_model(name, **overrides):
  return MODELS[name](num_classes=3, width=4, depth=None if name == 'unetr' else 2,
                      **{**TINY[name], **overrides})


@pytest.fixture(autouse=True, scope='module')
def _fast_compilation():
  """These tiny programs run in milliseconds; XLA's optimisation passes would dominate."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def _numpy_variables(model, *inputs, seed=0, **kwargs):
  """Variables with the model's tree, drawn with numpy (He-scaled kernels, unit scales)."""
  abstract = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      values = rng.normal(size=leaf.shape) * math.sqrt(2 / math.prod(leaf.shape[:-1]))
    elif name == 'position':
      values = rng.normal(size=leaf.shape) * 0.02
    elif name == 'bias':
      values = rng.normal(size=leaf.shape) * 0.1
    elif name in ('scale', 'var'):
      values = np.ones(leaf.shape)
    else:  # BatchNorm's running mean
      values = np.zeros(leaf.shape)
    return jnp.asarray(values, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _batch():
  x = jax.random.normal(jax.random.key(10), (2, 16, 16, 1))
  labels = jax.random.randint(jax.random.key(11), (2, 16, 16), 0, 3)
  return x, labels


@functools.lru_cache(maxsize=None)
def _setup(name, remat=False):
  """(model, variables, jitted value_and_grad of the mean cross-entropy over all heads)."""
  model = _tiny_model(name, remat=remat)
  x, labels = _batch()
  variables = _numpy_variables(_tiny_model(name), x, train=False)

  def loss_fn(params, state, rng):
    out, new_state = model.apply({'params': params, **state}, x, train=True,
                                 rngs={'dropout': rng}, mutable=['batch_stats'])
    heads = out if isinstance(out, tuple) else (out,)
    loss = sum(optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()
               for h in heads) / len(heads)
    return loss, (heads, new_state)

  return model, variables, jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _split(variables):
  return variables['params'], {k: v for k, v in variables.items() if k != 'params'}


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_params(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros(shape))['params']


# ---------------------------------------------------------------- independent parameter counts
# Layer-by-layer counts written from the papers' architectures, not from the module code.


def _conv(c_in, c_out, k, rank, bias=True):
  return k**rank * c_in * c_out + (c_out if bias else 0)


def _conv_norm(c_in, c_out, k, rank, norm):
  """Convolution (bias only without norm) + normalisation scale and bias."""
  return _conv(c_in, c_out, k, rank, bias=norm == 'none') + (0 if norm == 'none' else 2 * c_out)


def _double_conv(c_in, c_out, rank, norm):
  return _conv_norm(c_in, c_out, 3, rank, norm) + _conv_norm(c_out, c_out, 3, rank, norm)


def _residual(c_in, c_out, rank, norm):
  shortcut = _conv_norm(c_in, c_out, 1, rank, norm) if c_in != c_out else 0
  return _double_conv(c_in, c_out, rank, norm) + shortcut


def _up(c_in, c_out, rank, upsample, bias=True):
  return _conv(c_in, c_out, 2 if upsample == 'transpose' else 1, rank, bias)


def _pooling_count(rank, c_in, classes, width, depth, norm, upsample, block):
  """Encoder/decoder U-Net with `block(c_in, c_out)` at every stage."""
  w = [width * 2**i for i in range(depth + 1)]
  total, c = 0, c_in
  for level in range(depth + 1):
    total += block(c, w[level])
    c = w[level]
  for level in reversed(range(depth)):
    total += _up(c, w[level], rank, upsample) + block(2 * w[level], w[level])
    c = w[level]
  return total + _conv(c, classes, 1, rank)


def _unet_count(rank, c_in, classes, width, depth, norm='none', upsample='transpose'):
  block = lambda i, o: _double_conv(i, o, rank, norm)
  return _pooling_count(rank, c_in, classes, width, depth, norm, upsample, block)


def _res_unet_count(rank, c_in, classes, width, depth, norm='batch', upsample='transpose'):
  block = lambda i, o: _residual(i, o, rank, norm)
  return _pooling_count(rank, c_in, classes, width, depth, norm, upsample, block)


def _attention_unet_count(rank, c_in, classes, width, depth, norm='batch', upsample='transpose'):
  total = _unet_count(rank, c_in, classes, width, depth, norm, upsample)
  for level in range(depth):
    skip, coarse = width * 2**level, width * 2**(level + 1)
    inter = max(1, skip // 2)
    # W_x: 2×2 stride-2 conv without bias; W_g and psi: 1×1 convs with bias.
    total += _conv(skip, inter, 2, rank, bias=False) + _conv(coarse, inter, 1, rank)
    total += _conv(inter, 1, 1, rank)
  return total


def _unet_plus_plus_count(rank, c_in, classes, width, depth, heads, norm='none',
                          upsample='transpose'):
  w = [width * 2**i for i in range(depth + 1)]
  total, c = 0, c_in
  for i in range(depth + 1):
    total += _double_conv(c, w[i], rank, norm)
    c = w[i]
  for j in range(1, depth + 1):
    for i in range(depth + 1 - j):
      # X^{i,j} sees j same-level nodes and the up-sampled X^{i+1,j-1}, each w[i] channels.
      total += _up(w[i + 1], w[i], rank, upsample) + _double_conv((j + 1) * w[i], w[i], rank, norm)
  return total + heads * _conv(w[0], classes, 1, rank)


def _multires_unet_count(rank, c_in, classes, width, depth, norm='batch', upsample='transpose'):
  """Following the authors' Keras code (nibtehaz/MultiResUNet, tensorflow/MultiResUNet.py)."""
  nrm = lambda c: 0 if norm == 'none' else 2 * c

  def multires(c, u):
    w = 1.67 * u
    a, b, d = max(1, int(w * 0.167)), max(1, int(w * 0.333)), max(1, int(w * 0.5))
    out = a + b + d
    n = (_conv_norm(c, a, 3, rank, norm) + _conv_norm(a, b, 3, rank, norm)
         + _conv_norm(b, d, 3, rank, norm) + nrm(out)  # chain, norm after concatenation
         + _conv_norm(c, out, 1, rank, norm) + nrm(out))  # 1×1 shortcut, final norm
    return n, out

  u = [width * 2**i for i in range(depth + 1)]
  total, c, outs = 0, c_in, []
  for level in range(depth + 1):
    n, c = multires(c, u[level])
    total, outs = total + n, outs + [c]
  for level in range(depth):
    c = outs[level]
    for _ in range(depth - level):  # Res path units: 1×1 shortcut, 3×3 conv, norm
      total += _conv_norm(c, u[level], 1, rank, norm) + _conv_norm(c, u[level], 3, rank, norm)
      total += nrm(u[level])
      c = u[level]
  c = outs[depth]
  for level in reversed(range(depth)):
    n, out = multires(2 * u[level], u[level])
    total += _up(c, u[level], rank, upsample) + n
    c = out
  return total + _conv(c, classes, 1, rank)


def _unetr_count(rank, c_in, classes, width, patch, hidden, layers, heads, mlp, tokens,
                 norm='instance', norm_affine=True):
  """UNETR as in MONAI: bias-free qkv, bias-free convs in the blocks, bias-free deconvs."""
  del heads  # the head count does not change the parameter count
  vit = _conv(c_in, hidden, patch, rank) + tokens * hidden  # patch embedding, positions
  per_layer = (2 * hidden + hidden * 3 * hidden + hidden * hidden + hidden  # LN, qkv, out
               + 2 * hidden + hidden * mlp + mlp + mlp * hidden + hidden)  # LN, MLP
  vit += layers * per_layer + 2 * hidden  # final LayerNorm
  nrm = lambda c: 2 * c if norm_affine and norm != 'none' else 0
  cn = lambda i, o, k: _conv(i, o, k, rank, bias=norm == 'none') + nrm(o)
  res = lambda i, o: cn(i, o, 3) + cn(o, o, 3) + (cn(i, o, 1) if i != o else 0)
  deconv = lambda i, o: _conv(i, o, 2, rank, bias=False)
  levels = int(math.log2(patch))
  f = [width * 2**level for level in range(levels)]
  total = vit + res(c_in, f[0])
  for k in range(1, levels):
    total += deconv(hidden, f[k]) + (levels - k - 1) * (deconv(f[k], f[k]) + res(f[k], f[k]))
  c = hidden
  for level in reversed(range(levels)):
    total += deconv(c, f[level]) + res(2 * f[level], f[level])
    c = f[level]
  return total + _conv(c, classes, 1, rank)


# Reference configurations (2D ones are those of the README table).
REFERENCE_COUNTS = [
    ('attention_unet', 2, dict(width=64, depth=4),
     lambda: _attention_unet_count(2, 1, 2, 64, 4)),
    ('res_unet', 2, dict(width=64, depth=4), lambda: _res_unet_count(2, 1, 2, 64, 4)),
    ('multires_unet', 2, dict(width=64, depth=4), lambda: _multires_unet_count(2, 1, 2, 64, 4)),
    ('multires_unet', 2, dict(width=32, depth=4), lambda: _multires_unet_count(2, 1, 2, 32, 4)),
    ('unet_plus_plus', 2, dict(width=64, depth=4),
     lambda: _unet_plus_plus_count(2, 1, 2, 64, 4, heads=1)),
    ('unet_plus_plus', 2, dict(width=64, depth=4, deep_supervision=True),
     lambda: _unet_plus_plus_count(2, 1, 2, 64, 4, heads=4)),
    ('unet', 3, dict(width=4, depth=2, padding='SAME', norm='group', upsample='resize'),
     lambda: _unet_count(3, 1, 2, 4, 2, 'group', 'resize')),
    ('attention_unet', 3, dict(width=4, depth=3, norm='instance'),
     lambda: _attention_unet_count(3, 1, 2, 4, 3, 'instance')),
    ('res_unet', 3, dict(width=6, depth=2, norm='none', upsample='resize'),
     lambda: _res_unet_count(3, 1, 2, 6, 2, 'none', 'resize')),
    ('multires_unet', 3, dict(width=8, depth=3, norm='group'),  # widths such as 13 and 25
     lambda: _multires_unet_count(3, 1, 2, 8, 3, 'group')),
    ('multires_unet', 3, dict(width=8, depth=2, norm='none'),
     lambda: _multires_unet_count(3, 1, 2, 8, 2, 'none')),
    ('unet_plus_plus', 3, dict(width=4, depth=3, deep_supervision=True, norm='layer'),
     lambda: _unet_plus_plus_count(3, 1, 2, 4, 3, heads=3, norm='layer')),
    ('unetr', 2, dict(width=16),  # ViT-B/16 on 256×256: 16×16 tokens
     lambda: _unetr_count(2, 1, 2, 16, 16, 768, 12, 12, 3072, tokens=256)),
]


@pytest.mark.parametrize('name,rank,kwargs,expected', REFERENCE_COUNTS)
def test_parameter_count_matches_independent_count(name, rank, kwargs, expected):
  model = MODELS[name](num_classes=2, **kwargs)
  size = 256 if name == 'unetr' else 2**kwargs['depth'] * (16 if rank == 2 else 1)
  shape = (1, *(size,) * rank, 1)
  assert _count(_abstract_params(model, shape)) == expected()


def test_unetr_3d_matches_the_monai_reference_size():
  # BTCV setup of the paper: 1 channel, 14 classes, 96³ input, ViT-B/16, feature size 16.
  model = UNETR(num_classes=14, width=16)
  count = _count(_abstract_params(model, (1, 96, 96, 96, 1)))
  assert count == _unetr_count(3, 1, 14, 16, 16, 768, 12, 12, 3072, tokens=6**3)
  # MONAI's InstanceNorm has no affine parameters; without ours the count is the ~92.8M MONAI's
  # UNETR has for this setup (the paper quotes 92.58M).
  monai_like = _unetr_count(3, 1, 14, 16, 16, 768, 12, 12, 3072, tokens=6**3, norm_affine=False)
  assert round(monai_like / 1e5) == 928
  # Our instance norms' scales and biases: 6 norms of 16 channels (encoder0, decoder0), 7 of 32
  # (two residual blocks in encoder1, decoder1), 5 of 64, 3 of 128 (decoder3).
  assert count - monai_like == 2 * (6 * 16 + 7 * 32 + 5 * 64 + 3 * 128)


def test_multires_unet_matches_the_paper_parameter_count():
  # Ibtehaz & Rahman (2020) give 7,262,750 parameters for MultiResUNet with U = 32 (the Keras
  # model of their code: 3 input channels, 1 sigmoid output). Keras' total includes BatchNorm's
  # moving mean and variance, its conv+BatchNorm layers have no BatchNorm scale, and the
  # output is a bias-free 1×1 conv + BatchNorm(scale=False) (3 numbers) instead of our biased conv.
  model = MultiResUNet(num_classes=1, width=32, depth=4, norm='batch')
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 64, 64, 3)))
  conv_norm_scales = sum(
      math.prod(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]
      if 'norm' in [p.key for p in path] and path[-1].key == 'scale')
  keras_total = (_count(variables['params']) + _count(variables['batch_stats'])
                 - conv_norm_scales - 1 + 3)
  assert keras_total == 7_262_750


def test_unet_plus_plus_matches_the_paper_parameter_count():
  # Zhou et al. (2018), Table 3: UNet++ has 9.04M parameters (backbone widths 32..512, with and
  # without deep supervision), next to 7.76M for the U-Net of the same widths.
  for deep_supervision in (False, True):
    model = UNetPlusPlus(num_classes=1, width=32, depth=4, deep_supervision=deep_supervision)
    assert round(_count(_abstract_params(model, (1, 64, 64, 3))) / 1e4) == 904
  assert round(_count(_abstract_params(UNet(num_classes=1, width=32, depth=4, padding='SAME'),
                                       (1, 64, 64, 3))) / 1e4) == 776


# ------------------------------------------------------------------ shapes and size contract


def _output(model, shape):
  out, _ = jax.eval_shape(functools.partial(model.init_with_output, train=False),
                          jax.random.key(0), jnp.zeros(shape))
  return out


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
@pytest.mark.parametrize('rank', [2, 3])
@pytest.mark.parametrize('name', CONV_VARIANTS)
def test_output_shape_agrees_with_output_size(name, rank, padding):
  model = MODELS[name](num_classes=3, width=2, depth=2, padding=padding)
  sizes = model.valid_input_sizes(3)
  assert model.size_multiple() == 4 and np.all(np.diff(sizes) == 4)
  shapes = [sizes[:2], sizes[1:]] if rank == 2 else [sizes]
  for spatial in shapes:
    out = _output(model, (1, *spatial, 1))
    assert out.shape == (1, *(model.output_size(s) for s in spatial), 3)
    assert out.dtype == jnp.float32
  with pytest.raises(ValueError, match='nearby valid sizes: .*' + str(sizes[1])):
    model.output_size(sizes[1] + 1)
  if padding == 'SAME':
    assert sizes == [4, 8, 12]
  else:
    # A block at level l trims `block` pixels at 1/2**l of the input resolution: the encoder
    # levels 0..2 and decoder levels 0..1 of a depth-2 net trim block·(1 + 2 + 4 + 1 + 2).
    block = 6 if name == 'multires_unet' else 4  # MultiRes chain: three 3×3 convs
    assert [model.output_size(s) for s in sizes] == [s - 10 * block for s in sizes]


@pytest.mark.parametrize('name', CONV_VARIANTS)
def test_valid_input_size_is_the_smallest_that_covers(name):
  for padding in ('SAME', 'VALID'):
    model = MODELS[name](width=2, depth=3, padding=padding)
    for want in (1, 7, 33, 100):
      size = model.valid_input_size(want)
      assert model.output_size(size) >= want
      for smaller in range(1, size):
        try:
          assert model.output_size(smaller) < want
        except ValueError:
          pass


def test_odd_pooling_sizes_raise_a_clear_error():
  model = MultiResUNet(num_classes=2, width=2, depth=2, padding='VALID')
  with pytest.raises(ValueError, match='max pooling needs even spatial sizes'):
    _output(model, (1, 63, 62, 1))
  with pytest.raises(ValueError, match='odd size'):
    model.output_size(63)


def test_multires_valid_net_is_translation_equivariant_by_size_multiple():
  # Shifting the input by size_multiple() shifts the output by as much: the tiling relies on it.
  model = MultiResUNet(num_classes=2, width=2, depth=2, padding='VALID', norm='none')
  m = model.size_multiple()
  size = model.valid_input_sizes(1)[0]
  image = jax.random.normal(jax.random.key(3), (1, size + m, size, 1))
  variables = _numpy_variables(model, image[:, :size])
  apply = jax.jit(model.apply)
  first, second = apply(variables, image[:, :size]), apply(variables, image[:, m:])
  np.testing.assert_allclose(first[:, m:], second[:, :-m], rtol=1e-5, atol=1e-5)


def test_unetr_shapes_sizes_and_errors():
  model = UNETR(num_classes=3, width=4, **SMALL_VIT)
  assert model.size_multiple() == 4 and model.valid_input_size(13) == 16
  for shape in [(1, 16, 8, 1), (1, 8, 12, 4, 2)]:
    out = _output(model, shape)
    assert out.shape == (*shape[:-1], 3) and out.dtype == jnp.float32
    assert out.shape[1:-1] == tuple(model.output_size(s) for s in shape[1:-1])
  with pytest.raises(ValueError, match='not a positive multiple of the patch size 4'):
    model.output_size(10)
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    _output(model, (1, 16, 10, 1))
  with pytest.raises(ValueError, match="padding='VALID' is not supported by UNETR"):
    _output(model.clone(padding='VALID'), (1, 16, 16, 1))
  with pytest.raises(ValueError, match='model.depth=4 does not match model.patch_size=4'):
    model.clone(depth=4).output_size(16)
  assert UNETR().tap_layers() == [3, 6, 9]  # the paper's z3, z6, z9 (z12 is the bottleneck)
  assert UNETR(num_layers=24).tap_layers() == [6, 12, 18]
  assert UNETR(patch_size=8, num_layers=6).tap_layers() == [2, 4]


def test_unetr_position_embeddings_follow_another_grid():
  model = UNETR(num_classes=2, width=2, **SMALL_VIT)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 16, 16, 1)))
  assert variables['params']['vit']['embedding']['position'].shape == (1, 4, 4, 16)
  out = jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 24, 1)))
  assert out.shape == (1, 32, 24, 2)


# ------------------------------------------------------------------------- build by config


def test_build_model_by_name_with_common_fields():
  common = dict(width=4, depth=2, padding='SAME', upsample='resize', norm='instance',
                activation='gelu', dropout_rate=0.1, dtype='bfloat16', remat=True)
  for name, cls in MODELS.items():
    fields = dict(common, depth=None) if name == 'unetr' else common
    model = build_model(ml_collections.ConfigDict(dict(name=name, **fields)), num_classes=3)
    assert type(model) is cls and model.num_classes == 3 and model.dtype == jnp.bfloat16
    assert model.remat and model.norm == 'instance'
  assert set(MODELS) == {'unet', 'attention_unet', 'unet_plus_plus', 'res_unet', 'multires_unet',
                         'unetr'}
  model = build_model(ml_collections.ConfigDict(dict(name='unet_plus_plus', deep_supervision=True,
                                                     prune_level=1)), num_classes=2)
  assert model.deep_supervision and model.prune_level == 1
  with pytest.raises(ValueError, match=r"\['deep_supervision'\] that 'unet' does not take"):
    build_model(ml_collections.ConfigDict(dict(name='unet', deep_supervision=True)),
                num_classes=2)
  with pytest.raises(ValueError, match=r"\['hidden_size'\] that 'res_unet' does not take"):
    build_model(ml_collections.ConfigDict(dict(name='res_unet', hidden_size=8)), num_classes=2)


def test_instance_norm_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3)) * 3 + 1
  norm = blocks.Norm('instance')
  variables = _numpy_variables(norm, x, train=False)
  y = jax.jit(functools.partial(norm.apply, train=False))(variables, x)
  scale, bias = (variables['params']['InstanceNorm_0'][k] for k in ('scale', 'bias'))
  x = np.asarray(x, np.float64)
  mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-6) * scale + bias, rtol=1e-4,
                             atol=1e-4)


def test_group_norm_groups_divide_odd_widths():
  assert [blocks.group_count(c, 8) for c in (64, 4, 51, 17, 26, 12)] == [8, 4, 3, 1, 2, 6]
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 51)) * 2 + 1
  variables = {'params': {'GroupNorm_0': {'scale': jnp.ones(51), 'bias': jnp.zeros(51)}}}
  y = blocks.Norm('group').apply(variables, x, train=False)
  grouped = np.asarray(x, np.float64).reshape(2, 4, 4, 3, 17)  # 3 groups of 17 channels
  expected = (grouped - grouped.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      grouped.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, expected.reshape(x.shape), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- training


@pytest.mark.parametrize('name', sorted(MODELS))
def test_gradients_are_finite_and_adam_steps_lower_the_loss(name):
  _, variables, value_and_grad = _setup(name)
  params, state = jax.device_get(_split(variables))
  moments = [jax.tree.map(np.zeros_like, params), jax.tree.map(np.zeros_like, params)]
  losses = []
  for t in range(1, 7):  # Adam, written out in numpy to keep compilation to one function
    (loss, (_, new_state)), grads = value_and_grad(params, state, jax.random.key(0))
    grads = jax.device_get(grads)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0
    losses.append(float(loss))
    state = new_state
    moments[0] = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, moments[0], grads)
    moments[1] = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, moments[1], grads)
    params = jax.tree.map(
        lambda p, m, v: p - 3e-3 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8),
        params, *moments)
  assert losses[-1] < losses[0] - 0.05, losses


# The residual and transformer blocks are checked inside the whole UNETR below.
REMAT_BLOCKS = [
    (blocks.ConvBlock, dict(features=4, norm='batch', dropout_rate=0.3), (2, 8, 8, 3)),
    (blocks.MultiResBlock, dict(features=4, padding='VALID', norm='group'), (1, 10, 10, 10, 3)),
    (blocks.ResPath, dict(features=4, length=2, norm='batch'), (2, 8, 8, 3)),
]


@pytest.mark.parametrize('policy', ['conv', 'full'])
@pytest.mark.parametrize('block,kwargs,shape', REMAT_BLOCKS)
def test_remat_blocks_give_the_same_outputs_and_gradients(block, kwargs, shape, policy):
  x = jax.random.normal(jax.random.key(0), shape)
  plain, remat = block(**kwargs), blocks.remat_if(block, policy)(**kwargs)
  variables = _numpy_variables(plain, x, train=False)
  params, state = _split(variables)

  def loss(module, params, x):
    y, new_state = module.apply({'params': params, **state}, x, True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(1)})
    return jnp.sum(jnp.sin(y)), (y, new_state)

  grad = lambda module: jax.grad(functools.partial(loss, module), argnums=(0, 1), has_aux=True)
  assert 'remat' in str(jax.make_jaxpr(grad(remat))(params, x))
  both = jax.jit(lambda p, x: (grad(plain)(p, x), grad(remat)(p, x)))
  ((grads, (y, new_state)), (remat_grads, (remat_y, remat_state))) = both(params, x)
  np.testing.assert_allclose(remat_y, y, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves((remat_grads, remat_state)), jax.tree.leaves((grads, new_state))):
    # Recomputed forward values may be fused differently: float32 rounding of the largest entry.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize('name', sorted(MODELS))
def test_remat_models_have_the_same_parameters_and_checkpoint_their_blocks(name):
  x, _ = _batch()
  remat_model = _tiny_model(name, remat=True)
  variables = _setup(name)[1]
  assert (jax.tree.structure(_abstract_params(remat_model, x.shape))
          == jax.tree.structure(variables['params']))
  jaxpr = str(jax.make_jaxpr(functools.partial(remat_model.apply, train=False))(variables, x))
  assert jaxpr.count('remat') >= 5  # at least the blocks of the 3 encoder and 2 decoder levels


def _saved_for_backward(model, variables, x) -> int:
  """Bytes of the residuals jax.vjp keeps for the backward pass of a training-mode loss."""
  params, state = _split(variables)

  def loss(params, state):
    y, _ = model.apply({'params': params, **state}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(y)

  residuals = jax.eval_shape(
      lambda p, s: jax.tree.leaves(jax.vjp(lambda p: loss(p, s), p)[1]), params, state)
  return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in residuals)


def test_remat_policies_keep_less_for_the_backward_pass():
  x = jnp.zeros((2, 32, 32, 1))
  model = lambda remat: UNet(num_classes=2, width=8, depth=2, padding='SAME', norm='batch',
                             remat=remat)
  variables = jax.eval_shape(model('none').init, jax.random.key(0), x)
  saved = {p: _saved_for_backward(model(p), variables, x) for p in blocks.REMAT_POLICIES}
  # 'conv' drops the normalised and activated copies, 'full' everything but block inputs.
  assert saved['none'] > 1.5 * saved['conv'] > 1.5 * saved['full'], saved
  assert _saved_for_backward(model(True), variables, x) == saved['full']
  assert _saved_for_backward(model(False), variables, x) == saved['none']
  with pytest.raises(ValueError, match=r"model.remat='some' is not one of \('none', 'conv', "):
    model('some').init(jax.random.key(0), x)


def test_remat_unetr_gives_the_same_loss_and_gradients():
  # Transformer blocks with dropout, residual blocks with instance norm.
  _, variables, plain = _setup('unetr')
  _, _, remat = _setup('unetr', remat=True)
  params, state = _split(variables)
  (loss, (heads, _)), grads = plain(params, state, jax.random.key(0))
  (remat_loss, (remat_heads, _)), remat_grads = remat(params, state, jax.random.key(0))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(remat_heads[0], heads[0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_bfloat16_compute_matches_float32(name):
  _, variables, plain = _setup(name)
  x, _ = _batch()
  params, state = _split(variables)
  (_, (heads, _)), _ = plain(params, state, jax.random.key(0))  # train mode, float32
  model = _tiny_model(name, dtype=jnp.bfloat16)
  forward = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  out, _ = forward(variables, x, rngs={'dropout': jax.random.key(0)})
  bf16_heads = out if isinstance(out, tuple) else (out,)
  for a, b in zip(bf16_heads, heads):
    assert a.dtype == jnp.float32
    scale = float(jnp.abs(b).max())
    # bf16 keeps ~3 digits; the tiny test model normalises over 4 channels, which amplifies that
    # rounding at the odd pixel whose channels nearly agree, so the bound is on the bulk.
    error = np.abs(np.asarray(a) - np.asarray(b))
    assert error.mean() < 0.01 * scale and np.percentile(error, 99) < 0.05 * scale
    assert float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))) > 0.9
  # The parameters a bf16 model creates stay float32.
  abstract = _abstract_params(model, x.shape)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))


# ------------------------------------------------------------------------ attention coefficients


def _upsample2_linear(a, axis):
  """2× linear up-sampling with half-pixel centres and clamped edges, along one axis."""
  a = np.moveaxis(a, axis, 0)
  before = np.concatenate([a[:1], a[:-1]])
  after = np.concatenate([a[1:], a[-1:]])
  out = np.empty((2 * a.shape[0], *a.shape[1:]), a.dtype)
  out[0::2], out[1::2] = 0.75 * a + 0.25 * before, 0.75 * a + 0.25 * after
  return np.moveaxis(out, 0, axis)


def test_attention_gate_matches_numpy_reference():
  skip = jax.random.normal(jax.random.key(0), (2, 8, 6, 4))
  gate = jax.random.normal(jax.random.key(1), (2, 4, 3, 5))
  module = AttentionGate(features=3)
  variables = _numpy_variables(module, skip, gate)
  out, state = jax.jit(functools.partial(module.apply, mutable=['intermediates']))(
      variables, skip, gate)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), variables['params'])
  s, g = np.asarray(skip, np.float64), np.asarray(gate, np.float64)
  blocks2x2 = s.reshape(2, 4, 2, 3, 2, 4)  # (n, h, i, w, j, c) with pixel (2h + i, 2w + j)
  theta = np.einsum('nhiwjc,ijco->nhwo', blocks2x2, p['skip_proj']['kernel'])
  phi = g @ p['gate_proj']['kernel'][0, 0] + p['gate_proj']['bias']
  q = np.maximum(theta + phi, 0) @ p['psi']['kernel'][0, 0] + p['psi']['bias']
  alpha = _upsample2_linear(_upsample2_linear(1 / (1 + np.exp(-q)), 1), 2)
  sown = state['intermediates']['attention'][0]
  np.testing.assert_allclose(sown, alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, s * alpha, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('rank,padding', [(2, 'SAME'), (3, 'SAME'), (2, 'VALID')])
def test_attention_coefficients_are_in_unit_interval_with_skip_shape(rank, padding):
  model = AttentionUNet(num_classes=2, width=4, depth=2, padding=padding, norm='none')
  size = 16 if padding == 'SAME' else model.valid_input_sizes(1)[0]
  size = 8 if rank == 3 else size
  x = jax.random.normal(jax.random.key(0), (1, *(size,) * rank, 1))
  variables = _numpy_variables(model, x)
  _, state = jax.jit(functools.partial(model.apply, mutable=['intermediates']))(variables, x)
  # The skip each gate multiplies: SAME keeps level sizes; VALID crops the encoder features to
  # the up-sampled decoder map (each block trims 4 pixels).
  if padding == 'SAME':
    skip_sizes = {level: size // 2**level for level in range(2)}
  else:
    bottleneck = ((size - 4) // 2 - 4) // 2 - 4
    skip_sizes = {1: 2 * bottleneck, 0: 2 * (2 * bottleneck - 4)}
  for level, skip_size in skip_sizes.items():
    alpha = state['intermediates'][f'decoder{level}']['gate']['attention'][0]
    assert alpha.shape == (1, *(skip_size,) * rank, 1) and alpha.dtype == jnp.float32
    assert float(alpha.min()) >= 0 and float(alpha.max()) <= 1
    assert float(alpha.max() - alpha.min()) > 1e-3  # the gate is not a constant


# ------------------------------------------------------------------------------------ U-Net++


@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
def test_unet_plus_plus_deep_supervision_and_pruning(padding):
  full = UNetPlusPlus(num_classes=3, width=4, depth=2, padding=padding, deep_supervision=True)
  size = 16 if padding == 'SAME' else full.valid_input_sizes(1)[0]
  x = jax.random.normal(jax.random.key(0), (2, size, size, 1))
  variables = _numpy_variables(full, x)
  heads = jax.jit(full.apply)(variables, x)
  out_size = full.output_size(size)
  assert isinstance(heads, tuple) and len(heads) == 2
  assert all(h.shape == (2, out_size, out_size, 3) and h.dtype == jnp.float32 for h in heads)
  single = _output(full.clone(deep_supervision=False), x.shape)
  assert single.shape == (2, out_size, out_size, 3)
  for level in (1, 2):
    pruned = full.clone(prune_level=level)
    built = set(_abstract_params(pruned, x.shape))
    assert built == ({f'encoder{i}' for i in range(level + 1)} | {f'head{level}'}
                     | {f'node{i}_{j}' for j in range(1, level + 1) for i in range(level + 1 - j)})
    out = jax.jit(pruned.apply)(variables, x)
    assert out.shape[1:3] == (pruned.output_size(size),) * 2
    assert pruned.size_multiple() == 2**level
    np.testing.assert_allclose(blocks.center_crop(out, (out_size, out_size)), heads[level - 1],
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='prune_level=3 must be in 1..model.depth=2'):
    full.clone(prune_level=3).output_size(16)
