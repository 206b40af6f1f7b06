"""The ISBI 2012 EM challenge metrics: pixel error, Rand error and warping error, on the host.

Shape conventions: `membrane_probability` is float `(N, H, W)` in `[0, 1]` (the softmax
probability of class 1); `labels` is integer `(N, H, W)` with this project's class ids: 1 =
membrane, 0 = cell interior, -1 = ignored. The challenge's label images are the same data with
255 = cell and 0 = membrane; a prediction is binarised as membrane where `p > t`, which is the
argmax of a two-class softmax at `t = 0.5`.

The three numbers follow the challenge's Fiji evaluation (Trainable Weka Segmentation's
`PixelError`, `RandError` and `WarpingError`), with their conventions:

* `isbi_pixel_error` = 1 - max_t F(t), the F-score of pixel similarity with **cell interior as
  the positive class** (the challenge's labels are > 0 there). Precision is taken as 1 when there
  are no false positives and recall as 1 when there are no false negatives, as in the challenge.
* `isbi_rand_error` = 1 - max_t of the foreground-restricted Rand F-score. The true segments are
  the 4-connected components of true cell interior; the predicted segments are the 4-connected
  components of the predicted cell interior (`p <= t`). Only pixels of true cell interior are
  counted (true membrane, "background", is left out), and a predicted-membrane pixel there is a
  segment of its own. With `n_ij` the number of counted pixels in true segment i and predicted
  segment j, `a_i`, `b_j` the row and column sums (`b_j` over j ≥ 1 only):

    F = 2 * sum(n_ij^2 - n_ij) / (sum(a_i^2 - a_i) + sum(b_j^2 - b_j))

  i.e. the F-score of pixel pairs "in the same segment" without self-pairs, the form that
  `skimage.metrics.adapted_rand_error` computes. A set with no pixel pairs at all scores F = 1.
* `isbi_vrand` and `isbi_vinfo`: the challenge's current leaderboard scores (thinned_scores.py),
  foreground-restricted Rand and information F-scores after thinning the predicted borders to
  one-pixel lines, averaged over slices and maximised over the challenge's thresholds 0.0, 0.1,
  ..., 1.0 of the cell probability 1 - p; higher is better.
* `isbi_warping_error` (Jain et al., CVPR 2010) at the fixed threshold 0.5: the true membrane
  mask is warped towards the prediction by flipping only *simple* pixels (whose flip changes no
  topology, cells 4-connected and membrane 8-connected, the image surrounded by membrane), and
  the error is the fraction of pixels that still disagree. Shifted boundaries therefore cost
  nothing, while merges, splits and added or missing objects leave pixels that cannot flip.

Accumulation: every count (pixel TP/FP/FN per threshold, Rand pair sums per threshold, warping
mismatches) is summed over all images before the maximum over thresholds is taken, so a set's
score equals that of its slices stacked into one volume with 2D segments, not a mean of per-slice
maxima. Ignored pixels count nowhere; in the warping they take the predicted value, so they are
never mismatched but do take part in the topology of their neighbourhood.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from unet_jax.evaluation import thinned_scores

DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95
WARPING_THRESHOLD = 0.5
# Row and column offsets of the 8 neighbours; neighbour k sets bit k of a 3 x 3 code.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity
_SQUARE = ndimage.generate_binary_structure(2, 2)  # 8-connectivity
# Priority levels of the warping: flips of confident mismatches are tried first.
_WARPING_LEVELS = 8


@functools.cache
def simple_point_table() -> np.ndarray:
  """`(256,)` bool: whether a pixel with this 8-neighbour code is simple.

  Bit k of the code is set when neighbour `_NEIGHBOURS[k]` is cell interior. Following
  Bertrand & Malandain (1994), a pixel is simple for (4-connected cells, 8-connected membrane)
  iff exactly one 4-connected component of the cell neighbours is 4-adjacent to it and the
  membrane neighbours form exactly one 8-connected component. The pixel's own value does not
  enter, so the same table serves both flip directions.
  """
  table = np.zeros(256, bool)
  four_neighbours = [k for k, (dy, dx) in enumerate(_NEIGHBOURS) if abs(dy) + abs(dx) == 1]
  for code in range(256):
    cells = np.zeros((3, 3), bool)
    membrane = np.zeros((3, 3), bool)
    for k, (dy, dx) in enumerate(_NEIGHBOURS):
      cells[1 + dy, 1 + dx] = bool(code >> k & 1)
      membrane[1 + dy, 1 + dx] = not code >> k & 1
    cell_components, _ = ndimage.label(cells, structure=_CROSS)
    touching = {cell_components[1 + _NEIGHBOURS[k][0], 1 + _NEIGHBOURS[k][1]]
                for k in four_neighbours} - {0}
    _, membrane_count = ndimage.label(membrane, structure=_SQUARE)
    table[code] = len(touching) == 1 and membrane_count == 1
  return table


def warp_truth(
    truth_membrane: np.ndarray,
    predicted_membrane: np.ndarray,
    *,
    priority: np.ndarray | None = None,
) -> np.ndarray:
  """Warps a true membrane mask towards a predicted one by flipping simple pixels only.

  Greedy, as in Jain et al. and the challenge's implementation: mismatched pixels are flipped
  while they are simple, most confident first, until no mismatched pixel is simple. It runs
  vectorised: pixels of one parity class (row % 2, column % 2) have disjoint 8-neighbourhoods, so
  all simple mismatches of a class flip at once with the same result as flipping them one by one.
  Priorities are taken in `_WARPING_LEVELS` quantile levels, each swept to a fixed point before
  the next admits less confident pixels. The final sweep admits all, so on return no mismatched
  pixel is simple, and the result has the topology of `truth_membrane`.

  Args:
    truth_membrane: boolean `(H, W)`, True on membrane.
    predicted_membrane: boolean `(H, W)`, True on membrane.
    priority: optional float `(H, W)`, e.g. `|p - 0.5|`; higher flips earlier.

  Returns:
    The warped boolean `(H, W)` membrane mask.
  """
  truth_membrane = np.asarray(truth_membrane, bool)
  predicted_membrane = np.asarray(predicted_membrane, bool)
  if truth_membrane.ndim != 2 or truth_membrane.shape != predicted_membrane.shape:
    raise ValueError(
        f'truth of shape {truth_membrane.shape} and prediction of shape '
        f'{predicted_membrane.shape} must be the same (H, W)')
  height, width = truth_membrane.shape
  stride = width + 2
  # Cells are True; the one-pixel frame stays False, i.e. the image is surrounded by membrane.
  padded = np.zeros((height + 2, stride), bool)
  padded[1:-1, 1:-1] = ~truth_membrane
  cells = padded.reshape(-1)
  mismatched = np.flatnonzero(truth_membrane != predicted_membrane)
  rows, cols = np.divmod(mismatched, width)
  index = (rows + 1) * stride + cols + 1
  parity = (rows % 2) * 2 + cols % 2
  offsets = np.array([dy * stride + dx for dy, dx in _NEIGHBOURS])
  bits = (1 << np.arange(8)).astype(np.uint8)
  table = simple_point_table()
  if priority is None or index.size == 0:
    rank = np.zeros(index.size)
    levels = [0.0]
  else:
    rank = np.asarray(priority, np.float64).reshape(-1)[mismatched]
    levels = np.unique(np.quantile(rank, np.linspace(1, 0, _WARPING_LEVELS + 1)[1:]))[::-1]
  pending = np.ones(index.size, bool)
  for level in levels:
    admitted = rank >= level
    flipped = True
    while flipped:
      flipped = False
      for phase in range(4):
        chosen = np.flatnonzero(pending & admitted & (parity == phase))
        if chosen.size == 0:
          continue
        where = index[chosen]
        codes = (cells[where[:, None] + offsets] * bits).sum(axis=1)
        simple = table[codes]
        if simple.any():
          cells[where[simple]] = ~cells[where[simple]]
          pending[chosen[simple]] = False
          flipped = True
  return ~padded[1:-1, 1:-1]


def _f_score(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
  """F-score with the challenge's conventions: no FP means precision 1, no FN recall 1."""
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  with np.errstate(divide='ignore', invalid='ignore'):
    precision = np.where(fp == 0, 1.0, tp / (tp + fp))
    recall = np.where(fn == 0, 1.0, tp / (tp + fn))
    f = 2 * precision * recall / (precision + recall)
  return np.where(precision + recall > 0, f, 0.0)


