"""U-Net++ (Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation",
DLMIA 2018): nested, densely connected skip pathways.

Node X^{i,j} (level i, column j) has width·2**i channels. X^{i,0} is the encoder; for j ≥ 1

    X^{i,j} = block(concat(X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})))

with the U-Net's conv block and 2× up-sampling (skips center-cropped with padding 'VALID').
X^{0,1} .. X^{0,depth} are the outputs of nested U-Nets of depth 1 .. depth.

Outputs:

* default: logits of X^{0,depth} (head `head{depth}`), (N, *spatial_out, num_classes) float32;
* `deep_supervision=True`: a tuple of `depth` logits, from X^{0,1} to X^{0,depth} (heads
  `head1` .. `head{depth}`), each (N, *spatial_out, num_classes) float32. With 'VALID' padding
  the shallower heads are center-cropped to the output size of X^{0,depth}; with 'SAME' they
  all have the input's size. Train on a loss averaged over the heads;
* `prune_level=L`: only the nodes X^{i,j} with i + j ≤ L are built and the logits of X^{0,L}
  are returned (head `head{L}`), the paper's pruned inference. Parameter names are those of the
  full network, so variables trained with deep supervision can be applied directly; the pruned
  network's sizes are those of a U-Net of depth L.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from unet_jax.models import blocks
from unet_jax.models import sizes
from unet_jax.models.unet import UNet


class UNetPlusPlus(UNet):
  """Nested U-Net; attributes as `UNet` (default padding='SAME') plus:

  Attributes:
    deep_supervision: return one logits array per nested level (a tuple), see the module
      docstring.
    prune_level: if set (1..depth), build and return only the nested U-Net of that depth.
  """

  padding: str = 'SAME'
  deep_supervision: bool = False
  prune_level: int | None = None

  def levels(self) -> int:
    """The depth actually built: `prune_level` if set, else `depth`."""
    if self.prune_level is None:
      return self.depth
    if not 1 <= self.prune_level <= self.depth:
      raise ValueError(f'model.prune_level={self.prune_level} must be in 1..model.depth='
                       f'{self.depth} (or None)')
    return self.prune_level

  def geometry(self) -> sizes.PoolingGeometry:
    # Every column of nodes is a U-Net decoder; the longest path is that of a U-Net of the
    # built depth, and the dense skips it crops are always larger.
    return sizes.PoolingGeometry(self.levels(), self.padding, block_trim=4)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array | tuple[jax.Array, ...]:
    """Maps (N, *spatial, C_in) to logits, or a tuple of them (see the module docstring)."""
    levels = self.levels()
    encoder = self._encode(x, levels, train=train)
    nodes = {(i, 0): features for i, features in enumerate(encoder)}  # nodes[i, j] is X^{i,j}
    block = self._block(dropout=False)
    for j in range(1, levels + 1):
      for i in range(levels + 1 - j):
        same_level = [nodes[i, k] for k in range(j)]
        nodes[i, j] = blocks.DecoderStage(
            self.width * 2**i, self.upsample, block=block, dtype=self.dtype,
            conv_impl=self.conv_impl, name=f'node{i}_{j}')(nodes[i + 1, j - 1], same_level, train=train)
    head = lambda j: blocks.Head(self.num_classes, dtype=self.dtype, conv_impl=self.conv_impl,
                                 name=f'head{j}')(nodes[0, j])
    if self.prune_level is not None or not self.deep_supervision:
      return head(levels)
    heads = [head(j) for j in range(1, levels + 1)]
    # With VALID padding the shallower nested nets trim less: crop them to the final output.
    return tuple(blocks.center_crop(h, heads[-1].shape[1:-1]) for h in heads)
