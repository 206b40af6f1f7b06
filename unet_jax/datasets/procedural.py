"""A procedural EM-like membrane segmentation data set.

`make_em_like` draws images that imitate the ISBI 2012 serial-section EM slices closely enough for
a small U-Net to have something real to learn: cells are Voronoi regions of jittered seed points,
separated by thin dark curvy membranes, with textured mid-bright interiors, a few dark round
organelles, uneven illumination, blur and noise. It is the embedded default data set, so a fresh
machine can train without downloading anything.

The labels use the ISBI polarity (255 = cell interior, 0 = membrane), so the same loader reads
both this set and the real challenge stacks, and `data/procedural.py` can write it to disk as
ISBI-layout TIFF stacks.

Image i depends only on `(seed, i)`: any subset or shard can be regenerated on its own and agrees
with a full run.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ['make_em_like', 'describe']

# Grey levels (uint8 scale) before blur and noise. Chosen to resemble ISBI 2012, where the mean
# intensity is about 138 on interior and 85 on membrane pixels. Organelles stay lighter than
# membranes so that darkness alone does not give the answer but the task stays learnable.
_INTERIOR_LEVEL = 142.0
_CELL_LEVEL_STD = 10.0
_TEXTURE_STD = 9.0
_MEMBRANE_DEPTH = 68.0
_ORGANELLE_DEPTH = (30.0, 48.0)
_ORGANELLE_RADIUS = (0.1, 0.17)  # As fractions of cell_diameter.
# Seed lattice irregularity: uniform jitter as a fraction of the spacing, and the chance that a
# seed is dropped (its neighbours then grow into a larger cell, as real cells vary in size).
_SEED_JITTER = 0.3
_SEED_DROP = 0.08
# Smooth displacement of the sampling grid: this is what makes straight Voronoi edges curvy.
_WOBBLE_AMPLITUDE = 0.09  # Fraction of cell_diameter.
_WOBBLE_LENGTH = 0.7  # Correlation length as a fraction of cell_diameter.


def _check_positive_int(name: str, value: object) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f'{name} must be an integer, got {value!r}')
  if value < 1:
    raise ValueError(f'{name} must be >= 1, got {value}')
  return int(value)


def _check_float(name: str, value: object, *, positive: bool) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{name} must be a number, got {value!r}')
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f'{name} must be finite, got {value}')
  if positive and value <= 0:
    raise ValueError(f'{name} must be > 0, got {value}')
  if not positive and value < 0:
    raise ValueError(f'{name} must be >= 0, got {value}')
  return value


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, numbers.Integral) and not isinstance(size, bool):
    pair = (size, size)
  elif isinstance(size, (tuple, list)) and len(size) == 2:
    pair = tuple(size)
  else:
    raise ValueError(f'size must be an int or a (height, width) pair, got {size!r}')
  for value in pair:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f'size must hold positive integers, got {size!r}')
  return int(pair[0]), int(pair[1])


def _gaussian_basis(length: int, spacing: float) -> np.ndarray:
  """Returns a (length, K) float32 matrix of Gaussian bumps on knots `spacing` px apart.

  Each row has unit L2 norm, so `basis_y @ white_noise @ basis_x.T` is a smooth field with unit
  variance at every pixel. Knots extend two spacings past both ends so borders look like the
  middle. Two small matrix products are far cheaper than filtering or zooming a full-size array.
  """
  knots = np.arange(-2.0 * spacing, length + 2.0 * spacing + 1e-6, spacing)
  pixels = np.arange(length, dtype=np.float64)
  basis = np.exp(-0.5 * ((pixels[:, None] - knots[None, :]) / (0.6 * spacing)) ** 2)
  basis /= np.linalg.norm(basis, axis=1, keepdims=True)
  return basis.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, basis_y: np.ndarray, basis_x: np.ndarray,
                  count: int) -> np.ndarray:
  """Returns `count` independent smooth unit-variance fields, (count, H, W) float32."""
  coarse = rng.standard_normal((count, basis_y.shape[1], basis_x.shape[1]), dtype=np.float32)
  fields = np.empty((count, basis_y.shape[0], basis_x.shape[0]), np.float32)
  # Row blocks of about 2e5 multiply-adds stay under the size where BLAS (OpenBLAS at least)
  # goes multithreaded: one threaded product took ~15 ms on a busy 2-core machine against
  # ~0.1 ms for the blocks, for work this small.
  rows = max(1, 200_000 // (basis_x.shape[0] * basis_y.shape[1]))
  for field, knots in zip(fields, coarse):
    right = knots @ basis_x.T
    for start in range(0, basis_y.shape[0], rows):
      field[start:start + rows] = basis_y[start:start + rows] @ right
  return fields


def _seed_points(rng: np.random.Generator, height: int, width: int,
                 cell_diameter: float) -> np.ndarray:
  """Returns (S, 2) float64 (y, x) cell seeds: a jittered, rotated hexagonal lattice.

  The lattice covers the image plus a margin of two cells so that border cells are complete.
  A hexagonal lattice spaced `cell_diameter` apart gives cells of about that diameter; jitter,
  random dropping and a random rotation and shift per image hide its regularity.
  """
  margin = 2.0 * cell_diameter
  radius = 0.5 * math.hypot(height, width) + margin
  row_step = cell_diameter * math.sqrt(3.0) / 2.0
  rows = np.arange(-radius, radius + row_step, row_step)
  cols = np.arange(-radius, radius + cell_diameter, cell_diameter)
  ys, xs = np.meshgrid(rows, cols, indexing='ij')
  xs = xs + (np.arange(len(rows))[:, None] % 2) * (0.5 * cell_diameter)
  points = np.stack([ys.ravel(), xs.ravel()], axis=1)
  points += rng.uniform(-_SEED_JITTER, _SEED_JITTER, points.shape) * cell_diameter
  angle = rng.uniform(0.0, math.pi / 3.0)  # The hexagonal lattice has 60-degree symmetry.
  rotation = np.array([[math.cos(angle), -math.sin(angle)],
                       [math.sin(angle), math.cos(angle)]])
  # A random shift too, so the image centre is not always near a lattice point.
  shift = rng.uniform(-0.5, 0.5, 2) * cell_diameter
  points = points @ rotation.T + np.array([height / 2.0, width / 2.0]) + shift
  keep = ((points[:, 0] > -margin) & (points[:, 0] < height + margin) &
          (points[:, 1] > -margin) & (points[:, 1] < width + margin))
  keep &= rng.uniform(size=len(points)) >= _SEED_DROP
  return points[keep]


def _two_nearest(sample: np.ndarray, seeds: np.ndarray, tile: int = 8
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Finds the nearest and second-nearest seed of every sample point.

  Equivalent to `cKDTree(seeds).query(points, k=2)` but about twice as fast for this job,
  which dominates the generation time. The points are cut into tile x tile blocks; a block only
  has to compare against the seeds within `d2(centre) + 2 * reach` of its centre (`reach` = the
  largest distance of a block point from the centre), because by the triangle inequality no point
  of the block can have either of its two nearest seeds farther out. That leaves about ten
  candidates per block, compared in a short loop over whole arrays.

  Args:
    sample: (2, H, W) float32 (y, x) coordinates of the points.
    seeds: (S, 2) float64 (y, x) seed coordinates, S >= 2.
    tile: block side in points.

  Returns:
    `(dist1_sq, dist2_sq, index1, index2)`, each (H, W): float32 squared distances to the nearest
    and second-nearest seed and their intp indices into `seeds`.
  """
  _, height, width = sample.shape
  pad_h, pad_w = -height % tile, -width % tile
  if pad_h or pad_w:
    sample = np.pad(sample, ((0, 0), (0, pad_h), (0, pad_w)), mode='edge')
  tiles_h, tiles_w = sample.shape[1] // tile, sample.shape[2] // tile
  # (2, T, P): coordinates of the P = tile * tile points of each of the T blocks.
  points = sample.reshape(2, tiles_h, tile, tiles_w, tile).transpose(0, 1, 3, 2, 4).reshape(
      2, tiles_h * tiles_w, tile * tile)
  centres = points.mean(axis=2)
  reach = np.sqrt(((points - centres[:, :, None]) ** 2).sum(axis=0)).max(axis=1)
  tree = cKDTree(seeds)
  centre_second = tree.query(centres.T, k=2)[0][:, 1]
  lists = tree.query_ball_point(centres.T, centre_second + 2.0 * reach + 1e-3)
  lengths = np.array([len(found) for found in lists])
  # Pad each block's candidate list with a dummy seed far away, which never wins.
  candidates = np.full((len(lists), lengths.max()), len(seeds), dtype=np.intp)
  candidates[np.arange(lengths.max())[None, :] < lengths[:, None]] = np.concatenate(lists)
  padded_seeds = np.concatenate([seeds, np.full((1, 2), 1e6)]).astype(np.float32)

  point_y, point_x = points
  best1 = np.full(point_y.shape, np.inf, np.float32)
  best2 = best1.copy()
  index1 = np.zeros(point_y.shape, np.intp)
  index2 = index1.copy()
  for column in candidates.T:
    dist = ((point_y - padded_seeds[column, 0][:, None]) ** 2 +
            (point_x - padded_seeds[column, 1][:, None]) ** 2)
    index = np.broadcast_to(column[:, None], dist.shape)
    closer1 = dist < best1
    closer2 = dist < best2
    best2 = np.where(closer1, best1, np.where(closer2, dist, best2))
    index2 = np.where(closer1, index1, np.where(closer2, index, index2))
    best1 = np.where(closer1, dist, best1)
    index1 = np.where(closer1, index, index1)

  def untile(values: np.ndarray) -> np.ndarray:
    return values.reshape(tiles_h, tiles_w, tile, tile).transpose(0, 2, 1, 3).reshape(
        tiles_h * tile, tiles_w * tile)[:height, :width]

  return untile(best1), untile(best2), untile(index1), untile(index2)


