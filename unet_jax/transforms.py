"""Grain transforms for segmentation examples: padding, crops, fused geometry, the aug spec.

An example is a dict of numpy arrays that share their leading spatial dims (rank 2 or 3, D×H×W):
  'image':     (*spatial, C)  uint8 or float32
  'label':     (*spatial)     integer class ids
  'weight':    (*spatial)     float32 pixel weights (optional)
  'instances': (*spatial)     int32 instance ids (optional)
Geometric ops (`geometric`) draw their random parameters once per example and apply the same
geometry to every key, so image, label, weight map and instances never drift apart. Images and
weights are interpolated (spline order 1 or 3); labels and instances only ever take the nearest
source pixel.

`GeometricAugment` fuses a chain of geometric ops and the crop into ONE resampling that reads
the (mirror-padded) source at the crop's coordinates: pixels are interpolated once and only the
crop is computed. Beyond the source, pixels are mirrored without repeating the edge pixel:
scipy's mode 'mirror', the same as np.pad(mode='reflect') in MirrorPad. Whenever the drawn
geometry reduces to flips, 90° turns and integer offsets (e.g. every interpolating op's coin
flip failed), the crop is cut by indexing, exactly and without interpolation.

Augmentation spec (config.data.augment), in the style of big_vision: ops joined by '|', each
`name` or `name(key=literal, ...)`, e.g. 'elastic(p=0.5, sigma=10)|rotate(degrees=15)|flip'.
OPS maps the names to the op dataclasses of `geometric` and `intensity`, whose docstrings give
the keywords; `device_augment` parses the same spec into the same dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import time
from typing import Any, Sequence

import grain
import numpy as np
from scipy import ndimage as ndi

from unet_jax import geometric as G
from unet_jax import intensity as I

Example = dict[str, np.ndarray]
SPATIAL_KEYS = ('image', 'label', 'weight', 'instances')
NEAREST_KEYS = ('label', 'instances')  # ids: never interpolated
CROPS = ('random', 'foreground')
RandomFlip, RandomRot90 = G.RandomFlip, G.RandomRot90  # their former home
SPEC_FIELD = G.SPEC_FIELD
_SPLINE_MARGIN = 12  # pixels of context for a cubic spline prefilter on a window (pole^12 ≈ 1e-7)


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

  border: int | Sequence[int]  # one for every dim, or one per spatial dim

  def map(self, example: Example) -> Example:
    rank = spatial_rank(example)
    borders = (self.border,) * rank if isinstance(self.border, int) else tuple(self.border)
    if not any(b > 0 for b in borders):
      return example
    return apply_spatial(example, lambda x, r: mirror_pad(
        x, [(b, b) for b in borders] + [(0, 0)] * (x.ndim - r)))


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


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """A crop of `size` (one int per spatial dim) at a uniformly random position."""

  size: Sequence[int]

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    starts = crop_start(example['label'], self.size, rng)
    window = tuple(slice(b, b + c) for b, c in zip(starts, self.size))
    return apply_spatial(example, lambda x, rank: x[window])


@dataclasses.dataclass(frozen=True)
class ForegroundCrop(grain.transforms.RandomMap):
  """A crop of `size` centred with probability `p` on a pixel of `foreground_class`."""

  size: Sequence[int]
  foreground_class: int = 1
  p: float = 0.5

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    starts = crop_start(example['label'], self.size, rng, foreground_class=self.foreground_class,
                        foreground_p=self.p)
    window = tuple(slice(b, b + c) for b, c in zip(starts, self.size))
    return apply_spatial(example, lambda x, rank: x[window])


# ----------------------------------------------------------------------------------------------
# Host resampling.


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

  ops: tuple[G.GeometricOp, ...]
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
    matrix, field = G.compose(self.ops, draws, shape=size, xp=np)
    src_centre = np.asarray(start) + (np.asarray(size) - 1) / 2
    lattice = None if field is not None else _lattice(matrix, size, src_centre)
    if lattice is not None:
      return apply_spatial(example, lambda x, rank: _gather(x, *lattice))
    coords = G.source_coordinates(matrix, field, size, src_centre, np)
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


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Image → float32 `(x / scale - mean) / std` (scale 255 for uint8); labels and instances →
  int32; weights → float32; contiguous arrays."""

  mean: float
  std: float
  scale: float = 255.0

  def map(self, example: Example) -> Example:
    out = dict(example)
    image = np.asarray(example['image'], np.float32)
    out['image'] = np.ascontiguousarray((image / self.scale - self.mean) / self.std)
    out['label'] = np.ascontiguousarray(example['label'], np.int32)
    if 'weight' in example:
      out['weight'] = np.ascontiguousarray(example['weight'], np.float32)
    if 'instances' in example:
      out['instances'] = np.ascontiguousarray(example['instances'], np.int32)
    return out


# ----------------------------------------------------------------------------------------------
# The augmentation spec.

