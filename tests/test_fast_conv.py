"""unet_jax.models.fast_conv: the same function and gradients as lax / flax convolutions, drop-in layers.

References: a float64 numpy correlation with hand-written gradients, `lax.conv_general_dilated`
and `lax.conv_transpose` under `jax.grad`, and flax's own `nn.Conv` / `nn.ConvTranspose`.
"""

from __future__ import annotations

import functools
import itertools
import os

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.models import fast_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(rank: int) -> tuple[str, str, str]:
  spatial = 'DHW'[-rank:]
  return ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C')


def _lax_conv(x, kernel, padding, strides=1):
  rank = x.ndim - 2
  return lax.conv_general_dilated(x, kernel, (strides,) * rank, padding,
                                  dimension_numbers=_spec(rank))


def _random(seed: int, shape, scale: float = 1.0) -> jax.Array:
  # numpy draws: jax.random would compile one program per shape.
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _value_and_grads(fn, x, kernel, bias, cotangent):
  """fn's output and the gradients of <fn(x, kernel, bias), cotangent> w.r.t. all three."""
  loss = lambda x, kernel, bias: jnp.sum(fn(x, kernel, bias) * cotangent)
  return jax.jit(fn)(x, kernel, bias), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, kernel, bias)


def _rows_per_band(monkeypatch, rows: int | None, dy_shape, kernel_shape) -> None:
  """Sets the band budget so that the kernel-gradient scan takes `rows` output rows per band."""
  if rows is None:
    return
  n, _, *rest, _ = dy_shape
  row_bytes = int(np.prod(kernel_shape[:-2])) * n * int(np.prod(rest)) * kernel_shape[-2] * 4
  monkeypatch.setattr(fast_conv, '_BAND_BYTES', rows * row_bytes)


# --- against an independent numpy reference --------------------------------------------------


def _numpy_conv2d(x, kernel, pads):
  """float64 correlation and the gradients of sum(y * g), written out tap by tap."""
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  kh, kw = kernel.shape[:2]
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = sum(np.einsum('nhwi,io->nhwo', xp[:, a:a + ho, b:b + wo], kernel[a, b])
          for a in range(kh) for b in range(kw))

  def grads(g):
    dk = np.stack([np.stack([np.einsum('nhwi,nhwo->io', xp[:, a:a + ho, b:b + wo], g)
                             for b in range(kw)]) for a in range(kh)])
    dxp = np.zeros_like(xp)
    for a, b in itertools.product(range(kh), range(kw)):
      dxp[:, a:a + ho, b:b + wo] += np.einsum('nhwo,io->nhwi', g, kernel[a, b])
    (top, _), (left, _) = pads
    return dxp[:, top:top + x.shape[1], left:left + x.shape[2]], dk

  return y, grads


@pytest.mark.parametrize('padding,pads', [('SAME', ((1, 1), (1, 1))), ('VALID', ((0, 0), (0, 0))),
                                          (((2, 0), (1, 3)), ((2, 0), (1, 3)))])
@pytest.mark.parametrize('rows', [None, 2])
@pytest.mark.parametrize('cin', [3, 6])  # shifted products / XLA forward
def test_conv_matches_numpy(monkeypatch, padding, pads, rows, cin):
  x = _random(0, (2, 9, 8, cin))
  kernel = _random(1, (3, 3, cin, 5), 0.3)
  want, want_grads = _numpy_conv2d(np.asarray(x, np.float64), np.asarray(kernel, np.float64), pads)
  g = _random(2, want.shape)
  _rows_per_band(monkeypatch, rows, want.shape, kernel.shape)
  got = fast_conv.conv(x, kernel, padding=padding)
  got_dx, got_dk = jax.jit(jax.grad(
      lambda x, k: jnp.sum(fast_conv.conv(x, k, padding=padding) * g), argnums=(0, 1)))(x, kernel)
  want_dx, want_dk = want_grads(np.asarray(g, np.float64))
  assert got.shape == want.shape
  assert _relative_error(got, want) < 1e-5
  assert _relative_error(got_dx, want_dx) < 1e-5
  assert _relative_error(got_dk, want_dk) < 1e-5


# --- against lax, value and gradients --------------------------------------------------------

CASES = [
    # rank, batch, spatial, C_in, C_out, padding, rows per band (None: one band)
    (2, 2, (12, 10), 1, 4, 'SAME', None),
    (2, 3, (12, 10), 4, 6, 'SAME', 1),
    (2, 2, (11, 9), 16, 8, 'VALID', 2),  # 9 output rows: the last band is padded
    (2, 2, (11, 9), 8, 16, 'VALID', None),
    (3, 2, (6, 7, 5), 3, 4, 'SAME', 2),
    (3, 2, (7, 6, 6), 4, 2, 'VALID', 1),
    (3, 2, (6, 5, 7), 6, 3, 'SAME', 2),  # > _FEW_CHANNELS: the banded kernel gradient in 3D
]


