"""Post-processing of predicted probability maps (numpy/scipy, on the host).

Shapes: probabilities `(*spatial, C)` float; class maps `(*spatial)` integer class ids; masks
`(*spatial)` bool; instance labels `(*spatial)` int32 with 0 for background and 1..K for the
objects in raster order of their first pixel. Every function works in 2D and 3D.

Connectivity follows scipy.ndimage: 1 joins pixels that share a face (4-neighbours in 2D,
6 in 3D), `ndim` joins every pixel of the 3×3(×3) neighbourhood (8 in 2D, 26 in 3D).
For hole filling the connectivity is that of the *background*: a hole is a background
component that does not reach the image border.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def structure(ndim: int, connectivity: int) -> np.ndarray:
  """The scipy.ndimage structuring element of `connectivity` (1..ndim) in `ndim` dims."""
  if not 1 <= connectivity <= ndim:
    raise ValueError(f'connectivity={connectivity} must be in 1..{ndim} for {ndim}D arrays')
  return ndimage.generate_binary_structure(ndim, connectivity)


def to_classes(probabilities: np.ndarray, *, threshold: float | None = None,
               foreground: int = 1) -> np.ndarray:
  """Class ids `(*spatial)` uint8: the argmax, or `foreground` where its probability ≥ threshold.

  With a threshold the result is binary (0 or `foreground`), the usual way to trade precision
  for recall of one structure (e.g. ISBI membranes).
  """
  probabilities = np.asarray(probabilities)
  classes = probabilities.shape[-1]
  if classes > 256:
    raise ValueError(f'{classes} classes do not fit the uint8 class map')
  if threshold is None:
    return np.argmax(probabilities, axis=-1).astype(np.uint8)
  if not 0 <= foreground < classes:
    raise ValueError(f'foreground={foreground} is not a class of a {classes}-class map')
  return np.where(probabilities[..., foreground] >= threshold, foreground, 0).astype(np.uint8)


def component_sizes(labels: np.ndarray) -> np.ndarray:
  """Pixels per label id (index 0 = background) of a label image."""
  return np.bincount(labels.ravel())


def remove_small_components(mask: np.ndarray, min_size: int, *, connectivity: int = 1
                            ) -> np.ndarray:
  """`mask` without its connected components of fewer than `min_size` pixels."""
  mask = np.asarray(mask, bool)
  if min_size <= 1:
    return mask.copy()
  labels, _ = ndimage.label(mask, structure(mask.ndim, connectivity))
  keep = component_sizes(labels) >= min_size
  keep[0] = False
  return keep[labels]


def fill_holes(mask: np.ndarray, *, max_size: int | None = None, connectivity: int = 1
               ) -> np.ndarray:
  """`mask` with its holes filled: background components that do not touch the border.

  Args:
    mask: bool `(*spatial)`.
    max_size: fill only holes of at most this many pixels (None: every hole), so that e.g. a
      cell enclosed by membrane is not mistaken for a hole in the membrane.
    connectivity: connectivity of the background (1 matches scipy's binary_fill_holes).
  """
  mask = np.asarray(mask, bool)
  background, count = ndimage.label(~mask, structure(mask.ndim, connectivity))
  if count == 0:
    return mask.copy()
  touches_border = np.zeros(count + 1, bool)
  for axis in range(mask.ndim):
    for face in (0, -1):
      touches_border[np.take(background, face, axis=axis)] = True
  is_hole = ~touches_border
  is_hole[0] = False  # label 0 is the mask itself
  if max_size is not None:
    is_hole &= component_sizes(background) <= max_size
  return mask | is_hole[background]


def label_instances(mask: np.ndarray, *, connectivity: int = 1, min_size: int = 0
                    ) -> np.ndarray:
  """Instance ids int32 `(*spatial)`: 0 background, 1..K components of `mask` (≥ min_size)."""
  mask = remove_small_components(mask, min_size, connectivity=connectivity)
  labels, _ = ndimage.label(mask, structure(mask.ndim, connectivity))
  return labels.astype(np.int32)


def clean_classes(classes: np.ndarray, *, min_size: int = 0, hole_size: int = 0,
                  background: int = 0, connectivity: int = 1) -> np.ndarray:
  """A class map with small components removed and small holes filled, class by class.

  For every class other than `background` (in increasing id order): its components smaller than
  `min_size` become background, then background holes of at most `hole_size` pixels enclosed by
  it take its id. Pixels of other classes are never changed into a foreground class.
  """
  out = np.array(classes, copy=True)
  for c in np.unique(out):
    if c == background:
      continue
    mask = out == c
    kept = remove_small_components(mask, min_size, connectivity=connectivity)
    out[mask & ~kept] = background
    if hole_size > 0:
      # The background of a face-connected class is fully connected and vice versa (the
      # usual digital-topology pairing), so a hole is sealed exactly when the class encloses it.
      filled = fill_holes(kept, max_size=hole_size,
                          connectivity=mask.ndim if connectivity == 1 else 1)
      out[filled & ~kept & (out == background)] = c
  return out


def postprocess(probabilities: np.ndarray, *, threshold: float | None = None,
                foreground: int = 1, min_size: int = 0, hole_size: int = 0,
                connectivity: int = 1) -> np.ndarray:
  """Probabilities → cleaned uint8 class map: `to_classes`, then `clean_classes`."""
  classes = to_classes(probabilities, threshold=threshold, foreground=foreground)
  return clean_classes(classes, min_size=min_size, hole_size=hole_size,
                       connectivity=connectivity)


__all__ = ['clean_classes', 'component_sizes', 'fill_holes', 'label_instances', 'postprocess',
           'remove_small_components', 'structure', 'to_classes']
