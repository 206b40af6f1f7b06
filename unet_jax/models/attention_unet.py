"""Attention U-Net (Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
MIDL 2018): a U-Net whose skip features pass through additive attention gates.

At decoder level l the gate sees the skip x (center-cropped to the up-sampled size, so 2× the
coarse size) and the gating signal g, the decoder features of the coarser level l+1:

    q = psi(relu(W_x x + W_g g)),   alpha = sigmoid(q) up-sampled 2×,   x̂ = alpha · x

W_x is a 2×2 convolution with stride 2 (no bias), W_g and psi are 1×1 convolutions, the
intermediate width is half the skip's channels. alpha is computed at the coarse resolution and
linearly up-sampled to the skip's, as in the paper's grid attention.

Attention coefficients: each gate sows alpha, float32 in [0, 1] with shape (N, *skip_spatial, 1)
(skip_spatial is the spatial shape of the cropped skip it multiplies), under

    intermediates['decoder{level}']['gate']['attention'] == (alpha,)

for level = 0 (full resolution) .. depth-1. Retrieve them with

    logits, state = model.apply(variables, x, mutable=['intermediates'])
    alpha0 = state['intermediates']['decoder0']['gate']['attention'][0]
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax.models import blocks
from unet_jax.models.unet import UNet


class AttentionGate(nn.Module):
  """Additive attention gate: returns `skip · alpha` and sows alpha (see the module docstring).

  `skip` is (N, *2S, C) and `gate` is (N, *S, C_g); spatial sizes must be in that 2:1 ratio.
  """

  features: int
  dtype: blocks.Dtype = jnp.float32

  @nn.compact
  def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
    rank = skip.ndim - 2
    expected = tuple(2 * s for s in gate.shape[1:-1])
    if skip.shape[1:-1] != expected:
      raise ValueError(f'attention gate: skip spatial shape {skip.shape[1:-1]} is not twice the '
                       f'gating shape {gate.shape[1:-1]}')
    theta = nn.Conv(self.features, (2,) * rank, strides=(2,) * rank, padding='VALID',
                    use_bias=False, dtype=self.dtype, name='skip_proj')(skip)
    phi = nn.Conv(self.features, (1,) * rank, dtype=self.dtype, name='gate_proj')(gate)
    q = nn.Conv(1, (1,) * rank, dtype=self.dtype, name='psi')(nn.relu(theta + phi))
    alpha = jax.nn.sigmoid(q.astype(jnp.float32))
    # Linear interpolation is a convex combination, so the coefficients stay in [0, 1].
    alpha = jax.image.resize(alpha, (*skip.shape[:-1], 1), method='linear')
    self.sow('intermediates', 'attention', alpha)
    return skip * alpha.astype(skip.dtype)


class AttentionUNet(UNet):
  """U-Net with attention gates on the skip connections (Oktay et al. 2018).

  Same attributes as `UNet` (defaults: padding='SAME', norm='batch' as in the paper's
  implementation); 2D or 3D by the input rank. Attention coefficients are sown under
  `intermediates['decoder{level}']['gate']['attention']` (see the module docstring).
  """

  padding: str = 'SAME'
  norm: str = 'batch'

  def _gate(self, level: int) -> Callable[..., nn.Module]:
    return functools.partial(AttentionGate, max(1, self.width * 2**level // 2), dtype=self.dtype)
