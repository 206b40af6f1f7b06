"""Tests for unet_jax.isbi_metrics against brute-force topology, numpy and scikit-image."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage
import skimage.metrics
import tifffile

from unet_jax.evaluation import isbi_metrics

CROSS = ndimage.generate_binary_structure(2, 1)
SQUARE = ndimage.generate_binary_structure(2, 2)


def _topology(membrane: np.ndarray) -> tuple[int, int]:
  """(4-connected cell components, 8-connected membrane components), membrane frame added."""
  framed = np.pad(membrane, 1, constant_values=True)
  return (ndimage.label(~framed, structure=CROSS)[1],
          ndimage.label(framed, structure=SQUARE)[1])


def _flip_keeps_topology(membrane: np.ndarray, row: int, col: int) -> bool:
  flipped = membrane.copy()
  flipped[row, col] = ~flipped[row, col]
  return _topology(flipped) == _topology(membrane)


def _voronoi_membrane(rng, size: int, num_seeds: int) -> np.ndarray:
  """Cells of a random Voronoi tiling separated by one-pixel membrane (True)."""
  seeds = rng.uniform(0, size, size=(num_seeds, 2))
  grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing='ij'), -1)
  region = np.argmin(((grid[:, :, None, :] - seeds) ** 2).sum(-1), axis=-1)
  membrane = np.zeros((size, size), bool)
  membrane[:, :-1] |= region[:, :-1] != region[:, 1:]
  membrane[:-1, :] |= region[:-1, :] != region[1:, :]
  return membrane


def _perturbed(rng, membrane: np.ndarray) -> np.ndarray:
  """A prediction: thickened or thinned membrane, a few holes in it, a few spurious blobs."""
  out = ndimage.binary_dilation(membrane) if rng.random() < 0.5 else membrane.copy()
  for _ in range(3):
    r, c = rng.integers(0, membrane.shape[0] - 3, size=2)
    out[r:r + 3, c:c + 3] = rng.random() < 0.5
  return out ^ (rng.random(membrane.shape) < 0.03)


# --- simple points and warping ---------------------------------------------------------------


def test_simple_point_table_matches_global_topology_in_random_contexts():
  table = isbi_metrics.simple_point_table()
  assert table.shape == (256,) and table.dtype == bool
  rng = np.random.default_rng(0)
  offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
  for code in range(256):
    for _ in range(3):
      membrane = rng.random((7, 7)) < 0.5
      for k, (dy, dx) in enumerate(offsets):
        membrane[3 + dy, 3 + dx] = not code >> k & 1  # bit set = cell
      assert table[code] == _flip_keeps_topology(membrane, 3, 3), (code, membrane.astype(int))


def test_warp_keeps_topology_and_leaves_no_simple_mismatch():
  rng = np.random.default_rng(1)
  for _ in range(6):
    truth = _voronoi_membrane(rng, 24, 6)
    prediction = _perturbed(rng, truth)
    priority = rng.random(truth.shape)
    warped = isbi_metrics.warp_truth(truth, prediction, priority=priority)
    assert _topology(warped) == _topology(truth)
    remaining = np.argwhere(warped != prediction)
    assert len(remaining) < np.sum(truth != prediction)
    for row, col in remaining:
      assert not _flip_keeps_topology(warped, row, col)
    # Pixels that agreed from the start are never touched.
    agreed = truth == prediction
    np.testing.assert_array_equal(warped[agreed], truth[agreed])


def _scores(membrane_probability, labels, **kwargs):
  return isbi_metrics.isbi_scores(np.asarray(membrane_probability, np.float32)[None],
                                  np.asarray(labels, np.int32)[None], **kwargs)


def _two_cells(height=12, width=16, columns=(7,)):
  labels = np.zeros((height, width), np.int32)
  labels[:, list(columns)] = 1
  return labels


def test_identical_prediction_scores_zero():
  labels = _voronoi_membrane(np.random.default_rng(2), 20, 5).astype(np.int32)
  scores = _scores(labels, labels)
  assert scores['isbi_pixel_error'] == 0
  assert scores['isbi_rand_error'] == 0
  assert scores['isbi_warping_error'] == 0


def test_shifted_boundary_costs_pixels_but_no_warping():
  labels = _two_cells(columns=(7, 8))
  shifted = _two_cells(columns=(8, 9))
  scores = _scores(shifted, labels)
  assert scores['isbi_warping_error'] == 0
  # Rand counts true cell pixels only: all 84 left ones share a predicted segment; of the right
  # ones, column 9 (12 pixels) is predicted membrane, i.e. singletons, and 72 share a segment.
  same_both = 84 * 83 + 72 * 71
  assert scores['isbi_rand_error'] == pytest.approx(
      1 - 2 * same_both / (2 * 84 * 83 + same_both))
  # Cell interior is positive: 12 FP (column 7) and 12 FN (column 9) of 168 true cell pixels.
  tp = 168 - 12
  assert scores['isbi_pixel_error'] == pytest.approx(1 - 2 * tp / (2 * tp + 12 + 12))


def test_merge_leaves_the_gap_as_warping_error():
  labels = _two_cells()
  merged = labels.copy()
  merged[4:7, 7] = 0  # a three-pixel hole joins the two cells
  scores = _scores(merged, labels)
  assert scores['isbi_warping_error'] == pytest.approx(3 / labels.size)
  assert scores['isbi_pixel_error'] > 0
  assert scores['isbi_rand_error'] > 0


def test_split_leaves_one_pixel_as_warping_error():
  labels = _two_cells()
  split = labels.copy()
  split[6, :7] = 1  # cuts the left cell in two; all but the closing pixel can be grown
  scores = _scores(split, labels)
  assert scores['isbi_warping_error'] == pytest.approx(1 / labels.size)
  assert scores['isbi_rand_error'] > 0


def test_missing_object_cannot_be_warped_away():
  labels = np.zeros((10, 10), np.int32)
  labels[3:7, 3:7] = 1
  labels[4:6, 4:6] = 0  # a small cell enclosed by a membrane ring
  scores = _scores(np.zeros(labels.shape), labels)
  # The ring's 4 corners can go (the inner cell touches the outer one only diagonally then, which
  # does not connect 4-connected cells); the 8 edge pixels that 4-separate them cannot.
  assert scores['isbi_warping_error'] == pytest.approx(8 / labels.size)


def test_warping_uses_threshold_half_and_ignores_masked_pixels():
  labels = _two_cells()
  probability = np.where(labels == 1, 0.9, 0.1)
  probability[4:7, 7] = 0.45  # below 0.5: the hole is predicted
  assert _scores(probability, labels)['isbi_warping_error'] == pytest.approx(3 / labels.size)
  masked = labels.copy()
  masked[4:7, 7] = -1  # the hole lies in an ignored region: nothing to count
  assert _scores(probability, masked)['isbi_warping_error'] == 0


# --- pixel and Rand errors against references ------------------------------------------------


def _random_stack(seed, count=3, size=32):
  rng = np.random.default_rng(seed)
  labels = np.stack([_voronoi_membrane(rng, size, 7) for _ in range(count)]).astype(np.int32)
  smooth = ndimage.gaussian_filter(labels.astype(np.float64), (0, 1.5, 1.5))
  probability = np.clip(2 * smooth + rng.normal(0, 0.2, labels.shape), 0, 1)
  labels[0, :3, :5] = -1
  return probability, labels


def _reference_pixel_f(probability, labels, threshold):
  valid = labels >= 0
  truth, predicted = labels == 0, probability <= threshold  # cell interior is positive
  tp = np.sum(truth & predicted & valid)
  fp = np.sum(~truth & predicted & valid)
  fn = np.sum(truth & ~predicted & valid)
  precision = 1.0 if fp == 0 else tp / (tp + fp)
  recall = 1.0 if fn == 0 else tp / (tp + fn)
  return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _reference_rand_f(probability, labels, threshold):
  """1 - skimage's adapted Rand error on the stack, with per-slice ids made unique."""
  truth_stack, predicted_stack = [], []
  next_truth = next_predicted = 1
  for p, l in zip(probability, labels):
    truth, count = ndimage.label(l == 0, structure=CROSS)
    truth_stack.append(np.where(truth > 0, truth + next_truth - 1, 0))
    next_truth += count
    predicted, count = ndimage.label(p <= threshold, structure=CROSS)
    predicted = np.where(predicted > 0, predicted + next_predicted - 1, 0)
    next_predicted += count
    # Each predicted-membrane pixel becomes a segment of its own.
    singles = predicted == 0
    predicted[singles] = next_predicted + np.arange(singles.sum())
    next_predicted += singles.sum()
    predicted_stack.append(predicted)
  error, _, _ = skimage.metrics.adapted_rand_error(np.stack(truth_stack),
                                                   np.stack(predicted_stack), ignore_labels=(0,))
  return 1 - error


