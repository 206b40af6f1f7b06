"""Post-processing and the dense CRF, against references written out here (scipy, skimage,
numpy)."""

import os

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage import measure

from unet_jax.inference import crf
from unet_jax.inference import postprocess


def _blobs(shape, seed, density=0.45):
  """A random binary image with components and holes of many sizes."""
  rng = np.random.default_rng(seed)
  return ndimage.uniform_filter(rng.random(shape), 3) > density


def _same_partition(a, b):
  """Label images a and b name the same sets of pixels (ids may differ)."""
  if not np.array_equal(a > 0, b > 0):
    return False
  pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
  return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_to_classes():
  probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(6, 7)).astype(np.float32)
  np.testing.assert_array_equal(postprocess.to_classes(probs), probs.argmax(-1))
  binary = postprocess.to_classes(probs, threshold=0.3, foreground=2)
  np.testing.assert_array_equal(binary, np.where(probs[..., 2] >= 0.3, 2, 0))
  assert binary.dtype == np.uint8
  with pytest.raises(ValueError, match='foreground'):
    postprocess.to_classes(probs, threshold=0.5, foreground=3)


@pytest.mark.parametrize('shape,connectivity', [((40, 50), 1), ((40, 50), 2), ((12, 14, 10), 1),
                                                ((12, 14, 10), 3)])
def test_remove_small_components(shape, connectivity):
  mask = _blobs(shape, seed=1, density=0.45 if len(shape) == 2 else 0.55)
  min_size = 12
  structure = ndimage.generate_binary_structure(len(shape), connectivity)
  labels, count = ndimage.label(mask, structure)
  sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
  expected = np.isin(labels, 1 + np.flatnonzero(sizes >= min_size))
  result = postprocess.remove_small_components(mask, min_size, connectivity=connectivity)
  np.testing.assert_array_equal(result, expected)
  assert 0 < result.sum() < mask.sum()  # the case really removes something and keeps something


@pytest.mark.parametrize('shape', [(40, 50), (12, 14, 10)])
def test_fill_holes_matches_scipy(shape):
  mask = ~_blobs(shape, seed=2, density=0.6)
  expected = ndimage.binary_fill_holes(mask)
  assert (expected & ~mask).any()
  np.testing.assert_array_equal(postprocess.fill_holes(mask), expected)
  full = ndimage.generate_binary_structure(len(shape), len(shape))
  np.testing.assert_array_equal(postprocess.fill_holes(mask, connectivity=len(shape)),
                                ndimage.binary_fill_holes(mask, structure=full))


def test_fill_only_small_holes():
  mask = np.ones((30, 30), bool)
  mask[3:5, 3:5] = False     # a 4-pixel hole
  mask[10:20, 10:20] = False  # a 100-pixel hole
  mask[0, 25:28] = False      # background on the border is never a hole
  result = postprocess.fill_holes(mask, max_size=10)
  holes = ndimage.binary_fill_holes(mask) & ~mask
  labels, count = ndimage.label(holes)
  sizes = ndimage.sum_labels(holes, labels, np.arange(1, count + 1))
  expected = mask | np.isin(labels, 1 + np.flatnonzero(sizes <= 10))
  np.testing.assert_array_equal(result, expected)
  assert result[3:5, 3:5].all() and not result[10:20, 10:20].any() and not result[0, 26]


@pytest.mark.parametrize('connectivity', [1, 2])
def test_label_instances_matches_skimage(connectivity):
  mask = _blobs((40, 50), seed=3)
  labels = postprocess.label_instances(mask, connectivity=connectivity)
  reference = measure.label(mask, connectivity=connectivity)
  assert labels.dtype == np.int32 and labels.max() == reference.max() > 5
  assert _same_partition(labels, reference)
  big = postprocess.label_instances(mask, connectivity=connectivity, min_size=15)
  kept = [r.label for r in measure.regionprops(reference) if r.area >= 15]
  assert _same_partition(big, np.where(np.isin(reference, kept), reference, 0))
  np.testing.assert_array_equal(np.unique(big), np.arange(len(kept) + 1))  # ids are 0..K


def test_clean_classes():
  classes = np.zeros((20, 20), np.uint8)
  classes[2:10, 2:10] = 1
  classes[5, 5] = 0           # a 1-pixel hole in class 1
  classes[15, 15] = 1         # a speck of class 1
  classes[12:18, 2:8] = 2
  classes[14, 4] = 1          # a class-1 speck inside class 2: removed, becomes background ...
  result = postprocess.clean_classes(classes, min_size=3, hole_size=2)
  expected = classes.copy()
  expected[5, 5] = 1
  expected[15, 15] = 0
  expected[14, 4] = 2         # ... which is then a hole of class 2 and filled
  np.testing.assert_array_equal(result, expected)
  probs = np.eye(3, dtype=np.float32)[classes]
  np.testing.assert_array_equal(postprocess.postprocess(probs, min_size=3, hole_size=2), expected)
  with pytest.raises(ValueError, match='connectivity'):
    postprocess.remove_small_components(classes > 0, 3, connectivity=3)


