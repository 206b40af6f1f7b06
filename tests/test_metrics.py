"""Tests for unet_jax.metrics against independent numpy references."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
import skimage.metrics

from unet_jax.evaluation import distance_metrics
from unet_jax.evaluation import metrics

# Eager dispatch compiles every primitive per new shape, which is slow on CPU.
_confusion = jax.jit(metrics.confusion_matrix, static_argnames=('num_classes',))


def _reference_confusion(predictions, labels, num_classes):
  """Confusion matrix by np.add.at, skipping pixels whose label is out of range."""
  predictions = np.asarray(predictions).ravel()
  labels = np.asarray(labels).ravel()
  keep = (labels >= 0) & (labels < num_classes)
  out = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(out, (labels[keep], predictions[keep]), 1)
  return out


def _random_labels(seed, shape, num_classes, ignored_fraction=0.2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  predictions = rng.integers(0, num_classes, size=shape).astype(np.int32)
  ignored = rng.random(shape) < ignored_fraction
  labels[ignored] = rng.choice([-1, 255], size=int(ignored.sum()))
  return predictions, labels


# --- confusion_matrix ------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(3, 7, 9), (2, 4, 5, 6), (11,)], ids=['2d', '3d', '1d'])
def test_confusion_matrix_matches_reference(shape):
  predictions, labels = _random_labels(0, shape, 4)
  assert np.any(labels == -1) and np.any(labels == 255)
  got = _confusion(predictions, labels, num_classes=4)
  assert got.shape == (4, 4) and got.dtype == jnp.int32
  want = _reference_confusion(predictions, labels, 4)
  np.testing.assert_array_equal(got, want)
  assert int(got.sum()) == int(np.sum((labels >= 0) & (labels < 4)))


def test_confusion_matrix_eager_matches_jit():
  predictions, labels = _random_labels(1, (2, 5, 5), 3)
  np.testing.assert_array_equal(
      metrics.confusion_matrix(predictions, labels, num_classes=3),
      _confusion(predictions, labels, num_classes=3))


def test_confusion_matrix_rows_are_truth_columns_are_predictions():
  labels = np.array([0, 0, 1, 1, 1, 2], np.int32)
  predictions = np.array([0, 1, 1, 1, 2, 0], np.int32)
  got = np.asarray(_confusion(predictions, labels, num_classes=3))
  np.testing.assert_array_equal(got, [[1, 1, 0], [0, 2, 1], [1, 0, 0]])


def test_confusion_matrix_validation():
  with pytest.raises(ValueError, match='do not match'):
    metrics.confusion_matrix(np.zeros((2, 3), np.int32), np.zeros((2, 4), np.int32),
                             num_classes=2)
  with pytest.raises(ValueError, match='integer'):
    metrics.confusion_matrix(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32),
                             num_classes=2)
  with pytest.raises(ValueError, match='num_classes'):
    metrics.confusion_matrix(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32),
                             num_classes=0)


# --- segmentation_scores ---------------------------------------------------------------------


def test_scores_on_hand_made_example():
  # 10 pixels, 2 classes.
  #   truth:      0 0 0 0 0 0 1 1 1 1
  #   prediction: 0 0 0 0 1 1 1 1 1 0
  # class 1: tp = 3, fp = 2, fn = 1; class 0: tp = 4, fp = 1, fn = 2.
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], np.int32)
  predictions = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0], np.int32)
  scores = metrics.segmentation_scores(
      np.asarray(_confusion(predictions, labels, num_classes=2)), class_names=['bg', 'fg'])
  expected = {
      'pixel_accuracy': 7 / 10,
      'pixel_error': 3 / 10,
      'dice_bg': 8 / 11,  # 2*4 / (2*4 + 1 + 2)
      'iou_bg': 4 / 7,
      'precision_bg': 4 / 5,
      'recall_bg': 4 / 6,
      'dice_fg': 6 / 9,  # 2*3 / (2*3 + 2 + 1)
      'iou_fg': 3 / 6,
      'precision_fg': 3 / 5,
      'recall_fg': 3 / 4,
      'dice_mean': (8 / 11 + 6 / 9) / 2,
      'iou_mean': (4 / 7 + 3 / 6) / 2,
  }
  assert set(scores) == set(expected)
  for key, value in expected.items():
    assert isinstance(scores[key], float)
    assert scores[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize('shape', [(2, 9, 8), (2, 3, 5, 6)], ids=['2d', '3d'])
def test_scores_match_boolean_mask_definitions(shape):
  num_classes = 3
  predictions, labels = _random_labels(2, shape, num_classes)
  scores = metrics.segmentation_scores(
      np.asarray(_confusion(predictions, labels, num_classes=num_classes)),
      class_names=['a', 'b', 'c'])
  keep = (labels >= 0) & (labels < num_classes)
  truth, predicted = labels[keep], predictions[keep]
  for c, name in enumerate(['a', 'b', 'c']):
    a, b = truth == c, predicted == c
    intersection = np.logical_and(a, b).sum()
    assert scores[f'dice_{name}'] == pytest.approx(2 * intersection / (a.sum() + b.sum()))
    assert scores[f'iou_{name}'] == pytest.approx(intersection / np.logical_or(a, b).sum())
    assert scores[f'precision_{name}'] == pytest.approx(intersection / b.sum())
    assert scores[f'recall_{name}'] == pytest.approx(intersection / a.sum())
  assert scores['pixel_accuracy'] == pytest.approx(np.mean(truth == predicted))
  assert scores['pixel_error'] == pytest.approx(1 - np.mean(truth == predicted))


def test_confusion_matrix_matches_skimage_contingency_table():
  skimage_metrics = pytest.importorskip('skimage.metrics')
  predictions, labels = _random_labels(3, (2, 12, 10), 4)
  labels[labels == -1] = 255  # skimage counts non-negative ids only.
  table = skimage_metrics.contingency_table(labels, predictions, ignore_labels=[255])
  got = _confusion(predictions, labels, num_classes=4)
  np.testing.assert_array_equal(got, table.toarray()[:4, :4])


def test_absent_class_is_nan_and_left_out_of_means():
  # Class 2 never occurs in truth or prediction.
  confusion = np.array([[5, 1, 0], [2, 4, 0], [0, 0, 0]], np.int64)
  scores = metrics.segmentation_scores(confusion, class_names=['x', 'y', 'z'])
  for key in ('dice_z', 'iou_z', 'precision_z', 'recall_z'):
    assert math.isnan(scores[key]), key
  assert scores['dice_x'] == pytest.approx(10 / 13)
  assert scores['dice_y'] == pytest.approx(8 / 11)
  assert scores['dice_mean'] == pytest.approx((10 / 13 + 8 / 11) / 2)
  assert scores['iou_mean'] == pytest.approx((5 / 8 + 4 / 7) / 2)


def test_class_never_predicted_has_zero_dice_and_nan_precision():
  # Class 1 is present in truth but never predicted: dice 0 (defined), precision 0/0.
  confusion = np.array([[3, 0], [2, 0]], np.int64)
  scores = metrics.segmentation_scores(confusion, class_names=['bg', 'fg'])
  assert scores['dice_fg'] == 0.0
  assert scores['recall_fg'] == 0.0
  assert math.isnan(scores['precision_fg'])
  assert scores['dice_mean'] == pytest.approx((6 / 8 + 0) / 2)


def test_all_classes_undefined_gives_nan_means_without_warnings():
  with np.errstate(all='raise'), warnings.catch_warnings():
    warnings.simplefilter('error')
    scores = metrics.segmentation_scores(np.zeros((2, 2), np.int64), class_names=['a', 'b'])
  assert math.isnan(scores['dice_mean'])
  assert math.isnan(scores['iou_mean'])
  assert math.isnan(scores['pixel_accuracy'])


def test_scores_validation():
  with pytest.raises(ValueError, match='class_names'):
    metrics.segmentation_scores(np.zeros((3, 3), np.int64), class_names=['a', 'b'])
  with pytest.raises(ValueError, match='distinct'):
    metrics.segmentation_scores(np.zeros((2, 2), np.int64), class_names=['a', 'a'])
  with pytest.raises(ValueError, match='square'):
    metrics.segmentation_scores(np.zeros((2, 3), np.int64), class_names=['a', 'b'])


def test_scores_are_exact_for_counts_beyond_int32():
  big = 3 * 2**31
  confusion = np.array([[big, 1], [0, big]], np.int64)
  scores = metrics.segmentation_scores(confusion, class_names=['a', 'b'])
  assert scores['pixel_error'] == pytest.approx(1 / (2 * big + 1), rel=1e-9)


# --- ConfusionAccumulator --------------------------------------------------------------------


def test_accumulation_equals_scores_on_concatenated_set():
  names = ['bg', 'cell', 'border']
  batches = [_random_labels(seed, (2, 6, 7), 3) for seed in range(10, 14)]
  accumulator = metrics.ConfusionAccumulator()
  for predictions, labels in batches:
    accumulator.update(_confusion(predictions, labels, num_classes=3))
  all_predictions = np.concatenate([p for p, _ in batches])
  all_labels = np.concatenate([l for _, l in batches])
  whole = metrics.segmentation_scores(
      _reference_confusion(all_predictions, all_labels, 3), class_names=names)
  got = accumulator.result(names)
  assert accumulator.total.dtype == np.int64
  assert got.keys() == whole.keys()
  for key in whole:
    assert got[key] == pytest.approx(whole[key], rel=1e-12), key
  # Set-level dice differs from the mean of per-batch dice in general.
  per_batch = np.mean([
      metrics.segmentation_scores(_reference_confusion(p, l, 3), class_names=names)['dice_cell']
      for p, l in batches])
  assert got['dice_cell'] != pytest.approx(per_batch, rel=1e-9)


def test_accumulator_reset_and_shape_checks():
  accumulator = metrics.ConfusionAccumulator(num_classes=2)
  np.testing.assert_array_equal(accumulator.total, np.zeros((2, 2)))
  accumulator.update(np.array([[1, 2], [3, 4]]))
  accumulator.update(jnp.array([[1, 0], [0, 1]], jnp.int32))
  np.testing.assert_array_equal(accumulator.total, [[2, 2], [3, 5]])
  with pytest.raises(ValueError, match='does not match'):
    accumulator.update(np.zeros((3, 3), np.int64))
  accumulator.reset()
  np.testing.assert_array_equal(accumulator.total, np.zeros((2, 2)))

  lazy = metrics.ConfusionAccumulator()
  with pytest.raises(ValueError):
    lazy.result(['a', 'b'])
  lazy.update(np.eye(2, dtype=np.int32))
  assert lazy.result(['a', 'b'])['pixel_accuracy'] == 1.0
  lazy.reset()
  with pytest.raises(ValueError):
    _ = lazy.total


# --- Hausdorff distances ---------------------------------------------------------------------


def _blobs(seed, shape, count=3, threshold=0.6):
  """Random smooth blobs: a thresholded, blurred noise field."""
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.random(shape), sigma=max(shape) / 8)
  field = (field - field.min()) / np.ptp(field)
  return field > threshold if count else np.zeros(shape, bool)


def _boundary_by_shifts(mask):
  """Mask pixels with a face neighbour outside the mask or the image, by explicit shifts."""
  padded = np.pad(mask, 1, constant_values=False)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  outside = np.zeros(mask.shape, bool)
  for axis in range(mask.ndim):
    for step in (-1, 1):
      outside |= ~np.roll(padded, step, axis=axis)[inner]
  return mask & outside


def _brute_force_hd(a, b, percentile, spacing):
  """Percentile Hausdorff distance from all pairwise point distances."""
  spacing = np.asarray(spacing, np.float64)
  pa, pb = np.argwhere(a) * spacing, np.argwhere(b) * spacing
  pairwise = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
  return max(np.percentile(pairwise.min(1), percentile), np.percentile(pairwise.min(0), percentile))


@pytest.mark.parametrize('shape', [(40, 36), (12, 14, 10)], ids=['2d', '3d'])
def test_hausdorff_of_masks_matches_skimage(shape):
  a, b = _blobs(0, shape), _blobs(1, shape)
  assert a.any() and b.any() and not np.array_equal(a, b)
  got = distance_metrics.hausdorff_distance(a, b, point_set='mask')
  assert got == pytest.approx(skimage.metrics.hausdorff_distance(a, b), rel=1e-12)


@pytest.mark.parametrize('shape', [(40, 36), (12, 14, 10)], ids=['2d', '3d'])
def test_hausdorff_of_boundaries_matches_skimage_on_boundaries(shape):
  a, b = _blobs(2, shape), _blobs(3, shape)
  np.testing.assert_array_equal(distance_metrics.mask_boundary(a), _boundary_by_shifts(a))
  want = skimage.metrics.hausdorff_distance(_boundary_by_shifts(a), _boundary_by_shifts(b))
  assert distance_metrics.hausdorff_distance(a, b) == pytest.approx(want, rel=1e-12)


def test_boundary_and_mask_hausdorff_differ_when_the_far_point_is_inside_a_mask():
  ring = np.zeros((21, 21), bool)
  ring[1:20, 1:20] = True
  ring[2:19, 2:19] = False  # a one-pixel square ring on rows and columns 1 and 19
  square = np.zeros_like(ring)
  square[3:18, 3:18] = True  # filled, two pixels inside the ring
  # As sets, the square's centre (10, 10) is 9 pixels from the ring.
  assert distance_metrics.hausdorff_distance(square, ring, point_set='mask') == 9.0
  # Between boundaries, the worst is a ring corner to the square's corner: sqrt(2^2 + 2^2).
  assert distance_metrics.hausdorff_distance(square, ring) == pytest.approx(np.sqrt(8))


@pytest.mark.parametrize('spacing', [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize('point_set', ['boundary', 'mask'])
def test_hd95_matches_brute_force_2d(spacing, point_set):
  a, b = _blobs(4, (18, 16), threshold=0.5), _blobs(5, (18, 16), threshold=0.55)
  sa, sb = (a, b) if point_set == 'mask' else (_boundary_by_shifts(a), _boundary_by_shifts(b))
  for percentile in (95.0, 100.0):
    got = distance_metrics.hausdorff_distance(a, b, percentile=percentile, spacing=spacing,
                                              point_set=point_set)
    assert got == pytest.approx(_brute_force_hd(sa, sb, percentile, spacing), rel=1e-12)


def test_hd95_matches_brute_force_anisotropic_3d():
  a, b = _blobs(6, (6, 10, 9), threshold=0.5), _blobs(7, (6, 10, 9), threshold=0.5)
  spacing = (5.0, 1.0, 1.5)
  got = distance_metrics.hausdorff_distance(a, b, percentile=95, spacing=spacing)
  want = _brute_force_hd(_boundary_by_shifts(a), _boundary_by_shifts(b), 95, spacing)
  assert got == pytest.approx(want, rel=1e-12)
  # The slice spacing matters: the isotropic answer differs.
  assert distance_metrics.hausdorff_distance(a, b, percentile=95) != pytest.approx(got)


def test_hausdorff_hand_made_and_empty_cases():
  a = np.zeros((7, 5), bool)
  b = np.zeros((7, 5), bool)
  a[1, 1], b[4, 1] = True, True
  assert distance_metrics.hausdorff_distance(a, b) == 3.0
  assert distance_metrics.hausdorff_distance(a, b, spacing=(2.0, 1.0)) == 6.0
  empty = np.zeros_like(a)
  assert distance_metrics.hausdorff_distance(empty, empty) == 0.0
  assert distance_metrics.hausdorff_distance(a, empty) == math.inf
  assert distance_metrics.hausdorff_distance(empty, b, percentile=95) == math.inf
  assert skimage.metrics.hausdorff_distance(a, empty) == math.inf  # the same convention


def test_hausdorff_validation():
  a = np.ones((4, 4), bool)
  with pytest.raises(ValueError, match='does not match'):
    distance_metrics.hausdorff_distance(a, np.ones((4, 5), bool))
  with pytest.raises(ValueError, match='percentile'):
    distance_metrics.hausdorff_distance(a, a, percentile=0)
  with pytest.raises(ValueError, match='spacing'):
    distance_metrics.hausdorff_distance(a, a, spacing=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match='point_set'):
    distance_metrics.hausdorff_distance(a, a, point_set='surface')
  with pytest.raises(ValueError, match='classes'):
    distance_metrics.HausdorffAccumulator(['a', 'b'], classes=[2])
  with pytest.raises(ValueError, match='spacing must hold 2'):
    distance_metrics.HausdorffAccumulator(['a', 'b'], spacing=(1.0, 1.0, 1.0)).update(
        np.zeros((1, 4, 4), np.int32), np.zeros((1, 4, 4), np.int32))
  with pytest.raises(ValueError, match='integer'):
    distance_metrics.HausdorffAccumulator(['a', 'b']).update(
        np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.int32))


def test_hausdorff_accumulator_averages_per_image_distances():
  names = ['bg', 'cell', 'border']
  labels = np.stack([_blobs(s, (20, 22)).astype(np.int32) + 2 * _blobs(s + 10, (20, 22))
                     for s in range(4)]).clip(0, 2).astype(np.int32)
  predictions = np.roll(labels, shift=1, axis=2)
  predictions[1][predictions[1] == 1] = 0  # class 1 missing from one prediction: inf
  labels[0, :2] = 255  # ignored rows are in neither mask
  accumulator = distance_metrics.HausdorffAccumulator(names, classes=[1, 2])
  accumulator.update(predictions[:2], labels[:2])
  accumulator.update(predictions[2:], labels[2:])
  got = accumulator.result()
  assert set(got) == {'hd_cell', 'hd95_cell', 'hd_cell_inf_images', 'hd_border', 'hd95_border',
                      'hd_border_inf_images'}
  for c, name in ((1, 'cell'), (2, 'border')):
    hd, hd95 = [], []
    for p, l in zip(predictions, labels):
      keep = (l >= 0) & (l < 3)
      a, b = (p == c) & keep, (l == c) & keep
      hd.append(skimage.metrics.hausdorff_distance(_boundary_by_shifts(a),
                                                   _boundary_by_shifts(b)))
      hd95.append(distance_metrics.hausdorff_distance(a, b, percentile=95))
    np.testing.assert_allclose(accumulator.per_image[f'hd_{name}'], hd, rtol=1e-12)
    assert got[f'hd_{name}'] == pytest.approx(np.mean(hd))
    assert got[f'hd95_{name}'] == pytest.approx(np.mean(hd95))
  assert got['hd_cell'] == math.inf and got['hd_cell_inf_images'] == 1
  assert math.isfinite(got['hd_border']) and got['hd_border_inf_images'] == 0
  accumulator.reset()
  assert math.isnan(accumulator.result()['hd_cell'])
