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
from typing import Any, Sequence

import grain
import numpy as np

from unet_jax.augment import examples
from unet_jax.augment import geometric as G
from unet_jax.augment import intensity as I
from unet_jax.models import whole_image

CROPS = ('random', 'foreground')
SPEC_FIELD = G.SPEC_FIELD


@dataclasses.dataclass(frozen=True)
class MirrorPad(grain.transforms.Map):
  """Reflects `border` pixels at every spatial border.

  A VALID-padding U-Net loses `border` pixels per side; mirror padding (the paper's
  overlap-tile strategy) lets crops near the border still predict the border pixels.
  """

  border: int | Sequence[int]  # one for every dim, or one per spatial dim

  def map(self, example: examples.Example) -> examples.Example:
    rank = examples.spatial_rank(example)
    borders = (self.border,) * rank if isinstance(self.border, int) else tuple(self.border)
    if not any(b > 0 for b in borders):
      return example
    return examples.apply_spatial(example, lambda x, r: whole_image.mirror_pad(
        x, [(b, b) for b in borders] + [(0, 0)] * (x.ndim - r)))


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """A crop of `size` (one int per spatial dim) at a uniformly random position."""

  size: Sequence[int]

  def random_map(self, example: examples.Example, rng: np.random.Generator) -> examples.Example:
    starts = examples.crop_start(example['label'], self.size, rng)
    window = tuple(slice(b, b + c) for b, c in zip(starts, self.size))
    return examples.apply_spatial(example, lambda x, rank: x[window])


@dataclasses.dataclass(frozen=True)
class ForegroundCrop(grain.transforms.RandomMap):
  """A crop of `size` centred with probability `p` on a pixel of `foreground_class`."""

  size: Sequence[int]
  foreground_class: int = 1
  p: float = 0.5

  def random_map(self, example: examples.Example, rng: np.random.Generator) -> examples.Example:
    starts = examples.crop_start(example['label'], self.size, rng, foreground_class=self.foreground_class,
                        foreground_p=self.p)
    window = tuple(slice(b, b + c) for b, c in zip(starts, self.size))
    return examples.apply_spatial(example, lambda x, rank: x[window])


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Image → float32 `(x / scale - mean) / std` (scale 255 for uint8); labels and instances →
  int32; weights → float32; contiguous arrays."""

  mean: float
  std: float
  scale: float = 255.0

  def map(self, example: examples.Example) -> examples.Example:
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
    chain.append(G.GeometricAugment(geometric, size, order=order, foreground_class=foreground_class,
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