def test_real_nuclei_instances(nuclei_dir):
  """Instances of the real nuclei mask's foreground, cleaned of small components, vs skimage."""
  mask = tifffile.imread(os.path.join(nuclei_dir, 'mask2d.tif')) > 0
  labels = postprocess.label_instances(mask, min_size=20)
  reference = measure.label(mask, connectivity=1)
  kept = [r.label for r in measure.regionprops(reference) if r.area >= 20]
  assert len(kept) > 10
  assert _same_partition(labels, np.where(np.isin(reference, kept), reference, 0))


# Dense CRF (unet_jax/crf.py).


def _dense_crf_reference(probs, image, *, iterations, spatial_sigma, sigma_xy, sigma_rgb,
                         w_spatial, w_bilateral, spatial_radius, window):
  """Mean field with explicit N×N kernel matrices, truncated to the documented boxes."""
  h, w, _ = probs.shape
  yy, xx = np.mgrid[:h, :w]
  dy = yy.ravel()[:, None] - yy.ravel()[None, :]
  dx = xx.ravel()[:, None] - xx.ravel()[None, :]
  features = image.reshape(h * w, -1).astype(np.float64)
  colour = ((features[:, None, :] - features[None, :, :])**2).sum(-1)
  not_self = 1.0 - np.eye(h * w)
  box = lambda r: (np.abs(dy) <= r) & (np.abs(dx) <= r)
  k_spatial = np.exp(-(dy**2 + dx**2) / (2 * spatial_sigma**2)) * box(spatial_radius) * not_self
  k_bilateral = np.exp(-(dy**2 + dx**2) / (2 * sigma_xy**2) - colour / (2 * sigma_rgb**2)) \
      * box(window) * not_self
  log_p = np.log(np.maximum(probs.reshape(h * w, -1), 1e-6))
  q = np.exp(log_p) / np.exp(log_p).sum(-1, keepdims=True)
  for _ in range(iterations):
    logits = log_p + w_spatial * k_spatial @ q + w_bilateral * k_bilateral @ q
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
  return q.reshape(probs.shape)


@pytest.mark.parametrize('window', [2, 20])  # truncated, and wider than the image (exact)
def test_crf_matches_the_dense_mean_field(window):
  rng = np.random.default_rng(8)
  probs = rng.dirichlet(np.ones(3), size=(9, 11))
  image = rng.integers(0, 255, size=(9, 11, 2)).astype(np.float32)
  kwargs = dict(iterations=3, spatial_sigma=1.0, w_spatial=0.7, w_bilateral=1.3)
  result = crf.crf_refine(probs, image, bilateral_sigma_xy=3.0, bilateral_sigma_rgb=60.0,
                          window=window, **kwargs)
  reference = _dense_crf_reference(probs, image, sigma_xy=3.0, sigma_rgb=60.0, spatial_radius=4,
                                   window=window, **kwargs)
  np.testing.assert_allclose(np.asarray(result), reference, atol=2e-5)


def _two_regions(seed):
  rng = np.random.default_rng(seed)
  truth = np.zeros((40, 48), np.int64)
  truth[:, 20:] = 1
  truth[10:25, 5:15] = 1
  image = np.where(truth == 1, 180.0, 70.0) + rng.normal(0, 8, truth.shape)
  noisy = np.eye(2)[truth] * 0.3 + rng.random((40, 48, 2))  # about 70 % argmax accuracy
  return truth, image, noisy / noisy.sum(-1, keepdims=True)


def test_crf_cleans_a_noisy_two_region_map():
  truth, image, probs = _two_regions(9)
  before = np.mean(probs.argmax(-1) == truth)
  refined = np.asarray(crf.crf_refine(probs, image, iterations=5, spatial_sigma=2.0,
                                      bilateral_sigma_xy=4.0, bilateral_sigma_rgb=20.0,
                                      w_spatial=2.0, w_bilateral=4.0, window=6))
  after = np.mean(refined.argmax(-1) == truth)
  assert before < 0.8 and after > 0.97, (before, after)
  np.testing.assert_allclose(refined.sum(-1), 1.0, rtol=1e-5)


def test_crf_with_zero_weights_returns_the_input():
  _, image, probs = _two_regions(10)
  unnormalised = probs * 3.0
  result = crf.crf_refine(unnormalised, image[..., None], w_spatial=0.0, w_bilateral=0.0,
                          window=3)
  np.testing.assert_allclose(np.asarray(result), probs, rtol=1e-5)
  with pytest.raises(ValueError, match='does not match'):
    crf.crf_refine(probs, image[:10])
