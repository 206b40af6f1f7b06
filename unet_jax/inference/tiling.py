"""Tile geometry for the overlap-tile strategy (Ronneberger et al. 2015, Fig. 2).

A model's geometry is three facts per spatial dim: the output size of an input tile, the
smallest input whose output covers a given size, and the translation step (`size_multiple`,
2**depth for a pooling U-Net) for which shifting the input shifts the output by exactly as much.

A `TilePlan` places tiles on an image of any shape, smaller or larger than a tile:

* VALID nets (output smaller than the tile): the image is mirror-padded by the border the net
  trims, tile k starts at `k * stride` of the padded image and predicts image pixels
  `[k * stride, k * stride + out)`. The stride is the largest multiple of `size_multiple` that
  is ≤ `out`, so every tile sits on the lattice on which the net is translation-equivariant and
  the stitched result equals one forward pass over the whole padded image. Each tile *owns* the
  first `stride` pixels of its output (the last tile owns the rest): every image pixel is
  written exactly once, no blending.
* SAME nets (output as large as the tile): tiles overlap by `overlap` of their size (rounded to
  the lattice) and their outputs are blended with constant or Gaussian weights.

Along each axis the image is mirror-padded at the end so that the last tile fits; pixels beyond
the image are predicted and dropped. Shapes: images `(*spatial, C)`, one int per spatial dim for
tile and output shapes. Coordinates are in image pixels; `Tile.input` indexes the padded image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from unet_jax.models import whole_image

BLENDS = ('gaussian', 'constant')


@dataclasses.dataclass(frozen=True)
class TileGeometry:
  """How a model maps input tile sizes to output sizes, per spatial dim.

  Attributes:
    output_size: input size → output size; raises ValueError for a size the model cannot take.
    valid_input_size: minimal output → the smallest input size whose output covers it.
    size_multiple: the translation step of exact equivariance (2**depth for a pooling U-Net).
  """

  output_size: Callable[[int], int]
  valid_input_size: Callable[[int], int]
  size_multiple: int

  def valid_tile_sizes(self, near: int, count: int = 6) -> list[int]:
    """Up to `count` input sizes the model accepts, the closest to `near` first by position."""
    first = self.valid_input_size(1)
    step = self.size_multiple
    centre = max(0, (near - first) // step)
    candidates = [first + k * step for k in range(max(0, centre - count // 2), centre + count)]
    sizes = []
    for size in candidates:
      try:
        self.output_size(size)
      except ValueError:
        continue
      sizes.append(size)
    return sizes[:count]

  def check_tile_size(self, size: int, *, field: str = 'tile_size') -> int:
    """The output size of a tile, or a ValueError that lists nearby valid tile sizes."""
    try:
      out = self.output_size(int(size))
    except ValueError as e:
      reason = str(e)
      if 'valid sizes' not in reason:  # the model's own message may already list them
        reason += f'; valid tile sizes near it: {self.valid_tile_sizes(int(size))}'
      raise ValueError(f'{field}={size} cannot be taken by the model: {reason}') from None
    if out > size or (size - out) % 2:
      raise ValueError(f'{field}={size} gives an output of {out} that is not centred in the '
                       'tile; the overlap-tile strategy needs (input - output) to be even')
    return out


def geometry_for(model: Any) -> TileGeometry:
  """The geometry of `model` from its size contract (models/sizes.py): `output_size`,
  `valid_input_size` and `size_multiple`."""
  methods = ('output_size', 'valid_input_size', 'size_multiple')
  missing = [name for name in methods if not callable(getattr(model, name, None))]
  if missing:
    raise ValueError(f'{type(model).__name__} lacks the size methods {missing}; pass a '
                     'TileGeometry explicitly')
  return TileGeometry(output_size=model.output_size, valid_input_size=model.valid_input_size,
                      size_multiple=int(model.size_multiple()))


@dataclasses.dataclass(frozen=True)
class AxisPlan:
  """Tile positions along one spatial axis.

  Attributes:
    size: image size along the axis.
    tile: tile input size; out: tile output size; border: (tile - out) // 2.
    stride: distance between tile starts (a multiple of the geometry's size_multiple).
    starts: tile starts in padded-image coordinates; tile k predicts image pixels from
      `starts[k]` on (the mirror border before the image is exactly `border`).
    pad: (before, after) mirror padding of the image.
  """

  size: int
  tile: int
  out: int
  border: int
  stride: int
  starts: tuple[int, ...]
  pad: tuple[int, int]

  def destination(self, k: int, *, owned: bool) -> tuple[int, int]:
    """Image pixels [lo, hi) tile k writes: its owned part, or all its output inside the image."""
    lo = self.starts[k]
    if owned:
      hi = self.size if k == len(self.starts) - 1 else lo + self.stride
    else:
      hi = lo + self.out
    return lo, min(hi, self.size)


def plan_axis(size: int, tile: int, out: int, *, multiple: int, overlap: float) -> AxisPlan:
  """Places tiles along one axis of `size` pixels (see the module docstring)."""
  if size < 1:
    raise ValueError(f'cannot tile an axis of size {size}')
  border = (tile - out) // 2
  if out < tile:  # VALID: outputs abut on the equivariance lattice
    stride = out // multiple * multiple
    if stride == 0:
      raise ValueError(f'a tile of {tile} predicts {out} pixels, fewer than the translation step '
                       f'{multiple} of the model; use a larger tile')
  else:
    # SAME: neighbours share `overlap` of a tile, on the lattice, at least one step apart.
    stride = max(multiple, math.floor(out * (1.0 - overlap) / multiple) * multiple)
  count = 1 if size <= out else 1 + -(-(size - out) // stride)
  starts = tuple(k * stride for k in range(count))
  after = starts[-1] + tile - border - size
  return AxisPlan(size=size, tile=tile, out=out, border=border, stride=stride, starts=starts,
                  pad=(border, after))


@dataclasses.dataclass(frozen=True)
class Tile:
  """One tile: where its input comes from, which output pixels are kept and where they go."""

  input: tuple[slice, ...]        # window of the mirror-padded image
  source: tuple[slice, ...]       # kept part of the tile's output
  destination: tuple[slice, ...]  # where the kept part lands in the image


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """All tiles of one image; `blended` is False for VALID nets (every pixel written once)."""

  spatial_shape: tuple[int, ...]
  tile_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  axes: tuple[AxisPlan, ...]
  blended: bool

  @property
  def pads(self) -> list[tuple[int, int]]:
    return [axis.pad for axis in self.axes]

  @property
  def grid(self) -> tuple[int, ...]:
    return tuple(len(axis.starts) for axis in self.axes)

  def __len__(self) -> int:
    return math.prod(self.grid)

  def tiles(self) -> list[Tile]:
    """Tiles in C order of their grid index."""
    result = []
    for index in np.ndindex(*self.grid):
      inputs, sources, destinations = [], [], []
      for axis, k in zip(self.axes, index):
        start = axis.starts[k]
        lo, hi = axis.destination(k, owned=not self.blended)
        inputs.append(slice(start, start + axis.tile))
        sources.append(slice(lo - start, hi - start))
        destinations.append(slice(lo, hi))
      result.append(Tile(tuple(inputs), tuple(sources), tuple(destinations)))
    return result

  def pad_image(self, image: np.ndarray) -> np.ndarray:
    """Mirror-pads `(*spatial, C)` so that every tile's input window lies inside."""
    return whole_image.mirror_pad(image, [*self.pads, *[(0, 0)] * (image.ndim - len(self.pads))])


def plan_tiles(spatial_shape: Sequence[int], tile_shape: Sequence[int], geometry: TileGeometry,
               *, overlap: float = 0.25) -> TilePlan:
  """Tiles covering an image of `spatial_shape` with model input tiles of `tile_shape`.

  Args:
    spatial_shape: image size per spatial dim.
    tile_shape: tile input size per spatial dim; each must be a size the model takes.
    geometry: the model's TileGeometry.
    overlap: fraction of a SAME tile shared with its neighbour, in [0, 1); ignored for VALID
      nets, whose tiles abut exactly.
  """
  if len(spatial_shape) != len(tile_shape):
    raise ValueError(f'tile shape {tuple(tile_shape)} has {len(tile_shape)} dims but the image '
                     f'has {len(spatial_shape)} spatial dims {tuple(spatial_shape)}')
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'overlap={overlap} must be in [0, 1)')
  outs = tuple(geometry.check_tile_size(t) for t in tile_shape)
  blended = all(o == t for o, t in zip(outs, tile_shape))
  if not blended and any(o == t for o, t in zip(outs, tile_shape)):
    raise ValueError(f'tile shape {tuple(tile_shape)} → output {outs}: mixed SAME/VALID axes')
  axes = tuple(plan_axis(s, t, o, multiple=geometry.size_multiple, overlap=overlap)
               for s, t, o in zip(spatial_shape, tile_shape, outs))
  return TilePlan(tuple(int(s) for s in spatial_shape), tuple(int(t) for t in tile_shape), outs,
                  axes, blended)


def blend_weights(output_shape: Sequence[int], kind: str = 'gaussian', *,
                  sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
  """Per-pixel weights `(*output_shape)` float32 for blending overlapping SAME tiles.

  'gaussian' down-weights tile borders, where a SAME net sees zero padding instead of context:
  a separable Gaussian with sigma = `sigma_scale` × size, peak 1, floored at `floor` so that
  pixels only one tile covers still get a weight. 'constant' averages overlaps uniformly.
  """
  if kind == 'constant':
    return np.ones(tuple(output_shape), np.float32)
  if kind != 'gaussian':
    raise ValueError(f'blend={kind!r} is not one of {BLENDS}')
  weights = np.ones((), np.float64)
  for size in output_shape:
    x = np.arange(size) - (size - 1) / 2
    profile = np.exp(-0.5 * (x / (sigma_scale * size))**2)
    weights = np.multiply.outer(weights, profile)
  return np.maximum(weights / weights.max(), floor).astype(np.float32)


__all__ = ['BLENDS', 'AxisPlan', 'Tile', 'TileGeometry', 'TilePlan', 'blend_weights',
           'geometry_for', 'plan_axis', 'plan_tiles']