def _render_organelles(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray,
                       seeds: np.ndarray, displacement: np.ndarray, cell_diameter: float,
                       organelles_per_cell: float) -> None:
  """Darkens small soft ellipses inside cells, in place on `canvas` (H, W) float32.

  Each organelle sits near its cell's seed and is shrunk (or dropped) so that its dark profile
  stays clear of every membrane pixel of `labels` (H, W) uint8: organelles are labelled interior
  and must not blur into a membrane. The loop is per organelle (a few dozen per image), each
  touching only a small patch.
  """
  height, width = canvas.shape
  shade = np.zeros_like(canvas)
  counts = rng.poisson(organelles_per_cell, size=len(seeds))
  for index in np.flatnonzero(counts):
    seed_y, seed_x = seeds[index]
    if not (0 <= seed_y < height and 0 <= seed_x < width):
      continue
    # The grid was sampled at p + displacement(p), so the seed shows up near s - displacement(s).
    iy, ix = int(seed_y), int(seed_x)
    centre_y = seed_y - displacement[0, iy, ix]
    centre_x = seed_x - displacement[1, iy, ix]
    for _ in range(counts[index]):
      offset = rng.uniform(0.0, 0.25 * cell_diameter)
      direction = rng.uniform(0.0, 2.0 * math.pi)
      radius = rng.uniform(*_ORGANELLE_RADIUS) * cell_diameter
      elongation = rng.uniform(1.0, 1.6)
      theta = rng.uniform(0.0, math.pi)
      depth = rng.uniform(*_ORGANELLE_DEPTH)
      cy = centre_y + offset * math.sin(direction)
      cx = centre_x + offset * math.cos(direction)
      half = int(math.ceil(radius * elongation + 4))
      y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, height)
      x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, width)
      if y0 >= y1 or x0 >= x1:
        continue
      py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
      u = (py - cy) * math.cos(theta) + (px - cx) * math.sin(theta)
      v = -(py - cy) * math.sin(theta) + (px - cx) * math.cos(theta)
      distance = np.sqrt((u / elongation) ** 2 + v ** 2)
      on_membrane = labels[y0:y1, x0:x1] == 0
      if on_membrane.any():
        # Two units of margin leave under 4 % of the depth on the nearest membrane pixel.
        radius = min(radius, float(distance[on_membrane].min()) - 2.0)
      if radius < 1.5:
        continue
      # A soft-edged disc: about one pixel of antialiased edge, like a real vesicle profile.
      profile = 1.0 / (1.0 + np.exp((distance - radius) / 0.6))
      np.maximum(shade[y0:y1, x0:x1], depth * profile, out=shade[y0:y1, x0:x1])
  # Overlapping organelles take the darker of the two rather than the sum, which could outdo
  # a membrane.
  canvas -= shade


