"""The U-Net of Ronneberger, Fischer & Brox (MICCAI 2015) and its size arithmetic.

Paper configuration: `UNet(num_classes=2, width=64, depth=4, padding='VALID')` on a 1-channel
input has 31,030,658 parameters and maps 572×572 to 388×388. With 3D input (N, D, H, W, C) the
same module is the 3D U-Net of Çiçek et al. (MICCAI 2016).

`UNet` is also the skeleton of the pooling variants (ResUNet, Attention U-Net, MultiResUNet,
U-Net++): they override the hooks `_block`, `_skip_path`, `_gate` and `geometry` instead of
copying the encoder–decoder loop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax.models import blocks
from unet_jax.models import sizes
from unet_jax.models.blocks import activation_by_name


class UNet(sizes.SizeContract, nn.Module):
  """U-Net: `depth` down-sampling steps, channel width doubling per level.

  Attributes:
    num_classes: channels of the output logits.
    width: channels of the top level; level i has width * 2**i.
    depth: number of 2× down-sampling steps (the paper has 4).
    padding: 'SAME' keeps sizes; 'VALID' is the paper mode (each conv trims a pixel per border,
      skip features are center-cropped before concatenation).
    upsample: 'transpose' (2×2 up-convolution, the paper) or 'resize' (linear + 1×1 conv).
    norm: 'none' (the paper), 'batch', 'group', 'instance' or 'layer'.
    activation: name from blocks.ACTIVATIONS.
    dropout_rate: dropout after the conv blocks of the two deepest levels (the paper's
      "drop-out layers at the end of the contracting path").
    dtype: compute dtype; parameters stay float32 and logits are returned as float32.
    remat: rematerialisation of every conv block in the backward pass, one of
      blocks.REMAT_POLICIES ('none', 'conv', 'full'; True/False mean 'full'/'none'): less memory
      for more compute, same outputs and parameters.
    conv_impl: how convolutions are computed, one of conv_impls.IMPLS ('auto' | 'portable' |
      'xla' | 'fast' | 'onednn'; see conv_impls.py); same parameters and, to float32 rounding,
      the same function.
  """

  num_classes: int = 2
  width: int = 64
  depth: int = 4
  padding: str = 'VALID'
  upsample: str = 'transpose'
  norm: str = 'none'
  activation: str = 'relu'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool | str = 'none'
  conv_impl: str = 'auto'

  def geometry(self) -> sizes.PoolingGeometry:
    """Two 3×3 convolutions per block: 4 pixels trimmed per block with VALID padding."""
    return sizes.PoolingGeometry(self.depth, self.padding, block_trim=4)

  def _block_options(self, *, dropout: bool) -> dict[str, Any]:
    """Keyword arguments every conv block of this model takes."""
    return dict(padding=self.padding, norm=self.norm,
                activation=activation_by_name(self.activation),
                dropout_rate=self.dropout_rate if dropout else 0.0, dtype=self.dtype,
                conv_impl=self.conv_impl)

  def _block(self, *, dropout: bool) -> Callable[..., nn.Module]:
    """Constructor `block(features, name=...)` of the conv block at one stage."""
    return functools.partial(blocks.remat_if(blocks.ConvBlock, self.remat),
                             **self._block_options(dropout=dropout))

  def _skip_path(self, level: int) -> Callable[..., nn.Module] | None:
    """Constructor of a module applied to the level's skip features, or None (plain U-Net)."""
    del level
    return None

  def _gate(self, level: int) -> Callable[..., nn.Module] | None:
    """Constructor of the decoder's skip gate at `level`, or None (plain U-Net)."""
    del level
    return None

  def _encode(self, x: jax.Array, levels: int, *, train: bool) -> list[jax.Array]:
    """Encoder outputs of levels 0..levels, from full resolution to the bottleneck."""
    self.geometry()  # validates padding and depth before any shape error can hide them
    x = x.astype(self.dtype)
    features = []
    for level in range(levels + 1):
      # The two deepest levels of the full network carry the dropout.
      block = self._block(dropout=level >= self.depth - 1)
      x = blocks.EncoderStage(self.width * 2**level, downsample=level > 0, block=block,
                              conv_impl=self.conv_impl, name=f'encoder{level}')(x, train=train)
      features.append(x)
    return features

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps (N, *spatial, C_in) images to (N, *spatial_out, num_classes) float32 logits."""
    skips = self._encode(x, self.depth, train=train)
    x = skips.pop()  # the bottleneck output feeds the decoder directly
    for level in reversed(range(self.depth)):
      skip = skips[level]
      path = self._skip_path(level)
      if path is not None:
        skip = path(name=f'skip{level}')(skip, train)
      x = blocks.DecoderStage(self.width * 2**level, self.upsample,
                              block=self._block(dropout=False), gate=self._gate(level),
                              dtype=self.dtype, conv_impl=self.conv_impl,
                              name=f'decoder{level}')(x, skip, train=train)
    return blocks.Head(self.num_classes, dtype=self.dtype, conv_impl=self.conv_impl,
                       name='head')(x)
