"""Intensity augmentation of the image: brightness, contrast, gamma, Gaussian noise and blur.

Ops change only 'image' ((*spatial, C) float32); labels, weights and instances pass through.
They act on the image in [0, 1] (ToUnitRange divides the 0..255 image by 255 first; Normalize
follows with scale=1), so parameters are in units of the full intensity range: brightness
delta=0.1 shifts by at most a tenth of it, noise std=0.03 is 3% of it. Brightness, contrast and
gamma clip their result to [0, 1], as a saturating detector would; noise and blur do not clip.

Each op draws `num_uniform` uniform numbers u: u[0] < p applies it, u[1:] set its strength.
`apply(image, u, noise, xp)` is written once for numpy and jax.numpy (`xp`), so `device_augment`
runs the very same code inside a jitted step; `noise` is a standard normal array shaped like
the image for the ops that need one (GaussianNoise), else None.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import grain
import numpy as np

from unet_jax.augment import geometric as G

Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ToUnitRange(grain.transforms.Map):
  """Image → float32 in [0, 1] (x / scale), the range the intensity ops work in."""

  scale: float = 255.0

  def map(self, example: Example) -> Example:
    return {**example, 'image': np.asarray(example['image'], np.float32) / np.float32(self.scale)}


class IntensityOp(grain.transforms.RandomMap):
  """An intensity op of the spec; subclasses define p, their ranges and `apply`."""

  name: ClassVar[str]
  num_uniform: ClassVar[int] = 2
  needs_noise: ClassVar[bool] = False

  def __post_init__(self):
    G.check(0.0 <= self.p <= 1.0, self, f'p={self.p} must be a probability in [0, 1]')

  def apply(self, image, u, noise, xp):
    """The op at strength u[1:] (it is applied; the caller tests u[0] < p)."""
    raise NotImplementedError

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    u = rng.random(self.num_uniform)
    if not u[0] < self.p:
      return example
    image = np.asarray(example['image'], np.float32)
    noise = rng.standard_normal(image.shape, dtype=np.float32) if self.needs_noise else None
    return {**example, 'image': np.asarray(self.apply(image, u, noise, np), np.float32)}


def _check_range(op: Any, low: float, high: float, positive: bool = False) -> None:
  G.check(low <= high and (low > 0 or not positive), op,
         f'needs {"0 < " if positive else ""}min <= max')


@dataclasses.dataclass(frozen=True)
class Brightness(IntensityOp):
  """brightness(p=0.5, delta=0.1): adds an offset uniform in [-delta, delta]."""

  name: ClassVar[str] = 'brightness'
  p: float = 0.5
  delta: float = 0.1

  def __post_init__(self):
    super().__post_init__()
    G.check(self.delta >= 0, self, f'delta={self.delta} must be >= 0')

  def apply(self, image, u, noise, xp):
    return xp.clip(image + (2 * u[1] - 1) * self.delta, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Contrast(IntensityOp):
  """contrast(p=0.5, min=0.8, max=1.2): scales deviations from the image mean (per channel) by
  a factor uniform in [min, max]."""

  name: ClassVar[str] = 'contrast'
  p: float = 0.5
  min: float = 0.8
  max: float = 1.2

  def __post_init__(self):
    super().__post_init__()
    _check_range(self, self.min, self.max)

  def apply(self, image, u, noise, xp):
    mean = xp.mean(image, axis=tuple(range(image.ndim - 1)), keepdims=True)
    factor = self.min + u[1] * (self.max - self.min)
    return xp.clip((image - mean) * factor + mean, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Gamma(IntensityOp):
  """gamma(p=0.5, min=0.8, max=1.25): x ** g with log g uniform in [log min, log max], so 0.8
  and 1.25 darken and brighten equally often."""

  name: ClassVar[str] = 'gamma'
  p: float = 0.5
  min: float = 0.8
  max: float = 1.25

  def __post_init__(self):
    super().__post_init__()
    _check_range(self, self.min, self.max, positive=True)

  def apply(self, image, u, noise, xp):
    log_g = math.log(self.min) + u[1] * (math.log(self.max) - math.log(self.min))
    return xp.clip(image, 0.0, 1.0) ** xp.exp(log_g)


@dataclasses.dataclass(frozen=True)
class GaussianNoise(IntensityOp):
  """noise(p=0.5, std=0.03): adds independent N(0, std²) noise to every pixel."""

  name: ClassVar[str] = 'noise'
  num_uniform: ClassVar[int] = 1
  needs_noise: ClassVar[bool] = True
  p: float = 0.5
  std: float = 0.03

  def __post_init__(self):
    super().__post_init__()
    G.check(self.std >= 0, self, f'std={self.std} must be >= 0')

  def apply(self, image, u, noise, xp):
    return image + self.std * noise


@dataclasses.dataclass(frozen=True)
class GaussianBlur(IntensityOp):
  """blur(p=0.5, sigma_min=0, sigma_max=1): Gaussian blur of the spatial axes with sigma uniform
  in [sigma_min, sigma_max] px; mirror borders, kernel radius round(4 sigma_max) (scipy's
  default truncation), so a fixed-size kernel serves every drawn sigma."""

  name: ClassVar[str] = 'blur'
  p: float = 0.5
  sigma_min: float = 0.0
  sigma_max: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    G.check(0 <= self.sigma_min <= self.sigma_max, self, 'needs 0 <= sigma_min <= sigma_max')

  @property
  def radius(self) -> int:
    return int(4.0 * self.sigma_max + 0.5)

  def apply(self, image, u, noise, xp):
    radius = self.radius
    if radius == 0:
      return image
    sigma = self.sigma_min + u[1] * (self.sigma_max - self.sigma_min)
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = xp.exp(-0.5 * (taps / xp.maximum(sigma, 1e-3))**2)  # sigma → 0: a unit impulse
    kernel = (kernel / xp.sum(kernel)).astype(np.float32)
    for axis in range(image.ndim - 1):
      n = image.shape[axis]
      widths = [(0, 0)] * image.ndim
      widths[axis] = (radius, radius)
      padded = xp.pad(image, widths, mode='reflect')  # = scipy's 'mirror', even past the edge
      window = lambda i: padded[(slice(None),) * axis + (slice(i, i + n),)]
      image = sum(kernel[i] * window(i) for i in range(2 * radius + 1))
    return image