@pytest.mark.parametrize('rank,batch,spatial,cin,cout,padding,rows', CASES)
def test_conv3x3_value_and_grads_match_lax(monkeypatch, rank, batch, spatial, cin, cout, padding,
                                           rows):
  x = _random(0, (batch, *spatial, cin))
  kernel = _random(1, (3,) * rank + (cin, cout), 0.3)
  bias = _random(2, (cout,))
  reference = lambda x, k, b: _lax_conv(x, k, padding) + b
  cotangent = _random(3, reference(x, kernel, bias).shape)
  want, want_grads = _value_and_grads(reference, x, kernel, bias, cotangent)
  _rows_per_band(monkeypatch, rows, want.shape, kernel.shape)
  fast = lambda x, k, b: fast_conv.conv3x3(x, k, b, padding=padding)
  got, got_grads = _value_and_grads(fast, x, kernel, bias, cotangent)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert _relative_error(got, want) < 1e-5
  for name, g, w in zip(('input', 'kernel', 'bias'), got_grads, want_grads):
    assert g.shape == w.shape
    assert _relative_error(g, w) < 1e-5, name


@pytest.mark.parametrize('kernel_size,strides,padding', [((1, 1), 1, 'SAME'), ((2, 2), 1, 'SAME'),
                                                         ((3, 3), 2, 'SAME'), ((3, 3), 2, 'VALID'),
                                                         ((1, 1), 2, 'VALID'), ((3, 1), 1, 1)])
def test_other_kernels_and_strides_match_lax(kernel_size, strides, padding):
  x = _random(0, (2, 9, 8, 5))
  kernel = _random(1, (*kernel_size, 5, 3), 0.3)
  lax_padding = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  reference = lambda x, k, b: _lax_conv(x, k, lax_padding, strides) + b
  fast = lambda x, k, b: fast_conv.conv(x, k, padding=padding, strides=strides) + b
  bias = _random(2, (3,))
  want = reference(x, kernel, bias)
  cotangent = _random(3, want.shape)
  want, want_grads = _value_and_grads(reference, x, kernel, bias, cotangent)
  got, got_grads = _value_and_grads(fast, x, kernel, bias, cotangent)
  assert _relative_error(got, want) < 1e-5
  for g, w in zip(got_grads, want_grads):
    assert _relative_error(g, w) < 1e-5


@pytest.mark.parametrize('spatial', [(5, 6), (3, 4, 2)])
def test_conv_transpose_2x2_matches_lax(spatial):
  rank = len(spatial)
  x = _random(0, (2, *spatial, 6))
  kernel = _random(1, (2,) * rank + (6, 4), 0.3)
  bias = _random(2, (4,))
  reference = lambda x, k, b: lax.conv_transpose(x, k, (2,) * rank, 'VALID',
                                                 dimension_numbers=_spec(rank)) + b
  want = reference(x, kernel, bias)
  assert want.shape == (2, *(2 * s for s in spatial), 4)
  cotangent = _random(3, want.shape)
  want, want_grads = _value_and_grads(reference, x, kernel, bias, cotangent)
  got, got_grads = _value_and_grads(fast_conv.conv_transpose_2x2, x, kernel, bias, cotangent)
  assert _relative_error(got, want) < 1e-5
  for g, w in zip(got_grads, want_grads):
    assert _relative_error(g, w) < 1e-5


def test_conv_rejects_bad_arguments():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match='padding'):
    fast_conv.conv(x, jnp.zeros((3, 3, 3, 2)), padding='CIRCULAR')
  with pytest.raises(ValueError, match='channels'):
    fast_conv.conv(x, jnp.zeros((3, 3, 4, 2)))
  with pytest.raises(ValueError, match='3×…×3'):
    fast_conv.conv3x3(x, jnp.zeros((5, 5, 3, 2)))


# --- the flax modules ------------------------------------------------------------------------


