"""MultiResUNet (Ibtehaz & Rahman, "MultiResUNet: Rethinking the U-Net architecture for
multimodal biomedical image segmentation", Neural Networks 121, 2020).

Two changes to the U-Net:

* every conv block is a MultiRes block (`blocks.MultiResBlock`): with U = width·2**level and
  W = alpha·U (alpha = 1.67), a chain of three 3×3 convolutions of W/6, W/3 and W/2 filters whose
  outputs are concatenated, plus a 1×1 shortcut; the block outputs W/6 + W/3 + W/2 channels;
* the skip of level l passes through a Res path (`blocks.ResPath`) of U filters and length
  depth − l (4, 3, 2, 1 for the paper's depth 4) before it is concatenated in the decoder.

The decoder up-samples to U channels, concatenates the Res path output (U channels) and applies
a MultiRes block of the same U. With padding 'VALID' a MultiRes block trims 6 pixels and each
Res path unit 2, which `geometry()` accounts for.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn

from unet_jax.models import blocks
from unet_jax.models import sizes
from unet_jax.models.unet import UNet


class MultiResUNet(UNet):
  """U-Net with MultiRes blocks and Res paths; attributes as `UNet` (defaults padding='SAME',
  norm='batch') plus `alpha`, the width multiplier W = alpha·U; 2D or 3D by the input rank."""

  padding: str = 'SAME'
  norm: str = 'batch'
  alpha: float = 1.67

  def geometry(self) -> sizes.PoolingGeometry:
    # Level l's Res path has depth - l units of one 3×3 convolution each.
    return sizes.PoolingGeometry(self.depth, self.padding, block_trim=6,
                                 skip_trims=tuple(2 * (self.depth - l) for l in range(self.depth)))

  def _block(self, *, dropout: bool) -> Callable[..., nn.Module]:
    return functools.partial(blocks.remat_if(blocks.MultiResBlock, self.remat), alpha=self.alpha,
                             **self._block_options(dropout=dropout))

  def _skip_path(self, level: int) -> Callable[..., nn.Module]:
    options = self._block_options(dropout=False)
    del options['dropout_rate']  # Res paths have no dropout
    return functools.partial(blocks.remat_if(blocks.ResPath, self.remat), self.width * 2**level,
                             self.depth - level, **options)
