"""Small pure flax.linen building blocks shared by the U-Net family.

Every module here works on channels-last arrays of any spatial rank: (N, H, W, C) for 2D and
(N, D, H, W, C) for 3D. The rank is read from the input, so one code path serves both.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NORMS = ('none', 'batch', 'group', 'layer')
PADDINGS = ('SAME', 'VALID')
UPSAMPLINGS = ('transpose', 'resize')


def center_crop(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Crops the spatial dims of a channels-last `x` symmetrically to `spatial_shape`.

  This is how the paper's valid-convolution U-Net aligns an encoder feature map with the smaller
  decoder map before concatenation.
  """
  starts = []
  for have, want in zip(x.shape[1:-1], spatial_shape):
    if want > have or (have - want) % 2:
      raise ValueError(f'cannot center-crop spatial shape {x.shape[1:-1]} to {tuple(spatial_shape)}')
    starts.append((have - want) // 2)
  index = (slice(None),) + tuple(slice(s, s + w) for s, w in zip(starts, spatial_shape))
  return x[index]


class Norm(nn.Module):
  """Normalisation layer chosen by name; 'none' is the identity (the paper had none)."""

  kind: str = 'none'
  group_count: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.kind == 'none':
      return x
    if self.kind == 'batch':
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    if self.kind == 'group':
      return nn.GroupNorm(num_groups=min(self.group_count, x.shape[-1]), dtype=self.dtype)(x)
    if self.kind == 'layer':
      return nn.LayerNorm(dtype=self.dtype)(x)
    raise ValueError(f'model.norm={self.kind!r} is not one of {NORMS}')


class ConvBlock(nn.Module):
  """Two 3×3 convolutions, each followed by optional normalisation and the activation.

  With padding='VALID' each convolution trims one pixel from every border, as in the paper.
  """

  features: int
  padding: str = 'SAME'
  norm: str = 'none'
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kernel = (3,) * (x.ndim - 2)
    for i in range(2):
      x = nn.Conv(self.features, kernel, padding=self.padding, use_bias=self.norm == 'none',
                  dtype=self.dtype, name=f'conv{i}')(x)
      x = Norm(self.norm, dtype=self.dtype, name=f'norm{i}')(x, train=train)
      x = self.activation(x)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class Downsample(nn.Module):
  """2× max pooling over every spatial dim; odd sizes are an error, not a silent crop."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if any(s % 2 for s in x.shape[1:-1]):
      raise ValueError(f'max pooling needs even spatial sizes, got {x.shape[1:-1]}; '
                       'use unet_jax.models.valid_input_size() to choose an input size')
    window = (2,) * (x.ndim - 2)
    return nn.max_pool(x, window, strides=window)


class Upsample(nn.Module):
  """2× up-sampling to `features` channels.

  'transpose' is the paper's 2×2 up-convolution; 'resize' is bilinear resize followed by a 1×1
  convolution, which avoids the checkerboard pattern transposed convolutions can produce.
  """

  features: int
  mode: str = 'transpose'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    rank = x.ndim - 2
    if self.mode == 'transpose':
      return nn.ConvTranspose(self.features, (2,) * rank, strides=(2,) * rank, padding='VALID',
                              dtype=self.dtype)(x)
    if self.mode == 'resize':
      shape = (x.shape[0], *(2 * s for s in x.shape[1:-1]), x.shape[-1])
      x = jax.image.resize(x, shape, method='bilinear')
      return nn.Conv(self.features, (1,) * rank, dtype=self.dtype)(x)
    raise ValueError(f'model.upsample={self.mode!r} is not one of {UPSAMPLINGS}')


class EncoderStage(nn.Module):
  """Down-sampling (except at the top level) followed by a conv block."""

  features: int
  downsample: bool
  block: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.downsample:
      x = Downsample()(x)
    return self.block(self.features)(x, train=train)


class DecoderStage(nn.Module):
  """Up-sampling, concatenation with the (center-cropped) skip features, conv block."""

  features: int
  upsample: str
  block: Callable[..., nn.Module]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool) -> jax.Array:
    x = Upsample(self.features, self.upsample, dtype=self.dtype)(x)
    skip = center_crop(skip, x.shape[1:-1])
    x = jnp.concatenate([skip.astype(x.dtype), x], axis=-1)
    return self.block(self.features)(x, train=train)


class Head(nn.Module):
  """1×1 convolution to per-class logits, always returned in float32 for a stable loss."""

  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.num_classes, (1,) * (x.ndim - 2), dtype=self.dtype)(x)
    return x.astype(jnp.float32)
