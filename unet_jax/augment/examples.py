"""A training example and the rules every transform keeps for it.

An example is a dict of numpy arrays that share their leading spatial dims (rank 2 or 3, D×H×W):
  'image':     (*spatial, C)  uint8 or float32
  'label':     (*spatial)     integer class ids
  'weight':    (*spatial)     float32 pixel weights (optional)
  'instances': (*spatial)     int32 instance ids (optional)
Spatial transforms apply the same geometry to every spatial key, so image, label, weight map and
instances never drift apart; ids (NEAREST_KEYS) are never interpolated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Example = dict[str, np.ndarray]
SPATIAL_KEYS = ('image', 'label', 'weight', 'instances')
NEAREST_KEYS = ('label', 'instances')  # ids: never interpolated


def spatial_rank(example: Example) -> int:
  return example['label'].ndim


def apply_spatial(example: Example, fn) -> Example:
  """Applies `fn(array, rank)` to every spatial key present; other keys pass through."""
  rank = spatial_rank(example)
  return {k: fn(v, rank) if k in SPATIAL_KEYS else v for k, v in example.items()}


def crop_start(label: np.ndarray, size: Sequence[int], rng: np.random.Generator, *,
               foreground_class: int = 1, foreground_p: float = 0.0) -> tuple[int, ...]:
  """Start of a crop of `size` inside `label`'s shape.

  With probability `foreground_p` the crop is centred on a random pixel of `foreground_class`
  (then moved inside the example); otherwise, or without such pixels, its position is uniform.
  """
  shape = label.shape
  if len(size) != len(shape) or any(c > s for c, s in zip(size, shape)):
    raise ValueError(f'crop size {tuple(size)} does not fit an example of spatial shape '
                     f'{shape}; lower config.data.crop_size or pad the data')
  if foreground_p > 0 and rng.random() < foreground_p:
    hits = np.flatnonzero(label == foreground_class)
    if hits.size:
      centre = np.unravel_index(hits[rng.integers(hits.size)], shape)
      return tuple(int(np.clip(p - c // 2, 0, s - c)) for p, c, s in zip(centre, size, shape))
  return tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size))
