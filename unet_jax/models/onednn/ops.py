"""oneDNN convolutions on XLA:CPU: the forward pass and its VJP as FFI custom calls.

Shapes are channels-last as in `fast_conv`: x (N, *spatial, C_in), kernel (*kernel_size, C_in,
C_out), y (N, *spatial_out, C_out); 1D, 2D and 3D; float32; any strides; non-negative explicit
(low, high) pads. The function is `lax.conv_general_dilated`'s (only the order of the sums
differs); its VJP is one custom call that computes the input gradient and then the kernel
gradient (two OpenMP teams at once would share the same cores).

The custom calls exist on CPU only, and only in this process (they are registered at run
time): programs for another platform or for export must take another path (see
`fast_conv.impl_for_platforms`). `available()` builds the extension on first use.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.models.onednn import build

DTYPES = (jnp.float32,)
FORWARD = 'unet_jax_onednn_conv_forward'
BACKWARD = 'unet_jax_onednn_conv_backward'


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


def _output_shape(x_shape, kernel_shape, padding, strides) -> tuple[int, ...]:
  spatial = tuple((size + lo + hi - k) // s + 1 for size, k, (lo, hi), s
                  in zip(x_shape[1:-1], kernel_shape[:-2], padding, strides))
  return (x_shape[0], *spatial, kernel_shape[-1])


def _forward(x, kernel, padding, strides):
  out = jax.ShapeDtypeStruct(_output_shape(x.shape, kernel.shape, padding, strides), x.dtype)
  return jax.ffi.ffi_call(FORWARD, out, vmap_method='sequential')(
      x, kernel, **_attributes(padding, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, padding, strides):
  return _forward(x, kernel, padding, strides)


def _conv_fwd(x, kernel, padding, strides):
  return _forward(x, kernel, padding, strides), (x, kernel)


def _conv_bwd(padding, strides, residuals, dy):
  x, kernel = residuals
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, x.dtype))
  dx, dkernel = jax.ffi.ffi_call(BACKWARD, outs, vmap_method='sequential')(
      x, kernel, dy.astype(x.dtype), **_attributes(padding, strides))
  return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


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
  rank = kernel.ndim - 2
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  strides = tuple(int(s) for s in strides)
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
  return _conv(x.astype(dtype), kernel.astype(dtype), padding, strides)