def _tree_equal(a, b) -> bool:
  same_structure = jax.tree.structure(a) == jax.tree.structure(b)
  return same_structure and all(
      x.shape == y.shape and x.dtype == y.dtype and bool(jnp.array_equal(x, y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('impl', ['xla', 'fast', 'auto'])
@pytest.mark.parametrize('shape,kernel_size,padding,use_bias', [
    ((2, 10, 12, 4), (3, 3), 'SAME', True),
    ((2, 10, 12, 4), (3, 3), 'VALID', False),
    ((2, 10, 12, 4), (1, 1), 'SAME', True),
    ((2, 5, 6, 4, 3), (3, 3, 3), 'SAME', True),
])
def test_conv_module_is_a_drop_in_for_nn_conv(impl, shape, kernel_size, padding, use_bias):
  x = _random(0, shape)
  stock = nn.Conv(5, kernel_size, padding=padding, use_bias=use_bias)
  fast = fast_conv.Conv(5, kernel_size, padding=padding, use_bias=use_bias, impl=impl)
  variables = stock.init(jax.random.key(1), x)
  assert _tree_equal(fast.init(jax.random.key(1), x), variables)
  if use_bias:  # a non-zero bias, so that its gradient is tested against something
    variables = jax.tree.map(lambda v: v + 0.1, variables)
  want = stock.apply(variables, x)
  got = fast.apply(variables, x)
  assert got.shape == want.shape
  assert _relative_error(got, want) < 1e-5
  cotangent = _random(2, want.shape)
  grads = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x) * cotangent)))(variables)
  for g, w in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(stock))):
    assert _relative_error(g, w) < 1e-5


def test_conv_module_follows_dtype_like_nn_conv():
  x = _random(0, (2, 8, 8, 4))
  stock = nn.Conv(6, (3, 3), dtype=jnp.bfloat16)
  fast = fast_conv.Conv(6, (3, 3), dtype=jnp.bfloat16, impl='fast')
  variables = stock.init(jax.random.key(1), x)
  want, got = stock.apply(variables, x), fast.apply(variables, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  assert _relative_error(got, want) < 2e-2
  grads = jax.grad(lambda v: jnp.sum(fast.apply(v, x).astype(jnp.float32)))(variables)
  assert grads['params']['kernel'].dtype == jnp.float32  # params stay float32
  with pytest.raises(ValueError, match='model.conv_impl'):
    fast_conv.Conv(6, (3, 3), impl='cudnn').init(jax.random.key(0), x)


@pytest.mark.parametrize('impl', ['xla', 'fast', 'auto'])
@pytest.mark.parametrize('shape', [(2, 5, 6, 8), (2, 3, 4, 2, 8)])
def test_conv_transpose_module_is_a_drop_in(impl, shape):
  rank = len(shape) - 2
  x = _random(0, shape)
  stock = nn.ConvTranspose(4, (2,) * rank, strides=(2,) * rank, padding='VALID')
  fast = fast_conv.ConvTranspose2x2(4, impl=impl)
  variables = stock.init(jax.random.key(1), x)
  assert _tree_equal(fast.init(jax.random.key(1), x), variables)
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  want, got = stock.apply(variables, x), fast.apply(variables, x)
  assert _relative_error(got, want) < 1e-5
  cotangent = _random(2, want.shape)
  grads = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x) * cotangent)))(variables)
  for g, w in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(stock))):
    assert _relative_error(g, w) < 1e-5


def test_auto_resolves_as_documented():
  resolve = lambda k, cin, cout, spatial, **kw: fast_conv.resolve_impl(
      'auto', kernel_size=k, in_features=cin, out_features=cout, spatial_shape=spatial, **kw)
  assert jax.default_backend() == 'cpu'
  # CPU: 1×1 and transposed convolutions always take the matrix-product path.
  assert resolve((1, 1), 64, 2, (256, 256)) == 'fast'
  assert resolve((2, 2), 8, 4, (16, 16), transposed=True) == 'fast'
  # 3×3: large images with enough channels take the banded kernel gradient ...
  assert resolve((3, 3), 16, 16, (256, 256)) == 'fast'
  assert resolve((3, 3), 64, 128, (128, 128)) == 'fast'
  assert resolve((3, 3), 128, 256, (64, 64)) == 'fast'
  assert resolve((3, 3), 8, 8, (64, 64, 16)) == 'xla'  # 3D: pixels of the volume, few channels
  # ... small images, few input channels or little work stay with XLA.
  assert resolve((3, 3), 8, 64, (256, 256)) == 'xla'
  # A few input channels (the first layer): shifted products forward.
  assert resolve((3, 3), 1, 64, (256, 256)) == 'fast'
  assert resolve((3, 3), 4, 8, (16, 16)) == 'fast'
  assert resolve((3, 3), 64, 64, (128, 128)) == 'xla'
  assert resolve((3, 3), 512, 512, (32, 32)) == 'xla'
  # Accelerators: always XLA; explicit choices are kept.
  for backend in ('gpu', 'tpu'):
    assert resolve((3, 3), 64, 128, (128, 128), backend=backend) == 'xla'
    assert resolve((1, 1), 64, 2, (256, 256), backend=backend) == 'xla'
  for impl in ('xla', 'fast'):
    assert fast_conv.resolve_impl(impl, kernel_size=(3, 3), in_features=1, out_features=1,
                                  spatial_shape=(8, 8), backend='gpu') == impl
  with pytest.raises(ValueError, match="model.conv_impl='fastest' is not one of"):
    fast_conv.resolve_impl('fastest', kernel_size=(3, 3), in_features=1, out_features=1,
                           spatial_shape=(8, 8))


