"""oneDNN convolutions on XLA:CPU: the forward pass and its VJP as FFI custom calls.

Shapes are channels-last as in `fast_conv`: x (N, *spatial, C_in), kernel (*kernel_size, C_in,
C_out), y (N, *spatial_out, C_out); 1D, 2D and 3D; float32.

  conv            `lax.conv_general_dilated`: any strides, non-negative explicit (low, high) pads
  conv_transpose  `lax.conv_transpose(..., padding='VALID')` with kernel_size == strides (the
                  U-Net's 2×2 up-convolution): oneDNN's "deconvolution"
  conv_epilogue   conv(x, kernel) + bias, then an optional ReLU, in one inference call (the
                  bias and the ReLU are oneDNN post-ops; evaluation folds batch norm into them)

Only the order of the sums differs from lax. A VJP is two custom calls, the input gradient and
the kernel gradient, so XLA drops the first where nothing needs it (the image's gradient); the
extension runs one call at a time (two OpenMP teams at once would share the cores).

The custom calls exist on CPU only, and only in this process (they are registered at run
time): programs for another platform or for export must take another path (see
`fast_conv.impl_for_platforms`). `available()` builds the extension on first use.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.models.onednn import build

DTYPES = (jnp.float32,)
EPILOGUE = 'unet_jax_onednn_conv_forward_epilogue'
# The FFI targets (forward, input gradient, kernel gradient) of each kind of layer.
TARGETS = {kind: tuple(f'unet_jax_onednn_{kind}_{part}'
                       for part in ('forward', 'backward_data', 'backward_weights'))
           for kind in ('conv', 'deconv')}


def available() -> bool:
  """Whether the extension is built, loaded and registered (builds it on the first call)."""
  return build.load()


def supports(*, rank: int, dtype, padding: Sequence[tuple[int, int]]) -> bool:
  """Whether `conv` takes a convolution of this rank, compute dtype and explicit padding."""
  return (1 <= rank <= 3 and jnp.dtype(dtype) in [jnp.dtype(d) for d in DTYPES]
          and all(lo >= 0 and hi >= 0 for lo, hi in padding))


def _attributes(padding, strides) -> dict[str, np.ndarray]:
  return {'strides': np.asarray(strides, np.int64),
          'pad_lo': np.asarray([lo for lo, _ in padding], np.int64),
          'pad_hi': np.asarray([hi for _, hi in padding], np.int64)}


def _output_shape(kind, x_shape, kernel_shape, padding, strides) -> tuple[int, ...]:
  if kind == 'conv':
    spatial = tuple((size + lo + hi - k) // s + 1 for size, k, (lo, hi), s
                    in zip(x_shape[1:-1], kernel_shape[:-2], padding, strides))
  else:
    spatial = tuple((size - 1) * s + k - lo - hi for size, k, (lo, hi), s
                    in zip(x_shape[1:-1], kernel_shape[:-2], padding, strides))
  return (x_shape[0], *spatial, kernel_shape[-1])


def _forward(x, kernel, kind, padding, strides):
  out = jax.ShapeDtypeStruct(_output_shape(kind, x.shape, kernel.shape, padding, strides),
                             x.dtype)
  return jax.ffi.ffi_call(TARGETS[kind][0], out, vmap_method='sequential')(
      x, kernel, **_attributes(padding, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _call(x, kernel, kind, padding, strides):
  return _forward(x, kernel, kind, padding, strides)


def _call_fwd(x, kernel, kind, padding, strides):
  return _forward(x, kernel, kind, padding, strides), (x, kernel)


def _call_bwd(kind, padding, strides, residuals, dy):
  x, kernel = residuals
  dy = dy.astype(x.dtype)
  attributes = _attributes(padding, strides)
  _, data, weights = TARGETS[kind]
  dx = jax.ffi.ffi_call(data, jax.ShapeDtypeStruct(x.shape, x.dtype),
                        vmap_method='sequential')(x, kernel, dy, **attributes)
  dkernel = jax.ffi.ffi_call(weights, jax.ShapeDtypeStruct(kernel.shape, x.dtype),
                             vmap_method='sequential')(x, dy, **attributes)
  return dx, dkernel


_call.defvjp(_call_fwd, _call_bwd)


def _check(x, kernel, padding, strides) -> Any:
  """The compute dtype of x and kernel, or ValueError for what the path does not take."""
  rank = kernel.ndim - 2
  dtype = jnp.result_type(x, kernel)
  if x.ndim != rank + 2 or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f'x {x.shape} does not fit the kernel {kernel.shape}')
  if len(padding) != rank or len(strides) != rank:
    raise ValueError(f'padding {padding} and strides {strides} need {rank} entries each')
  if not supports(rank=rank, dtype=dtype, padding=padding):
    raise ValueError(f'the oneDNN path takes 1–3 spatial dims, {DTYPES} and non-negative '
                     f'padding; got rank {rank}, {dtype}, padding {padding}')
  if not available():
    raise ValueError('the oneDNN extension is not available (see the warning logged when it '
                     'was built)')
  return dtype


def conv(x: jax.Array, kernel: jax.Array, *, padding: Sequence[tuple[int, int]],
         strides: Sequence[int]) -> jax.Array:
  """`lax.conv_general_dilated` (channels-last, no dilation) through oneDNN, with its VJP.

  Args:
    x: (N, *spatial, C_in), float32.
    kernel: (*kernel_size, C_in, C_out), float32.
    padding: one non-negative (low, high) pair per spatial dim.
    strides: one per spatial dim.

  Returns:
    (N, *spatial_out, C_out) float32.

  Raises:
    ValueError: for what `supports` rejects, or when the extension is not available.
  """
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  strides = tuple(int(s) for s in strides)
  dtype = _check(x, kernel, padding, strides)
  return _call(x.astype(dtype), kernel.astype(dtype), 'conv', padding, strides)


def conv_transpose(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int]) -> jax.Array:
  """`lax.conv_transpose(x, kernel, strides, 'VALID')` (channels-last, kernel not transposed,
  as flax's nn.ConvTranspose) for kernel_size == strides, through oneDNN, with its VJP.

  Args:
    x: (N, *spatial, C_in), float32.
    kernel: (*strides, C_in, C_out), float32, flax's nn.ConvTranspose parameter.
    strides: one per spatial dim; every input pixel spreads to its own block of this size.

  Returns:
    (N, *(spatial·strides), C_out) float32.
  """
  strides = tuple(int(s) for s in strides)
  if tuple(kernel.shape[:-2]) != strides:
    raise ValueError(f'the oneDNN transposed convolution takes kernel_size == strides, got '
                     f'kernel {kernel.shape} and strides {strides}')
  padding = ((0, 0),) * len(strides)
  dtype = _check(x, kernel, padding, strides)
  # lax gives output offset a of a block kernel tap k-1-a; oneDNN (like torch) tap a.
  flipped = kernel[(slice(None, None, -1),) * len(strides)]
  return _call(x.astype(dtype), flipped.astype(dtype), 'deconv', padding, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _epilogue(x, kernel, bias, padding, strides, relu):
  out = jax.ShapeDtypeStruct(_output_shape('conv', x.shape, kernel.shape, padding, strides),
                             x.dtype)
  return jax.ffi.ffi_call(EPILOGUE, out, vmap_method='sequential')(
      x, kernel, bias, relu=np.int64(relu), **_attributes(padding, strides))


def _epilogue_fwd(x, kernel, bias, padding, strides, relu):
  y = _epilogue(x, kernel, bias, padding, strides, relu)
  return y, (x, kernel, y)


def _epilogue_bwd(padding, strides, relu, residuals, dy):
  x, kernel, y = residuals
  if relu:
    dy = jnp.where(y > 0, dy, 0)
  dx, dkernel = _call_bwd('conv', padding, strides, (x, kernel), dy)
  return dx, dkernel, jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))


_epilogue.defvjp(_epilogue_fwd, _epilogue_bwd)


def conv_epilogue(x: jax.Array, kernel: jax.Array, bias: jax.Array, *,
                  padding: Sequence[tuple[int, int]], strides: Sequence[int],
                  relu: bool) -> jax.Array:
  """`conv(x, kernel) + bias`, then `max(·, 0)` if `relu`, as one oneDNN call (with its VJP).

  Args:
    x: (N, *spatial, C_in), float32.
    kernel: (*kernel_size, C_in, C_out), float32.
    bias: (C_out,), float32.
    padding, strides: as `conv`.
    relu: apply the ReLU.

  Returns:
    (N, *spatial_out, C_out) float32.
  """
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  strides = tuple(int(s) for s in strides)
  dtype = _check(x, kernel, padding, strides)
  if bias.shape != kernel.shape[-1:]:
    raise ValueError(f'bias {bias.shape} does not fit the kernel {kernel.shape}')
  return _epilogue(x.astype(dtype), kernel.astype(dtype), bias.astype(dtype), padding, strides,
                   bool(relu))
