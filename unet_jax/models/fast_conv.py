"""Convolutions with a faster backward pass on XLA:CPU, and drop-in flax.linen layers for them.

Shapes are channels-last: inputs (N, *spatial, C_in), kernels (*kernel_size, C_in, C_out) as in
`flax.linen.Conv`, outputs (N, *spatial_out, C_out); 1D, 2D and 3D alike.

Why: on XLA:CPU the kernel (weight) gradient of a 3×3 convolution runs as a convolution whose
window is the whole image, 2–6× slower than the forward pass on large images with many channels
(jax-ml/jax#23783, jax-ml/jax#31662, openxla/xla#34273), and the gradient of
`lax.conv_transpose` (a convolution over a zero-dilated input) is slower still. Here:

* the kernel gradient is computed band by band (a `lax.scan` over slabs of output rows): each
  band stacks the input slices seen by the kernel taps, (taps, pixels, C_in), and contracts the
  pixels with dy's (pixels, C_out) in one matrix product, on data that is still in cache;
* the input gradient is the forward convolution of dy with the spatially flipped,
  channel-swapped kernel (what lax does too; XLA runs it as fast as the forward pass);
* a 1×1 convolution is a matrix product, and the 2×2 stride-2 transposed convolution of the
  U-Net decoder is one einsum, so autodiff gives matrix products for their gradients.

Every path computes the same function as `lax.conv_general_dilated` / `lax.conv_transpose`;
only the order of the floating-point sums differs. The forward convolution is XLA's own.

Public API:
  conv(x, kernel, *, padding, strides=1)     convolution with the fast VJP, any rank
  conv3x3(x, kernel, bias=None, *, padding)  the U-Net's 3×3 (3×3×3) layer
  conv_transpose_2x2(x, kernel, bias=None)   `nn.ConvTranspose(f, (2,)*n, (2,)*n, 'VALID')`
  max_pool_2x(x)                             `nn.max_pool(x, (2,)*n, strides=(2,)*n)` with a
                                             gather-free backward pass
  Conv, ConvTranspose2x2                     flax.linen modules, drop-in for nn.Conv and that
                                             nn.ConvTranspose, with impl one of IMPLS
  resolve_impl(impl, ...)                    which computation an impl picks for a layer
                                             (conv_impls.py; 'onednn': models/onednn/)
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
from jax import lax
import jax.numpy as jnp

from unet_jax.models import conv_impls
from unet_jax.models import onednn

Dtype = Any
Padding = str | int | Sequence[int | tuple[int, int]]

# The conv_impl names and the per-layer choice live in conv_impls.py; re-exported here.
IMPLS = conv_impls.IMPLS
resolve_impl = conv_impls.resolve_impl
resolve_pool_impl = conv_impls.resolve_pool_impl
impl_for_platforms = conv_impls.impl_for_platforms
PADDINGS = ('SAME', 'VALID')
# Bytes of the stacked tap slices of one band of the kernel-gradient scan: the size of the L2
# cache of a current x86 core. 1–4 MiB measured alike; 8 MiB and more were slower.
_BAND_BYTES = 2 << 20
_FEW_CHANNELS = conv_impls.FEW_CHANNELS  # shifted products forward up to this many channels


# --- padding and dimension helpers -----------------------------------------------------------


def _dimension_numbers(rank: int, swap_kernel_io: bool = False) -> lax.ConvDimensionNumbers:
  if not 1 <= rank <= 3:
    raise ValueError(f'only 1D, 2D and 3D convolutions are supported, got rank {rank}')
  spatial = 'DHW'[-rank:]
  lhs = 'N' + spatial + 'C'
  rhs = spatial + ('OI' if swap_kernel_io else 'IO')
  return lax.conv_dimension_numbers((1,) * (rank + 2), (1,) * (rank + 2), (lhs, rhs, lhs))


def _explicit_padding(padding: Padding, spatial_shape: Sequence[int], kernel_size: Sequence[int],
                      strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """`padding` as one (low, high) pair per spatial dim, the way lax and flax read it."""
  rank = len(kernel_size)
  if isinstance(padding, str):
    if padding.upper() not in PADDINGS:
      raise ValueError(f'padding={padding!r} is not one of {PADDINGS} or explicit (low, high) '
                       'pairs')
    return tuple(lax.padtype_to_pads(spatial_shape, kernel_size, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pads) != rank or any(len(p) != 2 for p in pads):
    raise ValueError(f'padding={padding!r} needs one (low, high) pair per spatial dim ({rank})')
  return pads


def _as_tuple(value: int | Sequence[int], rank: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * rank
  value = tuple(value)
  if len(value) != rank:
    raise ValueError(f'{name}={value} needs {rank} entries, one per spatial dim')
  return value


# --- the custom-VJP convolution --------------------------------------------------------------


def _lax_conv(x, kernel, padding, strides, *, swap_kernel_io: bool = False):
  """lax.conv_general_dilated, channels-last; `swap_kernel_io` reads the kernel as (…, O, I)."""
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_dimension_numbers(x.ndim - 2,
                                                                       swap_kernel_io))


def _input_grad(dy, kernel, padding, strides, x_shape):
  """dL/dx: for stride 1, `dy` convolved with the flipped, channel-swapped kernel."""
  ksize = kernel.shape[:-2]
  if any(s != 1 for s in strides):
    # Not used by the models; lax's transpose rule handles strides.
    _, vjp = jax.vjp(lambda x: _lax_conv(x, kernel, padding, strides),
                     jnp.zeros(x_shape, dy.dtype))
    return vjp(dy)[0]
  flipped = kernel[(slice(None, None, -1),) * len(ksize)]
  # y[o] = Σ_t x[o - lo + t]·k[t], so dx[i] = Σ_t dy[i + lo - t]·k[t]: a correlation of dy with
  # the flipped kernel, padded by k - 1 - lo below and by whatever makes it as long as x above.
  # The kernel's channel axes swap roles through the dimension numbers, not a transposed copy
  # (a 3×3×1024×1024 transpose alone took 0.2 s on the CPU).
  pads = tuple((k - 1 - lo, size + lo - out)
               for size, k, (lo, _), out in zip(x_shape[1:-1], ksize, padding, dy.shape[1:-1]))
  return _lax_conv(dy, flipped.astype(dy.dtype), pads, (1,) * len(ksize), swap_kernel_io=True)


def _band_rows(dy_shape, kernel_shape, itemsize: int) -> int:
  """Output rows (dim 1) per band: the band's stacked tap slices stay near `_BAND_BYTES`."""
  n, out_rows, *rest, _ = dy_shape
  taps = math.prod(kernel_shape[:-2])
  row_bytes = taps * n * math.prod(rest) * kernel_shape[-2] * itemsize
  return max(1, min(out_rows, _BAND_BYTES // max(row_bytes, 1)))


def _kernel_grad(x, dy, kernel_shape, padding, strides):
  """dL/dkernel = Σ over output pixels of x_window ⊗ dy, one band of output rows at a time.

  Each band stacks the input slices seen by every kernel tap, (taps, pixels, C_in), and
  contracts the pixels with dy's (pixels, C_out): one matrix product per band on data that
  was just written and is still in cache. The last band is completed with zero rows of dy.
  """
  ksize = kernel_shape[:-2]
  cin, cout = kernel_shape[-2:]
  rank = len(ksize)
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_rows = dy.shape[1]
  rows = _band_rows(dy.shape, kernel_shape, x.dtype.itemsize)
  bands = -(-out_rows // rows)
  # Zero rows of dy contribute nothing, so both arrays are padded to whole bands.
  dy = jnp.pad(dy, ((0, 0), (0, bands * rows - out_rows)) + ((0, 0),) * rank)
  band_in = (rows - 1) * strides[0] + ksize[0]
  in_rows = (bands - 1) * rows * strides[0] + band_in
  xp = jnp.pad(xp, ((0, 0), (0, max(0, in_rows - xp.shape[1]))) + ((0, 0),) * rank)
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  out_spatial = (rows,) + dy.shape[2:-1]
  windows = [tuple(slice(t, t + (o - 1) * s + 1, s) for t, o, s in zip(tap, out_spatial, strides))
             for tap in itertools.product(*(range(k) for k in ksize))]

  def band(acc, index):
    xb = lax.dynamic_slice_in_dim(xp, index * rows * strides[0], band_in, axis=1)
    db = lax.dynamic_slice_in_dim(dy, index * rows, rows, axis=1).reshape(-1, cout)
    taps = jnp.stack([xb[(slice(None),) + w].reshape(-1, cin) for w in windows])
    grad = lax.dot_general(taps, db, (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype)
    return acc + grad, None

  acc = jnp.zeros((len(windows), cin, cout), acc_dtype)
  acc, _ = lax.scan(band, acc, jnp.arange(bands))
  return acc.reshape(kernel_shape)


def _shifted_products(x, kernel, padding):
  """Stride-1 correlation as Σ over taps and input channels of shifted x times kernel rows.

  The sum is accumulated in float32 (at least), as XLA's convolutions do for bf16 inputs.
  """
  ksize = kernel.shape[:-2]
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  x, kernel = x.astype(acc_dtype), kernel.astype(acc_dtype)
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out = tuple(p - k + 1 for p, k in zip(xp.shape[1:-1], ksize))
  y = None
  for tap in itertools.product(*(range(k) for k in ksize)):
    window = xp[(slice(None),) + tuple(slice(t, t + o) for t, o in zip(tap, out))]
    for c in range(x.shape[-1]):
      term = window[..., c, None] * kernel[tap + (c,)]
      y = term if y is None else y + term
  return y


def _forward(x, kernel, padding, strides):
  if x.shape[-1] <= _FEW_CHANNELS and all(s == 1 for s in strides):
    return _shifted_products(x, kernel, padding).astype(jnp.result_type(x, kernel))
  return _lax_conv(x, kernel, padding, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding, strides):
  return _forward(x, kernel, padding, strides)


def _conv_fwd(x, kernel, padding, strides):
  return _forward(x, kernel, padding, strides), (x, kernel)


def _conv_bwd(padding, strides, residuals, dy):
  x, kernel = residuals
  dx = _input_grad(dy, kernel, padding, strides, x.shape).astype(x.dtype)
  if x.shape[-1] <= _FEW_CHANNELS:
    # With so few input channels XLA's own kernel gradient is the faster one.
    _, vjp = jax.vjp(lambda k: _lax_conv(x, k, padding, strides), kernel)
    dk = vjp(dy)[0]
  else:
    dk = _kernel_grad(x, dy, kernel.shape, padding, strides).astype(kernel.dtype)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, *, padding: Padding = 'SAME',
         strides: int | Sequence[int] = 1) -> jax.Array:
  """`lax.conv_general_dilated` (channels-last, no dilation) with a fast custom VJP.

  Args:
    x: (N, *spatial, C_in).
    kernel: (*kernel_size, C_in, C_out).
    padding: 'SAME', 'VALID', an int, or one (low, high) pair per spatial dim.
    strides: int or one per spatial dim.

  Returns:
    (N, *spatial_out, C_out), in the dtype of `x` and `kernel`.
  """
  rank = kernel.ndim - 2
  if x.ndim != rank + 2:
    raise ValueError(f'x has shape {x.shape}; a {rank}D kernel {kernel.shape} needs '
                     f'(N, *spatial[{rank}], C_in)')
  if x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f'x has {x.shape[-1]} channels but the kernel expects {kernel.shape[-2]}')
  strides = _as_tuple(strides, rank, 'strides')
  pads = _explicit_padding(padding, x.shape[1:-1], kernel.shape[:-2], strides)
  if all(k == 1 for k in kernel.shape[:-2]) and all(p == (0, 0) for p in pads):
    # A 1×1 convolution is a matrix product; its autodiff is two more.
    window = (slice(None),) + tuple(slice(None, None, s) for s in strides)
    return jnp.einsum('...i,io->...o', x[window], kernel.reshape(kernel.shape[-2:]))
  return _conv(x, kernel, pads, strides)


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
            padding: Padding = 'SAME') -> jax.Array:
  """3×3 (or 3×3×3) stride-1 convolution plus optional bias, with the fast custom VJP."""
  if any(k != 3 for k in kernel.shape[:-2]):
    raise ValueError(f'conv3x3 takes a 3×…×3 kernel, got shape {kernel.shape}')
  y = conv(x, kernel, padding=padding)
  return y if bias is None else y + bias.astype(y.dtype)


def conv_transpose_2x2(x: jax.Array, kernel: jax.Array,
                       bias: jax.Array | None = None) -> jax.Array:
  """`nn.ConvTranspose(C_out, (2,)*n, strides=(2,)*n, padding='VALID')` as one einsum.

  Every input pixel spreads to its own 2×…×2 output block, so the layer is a matrix product
  `(N·pixels, C_in) @ (C_in, 2^n·C_out)` followed by a reshape. lax (and so flax) applies the
  kernel without flipping it over the zero-dilated input, so output offset `a` in a block takes
  kernel tap `1 - a`; `kernel` is flax's (2, …, 2, C_in, C_out) parameter.
  """
  rank = x.ndim - 2
  if kernel.shape[:-2] != (2,) * rank:
    raise ValueError(f'conv_transpose_2x2 takes a 2×…×2 kernel for {rank}D input, got shape '
                     f'{kernel.shape}')
  flipped = kernel[(slice(None, None, -1),) * rank]
  spatial = 'dhw'[-rank:]
  taps = 'abc'[:rank]
  interleaved = ''.join(s + t for s, t in zip(spatial, taps))
  y = jnp.einsum(f'n{spatial}i,{taps}io->n{interleaved}o', x, flipped)
  n, *sizes, cout = x.shape[0], *x.shape[1:-1], kernel.shape[-1]
  y = y.reshape(n, *(2 * s for s in sizes), cout)
  return y if bias is None else y + bias.astype(y.dtype)


# --- 2× max pooling ---------------------------------------------------------------------------


def _pool_windows(x: jax.Array) -> jax.Array:
  """(N, *spatial, C) → (N, 2^rank, *spatial/2, C): the 2×…×2 windows, in row-major order."""
  n, *spatial, c = x.shape
  rank = len(spatial)
  split = x.reshape(n, *itertools.chain.from_iterable((s // 2, 2) for s in spatial), c)
  # Window offsets to the front, in the order (d, h, w) of lax's window iteration.
  offsets = tuple(2 + 2 * i for i in range(rank))
  blocks_ = tuple(1 + 2 * i for i in range(rank))
  windows = split.transpose(0, *offsets, *blocks_, 2 * rank + 1)
  return windows.reshape(n, 2**rank, *(s // 2 for s in spatial), c)


@jax.custom_vjp
def max_pool_2x(x: jax.Array) -> jax.Array:
  """2×…×2 max pooling with stride 2 of a channels-last array with even spatial sizes.

  The same values and the same gradient as `nn.max_pool(x, (2,)*n, strides=(2,)*n)`, ties
  included: the whole gradient goes to the first maximum of each window in row-major order,
  which is what lax's select-and-scatter does. That backward pass is a scatter on XLA:CPU,
  8× slower than this one, which compares each window with its maximum instead.
  """
  return jnp.max(_pool_windows(x), axis=1)


def _max_pool_fwd(x):
  y = max_pool_2x(x)
  return y, (x, y)


def _max_pool_bwd(residuals, dy):
  x, y = residuals
  windows = _pool_windows(x)
  # Only the first maximum of a window takes the gradient (a loop over the ≤ 8 offsets: a
  # cumulative sum would lower to a slow reduce-window on CPU).
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for offset in range(windows.shape[1]):
    first = (windows[:, offset] == y) & ~taken
    taken = taken | first
    parts.append(jnp.where(first, dy, jnp.zeros((), dy.dtype)))
  dx = jnp.stack(parts, axis=1)
  n, _, *half, c = dx.shape
  rank = len(half)
  dx = dx.reshape(n, *(2,) * rank, *half, c)
  # Back from (N, offsets..., blocks..., C) to (N, block0, offset0, block1, offset1, ..., C).
  order = itertools.chain.from_iterable((1 + rank + i, 1 + i) for i in range(rank))
  dx = dx.transpose(0, *order, 1 + 2 * rank)
  return (dx.reshape(x.shape),)


max_pool_2x.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- flax modules ----------------------------------------------------------------------------


def _kernel_and_bias(module: nn.Module, inputs: jax.Array, kernel_shape: tuple[int, ...]):
  """nn.Conv's 'kernel' and optional 'bias' parameters, promoted with `inputs` to module.dtype."""
  kernel = module.param('kernel', module.kernel_init, kernel_shape, module.param_dtype)
  bias = (module.param('bias', module.bias_init, (kernel_shape[-1],), module.param_dtype)
          if module.use_bias else None)
  return flax_dtypes.promote_dtype(inputs, kernel, bias, dtype=module.dtype)


class Conv(nn.Module):
  """Drop-in for `flax.linen.Conv` (stride 1, no dilation, one feature group).

  Parameters 'kernel' (*kernel_size, C_in, features) and 'bias' (features,) have nn.Conv's
  names, shapes, dtypes and initialisers, so checkpoints move between the two. `impl` picks
  the computation: 'xla' is exactly nn.Conv's, 'fast' the custom VJP above, 'onednn' oneDNN's
  convolutions on CPU (models/onednn/), 'auto' and 'portable' see conv_impls.py.
  """

  features: int
  kernel_size: int | Sequence[int]
  padding: Padding = 'SAME'
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs: jax.Array, *, affine: tuple[jax.Array, jax.Array] | None = None,
               relu: bool = False) -> jax.Array:
    """inputs (N, *spatial, C_in) → (N, *spatial, features).

    `affine` = (mul, add), each (features,): the output becomes y·mul + add (an evaluation batch
    norm folded in), then max(·, 0) if `relu`. On the 'onednn' path mul goes into the kernel
    and add into the bias of one inference call whose ReLU is a post-op.
    """
    # Like nn.Conv, an int kernel_size means a 1D kernel.
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    rank = len(kernel_size)
    if inputs.ndim != rank + 2:
      raise ValueError(f'Conv with kernel_size {kernel_size} takes (N, *spatial[{rank}], C) '
                       f'input, got shape {inputs.shape}')
    in_features = inputs.shape[-1]
    inputs, kernel, bias = _kernel_and_bias(self, inputs,
                                            kernel_size + (in_features, self.features))
    strides = (1,) * rank
    pads = _explicit_padding(self.padding, inputs.shape[1:-1], kernel_size, strides)
    impl = resolve_impl(self.impl, kernel_size=kernel_size, in_features=in_features,
                        out_features=self.features, spatial_shape=inputs.shape[1:-1],
                        dtype=inputs.dtype, padding=pads)
    if impl == 'onednn' and (affine is not None or relu):
      mul, add = affine if affine is not None else (1.0, 0.0)
      shift = jnp.zeros((self.features,), kernel.dtype) if bias is None else bias
      return onednn.conv_epilogue(inputs, kernel * mul, shift * mul + add, padding=pads,
                                  strides=strides, relu=relu)
    y = _CONV_PATHS[impl](inputs, kernel, pads, strides)
    y = y if bias is None else y + bias
    if affine is not None:
      y = (y * affine[0] + affine[1]).astype(y.dtype)
    return nn.relu(y) if relu else y


# What Conv computes for each resolved impl: (x, kernel, explicit pads, strides) → y.
_CONV_PATHS = {
    'xla': _lax_conv,
    'fast': lambda x, kernel, pads, strides: conv(x, kernel, padding=pads, strides=strides),
    'onednn': lambda x, kernel, pads, strides: onednn.conv(x, kernel, padding=pads,
                                                           strides=strides),
}


class ConvTranspose2x2(nn.Module):
  """Drop-in for `nn.ConvTranspose(features, (2,)*n, strides=(2,)*n, padding='VALID')`.

  Same 'kernel' (2, …, 2, C_in, features) and 'bias' parameters as nn.ConvTranspose. Flax
  names an unnamed submodule after its class, so a caller replacing an unnamed
  nn.ConvTranspose passes `name='ConvTranspose_0'` to keep the parameter tree.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    rank = inputs.ndim - 2
    if rank not in (1, 2, 3):
      raise ValueError(f'ConvTranspose2x2 takes (N, *spatial, C) input with 1–3 spatial dims, '
                       f'got shape {inputs.shape}')
    kernel_size = (2,) * rank
    inputs, kernel, bias = _kernel_and_bias(self, inputs,
                                            kernel_size + (inputs.shape[-1], self.features))
    impl = resolve_impl(self.impl, kernel_size=kernel_size, in_features=inputs.shape[-1],
                        out_features=self.features, spatial_shape=inputs.shape[1:-1],
                        transposed=True, dtype=inputs.dtype)
    y = _CONV_TRANSPOSE_PATHS[impl](inputs, kernel)
    return y if bias is None else y + bias


# What ConvTranspose2x2 computes for each resolved impl: (x, kernel) → y, without the bias.
_CONV_TRANSPOSE_PATHS = {
    'xla': lambda x, kernel: lax.conv_transpose(x, kernel, (2,) * (x.ndim - 2), 'VALID',
                                                dimension_numbers=_dimension_numbers(x.ndim - 2)),
    'fast': conv_transpose_2x2,
    'onednn': lambda x, kernel: onednn.conv_transpose(x, kernel, strides=(2,) * (x.ndim - 2)),
}
