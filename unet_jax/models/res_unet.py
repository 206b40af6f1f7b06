"""Residual U-Net (ResUNet; Zhang, Liu & Wang, "Road Extraction by Deep Residual U-Net", IEEE
GRSL 2018): the U-Net with every conv block replaced by a residual block.

Each block is `blocks.ResidualBlock`: conv3×3–norm–act–conv3×3–norm plus a 1×1 projection
shortcut (with norm), then the activation — the post-activation block of He et al. (CVPR 2016).
The skeleton (max pooling, 2× up-sampling, concatenated skips, widths width·2**level) is the
U-Net's; Zhang et al. use pre-activation blocks and strided convolutions instead, which this
family does not, so that every pooling variant shares one size arithmetic.

Sizes are those of the U-Net: with padding 'VALID' the two 3×3 convolutions trim 4 pixels and
the shortcut is center-cropped to match.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from unet_jax.models import blocks
from unet_jax.models.unet import UNet


class ResUNet(UNet):
  """U-Net with residual conv blocks; attributes as `UNet` (defaults padding='SAME',
  norm='batch'); 2D or 3D by the input rank."""

  padding: str = 'SAME'
  norm: str = 'batch'

  def _block(self, *, dropout: bool) -> Callable[..., nn.Module]:
    return functools.partial(blocks.remat_if(blocks.ResidualBlock, self.remat),
                             **self._block_options(dropout=dropout))
