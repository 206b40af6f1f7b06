"""Geometric augmentation ops and their maps, shared by the host and device pipelines.

Each op is a frozen dataclass holding its spec parameters (see transforms.OPS) that turns uniform
(`u`) and standard normal (`z`) random numbers into a backward map from output to source pixel
coordinates about the centre of the output frame:
  x = c_src + A (y - c_out + d(y)) + t
Flips, 90° turns, rotation, scaling and shifts give homogeneous matrices [[A, t], [0, 1]] of
shape (r+1, r+1), composed exactly in spec order; elastic deformation gives a displacement field
d of shape (r, *frame) on the output frame, so in a fused chain it acts as if it came last.
Everything is written once against the array module passed as `xp` (numpy on the host, jax.numpy
in `device_augment`), so both compute the same geometry from the same random numbers. Products
are elementwise, never matmuls: a TPU matmul rounds float32 inputs to bfloat16 by default, which
would move pixels far from the centre by whole pixels.

Rank 2 (H, W) or 3 (D, H, W). Angles turn the (H, W) plane counter-clockwise as displayed, so a
+90° turn equals np.rot90(x, 1, axes=(-2, -1)) of the spatial axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Sequence

import grain
import numpy as np
from scipy import ndimage as ndi

from unet_jax.augment.examples import (NEAREST_KEYS, SPATIAL_KEYS, Example, apply_spatial,
                                       crop_start, spatial_rank)

SPEC_FIELD = 'config.data.augment'
_SPLINE_MARGIN = 12  # pixels of context for a cubic spline prefilter on a window (pole^12 ≈ 1e-7)


def check(ok: bool, op: Any, message: str) -> None:
  """Raises a ValueError naming the spec field and the op when `ok` is false."""
  if not ok:
    raise ValueError(f'{SPEC_FIELD}: {op.name}: {message} (got {op})')


def _check_p(op: Any) -> None:
  check(0.0 <= op.p <= 1.0, op, f'p={op.p} must be a probability in [0, 1]')


def homogeneous(linear, offset, xp):
  """[[A, t], [0, 1]] from A (r, r) and t (r,)."""
  r = linear.shape[0]
  top = xp.concatenate([linear, xp.reshape(offset, (r, 1))], axis=1)
  return xp.concatenate([top, xp.asarray(np.eye(r + 1)[r:], dtype=top.dtype)], axis=0)


def plane_rotation(cos, sin, rank: int):
  """Backward rotation in the plane of the last two axes (H, W), a counter-clockwise turn of the
  image as displayed: +90° equals np.rot90(x, 1, axes=(rank-2, rank-1))."""
  a, b = rank - 2, rank - 1
  diag, skew = np.zeros((rank, rank)), np.zeros((rank, rank))
  diag[a, a] = diag[b, b] = 1.0
  skew[a, b], skew[b, a] = 1.0, -1.0
  return np.eye(rank) + (cos - 1) * diag + sin * skew  # numpy or jax scalars alike


def matmul(a, b, xp):
  """a @ b of small matrices by elementwise products (full float32 precision on a TPU too)."""
  return xp.sum(a[:, :, None] * b[None, :, :], axis=1)


def axis_rotation(angle, axis, xp):
  """Backward 3D rotation by `angle` about the unit vector `axis` (Rodrigues' formula)."""
  k0, k1, k2 = axis[0], axis[1], axis[2]
  zero = 0 * k0
  cross = xp.stack([xp.stack([zero, -k2, k1]), xp.stack([k2, zero, -k0]),
                    xp.stack([-k1, k0, zero])])
  return np.eye(3) - xp.sin(angle) * cross + (1 - xp.cos(angle)) * matmul(cross, cross, xp)


@functools.lru_cache(maxsize=64)
def cubic_upsample_matrix(grid: int, size: int) -> np.ndarray:
  """(size, grid): cubic B-spline interpolation of `grid` nodes spread over `size` pixels.

  Column j is the spline through the unit vector e_j, so a coarse field interpolates to full
  resolution by one small matrix product per axis, the same on host and device.
  """
  positions = np.linspace(0, grid - 1, size)
  eye = np.eye(grid)
  matrix = np.stack([ndi.map_coordinates(eye[j], [positions], order=3, mode='mirror')
                     for j in range(grid)], axis=1)
  matrix.flags.writeable = False
  return matrix


class GeometricOp(grain.transforms.RandomMap):
  """A geometric op of the spec: random numbers → backward matrix and/or displacement field.

  Used alone as a grain transform it resamples the whole example (order 1) in its own frame.
  """

  name: ClassVar[str]

  def num_uniform(self, rank: int) -> int:
    raise NotImplementedError

  def num_normal(self, rank: int) -> int:
    del rank
    return 0

  def transform(self, u, z, *, shape: tuple[int, ...], xp) -> tuple[Any, Any]:
    """(backward homogeneous matrix (r+1, r+1), displacement (r, *shape) or None)."""
    raise NotImplementedError

  def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    return GeometricAugment((self,)).random_map(example, rng)


@dataclasses.dataclass(frozen=True)
class RandomFlip(GeometricOp):
  """flip(p=0.5): flips each spatial axis independently with probability `p`."""

  name: ClassVar[str] = 'flip'
  p: float = 0.5

  def __post_init__(self):
    _check_p(self)

  def num_uniform(self, rank: int) -> int:
    return rank

  def transform(self, u, z, *, shape, xp):
    signs = xp.where(u[:len(shape)] < self.p, -1.0, 1.0)
    return homogeneous(xp.diag(signs), 0 * signs, xp), None


_COS90, _SIN90 = np.array([1.0, 0.0, -1.0, 0.0]), np.array([0.0, 1.0, 0.0, -1.0])


@dataclasses.dataclass(frozen=True)
class RandomRot90(GeometricOp):
  """rot90: turns the (H, W) plane by a random multiple of 90°.

  A non-square plane only gets 0° or 180°, so every example of a batch keeps its shape.
  """

  name: ClassVar[str] = 'rot90'

  def num_uniform(self, rank: int) -> int:
    return 1

  def transform(self, u, z, *, shape, xp):
    turns = 4 if shape[-1] == shape[-2] else 2
    k = xp.floor(u[0] * turns).astype(np.int32) * (4 // turns)
    linear = plane_rotation(xp.asarray(_COS90)[k], xp.asarray(_SIN90)[k], len(shape))
    return homogeneous(linear, xp.zeros(len(shape)), xp), None


@dataclasses.dataclass(frozen=True)
class RandomRotate(GeometricOp):
  """rotate(p=0.5, degrees=15, axis='hw'): rotation by an angle uniform in ±degrees.

  2D: in-plane. 3D: axis='hw' turns the H×W plane (about the D axis, right for anisotropic
  stacks); axis='random' turns about an axis drawn uniformly on the sphere.
  """

  name: ClassVar[str] = 'rotate'
  p: float = 0.5
  degrees: float = 15.0
  axis: str = 'hw'

  def __post_init__(self):
    _check_p(self)
    check(self.degrees >= 0, self, f'degrees={self.degrees} must be >= 0')
    check(self.axis in ('hw', 'random'), self, f"axis={self.axis!r} must be 'hw' or 'random'")

  def num_uniform(self, rank: int) -> int:
    return 4 if rank == 3 and self.axis == 'random' else 2

  def transform(self, u, z, *, shape, xp):
    rank = len(shape)
    angle = xp.where(u[0] < self.p, (2 * u[1] - 1) * math.radians(self.degrees), 0.0)
    if rank == 3 and self.axis == 'random':
      cos_t, phi = 2 * u[2] - 1, 2 * np.pi * u[3]
      sin_t = xp.sqrt(xp.maximum(1 - cos_t**2, 0.0))
      linear = axis_rotation(angle, xp.stack([sin_t * xp.cos(phi), sin_t * xp.sin(phi), cos_t]),
                             xp)
    else:
      linear = plane_rotation(xp.cos(angle), xp.sin(angle), rank)
    return homogeneous(linear, xp.zeros(rank), xp), None


@dataclasses.dataclass(frozen=True)
class RandomScale(GeometricOp):
  """scale(p=0.5, min=0.9, max=1.1): isotropic zoom by a factor uniform in [min, max].

  A factor above 1 magnifies (structures look larger).
  """

  name: ClassVar[str] = 'scale'
  p: float = 0.5
  min: float = 0.9
  max: float = 1.1

  def __post_init__(self):
    _check_p(self)
    check(0 < self.min <= self.max, self, 'needs 0 < min <= max')

  def num_uniform(self, rank: int) -> int:
    return 2

  def transform(self, u, z, *, shape, xp):
    factor = xp.where(u[0] < self.p, self.min + u[1] * (self.max - self.min), 1.0)
    return homogeneous(np.eye(len(shape)) / factor, xp.zeros(len(shape)), xp), None


@dataclasses.dataclass(frozen=True)
class RandomShift(GeometricOp):
  """shift(p=0.5, max=10): translation by up to `max` pixels along each axis (uniform)."""

  name: ClassVar[str] = 'shift'
  p: float = 0.5
  max: float = 10.0

  def __post_init__(self):
    _check_p(self)
    check(self.max >= 0, self, f'max={self.max} must be >= 0')

  def num_uniform(self, rank: int) -> int:
    return 1 + rank

  def transform(self, u, z, *, shape, xp):
    shift = xp.where(u[0] < self.p, (2 * u[1:] - 1) * self.max, 0.0)
    return homogeneous(xp.eye(len(shape)), -shift, xp), None


@dataclasses.dataclass(frozen=True)
class ElasticDeform(GeometricOp):
  """elastic(p=0.5, sigma=10, grid=3): the paper's elastic deformation (§3.1).

  Displacement vectors on a coarse grid×grid(×grid) grid spanning the output tile are drawn from
  N(0, sigma²) px per component and interpolated by cubic B-splines to every pixel.
  """

  name: ClassVar[str] = 'elastic'
  p: float = 0.5
  sigma: float = 10.0
  grid: int = 3

  def __post_init__(self):
    _check_p(self)
    check(self.sigma >= 0, self, f'sigma={self.sigma} must be >= 0')
    check(isinstance(self.grid, int) and self.grid >= 2, self, f'grid={self.grid} must be an '
          'int >= 2')

  def num_uniform(self, rank: int) -> int:
    return 1

  def num_normal(self, rank: int) -> int:
    return rank * self.grid**rank

  def transform(self, u, z, *, shape, xp):
    rank = len(shape)
    scale = xp.where(u[0] < self.p, self.sigma, 0.0)
    field = xp.reshape(z, (rank,) + (self.grid,) * rank) * scale
    for axis, size in enumerate(shape):  # separable: one small contraction per axis
      upsample = cubic_upsample_matrix(self.grid, size)
      column = [1] * (rank + 1)
      column[axis + 1] = size
      field = sum(xp.reshape(upsample[:, j], column)
                  * field[(slice(None),) * (axis + 1) + (slice(j, j + 1),)]
                  for j in range(self.grid))
    return homogeneous(xp.eye(rank), xp.zeros(rank), xp), field


def compose(ops: Sequence[GeometricOp], draws: Sequence[tuple[Any, Any]], *,
            shape: tuple[int, ...], xp) -> tuple[Any, Any]:
  """Backward map of `ops` applied in order: (homogeneous matrix, displacement or None)."""
  matrix, field = xp.eye(len(shape) + 1), None
  for op, (u, z) in zip(ops, draws):
    h, d = op.transform(u, z, shape=shape, xp=xp)
    matrix = matmul(matrix, h, xp)  # forward op1 then op2 reads the source at B1 B2 y
    if d is not None:
      field = d if field is None else field + d
  return matrix, field


def source_coordinates(matrix, field, shape: tuple[int, ...], src_centre, xp):
  """(r, *shape) source coordinates of every output pixel (elementwise, see matmul)."""
  rank = len(shape)
  y = []
  for j, n in enumerate(shape):
    grid = xp.reshape(xp.arange(n) - (n - 1) / 2, tuple(n if a == j else 1 for a in range(rank)))
    y.append(grid if field is None else grid + field[j])
  offset = matrix[:rank, rank] + xp.asarray(src_centre)
  rows = [offset[i] + sum(matrix[i, j] * y[j] for j in range(rank)) for i in range(rank)]
  return xp.stack([xp.broadcast_to(row, shape) for row in rows])


# ----------------------------------------------------------------------------------------------
# Host resampling: every geometric op and the crop fused into one pass over the source.


def _mirror_index(index: np.ndarray, size: int) -> np.ndarray:
  """Folds integer or float indices into [0, size - 1] like np.pad 'reflect' / scipy 'mirror'."""
  if size == 1:
    return np.zeros_like(index)
  period = 2 * (size - 1)
  index = np.abs(index)  # the reflection about 0
  if index.max() >= period:
    index = np.mod(index, period)
  return np.where(index > size - 1, period - index, index)


def _lattice(matrix: np.ndarray, shape: tuple[int, ...], src_centre: np.ndarray):
  """Per-source-axis integer indices if the map is a signed axis permutation + integer offset."""
  rank = len(shape)
  linear, offset = matrix[:rank, :rank], matrix[:rank, rank] + src_centre
  magnitude = np.abs(linear)
  if not (np.isin(linear, (-1.0, 0.0, 1.0)).all() and (magnitude.sum(0) == 1).all()
          and (magnitude.sum(1) == 1).all()):
    return None
  src_axes = np.argmax(magnitude, axis=0)  # output axis j reads source axis src_axes[j]
  indices = [None] * rank
  for j, k in enumerate(src_axes):
    v = offset[k] + linear[k, j] * (np.arange(shape[j]) - (shape[j] - 1) / 2)
    if not np.allclose(v, np.round(v), rtol=0, atol=1e-6):
      return None
    indices[k] = np.round(v).astype(np.intp)
  return indices, src_axes


def _gather(x: np.ndarray, indices, src_axes) -> np.ndarray:
  for k, idx in enumerate(indices):
    idx = _mirror_index(idx, x.shape[k])
    step = int(idx[1] - idx[0]) if idx.size > 1 else 1
    if abs(step) == 1 and np.array_equal(idx, idx[0] + step * np.arange(idx.size)):
      stop = idx[-1] + step if idx[-1] + step >= 0 else None
      x = x[(slice(None),) * k + (slice(idx[0], stop, step),)]  # a view, no copy
    else:
      x = np.take(x, idx, axis=k)
  return x.transpose(*src_axes, *range(len(src_axes), x.ndim))


def _nearest(x: np.ndarray, coords: np.ndarray) -> np.ndarray:
  """x (*spatial, ...) at the nearest pixel to each coordinate, mirror borders."""
  index = []
  for c, size in zip(coords, x.shape):
    i = np.rint(c).astype(np.intp)
    index.append(_mirror_index(i, size) if i.min() < 0 or i.max() >= size else i)
  return x[tuple(index)]


def _resample(x: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
  """x (*spatial) at `coords` (r, *out) with spline `order` >= 1, mirror borders; float32."""
  if order == 1:
    return ndi.map_coordinates(x, coords, order=1, mode='mirror', output=np.float32)
  # A spline prefilters its whole input: fold the coordinates inside the image and filter only
  # the window they read (plus a margin), not the full padded image.
  coords = np.stack([_mirror_index(c, s) for c, s in zip(coords, x.shape)])
  lo = [max(int(np.floor(c.min())) - _SPLINE_MARGIN, 0) for c in coords]
  hi = [min(int(np.ceil(c.max())) + _SPLINE_MARGIN + 1, s) for c, s in zip(coords, x.shape)]
  window = x[tuple(slice(a, b) for a, b in zip(lo, hi))]
  coords = coords - np.reshape(lo, (-1,) + (1,) * (coords.ndim - 1))
  return ndi.map_coordinates(window, coords, order=order, mode='mirror', output=np.float32)


def _cast_like(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return np.clip(np.rint(y), info.min, info.max).astype(dtype)
  return y.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class GeometricAugment(grain.transforms.RandomMap):
  """Geometric `ops` and a crop of `size` fused into one resampling of the source.

  size: the crop (one int per spatial dim); None keeps the example's shape. Either way the crop
    window must fit the example, as for RandomCrop.
  order: spline order for images and weights (0 nearest, 1 linear, 3 cubic); labels and
    instances always use the nearest pixel.
  foreground_class, foreground_p: with probability foreground_p the crop is centred on a pixel
    of that label class (see crop_start).
  """

  ops: tuple[GeometricOp, ...]
  size: tuple[int, ...] | None = None
  order: int = 1
  foreground_class: int = 1
  foreground_p: float = 0.0

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    rank, label = spatial_rank(example), example['label']
    size = label.shape if self.size is None else tuple(self.size)
    start = crop_start(label, size, rng, foreground_class=self.foreground_class,
                       foreground_p=self.foreground_p)
    draws = [(rng.random(op.num_uniform(rank)), rng.standard_normal(op.num_normal(rank)))
             for op in self.ops]
    return self.apply(example, draws, start=start)

  def apply(self, example: Example, draws: Sequence[tuple[np.ndarray, np.ndarray]], *,
            start: Sequence[int] | None = None) -> Example:
    """The crop at `start` (default: origin) of the geometry drawn as `draws`: (uniform, normal)
    random numbers per op, as random_map draws them."""
    shape = example['label'].shape
    size = shape if self.size is None else tuple(self.size)
    start = (0,) * len(shape) if start is None else tuple(start)
    draws = [(np.asarray(u, np.float64), np.asarray(z, np.float64)) for u, z in draws]
    matrix, field = compose(self.ops, draws, shape=size, xp=np)
    src_centre = np.asarray(start) + (np.asarray(size) - 1) / 2
    lattice = None if field is not None else _lattice(matrix, size, src_centre)
    if lattice is not None:
      return apply_spatial(example, lambda x, rank: _gather(x, *lattice))
    coords = source_coordinates(matrix, field, size, src_centre, np)
    out = dict(example)
    for key in SPATIAL_KEYS:
      if key not in example:
        continue
      x = example[key]
      if key in NEAREST_KEYS or self.order == 0:
        out[key] = _nearest(x, coords)
      elif key == 'weight':
        y = _resample(x, coords, self.order)
        out[key] = np.clip(y, x.min(), x.max()) if self.order > 1 else y  # no spline overshoot
      else:
        channels = [_resample(x[..., c], coords, self.order) for c in range(x.shape[-1])]
        out[key] = _cast_like(np.stack(channels, axis=-1), x.dtype)
    return out
