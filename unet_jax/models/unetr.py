"""UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022).

A ViT encoder (`transformer.ViTEncoder`) on non-overlapping p×p(×p) patches replaces the
convolutional encoder; a convolutional decoder turns its tokens back into a segmentation. With
depth = log2(p) decoder levels (4 for the paper's p = 16), level 0 at full resolution and level
k at 1/2**k:

* level 0 skip: a residual block on the input image;
* level k skip (1 ≤ k < depth): the tokens of transformer layer round(k·L/depth) (layers 3, 6, 9
  for L = 12, as in the paper), reshaped to the 1/p grid and brought to 1/2**k by depth − k
  2× up-samplings (the first bare, the others each followed by a residual block), width·2**k
  channels;
* bottleneck: the last layer's tokens after the final LayerNorm, at 1/p;
* decoder level k: 2× up-sampling, concatenation with the level-k skip, residual block.

The blocks are those of MONAI's UNETR: `blocks.ResidualBlock` (MONAI's UnetResBlock: bias-free
convolutions, norm 'instance', leaky ReLU) and bias-free 2× transposed convolutions; a 1×1
convolution makes the logits. MONAI taps layers 4, 7, 10 where the paper says 3, 6, 9; this
module follows the paper. Only 'SAME' padding exists; every spatial size must be a multiple of p.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax.models import blocks
from unet_jax.models import sizes
from unet_jax.models import transformer


class TokenUpsampler(nn.Module):
  """MONAI's UnetrPrUpBlock: `steps` 2× up-samplings of a token map to `features` channels,
  each after the first followed by a residual block."""

  features: int
  steps: int
  upsample: str
  block: Callable[..., nn.Module]
  dtype: blocks.Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.steps):
      x = blocks.Upsample(self.features, self.upsample, use_bias=False, dtype=self.dtype,
                          conv_impl=self.conv_impl, name=f'upsample{i}')(x)
      if i:
        x = self.block(self.features, name=f'block{i}')(x, train)
    return x


class UNETR(sizes.SizeContract, nn.Module):
  """ViT encoder + convolutional decoder; 2D or 3D by the input rank.

  Attributes:
    num_classes: channels of the output logits.
    width: channels of the full-resolution decoder level ("feature size", 16 in the paper);
      level k has width·2**k.
    depth: decoder levels; must be log2(patch_size). None: derived from patch_size.
    patch_size: side of the non-overlapping patches (16 in the paper), a power of 2.
    hidden_size, num_layers, num_heads, mlp_dim: the ViT (768, 12, 12, 3072: ViT-B/16).
    qkv_bias: bias of the attention's qkv projection (off in MONAI).
    padding: only 'SAME' (the decoder mirrors the patch grid exactly).
    upsample: 'transpose' (2×2 transposed convolutions, the paper) or 'resize'.
    norm, activation: of the convolutional blocks (paper: 'instance', 'leaky_relu').
    dropout_rate: dropout in the transformer (embeddings, attention, MLP).
    dtype: compute dtype; parameters stay float32 and logits are returned as float32.
    remat: rematerialisation policy of the transformer and residual blocks
      (blocks.REMAT_POLICIES; 'conv' keeps convolution and dense-layer outputs).
    conv_impl: how convolutions are computed (see UNet).
  """

  num_classes: int = 2
  width: int = 16
  depth: int | None = None
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  qkv_bias: bool = False
  padding: str = 'SAME'
  upsample: str = 'transpose'
  norm: str = 'instance'
  activation: str = 'leaky_relu'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool | str = 'none'
  conv_impl: str = 'auto'

  def levels(self) -> int:
    """Decoder levels: log2(patch_size), checked against `depth` when that is set."""
    p = self.patch_size
    if p < 2 or p & (p - 1):
      raise ValueError(f'model.patch_size={p} must be a power of 2 ≥ 2 (UNETR halves the '
                       'resolution once per decoder level)')
    levels = int(math.log2(p))
    if self.depth is not None and self.depth != levels:
      raise ValueError(f'model.depth={self.depth} does not match model.patch_size={p}: UNETR has '
                       f'log2(patch_size)={levels} levels; set depth={levels} or None')
    return levels

  def tap_layers(self) -> list[int]:
    """1-based transformer layers whose tokens feed the skips of levels 1..depth-1."""
    if self.num_layers < 1:
      raise ValueError(f'model.num_layers={self.num_layers} must be ≥ 1')
    levels = self.levels()
    # Evenly spaced, rounding halves up: 3, 6, 9 for 12 layers and 4 levels.
    return [max(1, (k * self.num_layers * 2 + levels) // (2 * levels)) for k in range(1, levels)]

  def geometry(self) -> sizes.PatchGeometry:
    if self.padding != 'SAME':
      raise ValueError(f"model.padding={self.padding!r} is not supported by UNETR, which only "
                       "has 'SAME' padding (its decoder mirrors the patch grid)")
    self.levels()
    return sizes.PatchGeometry(self.patch_size)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps (N, *spatial, C_in) images to (N, *spatial, num_classes) float32 logits."""
    self.geometry()
    levels = self.levels()
    x = x.astype(self.dtype)
    final, taps = transformer.ViTEncoder(
        self.hidden_size, self.num_layers, self.num_heads, self.mlp_dim, self.patch_size,
        taps=self.tap_layers(), qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate,
        remat=self.remat, dtype=self.dtype, name='vit')(x, train)
    block = functools.partial(blocks.remat_if(blocks.ResidualBlock, self.remat), padding='SAME',
                              norm=self.norm, activation=blocks.activation_by_name(self.activation),
                              dtype=self.dtype, conv_impl=self.conv_impl)
    skips = [block(self.width, name='encoder0')(x, train)]
    for k, tokens in enumerate(taps, start=1):
      skips.append(TokenUpsampler(self.width * 2**k, levels - k, self.upsample, block,
                                  dtype=self.dtype, conv_impl=self.conv_impl,
                                  name=f'encoder{k}')(tokens, train))
    y = final
    for level in reversed(range(levels)):
      y = blocks.DecoderStage(self.width * 2**level, self.upsample, block=block,
                              upsample_bias=False, dtype=self.dtype, conv_impl=self.conv_impl,
                              name=f'decoder{level}')(y, skips[level], train=train)
    return blocks.Head(self.num_classes, dtype=self.dtype, conv_impl=self.conv_impl,
                       name='head')(y)
