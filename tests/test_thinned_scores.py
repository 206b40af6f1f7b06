"""V_rand and V_info after border thinning, against hand counts and scikit-image."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import metrics as skmetrics

from unet_jax.evaluation import isbi_metrics
from unet_jax.evaluation import thinned_scores


def _two_cells():
  truth = np.zeros((4, 4), np.int64)
  truth[:, :2] = 1  # 8 pixels
  truth[:, 2:] = 2  # 8 pixels
  return truth


def test_a_perfect_segmentation_scores_one():
  truth = _two_cells()
  assert thinned_scores.vrand(truth, truth) == 1.0
  assert thinned_scores.vinfo(truth, truth) == pytest.approx(1.0)
  assert thinned_scores.vrand(truth, truth * 7) == 1.0  # ids do not matter


def test_a_split_by_hand():
  truth = _two_cells()
  predicted = truth.copy()
  predicted[2:, :2] = 3  # cell 1 split into 4 + 4 pixels
  # Σ n_ij² = 16 + 16 + 64, Σ a² = 128, Σ b² = 96
  assert thinned_scores.vrand(truth, predicted) == pytest.approx(2 * 96 / (128 + 96))
  # H(A) = ln 2, H(B) = H(A, B) = 1.5 ln 2: I = ln 2, precision 1, recall 2/3
  assert thinned_scores.vinfo(truth, predicted) == pytest.approx(0.8)


def test_a_merge_by_hand():
  truth = _two_cells()
  merged = np.ones_like(truth)
  assert thinned_scores.vrand(truth, merged) == pytest.approx(2 * 128 / (128 + 256))
  assert thinned_scores.vinfo(truth, merged) == 0.0  # one predicted segment: no information


def test_line_pixels_are_singletons_and_true_membrane_is_not_counted():
  truth = _two_cells()
  truth[0, 0] = 0  # true membrane: out of the count, whatever is predicted there
  predicted = _two_cells()
  predicted[1, 0] = predicted[2, 0] = 0  # two line pixels inside true cell 1
  predicted[0, 0] = 2
  # cell 1 has 7 counted pixels: 5 with predicted 1, 2 singletons; cell 2 is exact
  both = 25 + 64 + 2
  assert thinned_scores.vrand(truth, predicted) == pytest.approx(
      2 * both / ((49 + 64) + (25 + 64 + 2)))


def test_thinning_leaves_one_pixel_lines_midway():
  cells = np.ones((5, 11), bool)
  cells[:, 4:7] = False  # a border 3 pixels wide
  segments = thinned_scores.thin_borders(cells)
  assert (segments[:, 5] == 0).all()
  left, right = segments[0, 0], segments[0, -1]
  assert left != right and left > 0 and right > 0
  assert (segments[:, :5] == left).all() and (segments[:, 6:] == right).all()
  assert not thinned_scores.thin_borders(np.zeros((3, 3), bool)).any()


def _random_case(seed):
  rng = np.random.default_rng(seed)
  truth_cells = ndimage.gaussian_filter(rng.random((48, 48)), 2) > 0.5
  truth, _ = ndimage.label(truth_cells, structure=ndimage.generate_binary_structure(2, 1))
  probability = ndimage.gaussian_filter(rng.random((48, 48)), 2)
  predicted = thinned_scores.thin_borders(probability > 0.5)
  return truth, predicted


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_scores_match_scikit_image_with_lines_as_singletons(seed):
  truth, predicted = _random_case(seed)
  counted = truth > 0
  n = int(counted.sum())
  assert (predicted[counted] == 0).any()  # the case has line pixels among true cells
  # scikit-image sees every line pixel as a segment of its own.
  relabeled = predicted.copy()
  lines = relabeled == 0
  relabeled[lines] = predicted.max() + 1 + np.arange(lines.sum())
  a = np.bincount(truth[counted])[1:].astype(np.float64)
  b = np.bincount(relabeled[counted]).astype(np.float64)
  a, b = a[a > 0], b[b > 0]

  # Rand: skimage's adapted Rand leaves out self-pairs, and its "precision" is the joint pair
  # count over the true one; the self-pairs (n of them) are added back.
  _, precision, recall = skmetrics.adapted_rand_error(truth, relabeled, ignore_labels=(0,))
  sum_b, sum_a = float(np.sum(b * b)), float(np.sum(a * a))
  joint = precision * (sum_a - n) + n
  assert recall * (sum_b - n) + n == pytest.approx(joint)
  assert thinned_scores.vrand(truth, predicted) == pytest.approx(2 * joint / (sum_a + sum_b))

  # Information: skimage gives H(B|A) and H(A|B) in bits; the entropies come from the counts.
  h_b_given_a, h_a_given_b = skmetrics.variation_of_information(truth, relabeled,
                                                                 ignore_labels=(0,))
  entropy = lambda counts: -float(np.sum(counts / n * np.log2(counts / n)))
  h_a, h_b = entropy(a), entropy(b)
  p, r = (h_a - h_a_given_b) / h_a, (h_b - h_b_given_a) / h_b
  assert thinned_scores.vinfo(truth, predicted) == pytest.approx(2 * p * r / (p + r))


def test_the_accumulator_averages_slices_then_takes_the_best_threshold():
  labels = np.zeros((2, 16, 16), np.int64)
  labels[:, :, 7:9] = 1  # a vertical membrane: two cells per slice
  perfect = labels.astype(np.float32)
  merged = np.zeros_like(perfect)  # no membrane predicted in slice 2
  stack = np.stack([perfect[0], merged[1]])
  scores = isbi_metrics.isbi_scores(stack, labels)
  per_slice = [thinned_scores.slice_scores(ndimage.label(labels[i] == 0)[0], 1 - stack[i])
               for i in range(2)]
  mean = (per_slice[0] + per_slice[1]) / 2
  assert scores['isbi_vrand'] == pytest.approx(mean[:, 0].max())
  assert scores['isbi_vinfo'] == pytest.approx(mean[:, 1].max())
  assert scores['isbi_vrand_threshold'] in thinned_scores.CHALLENGE_THRESHOLDS
  # The perfect slice scores 1 at a threshold where the merged one does not.
  assert per_slice[0][:, 0].max() == 1.0 and per_slice[1][:, 0].max() < 1.0
  assert isbi_metrics.isbi_scores(perfect, labels)['isbi_vrand'] == 1.0
  assert math.isclose(isbi_metrics.isbi_scores(perfect, labels)['isbi_vinfo'], 1.0)