# --- 2× max pooling --------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(2, 6, 8, 3), (2, 4, 6, 4, 2), (3, 10, 4)])
def test_max_pool_matches_flax_values_and_gradients_with_ties(shape):
  rank = len(shape) - 2
  # Small integers: most windows hold ties, where the gradient's choice of element matters.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=shape), jnp.float32)
  reference = lambda x: nn.max_pool(x, (2,) * rank, strides=(2,) * rank)
  want = reference(x)
  cotangent = _random(1, want.shape)
  got = fast_conv.max_pool_2x(x)
  assert got.shape == want.shape and bool(jnp.array_equal(got, want))
  want_dx = jax.vjp(reference, x)[1](cotangent)[0]
  got_dx = jax.jit(lambda x, g: jax.vjp(fast_conv.max_pool_2x, x)[1](g)[0])(x, cotangent)
  assert bool(jnp.array_equal(got_dx, want_dx))  # the same element of each window, exactly


def test_pool_impl_resolves_by_backend():
  assert fast_conv.resolve_pool_impl('auto', backend='cpu') == 'fast'
  assert fast_conv.resolve_pool_impl('auto', backend='gpu') == 'xla'
  assert fast_conv.resolve_pool_impl('xla', backend='cpu') == 'xla'
  for impl in ('portable', 'onednn'):
    assert fast_conv.resolve_pool_impl(impl, backend='cpu') == 'fast'
    assert fast_conv.resolve_pool_impl(impl, backend='tpu') == 'xla'
  with pytest.raises(ValueError, match='model.conv_impl'):
    fast_conv.resolve_pool_impl('fastest')


# --- in the models: config.model.conv_impl ---------------------------------------------------


def _he_variables(model, x):
  """He-scaled random values of the right shapes (a compiled init of a U-Net is slow to build)."""
  abstract = jax.eval_shape(model.init, jax.random.key(1), x)
  leaves, tree = jax.tree.flatten(abstract)
  scale = lambda shape: np.sqrt(2 / np.prod(shape[:-1])) if len(shape) > 1 else 0.5
  variables = jax.tree.unflatten(tree, [_random(i, leaf.shape, scale(leaf.shape))
                                        for i, leaf in enumerate(leaves)])
  return abstract, jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.abs(v) + 0.5 if 'var' in jax.tree_util.keystr(path) else v, variables)


@pytest.mark.parametrize('name,padding,size,norm', [('unet', 'SAME', 16, 'batch'),
                                                    ('unet', 'VALID', 44, 'none'),
                                                    ('res_unet', 'SAME', 16, 'batch')])
def test_models_with_fast_paths_have_the_same_parameters_and_gradients(name, padding, size, norm):
  from unet_jax.models import MODELS  # pylint: disable=g-import-not-at-top
  x = _random(0, (2, size, size, 1))
  build = lambda impl: MODELS[name](num_classes=2, width=4, depth=2, padding=padding, norm=norm,
                                    conv_impl=impl)
  stock, fast = build('xla'), build('fast')
  abstract, variables = _he_variables(stock, x)
  assert jax.tree.structure(jax.eval_shape(fast.init, jax.random.key(1), x)) == \
      jax.tree.structure(abstract)
  out_shape = jax.eval_shape(lambda: stock.apply(variables, x)).shape
  cotangent = _random(99, out_shape)

  def loss(model, params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(logits * cotangent), logits

  grads = lambda model: jax.jit(jax.grad(functools.partial(loss, model), has_aux=True))(
      variables['params'])
  (want_grads, want), (got_grads, got) = grads(stock), grads(fast)
  assert _relative_error(got, want) < 1e-5
  # Against the largest gradient: kernels in front of a batch norm get gradients that mostly
  # cancel, whose float32 rounding differs between any two summation orders (in float64 the
  # two paths agree to 1e-11).
  scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want_grads))
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert float(jnp.max(jnp.abs(g - w))) < 1e-5 * scale
  # 'fast' really changed the computation: no select-and-scatter (max-pool backward), no
  # reduce-window and no transposed convolution (lhs dilation 2) are left in the gradient.
  hlo = lambda model: jax.jit(jax.grad(functools.partial(loss, model), has_aux=True)).lower(
      variables['params']).as_text()
  fast_hlo, stock_hlo = hlo(fast), hlo(stock)
  for op in ('select_and_scatter', 'reduce_window', 'lhs_dilate = [2'):
    assert op in stock_hlo and op not in fast_hlo, op
