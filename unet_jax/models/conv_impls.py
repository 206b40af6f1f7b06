"""The `model.conv_impl` names and which computation each picks for one layer.

  name        a 3×3 (any k>1) convolution and       1×1 convolution / max pooling
              the 2×2 up-convolution
  'auto'      GPU/TPU: XLA. CPU: oneDNN when the    as 'portable'
              extension is available, float32 and
              one device; else as 'portable'
  'portable'  GPU/TPU: XLA. CPU: 'fast' or 'xla' by shape (see `_portable`): never a custom call,
              so the choice for programs that leave this process (exports, ahead-of-time compiles)
  'xla'       XLA's own convolutions and pooling, everywhere: the reference
  'fast'      fast_conv's custom VJPs (banded kernel gradient, matrix products, shifted products)
  'onednn'    oneDNN custom calls on CPU where they apply (else as 'portable'); XLA on GPU/TPU

'auto' leaves oneDNN out of programs over several devices: XLA's SPMD partitioner knows nothing
of the custom calls and would give each device the whole batch (explicit 'onednn' still does).
Every choice computes the same function with the same parameters; only the order of the
floating-point sums differs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from unet_jax.models import onednn

IMPLS = ('auto', 'portable', 'xla', 'fast', 'onednn')
# Up to this many input channels a stride-1 convolution is computed as a sum of shifted,
# broadcast products: XLA:CPU's convolution of a 1-channel 256² image to 16 channels took
# 12× longer (jax 0.10.2); from 8 channels on XLA wins.
FEW_CHANNELS = 4


def _check(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f'model.conv_impl={impl!r} is not one of {IMPLS}')


def _portable(*, kernel_size: Sequence[int], in_features: int, out_features: int,
              spatial_shape: Sequence[int], transposed: bool) -> str:
  """'fast' or 'xla' on CPU without custom calls, as measured (jax 0.10.2, 2-core AMD EPYC,
  batch 4): 'fast' for 1×1 kernels and `transposed` 2×2 convolutions (matrix products beat
  XLA:CPU's convolution, forward and backward), for at most FEW_CHANNELS input channels
  (shifted products forward), and where XLA:CPU's kernel gradient was slower than the banded
  one: at least 16 input channels and either ≥ 256×256 pixels per image, or ≥ 64×64 pixels with
  pixels·C_in·C_out ≥ 2^27 (e.g. 128×128 pixels with 64→128 channels)."""
  if transposed or all(k == 1 for k in kernel_size) or in_features <= FEW_CHANNELS:
    return 'fast'
  pixels = math.prod(spatial_shape)
  large = pixels >= 256 * 256 or (pixels >= 64 * 64
                                  and pixels * in_features * out_features >= 2**27)
  return 'fast' if in_features >= 16 and large else 'xla'


def _onednn_fits(*, kernel_size: Sequence[int], transposed: bool, dtype: Any,
                 padding: Sequence[tuple[int, int]] | None) -> bool:
  """Whether the oneDNN path takes the layer: a k>1 kernel (a 1×1 one is a matrix product) or
  the 2×2 up-convolution, in what ops supports."""
  pads = padding if padding is not None else ((0, 0),) * len(kernel_size)
  return ((transposed or not all(k == 1 for k in kernel_size))
          and onednn.supports(rank=len(kernel_size), dtype=dtype, padding=pads))


def resolve_impl(impl: str, *, kernel_size: Sequence[int], in_features: int, out_features: int,
                 spatial_shape: Sequence[int], transposed: bool = False,
                 backend: str | None = None, dtype: Any = jnp.float32,
                 padding: Sequence[tuple[int, int]] | None = None) -> str:
  """'xla', 'fast' or 'onednn' for one convolution layer (see the module's table).

  Args:
    impl: one of IMPLS.
    kernel_size, in_features, out_features, spatial_shape: the layer's kernel, channels and
      input spatial shape.
    transposed: a 2×2 stride-2 up-convolution.
    backend: the platform the layer runs on; default `jax.default_backend()`.
    dtype: the compute dtype (oneDNN takes float32 only).
    padding: explicit (low, high) pairs, if known (oneDNN takes non-negative ones).

  Raises:
    ValueError: if `impl` is not one of IMPLS.
  """
  _check(impl)
  if impl in ('xla', 'fast'):
    return impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'xla'
  wants_onednn = impl == 'onednn' or (impl == 'auto' and jax.device_count() == 1)
  if wants_onednn and _onednn_fits(kernel_size=kernel_size, transposed=transposed, dtype=dtype,
                                   padding=padding) and onednn.available():
    return 'onednn'
  return _portable(kernel_size=kernel_size, in_features=in_features, out_features=out_features,
                   spatial_shape=spatial_shape, transposed=transposed)


def impl_for_platforms(impl: str, platforms: Sequence[str]) -> str:
  """`impl` for a program compiled for `platforms` rather than run by this process.

  'auto' resolves per layer by `jax.default_backend()` when the model is traced; a program built
  here for another platform (an ahead-of-time TPU compile, a multi-platform export) must not take
  the host's CPU paths, and no such program may hold the oneDNN custom calls, which exist only
  in a process that registered them. So 'auto' and 'onednn' become 'xla' unless every target
  platform is a CPU, and 'portable' there; 'fast' and 'xla' stay.
  """
  _check(impl)
  if impl in ('fast', 'xla'):
    return impl
  return 'portable' if all(p == 'cpu' for p in platforms) else 'xla'


def resolve_pool_impl(impl: str, *, backend: str | None = None) -> str:
  """'xla' or 'fast' for 2× max pooling: every choice but 'xla' is 'fast' on CPU, 'xla'
  elsewhere unless 'fast' is explicit (see `fast_conv.max_pool_2x`)."""
  _check(impl)
  if impl in ('xla', 'fast'):
    return impl
  return 'fast' if (backend or jax.default_backend()) == 'cpu' else 'xla'