def test_pixel_and_rand_errors_match_references_over_a_set():
  probability, labels = _random_stack(3)
  thresholds = (0.2, 0.4, 0.5, 0.6, 0.8)
  accumulator = isbi_metrics.ISBIAccumulator(thresholds)
  accumulator.update(probability[:1], labels[:1])
  accumulator.update(probability[1:], labels[1:])
  got = accumulator.result()
  pixel_f = [_reference_pixel_f(probability, labels, t) for t in thresholds]
  rand_f = [_reference_rand_f(probability, labels, t) for t in thresholds]
  assert got['isbi_pixel_error'] == pytest.approx(1 - max(pixel_f), abs=1e-12)
  assert got['isbi_pixel_threshold'] == thresholds[int(np.argmax(pixel_f))]
  assert got['isbi_rand_error'] == pytest.approx(1 - max(rand_f), abs=1e-12)
  assert got['isbi_rand_threshold'] == thresholds[int(np.argmax(rand_f))]
  # The F-scores vary over thresholds, so the maximisation is really exercised.
  assert np.ptp(pixel_f) > 0.01 and np.ptp(rand_f) > 0.01
  # The set-level score is not the mean of per-slice best scores.
  per_slice = np.mean([
      isbi_metrics.isbi_scores(probability[i:i + 1], labels[i:i + 1],
                               thresholds=thresholds)['isbi_rand_error'] for i in range(3)])
  assert got['isbi_rand_error'] != pytest.approx(per_slice, abs=1e-9)


