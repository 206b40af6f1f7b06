"""Vision Transformer encoder on non-overlapping patches (Dosovitskiy et al., ICLR 2021), the
encoder of UNETR.

Shapes: images (N, *spatial, C) with every spatial size a multiple of the patch size p; the
token grid is spatial / p; tokens are (N, T, hidden) inside the transformer and (N, *grid, hidden)
when handed to a decoder. 2D and 3D share the code: the rank is read from the input.

Layers follow MONAI's ViT as used by UNETR: patch embedding by a p×p(×p) convolution with
stride p, learned position embeddings, pre-norm transformer blocks (LayerNorm → multi-head
self-attention with a bias-free qkv projection → residual; LayerNorm → MLP with GELU →
residual), and a final LayerNorm on the last layer's output.

Position embeddings are created for the token grid of the input seen at initialisation; an input
with another grid gets them linearly resized (as when fine-tuning a ViT at another resolution).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax.models import blocks


class PatchEmbedding(nn.Module):
  """(N, *spatial, C) images → (N, *spatial / p, hidden) patch tokens with position embeddings."""

  hidden_size: int
  patch_size: int
  dropout_rate: float = 0.0
  dtype: blocks.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    rank, p = x.ndim - 2, self.patch_size
    if any(s % p for s in x.shape[1:-1]):
      raise ValueError(f'spatial shape {x.shape[1:-1]} is not divisible by the patch size '
                       f'model.patch_size={p}')
    x = nn.Conv(self.hidden_size, (p,) * rank, strides=(p,) * rank, padding='VALID',
                dtype=self.dtype, name='proj')(x)
    grid = x.shape[1:-1]
    # The stored table keeps the grid it was created with; another grid is served by resizing.
    table_grid = grid
    if self.has_variable('params', 'position'):
      table_grid = self.get_variable('params', 'position').shape[1:-1]
    position = self.param('position', nn.initializers.truncated_normal(0.02),
                          (1, *table_grid, x.shape[-1]))
    if position.shape[1:-1] != grid:
      position = jax.image.resize(position, (1, *grid, x.shape[-1]), method='linear')
    x = x + position.astype(x.dtype)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention on (N, T, D) tokens; softmax in float32."""

  num_heads: int
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  dtype: blocks.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    n, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'model.hidden_size={d} is not divisible by model.num_heads='
                       f'{self.num_heads}')
    head_dim = d // self.num_heads
    qkv = blocks.tagged(nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, name='qkv')(x))
    q, k, v = jnp.moveaxis(qkv.reshape(n, t, 3, self.num_heads, head_dim), 2, 0)
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    y = jnp.einsum('nhqk,nkhd->nqhd', weights, v).reshape(n, t, d)
    y = blocks.tagged(nn.Dense(d, dtype=self.dtype, name='out')(y))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) → GELU → Dense(D), with dropout after each."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: blocks.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = blocks.tagged(nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc0')(x))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.gelu(y, approximate=False))
    y = blocks.tagged(nn.Dense(x.shape[-1], dtype=self.dtype, name='fc1')(y))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class TransformerBlock(nn.Module):
  """Pre-norm transformer encoder block on (N, T, D) tokens."""

  num_heads: int
  mlp_dim: int
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  dtype: blocks.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype, name='norm0')(x)
    x = x + SelfAttention(self.num_heads, self.qkv_bias, self.dropout_rate, self.dtype,
                          name='attention')(y, train)
    y = nn.LayerNorm(dtype=self.dtype, name='norm1')(x)
    return x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='mlp')(y, train)


class ViTEncoder(nn.Module):
  """Patch embedding and `num_layers` transformer blocks.

  Returns `(final, taps)`: the last layer's output after a LayerNorm and the outputs of the
  (1-based) layers listed in `taps`, all as (N, *grid, hidden_size) maps.
  """

  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  taps: Sequence[int] = ()
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  remat: bool | str = 'none'
  dtype: blocks.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    tokens = PatchEmbedding(self.hidden_size, self.patch_size, self.dropout_rate, self.dtype,
                            name='embedding')(x, train)
    map_shape = tokens.shape
    tokens = tokens.reshape(map_shape[0], -1, map_shape[-1])
    layer = blocks.remat_if(TransformerBlock, self.remat)
    outputs = {}
    for i in range(1, self.num_layers + 1):
      tokens = layer(self.num_heads, self.mlp_dim, self.qkv_bias, self.dropout_rate, self.dtype,
                     name=f'layer{i}')(tokens, train)
      outputs[i] = tokens
    final = nn.LayerNorm(dtype=self.dtype, name='norm')(tokens)
    return final.reshape(map_shape), [outputs[i].reshape(map_shape) for i in self.taps]
