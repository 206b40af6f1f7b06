"""The U-Net paper's pixel weight map (Ronneberger et al. 2015, eq. 2) and instance labelling.

  w(x) = w_c(x) + w0 · exp(-(d1(x) + d2(x))² / (2σ²))

w_c balances the class frequencies of background and cells; d1 and d2 are the distances from x
to the border of the nearest and the second-nearest cell (instance). The border term is added on
background pixels only: the paper wants the network to learn the thin background gaps that
separate touching cells, and on a cell pixel d1 = 0 would put weight inside cells next to a
neighbour instead. Shapes: instances (*spatial) integer ids, rank 2 or 3; the map has the same
shape, float32. For ISBI 2012 (cells = class 0 'interior', membrane = class 1) the instances are
`instances_from_binary(labels == 0)`.

Distances are exact: each cell gets one Euclidean distance transform over its bounding box grown
by a margin beyond which the term cannot exceed `tolerance`; farther pixels count as infinitely
far, which changes w by at most `tolerance`. A 512×512 ISBI slice (~200 cells) takes well under
a second, so a pipeline can compute it once per image and cache it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi


def instances_from_binary(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
  """Connected components of a cell mask: int32 ids 1..K, background 0.

  connectivity: 1 joins face neighbours only (4 in 2D, 6 in 3D), `mask.ndim` all neighbours.
  """
  if not 1 <= connectivity <= mask.ndim:
    raise ValueError(f'connectivity={connectivity} must be in 1..{mask.ndim} for a '
                     f'{mask.ndim}D mask')
  structure = ndi.generate_binary_structure(mask.ndim, connectivity)
  labels, _ = ndi.label(np.asarray(mask, bool), structure)
  return labels.astype(np.int32)


def class_weight_map(cells: np.ndarray,
                     class_weights: str | Sequence[float] = 'balanced') -> np.ndarray:
  """w_c: weight of background (cells False) and cell (True) pixels, float32.

  'balanced' gives each class present the same total weight with mean weight 1:
  w_c = n_pixels / (n_classes_present · n_pixels_of_class). A pair sets (background, cell).
  """
  if isinstance(class_weights, str):
    if class_weights != 'balanced':
      raise ValueError(f"class_weights={class_weights!r} must be 'balanced' or a pair "
                       '(background weight, cell weight)')
    counts = np.array([cells.size - np.count_nonzero(cells), np.count_nonzero(cells)])
    present = counts > 0
    weights = np.where(present, cells.size / (present.sum() * np.maximum(counts, 1)), 0.0)
  else:
    weights = np.asarray(class_weights, np.float64)
    if weights.shape != (2,):
      raise ValueError(f'class_weights={class_weights!r} must be "balanced" or a pair '
                       '(background weight, cell weight)')
  return weights.astype(np.float32)[cells.astype(np.intp)]


def nearest_two_distances(ids: np.ndarray, num: int, margin: float) -> tuple[np.ndarray, ...]:
  """d1, d2: distances to the nearest and second-nearest of cells 1..num in `ids` (0 elsewhere),
  exact up to `margin`, inf beyond it."""
  d1 = np.full(ids.shape, np.inf)
  d2 = np.full(ids.shape, np.inf)
  pad = int(math.ceil(margin))
  for cell, box in enumerate(ndi.find_objects(ids, max_label=num), start=1):
    if box is None:
      continue
    window = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n))
                   for s, n in zip(box, ids.shape))
    # Every pixel of the cell lies in its box, so inside the window the transform is exact.
    d = ndi.distance_transform_edt(ids[window] != cell)
    near, second = d1[window], d2[window]
    second[...] = np.minimum(second, np.maximum(near, d))
    near[...] = np.minimum(near, d)
  return d1, d2


def border_weight_map(instances: np.ndarray, *, w0: float = 10.0, sigma: float = 5.0,
                      class_weights: str | Sequence[float] = 'balanced', background: int = 0,
                      tolerance: float = 1e-6) -> np.ndarray:
  """The paper's weight map for an instance image.

  Args:
    instances: (*spatial) integer ids; `background` marks pixels that belong to no cell. Ids
      need not be contiguous.
    w0, sigma: height and width (px) of the separation-border term (paper: 10 and ~5).
    class_weights: 'balanced' or (background, cell) weights; see class_weight_map.
    background: the id of background pixels.
    tolerance: largest error allowed in the border term (sets the distance margin).

  Returns:
    (*spatial) float32 w_c(x) plus, on background pixels, w0·exp(-(d1 + d2)² / (2σ²)).
  """
  instances = np.asarray(instances)
  if instances.ndim not in (2, 3) or not np.issubdtype(instances.dtype, np.integer):
    raise ValueError(f'instances must be a 2D or 3D integer array, got {instances.dtype} '
                     f'{instances.shape}')
  if w0 < 0 or sigma < 0:
    raise ValueError(f'w0={w0} and sigma={sigma} must be >= 0')
  cells = instances != background
  weights = class_weight_map(cells, class_weights)
  ids_present, ids = np.unique(instances, return_inverse=True)
  ids = ids.reshape(instances.shape)
  # Compact ids with background 0 and cells 1..K.
  has_background = bool(np.any(ids_present == background))
  if has_background:
    bg_index = int(np.searchsorted(ids_present, background))
    ids = np.where(ids < bg_index, ids + 1, ids)
    ids[~cells] = 0
  else:
    ids = ids + 1
  num = len(ids_present) - int(has_background)
  if num < 2 or w0 <= tolerance or sigma == 0 or not has_background:
    return weights
  # (d1 + d2) > margin makes the term < tolerance; d1 <= d2, so d2 <= margin suffices.
  margin = sigma * math.sqrt(2.0 * math.log(w0 / tolerance))
  d1, d2 = nearest_two_distances(ids.astype(np.int32), num, margin)
  gap = ~cells & np.isfinite(d2)
  weights[gap] += (w0 * np.exp(-(d1[gap] + d2[gap])**2 / (2.0 * sigma**2))).astype(np.float32)
  return weights