def _make_one(seed: int, index: int, height: int, width: int, cell_diameter: float,
              membrane_width: float, organelles_per_cell: float, blur_sigma: float,
              noise_std: float, grid: np.ndarray, bases: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray]:
  """Draws image `index`: returns its (H, W) uint8 image and (H, W) uint8 labels."""
  # Organelles draw from their own stream, so changing organelles_per_cell leaves everything
  # else about the image (layout, labels, texture, noise) exactly as it was.
  rng, organelle_rng = (np.random.default_rng(child)
                        for child in np.random.SeedSequence([seed, index]).spawn(2))
  seeds = _seed_points(rng, height, width, cell_diameter)

  displacement = _WOBBLE_AMPLITUDE * cell_diameter * _smooth_noise(
      rng, bases['wobble_y'], bases['wobble_x'], 2)
  sample = grid + displacement
  # Blocks of about a third of a cell keep the candidate lists short (about ten seeds).
  tile = int(np.clip(round(cell_diameter / 3.5), 2, 16))
  dist1_sq, dist2_sq, owner, neighbour = _two_nearest(sample, seeds, tile)
  # Twice the distance to the bisector of the two nearest seeds, i.e. to the Voronoi edge
  # between them: (d2^2 - d1^2) / |s1 - s2|. Thresholding it at membrane_width gives a band of
  # that full width along every edge. (Thresholding d2 - d1 instead widens the band where the
  # point is off the line joining the seeds, which blots out short edges.)
  separation = np.linalg.norm(seeds[owner] - seeds[neighbour], axis=-1).astype(np.float32)
  separation = np.maximum(separation, 1e-6)  # Coincident seeds are possible in principle.
  gap = (dist2_sq - dist1_sq) / separation
  labels = np.where(gap < membrane_width, 0, 255).astype(np.uint8)

  num_seeds = len(seeds)
  cell_level = _INTERIOR_LEVEL + rng.normal(0.0, _CELL_LEVEL_STD, num_seeds).astype(np.float32)
  canvas = cell_level[owner]
  canvas += _TEXTURE_STD * ndimage.gaussian_filter(
      rng.standard_normal((height, width), dtype=np.float32), 1.0) / 0.28
  # Half dark at the label boundary, fully dark in the middle, fading out a little outside:
  # the membrane has a soft edge like in real EM, and the label edge sits at half contrast.
  darkness = np.clip((1.25 * membrane_width - gap) / (0.5 * membrane_width), 0.0, 1.0)
  # Membranes between different cell pairs stain differently.
  edge_strength = rng.uniform(0.75, 1.15, num_seeds).astype(np.float32)
  strength = 0.5 * (edge_strength[owner] + edge_strength[neighbour])
  canvas -= _MEMBRANE_DEPTH * strength * darkness

  if organelles_per_cell > 0:
    _render_organelles(organelle_rng, canvas, labels, seeds, displacement, cell_diameter,
                       organelles_per_cell)

  # Uneven illumination: a linear ramp in a random direction plus a slow smooth undulation.
  angle = rng.uniform(0.0, 2.0 * math.pi)
  ramp = (math.cos(angle) * (grid[0] / height - 0.5) +
          math.sin(angle) * (grid[1] / width - 0.5))
  canvas += rng.uniform(0.0, 30.0) * ramp
  canvas += rng.uniform(2.0, 8.0) * _smooth_noise(rng, bases['light_y'], bases['light_x'], 1)[0]

  if blur_sigma > 0:
    canvas = ndimage.gaussian_filter(canvas, blur_sigma)
  if noise_std > 0:
    canvas += noise_std * rng.standard_normal((height, width), dtype=np.float32)
  image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
  return image, labels


