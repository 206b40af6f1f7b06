"""V_rand and V_info: the ISBI 2012 leaderboard's foreground-restricted scores after border thinning.

Arganda-Carreras et al., "Crowdsourcing the creation of image segmentation algorithms for
connectomics", Front. Neuroanat. 2015, and the challenge's Fiji evaluation (Trainable Weka
Segmentation's `RandError.getMaximalVRandAfterThinning` and
`VariationOfInformation.getMaximalVInfoAfterThinning`):

1. The true segments A are the 4-connected components of the true cell interior; true membrane
   is "out" space and is not counted (the foreground restriction): n is the number of true
   cell pixels.
2. The proposal is binarised at a threshold and its membrane is thinned to one-pixel lines: a
   4-connected watershed floods the membrane from the predicted cells, so each predicted cell
   grows until it meets its neighbours (`thin_borders`). The predicted segments B are the
   flooded regions; a pixel left on a line is a segment of its own.
3. With p_ij the fraction of the n pixels in true segment i and predicted segment j, a_i and
   b_j its sums, and the line pixels as singletons:

     V_rand = 2 Σ p_ij² / (Σ a_i² + Σ b_j²)
     V_info = 2 P R / (P + R),  P = I(A; B) / H(A),  R = I(A; B) / H(B)

   (F-scores of pairs of pixels in the same segment, and of mutual information; 1 is perfect.)
4. Each score is averaged over the slices of a stack at every threshold, and the best threshold
   counts: the challenge sweeps 0.0, 0.1, ..., 1.0.

Shapes: `predicted_cells` boolean `(H, W)`, True where the proposal says cell; segment images
are int `(H, W)`, 0 = none.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import segmentation

CHALLENGE_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
_CROSS = ndimage.generate_binary_structure(2, 1)
# Key spaces up to this size are counted with bincount, larger ones by sorting.
_DENSE_CONTINGENCY = 1 << 22


def joint_counts(truth_ids: np.ndarray, predicted_ids: np.ndarray) -> np.ndarray:
  """Pixel counts of the (true, predicted) segment pairs that occur, for the int ids ≥ 0 of the
  same pixels (the non-empty cells of their contingency table, in no particular order)."""
  width = int(predicted_ids.max(initial=0)) + 1
  keys = truth_ids.astype(np.int64) * width + predicted_ids
  size = (int(truth_ids.max(initial=0)) + 1) * width
  if size <= _DENSE_CONTINGENCY:
    counts = np.bincount(keys, minlength=size)
    return counts[counts > 0]
  return np.unique(keys, return_counts=True)[1]


def thin_borders(predicted_cells: np.ndarray) -> np.ndarray:
  """Segments of a binary proposal with its borders thinned to one-pixel watershed lines.

  Returns int `(H, W)`: the 4-connected predicted cells flooded over the border pixels (4
  connectivity), 0 on the lines where two floods meet, and 0 everywhere when no pixel is cell.
  """
  predicted_cells = np.asarray(predicted_cells, bool)
  markers, count = ndimage.label(predicted_cells, structure=_CROSS)
  if count == 0:
    return np.zeros(predicted_cells.shape, np.int64)
  # A flat landscape: every border pixel is one step above the cells, so the floods advance in
  # breadth-first order and meet halfway across each border.
  return segmentation.watershed((~predicted_cells).astype(np.uint8), markers=markers,
                                connectivity=1, watershed_line=True).astype(np.int64)


def _contingency(truth_segments: np.ndarray, predicted_segments: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
  """(joint counts of i ≥ 1, j ≥ 1; a_i counts; b_j counts; singletons; n) over true cells."""
  counted = truth_segments > 0
  truth = truth_segments[counted].astype(np.int64)
  predicted = predicted_segments[counted].astype(np.int64)
  n = int(truth.size)
  singletons = int(np.sum(predicted == 0))
  in_segment = predicted > 0
  joint = joint_counts(truth[in_segment], predicted[in_segment])
  a = np.bincount(truth)[1:]
  b = np.bincount(predicted[in_segment])[1:] if in_segment.any() else np.zeros(0, np.int64)
  return joint, a[a > 0], b[b > 0], singletons, n


def vrand(truth_segments: np.ndarray, predicted_segments: np.ndarray) -> float:
  """Foreground-restricted Rand F-score of two segment images (0: true out space, predicted
  line pixels); 1.0 when there is no true cell pixel."""
  joint, a, b, singletons, n = _contingency(truth_segments, predicted_segments)
  if n == 0:
    return 1.0
  squares = lambda counts: float(np.sum(counts.astype(np.float64) ** 2))
  both = squares(joint) + singletons
  return 2 * both / (squares(a) + squares(b) + singletons)


def vinfo(truth_segments: np.ndarray, predicted_segments: np.ndarray) -> float:
  """Foreground-restricted information-theoretic F-score of two segment images (natural log);
  by the challenge's convention 0 when either side is one segment (zero entropy)."""
  joint, a, b, singletons, n = _contingency(truth_segments, predicted_segments)
  if n == 0:
    return 1.0
  plogp = lambda counts: float(np.sum((c := counts / n) * np.log(c))) if counts.size else 0.0
  singleton_term = singletons / n * math.log(1 / n) if singletons else 0.0
  h_a = -plogp(a)
  h_b = -(plogp(b) + singleton_term)
  h_ab = -(plogp(joint) + singleton_term)
  mutual = h_a + h_b - h_ab
  # The challenge's conventions when one side carries no information.
  if h_b == 0:
    precision, recall = 1.0, 0.0
  elif h_a == 0:
    precision, recall = 0.0, 1.0
  else:
    precision, recall = mutual / h_a, mutual / h_b
  return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def slice_scores(truth_segments: np.ndarray, cell_probability: np.ndarray,
                 thresholds: tuple[float, ...] = CHALLENGE_THRESHOLDS) -> np.ndarray:
  """`(len(thresholds), 2)`: V_rand and V_info of one slice, the proposal taken as cell where
  `cell_probability > threshold` (the challenge's polarity: 1 = cell, 0 = membrane).

  `truth_segments`: the 4-connected components of the true cell interior (0 elsewhere).
  """
  scores = np.zeros((len(thresholds), 2))
  for k, threshold in enumerate(thresholds):
    predicted = thin_borders(np.asarray(cell_probability) > threshold)
    scores[k] = vrand(truth_segments, predicted), vinfo(truth_segments, predicted)
  return scores