def test_warping_error_accumulates_as_total_over_total():
  probability, labels = _random_stack(4, count=2)
  whole = isbi_metrics.isbi_scores(probability, labels)['isbi_warping_error']
  first, second = (isbi_metrics.isbi_scores(probability[i:i + 1], labels[i:i + 1])
                   for i in range(2))
  valid = (labels >= 0).reshape(2, -1).sum(1)
  expected = (first['isbi_warping_error'] * valid[0]
              + second['isbi_warping_error'] * valid[1]) / valid.sum()
  assert whole == pytest.approx(expected, rel=1e-12)
  assert 0 < whole < np.mean((probability > 0.5) != (labels == 1))


def test_accumulator_validation_and_reset():
  accumulator = isbi_metrics.ISBIAccumulator()
  with pytest.raises(ValueError, match='nothing accumulated'):
    accumulator.result()
  zeros = np.zeros((1, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r'\(N, H, W\)'):
    accumulator.update(zeros[0], np.zeros((4, 4), np.int32))
  with pytest.raises(ValueError, match='membrane'):
    accumulator.update(zeros, np.full((1, 4, 4), 255, np.int32))
  with pytest.raises(ValueError, match='integer'):
    accumulator.update(zeros, zeros)
  with pytest.raises(ValueError, match='non-finite'):
    accumulator.update(zeros + np.nan, np.zeros((1, 4, 4), np.int32))
  with pytest.raises(ValueError, match='increasing'):
    isbi_metrics.ISBIAccumulator((0.5, 0.2))
  labels = _two_cells()[None]
  accumulator.update(np.ones(labels.shape, np.float32), labels)  # all membrane: everything wrong
  assert accumulator.result()['isbi_pixel_error'] == 1.0
  accumulator.reset()
  accumulator.update(labels.astype(np.float32), labels)
  assert accumulator.result()['isbi_pixel_error'] == 0.0


# --- the real data ---------------------------------------------------------------------------


@pytest.fixture
def isbi_val_labels(isbi_dir):
  raw = tifffile.imread(os.path.join(isbi_dir, 'train-labels.tif'))[25:30]
  return (raw == 0).astype(np.int32)  # 0 (membrane) becomes class 1


def test_isbi_ground_truth_against_itself_scores_zero(isbi_val_labels):
  scores = isbi_metrics.isbi_scores(isbi_val_labels.astype(np.float32), isbi_val_labels)
  assert scores['isbi_pixel_error'] == 0
  assert scores['isbi_rand_error'] == 0
  assert scores['isbi_warping_error'] == 0


def test_isbi_all_cell_interior_prediction(isbi_val_labels):
  scores = isbi_metrics.isbi_scores(np.zeros(isbi_val_labels.shape, np.float32), isbi_val_labels)
  cells = np.sum(isbi_val_labels == 0)
  membrane = np.sum(isbi_val_labels == 1)
  # Everything predicted as cell: TP = all cells, FP = all membrane, FN = 0.
  assert scores['isbi_pixel_error'] == pytest.approx(1 - 2 * cells / (2 * cells + membrane))
  assert 0.08 < scores['isbi_pixel_error'] < 0.15  # about 0.11 on slices 25-29
  # One predicted segment holds every cell pixel: nearly all same-segment pairs are false.
  assert scores['isbi_rand_error'] > 0.8
  # What remains after warping is the membrane skeleton that keeps the cells apart.
  assert 0.005 < scores['isbi_warping_error'] < np.mean(isbi_val_labels == 1)
