"""The U-Net of Ronneberger, Fischer & Brox (MICCAI 2015) and its size arithmetic.

Paper configuration: `UNet(num_classes=2, width=64, depth=4, padding='VALID')` on a 1-channel
input has 31,030,658 parameters and maps 572×572 to 388×388.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax.models import blocks

ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'leaky_relu': nn.leaky_relu,
    'elu': nn.elu,
}


def activation_by_name(name: str):
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'model.activation={name!r} is not one of {sorted(ACTIVATIONS)}') from None


class UNet(nn.Module):
  """U-Net: `depth` down-sampling steps, channel width doubling per level.

  Attributes:
    num_classes: channels of the output logits.
    width: channels of the top level; level i has width * 2**i.
    depth: number of 2× down-sampling steps (the paper has 4).
    padding: 'SAME' keeps sizes; 'VALID' is the paper mode (each conv trims a pixel per border,
      skip features are center-cropped before concatenation).
    upsample: 'transpose' (2×2 up-convolution, the paper) or 'resize' (bilinear + 1×1 conv).
    norm: 'none' (the paper), 'batch', 'group' or 'layer'.
    activation: name from ACTIVATIONS.
    dropout_rate: dropout after the conv blocks of the two deepest levels (the paper's
      "drop-out layers at the end of the contracting path").
    dtype: compute dtype; parameters stay float32.
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

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps (N, *spatial, C_in) images to (N, *spatial_out, num_classes) float32 logits."""
    if self.padding not in blocks.PADDINGS:
      raise ValueError(f'model.padding={self.padding!r} is not one of {blocks.PADDINGS}')
    x = x.astype(self.dtype)
    block = functools.partial(blocks.ConvBlock, padding=self.padding, norm=self.norm,
                              activation=activation_by_name(self.activation), dtype=self.dtype)
    skips = []
    for level in range(self.depth + 1):
      deep = level >= self.depth - 1
      stage_block = functools.partial(block, dropout_rate=self.dropout_rate if deep else 0.0)
      x = blocks.EncoderStage(self.width * 2**level, downsample=level > 0, block=stage_block,
                              name=f'encoder{level}')(x, train=train)
      skips.append(x)
    skips.pop()  # the bottleneck output feeds the decoder directly
    for level in reversed(range(self.depth)):
      x = blocks.DecoderStage(self.width * 2**level, self.upsample, block=block, dtype=self.dtype,
                              name=f'decoder{level}')(x, skips[level], train=train)
    return blocks.Head(self.num_classes, dtype=self.dtype, name='head')(x)


def output_size(input_size: int, *, depth: int, padding: str) -> int:
  """Output size along one spatial dim of a U-Net of `depth`, or ValueError if it cannot run.

  VALID: each conv block trims 4 pixels, each pooling needs an even size.
  SAME: the size must be divisible by 2**depth.
  """
  if padding == 'SAME':
    if input_size <= 0 or input_size % 2**depth:
      raise ValueError(f'input size {input_size} is not a positive multiple of 2**depth = '
                       f'{2**depth} (padding=SAME)')
    return input_size
  if padding != 'VALID':
    raise ValueError(f'padding={padding!r} is not one of {blocks.PADDINGS}')
  size = input_size
  for _ in range(depth):
    size -= 4
    if size <= 0 or size % 2:
      raise ValueError(f'input size {input_size} is invalid for a VALID U-Net of depth {depth}; '
                       f'valid sizes: {valid_input_sizes(depth=depth, count=5)} ...')
    size //= 2
  size -= 4
  for _ in range(depth):
    size = 2 * size - 4
  if size <= 0:
    raise ValueError(f'input size {input_size} is too small for a VALID U-Net of depth {depth}; '
                     f'the smallest valid size is {valid_input_sizes(depth=depth, count=1)[0]}')
  return size


def valid_input_sizes(*, depth: int, count: int = 5, start: int = 1) -> list[int]:
  """The first `count` input sizes ≥ `start` a VALID U-Net of `depth` accepts.

  Valid sizes form an arithmetic progression with step 2**depth (e.g. 572 = 188 + 24·16 for the
  paper), so counting upwards from the bottleneck is exact.
  """
  sizes = []
  bottom = 5  # bottleneck input size; its two convolutions leave bottom - 4 pixels
  while len(sizes) < count:
    size, out = bottom, bottom - 4
    for _ in range(depth):
      size, out = 2 * size + 4, 2 * out - 4
    if out > 0 and size >= start:
      sizes.append(size)
    bottom += 1
  return sizes


def valid_input_size(min_output: int, *, depth: int, padding: str) -> int:
  """The smallest input size whose output covers at least `min_output` pixels."""
  if padding == 'SAME':
    step = 2**depth
    return -(-min_output // step) * step
  size = valid_input_sizes(depth=depth, count=1)[0]
  while output_size(size, depth=depth, padding=padding) < min_output:
    size += 2**depth
  return size


def output_shape(input_shape: Sequence[int], *, depth: int, padding: str) -> tuple[int, ...]:
  """`output_size` applied to every spatial dim."""
  return tuple(output_size(s, depth=depth, padding=padding) for s in input_shape)
