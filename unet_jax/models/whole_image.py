"""Whole images through a model: crop sizes, mirror padding, the final head and its softmax.

Every model of the family has the size contract of `sizes.SizeContract` (`output_size`,
`valid_input_size`). This module is the one place that turns that contract into what training,
evaluation and prediction all need:

  crop_shape(crop_size, rank)      config.data.crop_size (an int or one per dim) → a tuple
  mirror_border(model, crop)       pixels a VALID net trims from each side of a crop
  model_padding(model, shape)      (before, after) padding so that ONE pass covers an image
  mirror_pad(x, widths)            the one mirror rule: numpy 'reflect', also for borders
                                   wider than the image
  crop_to(logits, shape)           the part of the output that lies over the unpadded image
  final_logits(outputs)            the prediction of a model with several heads: the last
  head_probabilities(outputs)      its softmax, in float32
  tta_transforms(mode, rank)       the flips/rotations of test-time augmentation (TTA_MODES)
  tta_mean(predict, x, ...)        the mean prediction over them, each mapped back

Alignment: after `model_padding`, output pixel i lies over image pixel i, so the output is cut
back with `crop_to` (`[:size]` along every spatial dim). For a SAME net the padding only rounds
the size up to one the net takes (a multiple of `size_multiple()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def crop_shape(crop_size: int | Sequence[int], spatial_rank: int) -> tuple[int, ...]:
  """`crop_size` as one size per spatial dim (an int means a square or a cube)."""
  if isinstance(crop_size, (tuple, list)):
    shape = tuple(int(c) for c in crop_size)
  else:
    shape = (int(crop_size),) * spatial_rank
  if len(shape) != spatial_rank:
    raise ValueError(f'config.data.crop_size={crop_size} has {len(shape)} sizes for data with '
                     f'{spatial_rank} spatial dims')
  return shape


def mirror_border(model: Any, crop: Sequence[int]) -> tuple[int, ...]:
  """Pixels `model` trims from each side of an input of shape `crop` (0 for SAME nets)."""
  return tuple((c - model.output_size(c)) // 2 for c in crop)


def model_padding(model: Any, spatial_shape: Sequence[int]) -> list[tuple[int, int]]:
  """(before, after) mirror padding per spatial dim so that ONE pass of `model` covers an image
  of `spatial_shape`; output pixel i then lies over image pixel i."""
  pads = []
  for size in spatial_shape:
    needed = model.valid_input_size(int(size))
    border = (needed - model.output_size(needed)) // 2
    pads.append((border, needed - int(size) - border))
  return pads


def mirror_pad(x: Any, widths: Sequence[tuple[int, int]]) -> Any:
  """`x` mirrored at its borders without repeating the edge pixel (numpy 'reflect').

  The paper's overlap-tile extrapolation. numpy keeps reflecting when a border is wider than
  the axis, so images smaller than the network's border get the same rule as large ones, and
  training crops, evaluation and tiled prediction all see the same pixels. A jax array (traced
  too) is padded by jax's 'reflect', the same rule.
  """
  widths = [tuple(int(w) for w in pair) for pair in widths]
  if not any(b or a for b, a in widths):
    return x
  return _array_module(x).pad(x, widths, mode='reflect')


def crop_to(logits: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """The leading `spatial_shape` of a batched output `(N, *spatial, C)`: the part over the
  unpadded image."""
  return logits[(slice(None),) + tuple(slice(0, int(s)) for s in spatial_shape)]


def final_logits(outputs: Any) -> jax.Array:
  """The prediction of a model: its last head when it returns several (deep supervision)."""
  return outputs[-1] if isinstance(outputs, (tuple, list)) else outputs


def head_probabilities(outputs: Any) -> jax.Array:
  """Softmax over classes of the final head, in float32 whatever the compute dtype."""
  return jax.nn.softmax(final_logits(outputs).astype(jnp.float32), axis=-1)


# Test-time augmentation: evaluation and tiled prediction average over the same transforms.
TTA_MODES = ('none', 'flips', 'dihedral')


@dataclasses.dataclass(frozen=True)
class Transform:
  """A test-time transform of the last two spatial axes: flip `flip` axes, then rotate k×90°.

  Works on `(*spatial, C)` arrays of `rank` spatial dims; a 3D volume is flipped and rotated in
  its (H, W) plane.
  """

  flip: tuple[int, ...]
  k: int

  def forward(self, x: Any, rank: int, *, batched: bool = False) -> Any:
    """`x` transformed; `batched`: `x` is `(N, *spatial, C)`. numpy in, numpy out; jax in
    (traced too), jax out."""
    xp, lead = _array_module(x), int(batched)
    x = xp.flip(x, tuple(a + lead for a in self.flip)) if self.flip else x
    return xp.rot90(x, self.k, axes=(rank - 2 + lead, rank - 1 + lead)) if self.k else x

  def inverse(self, y: Any, rank: int, *, batched: bool = False) -> Any:
    xp, lead = _array_module(y), int(batched)
    y = xp.rot90(y, -self.k, axes=(rank - 2 + lead, rank - 1 + lead)) if self.k else y
    return xp.flip(y, tuple(a + lead for a in self.flip)) if self.flip else y


def _array_module(x: Any) -> Any:
  return jnp if isinstance(x, jax.Array) else np


def tta_transforms(mode: str, rank: int) -> list[Transform]:
  """'none': identity; 'flips': no/vertical/horizontal/both; 'dihedral': 4 rotations × 2 flips."""
  if mode not in TTA_MODES:
    raise ValueError(f'tta={mode!r} is not one of {TTA_MODES}')
  if mode == 'none':
    return [Transform((), 0)]
  if rank < 2:
    raise ValueError(f'tta={mode!r} needs at least 2 spatial dims, got {rank}')
  rows, cols = rank - 2, rank - 1
  if mode == 'flips':
    return [Transform(f, 0) for f in ((), (rows,), (cols,), (rows, cols))]
  return [Transform(f, k) for f in ((), (cols,)) for k in range(4)]


def tta_mean(predict: Any, x: Any, *, mode: str, rank: int, batched: bool = False) -> Any:
  """Mean over `tta_transforms(mode, rank)` of `inverse(predict(forward(x)))`: `predict` maps
  an image (a batch if `batched`) to per-pixel outputs of the same spatial shape."""
  transforms = tta_transforms(mode, rank)
  total = None
  for transform in transforms:
    y = transform.inverse(predict(transform.forward(x, rank, batched=batched)), rank,
                          batched=batched)
    total = y if total is None else total + y
  return total / len(transforms)
