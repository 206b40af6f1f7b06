"""Grain transforms for segmentation examples.

An example is a dict of numpy arrays that share their leading spatial dims:
  'image':  (*spatial, C)  uint8 or float32
  'label':  (*spatial)     integer class ids
  'weight': (*spatial)     float32 pixel weights (optional)
Geometric ops draw their random parameters once per example and apply the same geometry to
every key, so image, label and weight map never drift apart. Labels are only ever indexed,
flipped, rotated or cropped here, never interpolated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

Example = dict[str, np.ndarray]
SPATIAL_KEYS = ('image', 'label', 'weight')


def spatial_rank(example: Example) -> int:
  return example['label'].ndim


def apply_spatial(example: Example, fn) -> Example:
  """Applies `fn(array, rank)` to every spatial key present; other keys pass through."""
  rank = spatial_rank(example)
  return {k: fn(v, rank) if k in SPATIAL_KEYS else v for k, v in example.items()}


def mirror_pad(x: np.ndarray, widths: Sequence[tuple[int, int]]) -> np.ndarray:
  """np.pad by reflection; falls back to edge-including reflection for tiny arrays."""
  if not any(b or a for b, a in widths):
    return x
  tiny = any(max(b, a) >= s for (b, a), s in zip(widths, x.shape))
  return np.pad(x, widths, mode='symmetric' if tiny else 'reflect')


@dataclasses.dataclass(frozen=True)
class MirrorPad(grain.transforms.Map):
  """Reflects `border` pixels at every spatial border.

  A VALID-padding U-Net loses `border` pixels per side; mirror padding (the paper's
  overlap-tile strategy) lets crops near the border still predict the border pixels.
  """

  border: int

  def map(self, example: Example) -> Example:
    if self.border <= 0:
      return example
    return apply_spatial(example, lambda x, rank: mirror_pad(
        x, [(self.border, self.border)] * rank + [(0, 0)] * (x.ndim - rank)))


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """A crop of `size` (one int per spatial dim) at a uniformly random position."""

  size: Sequence[int]

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    shape = example['label'].shape
    if len(self.size) != len(shape) or any(c > s for c, s in zip(self.size, shape)):
      raise ValueError(f'crop size {tuple(self.size)} does not fit an example of spatial shape '
                       f'{shape}; lower config.data.crop_size or pad the data')
    starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.size)]
    window = tuple(slice(b, b + c) for b, c in zip(starts, self.size))
    return apply_spatial(example, lambda x, rank: x[window])


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Flips each spatial axis independently with probability `p`."""

  p: float = 0.5

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    axes = tuple(a for a in range(spatial_rank(example)) if rng.random() < self.p)
    if not axes:
      return example
    return apply_spatial(example, lambda x, rank: np.flip(x, axes))


@dataclasses.dataclass(frozen=True)
class RandomRot90(grain.transforms.RandomMap):
  """Rotates the last two spatial axes by a random multiple of 90°.

  A non-square plane only gets 0° or 180°, so every example of a batch keeps its shape.
  """

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    rank = spatial_rank(example)
    h, w = example['label'].shape[rank - 2:]
    k = int(rng.integers(0, 4)) if h == w else 2 * int(rng.integers(0, 2))
    if k == 0:
      return example
    return apply_spatial(example, lambda x, r: np.rot90(x, k, axes=(r - 2, r - 1)))


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """uint8 image → float32 `(x / 255 - mean) / std`; labels → int32; contiguous arrays."""

  mean: float
  std: float

  def map(self, example: Example) -> Example:
    out = dict(example)
    image = np.asarray(example['image'], np.float32)
    out['image'] = np.ascontiguousarray((image / 255.0 - self.mean) / self.std)
    out['label'] = np.ascontiguousarray(example['label'], np.int32)
    if 'weight' in example:
      out['weight'] = np.ascontiguousarray(example['weight'], np.float32)
    return out


def train_transforms(*, crop_size: Sequence[int], border: int, flip: bool, rot90: bool,
                     mean: float, std: float) -> list[Any]:
  """The training chain: mirror-pad, crop, then flips/rotations of the (cheaper) crop."""
  ops: list[Any] = [MirrorPad(border), RandomCrop(tuple(crop_size))]
  if flip:
    ops.append(RandomFlip())
  if rot90:
    ops.append(RandomRot90())
  ops.append(Normalize(mean, std))
  return ops