def make_em_like(num_images: int, size: int | tuple[int, int] = 256, *, seed: int = 0,
                 cell_diameter: float = 28.0, membrane_width: float = 3.0,
                 organelles_per_cell: float = 0.5, blur_sigma: float = 1.0,
                 noise_std: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
  """Draws EM-like images of cells and their membrane labels.

  Args:
    num_images: how many images to draw (>= 1).
    size: image side in pixels, or a (height, width) pair.
    seed: non-negative integer; image i is drawn from `np.random.SeedSequence([seed, i])` alone,
      so it is the same whatever `num_images` is.
    cell_diameter: typical distance in pixels between neighbouring cell centres.
    membrane_width: width in pixels of the membrane band (label 0) between two cells. Must be
      less than half of `cell_diameter`.
    organelles_per_cell: mean number of dark round organelles per cell (Poisson). They are
      labelled interior (255), so the net has to learn membrane shape rather than darkness.
    blur_sigma: standard deviation in pixels of the Gaussian blur (0 turns it off).
    noise_std: standard deviation of the additive Gaussian noise, in grey levels (0 = none).

  Returns:
    `(images, labels)`, both `(num_images, H, W) uint8`. Images are grayscale; labels use the
    ISBI 2012 polarity: 255 = cell interior, 0 = membrane. With the defaults about 20 % of the
    pixels are membrane, which is darker than the interior by about 40 grey levels on average
    (ISBI 2012: 22 %, and 85 against 138).

  Raises:
    ValueError: if an argument is out of range; the message names it.
  """
  num_images = _check_positive_int('num_images', num_images)
  height, width = _parse_size(size)
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  cell_diameter = _check_float('cell_diameter', cell_diameter, positive=True)
  membrane_width = _check_float('membrane_width', membrane_width, positive=True)
  organelles_per_cell = _check_float('organelles_per_cell', organelles_per_cell, positive=False)
  blur_sigma = _check_float('blur_sigma', blur_sigma, positive=False)
  noise_std = _check_float('noise_std', noise_std, positive=False)
  if cell_diameter <= 2.0 * membrane_width:
    raise ValueError(f'cell_diameter ({cell_diameter}) must be more than twice membrane_width '
                     f'({membrane_width}), or membranes would fill the cells')

  grid = np.stack(np.meshgrid(np.arange(height, dtype=np.float32),
                              np.arange(width, dtype=np.float32), indexing='ij'))
  wobble = _WOBBLE_LENGTH * cell_diameter
  light = 0.5 * max(height, width)
  bases = {
      'wobble_y': _gaussian_basis(height, wobble),
      'wobble_x': _gaussian_basis(width, wobble),
      'light_y': _gaussian_basis(height, light),
      'light_x': _gaussian_basis(width, light),
  }
  images = np.empty((num_images, height, width), np.uint8)
  labels = np.empty((num_images, height, width), np.uint8)
  for index in range(num_images):
    images[index], labels[index] = _make_one(
        int(seed), index, height, width, cell_diameter, membrane_width, organelles_per_cell,
        blur_sigma, noise_std, grid, bases)
  return images, labels


def describe(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Summarises an image/label set in ISBI polarity (255 = interior, 0 = membrane).

  Args:
    images: (..., H, W) grayscale, any numeric dtype.
    labels: same shape as `images`, values in {0, 255}.

  Returns:
    A dict with 'membrane_fraction' (share of pixels labelled 0), and 'membrane_mean' and
    'interior_mean' (mean image intensity over each class; NaN when a class is absent).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.shape != labels.shape:
    raise ValueError(f'images shape {images.shape} differs from labels shape {labels.shape}')
  membrane = labels == 0
  values = images.astype(np.float64)
  num_membrane = int(membrane.sum())
  num_interior = membrane.size - num_membrane
  return {
      'membrane_fraction': num_membrane / membrane.size if membrane.size else float('nan'),
      'membrane_mean': float(values[membrane].mean()) if num_membrane else float('nan'),
      'interior_mean': float(values[~membrane].mean()) if num_interior else float('nan'),
  }