def _pair_sum(counts: np.ndarray) -> int:
  """`sum(c^2 - c)`: ordered pairs of distinct pixels within each group."""
  counts = counts.astype(np.int64)
  return int(np.sum(counts * counts) - np.sum(counts))


def _rand_pair_sums(truth_ids: np.ndarray, counted: np.ndarray,
                    predicted_cells: np.ndarray) -> tuple[int, int]:
  """`(sum over n_ij, sum over b_j)` pair sums of one image at one threshold.

  `truth_ids` are the true segment ids (≥ 1) of the `counted` (true cell) pixels, in C order.
  """
  predicted, _ = ndimage.label(predicted_cells, structure=_CROSS)
  predicted_ids = predicted[counted].astype(np.int64)
  # Predicted-membrane pixels are singletons: they form no pair with anything.
  in_segment = predicted_ids > 0
  if not in_segment.any():
    return 0, 0
  truth_in, predicted_in = truth_ids[in_segment], predicted_ids[in_segment]
  joint = thinned_scores.joint_counts(truth_in, predicted_in)
  return _pair_sum(joint), _pair_sum(np.bincount(predicted_in))


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
  values = np.asarray(thresholds, np.float64)
  if (values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values))
      or np.any(np.diff(values) <= 0)):
    raise ValueError(f'thresholds must be a non-empty increasing sequence; got {thresholds}')
  return values