OPS = {
    'flip': G.RandomFlip,
    'rot90': G.RandomRot90,
    'rotate': G.RandomRotate,
    'scale': G.RandomScale,
    'shift': G.RandomShift,
    'elastic': G.ElasticDeform,
    'brightness': I.Brightness,
    'contrast': I.Contrast,
    'gamma': I.Gamma,
    'noise': I.GaussianNoise,
    'blur': I.GaussianBlur,
}


def _parse_op(piece: str) -> Any:
  try:
    node = ast.parse(piece, mode='eval').body
  except SyntaxError as e:
    raise ValueError(f'{SPEC_FIELD}: cannot parse {piece!r} ({e.msg}); write an op as name or '
                     'name(key=value, ...)') from None
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, call = node.func.id, node
  elif isinstance(node, ast.Name):
    name, call = node.id, None
  else:
    raise ValueError(f'{SPEC_FIELD}: {piece!r} is not an op; write name or name(key=value, ...)')
  if name not in OPS:
    raise ValueError(f'{SPEC_FIELD}: unknown op {name!r} in {piece!r}; valid ops: '
                     f'{", ".join(sorted(OPS))}')
  cls = OPS[name]
  valid = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  if call is not None:
    if call.args or any(kw.arg is None for kw in call.keywords):
      raise ValueError(f'{SPEC_FIELD}: {piece!r}: pass arguments by keyword; valid keywords of '
                       f'{name}: {", ".join(valid) or "none"}')
    for kw in call.keywords:
      if kw.arg not in valid:
        raise ValueError(f'{SPEC_FIELD}: op {name!r} has no keyword {kw.arg!r}; valid keywords '
                         f'of {name}: {", ".join(valid) or "none"}')
      try:
        kwargs[kw.arg] = ast.literal_eval(kw.value)
      except ValueError:
        raise ValueError(f'{SPEC_FIELD}: {piece!r}: the value of {kw.arg} must be a Python '
                         'literal (number, string, bool)') from None
  return cls(**kwargs)


@functools.lru_cache(maxsize=128)
def parse_augment(spec: str) -> tuple[Any, ...]:
  """'op(k=v)|op|...' → op dataclasses in order; '' → (). ValueErrors name the bad part."""
  if not spec.strip():
    return ()
  return tuple(_parse_op(piece.strip()) for piece in spec.split('|'))


def build_train_transforms(augment: str, *, crop_size: Sequence[int], border: int | Sequence[int],
                           mean: float,
                           std: float, crop: str = 'random', foreground_class: int = 1,
                           foreground_p: float = 0.5, order: int = 1) -> list[Any]:
  """The training chain, to apply in order with ds.map / ds.random_map.

  mirror pad → geometric ops of `augment` fused with the crop (one resampling) → intensity ops
  of `augment` on the image in [0, 1] → Normalize. Geometric and intensity ops each keep their
  spec order; intensity ops always follow the geometry.
  """
  if crop not in CROPS:
    raise ValueError(f'config.data.crop={crop!r} is not one of {CROPS}')
  if order not in range(6):
    raise ValueError(f'interpolation order={order!r} must be an int in 0..5 (1 linear, 3 cubic)')
  ops = parse_augment(augment)
  geometric = tuple(op for op in ops if isinstance(op, G.GeometricOp))
  intensity = [op for op in ops if isinstance(op, I.IntensityOp)]
  size = tuple(int(c) for c in crop_size)
  p = foreground_p if crop == 'foreground' else 0.0
  chain: list[Any] = [MirrorPad(border)]
  if geometric:
    chain.append(GeometricAugment(geometric, size, order=order, foreground_class=foreground_class,
                                  foreground_p=p))
  elif crop == 'foreground':
    chain.append(ForegroundCrop(size, foreground_class=foreground_class, p=p))
  else:
    chain.append(RandomCrop(size))
  if intensity:
    chain += [I.ToUnitRange(), *intensity, Normalize(mean, std, scale=1.0)]
  else:
    chain.append(Normalize(mean, std))
  return chain


def benchmark_host_ops(spec: str, image_size: Sequence[int], crop_size: Sequence[int], n: int, *,
                       border: int | None = None, order: int = 1, seed: int = 0) -> float:
  """Examples per second of the full host training chain on one thread (a benchmark helper).

  The example is a uint8 image with a derived label; `border` defaults to the mirror padding
  needed for the crop to fit (e.g. 30 for a 572² crop of a 512² image).
  """
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (*image_size, 1), dtype=np.uint8)
  example = {'image': image, 'label': (image[..., 0] > 127).astype(np.uint8)}
  if border is None:
    border = max(0, max(-(-(c - s) // 2) for c, s in zip(crop_size, image_size)))
  chain = build_train_transforms(spec, crop_size=crop_size, border=border, mean=0.5, std=0.2,
                                 order=order)
  tick = time.perf_counter()
  for _ in range(n):
    out = example
    for op in chain:
      out = op.random_map(out, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(out)
  return n / (time.perf_counter() - tick)
