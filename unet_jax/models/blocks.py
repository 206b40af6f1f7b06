"""Small pure flax.linen building blocks shared by the U-Net family.

Every module here works on channels-last arrays of any spatial rank: (N, H, W, C) for 2D and
(N, D, H, W, C) for 3D. The rank is read from the input, so one code path serves both.

Convolutional blocks (`ConvBlock`, `ResidualBlock`, `MultiResBlock`, `ResPath`) are called as
`block(x, train)`. With padding='VALID' they shrink every spatial dim; shortcut branches are
center-cropped to the main branch. `remat_if` wraps any of them in `nn.remat` under one of the
REMAT_POLICIES.

Convolutions are `fast_conv.Conv` / `fast_conv.ConvTranspose2x2`, drop-ins for flax's layers
with the same parameters; `conv_impl` (one of conv_impls.IMPLS: 'auto' | 'portable' | 'xla' |
'fast' | 'onednn') picks how they are computed. 'auto' keeps XLA's convolutions on GPU/TPU and on
CPU takes oneDNN's convolutions, or the faster backward passes where they were measured faster.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from unet_jax.models import batch_norm
from unet_jax.models import fast_conv

Dtype = Any

NORMS = ('none', 'batch', 'group', 'instance', 'layer')
PADDINGS = ('SAME', 'VALID')
UPSAMPLINGS = ('transpose', 'resize')
CONV_IMPLS = fast_conv.IMPLS
# Rematerialisation of conv blocks in the backward pass (jax.checkpoint policies):
#   'none'  store every activation (fastest, most memory);
#   'conv'  store the convolution outputs only, recompute normalisation, activation and pooling
#           (cheap element-wise work; about half the activation memory of a conv–norm–ReLU block);
#   'full'  store only each block's input and recompute the whole block (least memory, one more
#           forward pass of the convolutions).
REMAT_POLICIES = ('none', 'conv', 'full')
_CONV_OUTPUT = 'conv_output'  # checkpoint_name of the tensors the 'conv' policy keeps
ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'leaky_relu': nn.leaky_relu,
    'elu': nn.elu,
}


def activation_by_name(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'model.activation={name!r} is not one of {sorted(ACTIVATIONS)}') from None


def remat_policy(remat: bool | str) -> str:
  """The policy name of `model.remat`; True and False stand for 'full' and 'none'."""
  if isinstance(remat, bool):
    return 'full' if remat else 'none'
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat={remat!r} is not one of {REMAT_POLICIES} (or a bool)')
  return remat


def remat_if(block: type[nn.Module], remat: bool | str) -> type[nn.Module]:
  """`block`, or its `nn.remat` version that recomputes activations in the backward pass.

  `remat` is one of REMAT_POLICIES (or a bool, see `remat_policy`). Blocks take `train` as their
  second positional argument so that it can be static here: `jax.checkpoint` would trace a
  keyword argument, and Python control flow on it (BatchNorm's running averages, dropout) needs
  a plain bool. Callers give the block an explicit name so the parameter tree is the same with
  and without remat.
  """
  policy = remat_policy(remat)
  if policy == 'none':
    return block
  if policy == 'conv':
    return nn.remat(block, static_argnums=(2,),
                    policy=jax.checkpoint_policies.save_only_these_names(_CONV_OUTPUT))
  return nn.remat(block, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable)


def conv(features: int, kernel_size: Sequence[int], *, conv_impl: str, name: str | None = None,
         **kwargs: Any) -> nn.Module:
  """A stride-1 convolution layer (nn.Conv's parameters) computed as `conv_impl` says."""
  return fast_conv.Conv(features, tuple(kernel_size), impl=conv_impl, name=name, **kwargs)


def tagged(y: jax.Array) -> jax.Array:
  """Marks a convolution output as what remat policy 'conv' keeps."""
  return checkpoint_name(y, _CONV_OUTPUT)


def center_crop(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Crops the spatial dims of a channels-last `x` symmetrically to `spatial_shape`.

  This is how the paper's valid-convolution U-Net aligns an encoder feature map with the smaller
  decoder map before concatenation.
  """
  starts = []
  for have, want in zip(x.shape[1:-1], spatial_shape):
    if want > have or (have - want) % 2:
      raise ValueError(f'cannot center-crop spatial shape {x.shape[1:-1]} to '
                       f'{tuple(spatial_shape)}')
    starts.append((have - want) // 2)
  index = (slice(None),) + tuple(slice(s, s + w) for s, w in zip(starts, spatial_shape))
  return x[index]


def group_count(channels: int, max_groups: int) -> int:
  """The largest number of groups ≤ `max_groups` that divides `channels`.

  8 for the usual power-of-two widths; MultiRes blocks have widths such as 51 (3 groups).
  """
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class Norm(nn.Module):
  """Normalisation layer chosen by name; 'none' is the identity (the paper had none).

  'group' uses up to `group_count` groups (see `group_count()`); 'instance' normalises each
  channel of each example over its spatial dims. All kinds but 'none' learn a scale and a bias.
  """

  kind: str = 'none'
  group_count: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.kind == 'none':
      return x
    if self.kind == 'batch':
      return batch_norm.BatchNorm(use_running_average=not train, momentum=0.9,
                                  dtype=self.dtype)(x)
    if self.kind == 'group':
      return nn.GroupNorm(num_groups=group_count(x.shape[-1], self.group_count),
                          dtype=self.dtype)(x)
    if self.kind == 'instance':
      return nn.InstanceNorm(dtype=self.dtype)(x)
    if self.kind == 'layer':
      return nn.LayerNorm(dtype=self.dtype)(x)
    raise ValueError(f'model.norm={self.kind!r} is not one of {NORMS}')


class ConvNorm(nn.Module):
  """Convolution followed by normalisation (and the activation, if given).

  The convolution has a bias only without normalisation, where a bias would be cancelled anyway.
  """

  features: int
  kernel: int = 3
  padding: str = 'SAME'
  norm: str = 'none'
  activation: Callable[[jax.Array], jax.Array] | None = None
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = tagged(conv(self.features, (self.kernel,) * (x.ndim - 2), padding=self.padding,
                    use_bias=self.norm == 'none', dtype=self.dtype, conv_impl=self.conv_impl,
                    name='conv')(x))
    x = Norm(self.norm, dtype=self.dtype, name='norm')(x, train=train)
    return x if self.activation is None else self.activation(x)


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
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kernel = (3,) * (x.ndim - 2)
    # In evaluation a batch norm is an affine map of the convolution's output: the convolution
    # applies it with the ReLU (one oneDNN call on CPU instead of a call and two XLA passes).
    fold = (not train and self.norm == 'batch' and self.activation is nn.relu
            and not self.is_initializing())
    for i in range(2):
      layer = conv(self.features, kernel, padding=self.padding, use_bias=self.norm == 'none',
                   dtype=self.dtype, conv_impl=self.conv_impl, name=f'conv{i}')
      if fold:
        affine = batch_norm.inference_affine(self.variables, f'norm{i}')
        x = tagged(layer(x, affine=affine, relu=True))
        continue
      x = tagged(layer(x))
      x = Norm(self.norm, dtype=self.dtype, name=f'norm{i}')(x, train=train)
      x = self.activation(x)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class ResidualBlock(nn.Module):
  """Two 3×3 conv+norm layers plus a shortcut, then the activation (He et al. 2016).

  out = act(norm(conv(act(norm(conv(x))))) + shortcut(x)). The shortcut is a 1×1 convolution
  with normalisation when the channel count changes (always, inside a U-Net), the identity
  otherwise; with VALID padding it is center-cropped to the 4-pixel smaller main branch. This is
  the block of ResUNet and of UNETR's convolutional path (MONAI's UnetResBlock).
  """

  features: int
  padding: str = 'SAME'
  norm: str = 'none'
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layer = lambda name, kernel=3, act=None: ConvNorm(
        self.features, kernel, self.padding, self.norm, act, dtype=self.dtype,
        conv_impl=self.conv_impl, name=name)
    y = layer('conv0', act=self.activation)(x, train=train)
    y = layer('conv1')(y, train=train)
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = layer('shortcut', kernel=1)(x, train=train)
    y = self.activation(y + center_crop(shortcut, y.shape[1:-1]).astype(y.dtype))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return y


def multires_channels(features: int, alpha: float = 1.67) -> tuple[int, int, int]:
  """Widths of the three chained 3×3 convolutions of a MultiRes block with U = `features`.

  W = alpha·U split as W/6, W/3, W/2, rounded down like the authors' code (int(W·0.167),
  int(W·0.333), int(W·0.5)); at least one channel each so tiny test widths still work.
  """
  w = alpha * features
  return tuple(max(1, int(w * f)) for f in (0.167, 0.333, 0.5))


class MultiResBlock(nn.Module):
  """MultiRes block (Ibtehaz & Rahman 2020): a chain of three 3×3 convolutions whose outputs are
  concatenated (receptive fields 3, 5 and 7) plus a 1×1 shortcut.

  out = norm(act(norm(concat(a, b, c)) + shortcut(x))), a = conv(x), b = conv(a), c = conv(b),
  with the widths of `multires_channels`. VALID padding: a and b are center-cropped to c (6
  pixels smaller than x), and so is the shortcut.
  """

  features: int
  alpha: float = 1.67
  padding: str = 'SAME'
  norm: str = 'none'
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    widths = multires_channels(self.features, self.alpha)
    branches, y = [], x
    for i, width in enumerate(widths):
      y = ConvNorm(width, 3, self.padding, self.norm, self.activation, dtype=self.dtype,
                   conv_impl=self.conv_impl, name=f'conv{i}')(y, train=train)
      branches.append(y)
    spatial = y.shape[1:-1]
    y = jnp.concatenate([center_crop(b, spatial) for b in branches], axis=-1)
    y = Norm(self.norm, dtype=self.dtype, name='concat_norm')(y, train=train)
    shortcut = ConvNorm(sum(widths), 1, self.padding, self.norm, dtype=self.dtype,
                        conv_impl=self.conv_impl, name='shortcut')(x, train=train)
    y = self.activation(y + center_crop(shortcut, spatial))
    y = Norm(self.norm, dtype=self.dtype, name='out_norm')(y, train=train)
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return y


class ResPath(nn.Module):
  """Res path (Ibtehaz & Rahman 2020): `length` units of norm(act(conv3×3(x) + conv1×1(x))) that
  bring encoder features closer to the decoder's before concatenation.

  Each unit trims 2 pixels with VALID padding (the 1×1 shortcut is center-cropped).
  """

  features: int
  length: int
  padding: str = 'SAME'
  norm: str = 'none'
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.length):
      shortcut = ConvNorm(self.features, 1, self.padding, self.norm, dtype=self.dtype,
                          conv_impl=self.conv_impl, name=f'shortcut{i}')(x, train=train)
      y = ConvNorm(self.features, 3, self.padding, self.norm, self.activation, dtype=self.dtype,
                   conv_impl=self.conv_impl, name=f'conv{i}')(x, train=train)
      y = self.activation(y + center_crop(shortcut, y.shape[1:-1]))
      x = Norm(self.norm, dtype=self.dtype, name=f'norm{i}')(y, train=train)
    return x


class Downsample(nn.Module):
  """2× max pooling over every spatial dim; odd sizes are an error, not a silent crop.

  `conv_impl` picks the pooling's backward pass like the convolutions' (see
  fast_conv.resolve_pool_impl); values and gradients are the same either way.
  """

  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if any(s % 2 for s in x.shape[1:-1]):
      raise ValueError(f'max pooling needs even spatial sizes, got {x.shape[1:-1]}; '
                       "use the model's valid_input_size() to choose an input size")
    if fast_conv.resolve_pool_impl(self.conv_impl) == 'fast':
      return fast_conv.max_pool_2x(x)
    window = (2,) * (x.ndim - 2)
    return nn.max_pool(x, window, strides=window)


class Upsample(nn.Module):
  """2× up-sampling to `features` channels.

  'transpose' is the paper's 2×2 up-convolution; 'resize' is (bi/tri)linear resize followed by a
  1×1 convolution, which avoids the checkerboard pattern transposed convolutions can produce.
  """

  features: int
  mode: str = 'transpose'
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    rank = x.ndim - 2
    # The layer names are those flax gives unnamed nn.ConvTranspose / nn.Conv layers, so the
    # parameter tree is that of the stock layers.
    if self.mode == 'transpose':
      return tagged(fast_conv.ConvTranspose2x2(self.features, use_bias=self.use_bias,
                                               dtype=self.dtype, impl=self.conv_impl,
                                               name='ConvTranspose_0')(x))
    if self.mode == 'resize':
      shape = (x.shape[0], *(2 * s for s in x.shape[1:-1]), x.shape[-1])
      x = jax.image.resize(x, shape, method='linear')
      return tagged(conv(self.features, (1,) * rank, use_bias=self.use_bias, dtype=self.dtype,
                         conv_impl=self.conv_impl, name='Conv_0')(x))
    raise ValueError(f'model.upsample={self.mode!r} is not one of {UPSAMPLINGS}')


class EncoderStage(nn.Module):
  """Down-sampling (except at the top level) followed by a conv block."""

  features: int
  downsample: bool
  block: Callable[..., nn.Module]
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.downsample:
      x = Downsample(self.conv_impl)(x)
    return self.block(self.features, name='block')(x, train)


class DecoderStage(nn.Module):
  """Up-sampling, concatenation with the (center-cropped) skip features, conv block.

  `skips` is one array or, for U-Net++'s dense pathways, several. `gate`, if given, builds a
  module `gate(skip, coarse)` that reweights the single skip using the coarser decoder features
  (Attention U-Net).
  """

  features: int
  upsample: str
  block: Callable[..., nn.Module]
  gate: Callable[..., nn.Module] | None = None
  upsample_bias: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, skips: jax.Array | Sequence[jax.Array], *,
               train: bool) -> jax.Array:
    skips = [skips] if isinstance(skips, jax.Array) else list(skips)
    up = Upsample(self.features, self.upsample, use_bias=self.upsample_bias, dtype=self.dtype,
                  conv_impl=self.conv_impl, name='upsample')(x)
    skips = [center_crop(s, up.shape[1:-1]).astype(up.dtype) for s in skips]
    if self.gate is not None:
      if len(skips) != 1:
        raise ValueError(f'an attention gate takes one skip, got {len(skips)}')
      skips = [self.gate(name='gate')(skips[0], x)]
    x = jnp.concatenate([*skips, up], axis=-1)
    return self.block(self.features, name='block')(x, train)


class Head(nn.Module):
  """1×1 convolution to per-class logits, always returned in float32 for a stable loss."""

  num_classes: int
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = conv(self.num_classes, (1,) * (x.ndim - 2), dtype=self.dtype, conv_impl=self.conv_impl,
             name='Conv_0')(x)
    return x.astype(jnp.float32)