class ISBIAccumulator:
  """Host-side running sums of the ISBI 2012 challenge metrics over an evaluation set.

  Typical use: `update(membrane_probability, labels)` once per batch, then `result()`. A
  512 x 512 slice takes about 0.1-0.2 s with the 19 default thresholds, mostly the connected
  components of the Rand error.
  """

  def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS):
    """`thresholds`: increasing membrane-probability thresholds for the pixel and Rand errors."""
    self._thresholds = _check_thresholds(thresholds)
    self.reset()

  def reset(self) -> None:
    """Forgets everything added so far."""
    size = self._thresholds.size
    self._pixel = np.zeros((3, size), np.int64)  # TP, FP, FN of cell interior per threshold
    self._rand_joint = np.zeros(size, np.int64)
    self._rand_predicted = np.zeros(size, np.int64)
    self._rand_truth = 0
    self._warping_mismatches = 0
    self._valid_pixels = 0
    self._thinned = np.zeros((len(thinned_scores.CHALLENGE_THRESHOLDS), 2))  # summed per slice
    self._images = 0

  def update(self, membrane_probability: np.ndarray, labels: np.ndarray) -> None:
    """Adds float `(N, H, W)` membrane probabilities and their `(N, H, W)` labels in {-1, 0, 1}."""
    probability = np.asarray(membrane_probability)
    labels = np.asarray(labels)
    if probability.ndim != 3 or probability.shape != labels.shape:
      raise ValueError(
          f'membrane_probability of shape {probability.shape} and labels of shape '
          f'{labels.shape} must both be (N, H, W)')
    if not np.issubdtype(probability.dtype, np.floating):
      raise ValueError(f'membrane_probability must be floating; got {probability.dtype}')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'labels must have an integer dtype; got {labels.dtype}')
    if not np.all(np.isfinite(probability)):
      raise ValueError('membrane_probability has non-finite values')
    if labels.size and (labels.min() < -1 or labels.max() > 1):
      unexpected = np.setdiff1d(np.unique(labels), [-1, 0, 1])
      raise ValueError(
          f'labels must be 1 (membrane), 0 (cell) or -1 (ignored); got {unexpected.tolist()}')
    for image_probability, image_labels in zip(probability, labels):
      self._add_image(image_probability.astype(np.float64), image_labels)

  def _add_image(self, probability: np.ndarray, labels: np.ndarray) -> None:
    cells = labels == 0
    valid = labels >= 0
    thresholds = self._thresholds
    # Pixel counts for every threshold at once: predicted cell where p <= t.
    cell_p = np.sort(probability[cells])
    membrane_p = np.sort(probability[labels == 1])
    tp = np.searchsorted(cell_p, thresholds, side='right')
    fp = np.searchsorted(membrane_p, thresholds, side='right')
    self._pixel += np.stack([tp, fp, cell_p.size - tp])

    truth_segments, _ = ndimage.label(cells, structure=_CROSS)
    truth_ids = truth_segments[cells].astype(np.int64)
    # The true pair sum does not depend on the threshold.
    self._rand_truth += _pair_sum(np.bincount(truth_ids))
    for i, threshold in enumerate(thresholds):
      joint, predicted = _rand_pair_sums(truth_ids, cells, probability <= threshold)
      self._rand_joint[i] += joint
      self._rand_predicted[i] += predicted

    predicted_membrane = probability > WARPING_THRESHOLD
    truth_membrane = np.where(valid, labels == 1, predicted_membrane)
    warped = warp_truth(truth_membrane, predicted_membrane,
                        priority=np.abs(probability - WARPING_THRESHOLD))
    self._warping_mismatches += int(np.sum((warped != predicted_membrane) & valid))
    self._valid_pixels += int(valid.sum())
    self._thinned += thinned_scores.slice_scores(truth_segments, 1 - probability)
    self._images += 1

  def result(self) -> dict[str, float]:
    """The three errors and the thresholds at which the pixel and Rand F-scores peak.

    Returns:
      `isbi_pixel_error`, `isbi_pixel_threshold`, `isbi_rand_error`, `isbi_rand_threshold`,
      `isbi_warping_error` (NaN if no pixel was valid), `isbi_vrand`, `isbi_vrand_threshold`,
      `isbi_vinfo`, `isbi_vinfo_threshold` (thresholds of the cell probability), all Python
      floats. Ties between thresholds go to the lowest.

    Raises:
      ValueError: if nothing was accumulated.
    """
    if not self._images:
      raise ValueError('nothing accumulated yet')
    pixel_f = _f_score(*self._pixel)
    denominator = self._rand_truth + self._rand_predicted
    with np.errstate(divide='ignore', invalid='ignore'):
      rand_f = np.where(denominator > 0, 2 * self._rand_joint / denominator, 1.0)
    best_pixel, best_rand = int(np.argmax(pixel_f)), int(np.argmax(rand_f))
    warping = (self._warping_mismatches / self._valid_pixels if self._valid_pixels
               else math.nan)
    thinned = self._thinned / self._images  # the challenge averages slices, then maximises
    best_vrand, best_vinfo = (int(i) for i in np.argmax(thinned, axis=0))
    return {
        'isbi_pixel_error': float(1 - pixel_f[best_pixel]),
        'isbi_pixel_threshold': float(self._thresholds[best_pixel]),
        'isbi_rand_error': float(1 - rand_f[best_rand]),
        'isbi_rand_threshold': float(self._thresholds[best_rand]),
        'isbi_warping_error': float(warping),
        'isbi_vrand': float(thinned[best_vrand, 0]),
        'isbi_vrand_threshold': thinned_scores.CHALLENGE_THRESHOLDS[best_vrand],
        'isbi_vinfo': float(thinned[best_vinfo, 1]),
        'isbi_vinfo_threshold': thinned_scores.CHALLENGE_THRESHOLDS[best_vinfo],
    }


def isbi_scores(
    membrane_probability: np.ndarray,
    labels: np.ndarray,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, float]:
  """`ISBIAccumulator.result()` of one `(N, H, W)` stack."""
  accumulator = ISBIAccumulator(thresholds)
  accumulator.update(membrane_probability, labels)
  return accumulator.result()
