"""The paper's weight map against a brute-force computation, and instance labelling."""

import os

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage import measure

from unet_jax.datasets import weight_maps as W


def _cells(shape, num, seed=0):
  """Voronoi cells of random seeds with 1-px background borders and a background hole."""
  rng = np.random.default_rng(seed)
  seeds = np.zeros(shape, bool)
  seeds[tuple(rng.integers(0, s, num) for s in shape)] = True
  ids = ndi.label(seeds)[0]
  _, nearest = ndi.distance_transform_edt(ids == 0, return_indices=True)
  cells = ids[tuple(nearest)]
  border = np.zeros(shape, bool)
  for axis in range(len(shape)):
    border |= np.diff(cells, axis=axis, append=np.take(cells, [-1], axis)) != 0
  cells[border] = 0
  cells[tuple(slice(0, s // 4) for s in shape)] = 0  # a wide background region too
  return cells


def _brute_force(instances, w0, sigma, background=0, class_weights=None):
  """Every instance's distance transform over the whole image; the two smallest per pixel."""
  ids = [i for i in np.unique(instances) if i != background]
  cells = instances != background
  if class_weights is None:  # balanced: each class's pixels carry the same total weight
    n_cell, n_bg = cells.sum(), (~cells).sum()
    class_weights = (cells.size / (2 * n_bg), cells.size / (2 * n_cell))
  w = np.where(cells, class_weights[1], class_weights[0]).astype(np.float64)
  if len(ids) < 2:
    return w
  d = np.sort(np.stack([ndi.distance_transform_edt(instances != i) for i in ids]), axis=0)
  border = w0 * np.exp(-(d[0] + d[1])**2 / (2 * sigma**2))
  return w + np.where(cells, 0.0, border)


@pytest.mark.parametrize('shape, num, w0, sigma', [((48, 56), 12, 10.0, 5.0),
                                                    ((40, 40), 8, 4.0, 2.0),
                                                    ((10, 18, 20), 9, 10.0, 3.0)])
def test_weight_map_matches_brute_force(shape, num, w0, sigma):
  instances = _cells(shape, num)
  assert len(np.unique(instances)) > 3
  w = W.border_weight_map(instances, w0=w0, sigma=sigma)
  assert w.dtype == np.float32 and w.shape == shape
  np.testing.assert_allclose(w, _brute_force(instances, w0, sigma), rtol=1e-5, atol=1e-5)
  # The border term sits on the background between cells, not inside cells.
  cells = instances > 0
  assert len(np.unique(w[cells])) == 1 and w[~cells].max() - w[~cells].min() > 0.25 * w0


def test_arbitrary_ids_background_and_class_weights():
  instances = _cells((40, 44), 10, seed=3)
  reference = _brute_force(instances, 10.0, 4.0, class_weights=(1.0, 2.5))
  relabelled = np.where(instances == 0, 5, instances * 7 + 1000).astype(np.int64)
  w = W.border_weight_map(relabelled, w0=10.0, sigma=4.0, background=5, class_weights=(1.0, 2.5))
  np.testing.assert_allclose(w, reference, rtol=1e-5, atol=1e-5)


def test_balanced_class_weights_give_equal_totals():
  instances = _cells((30, 30), 5, seed=1)
  w = W.border_weight_map(instances, w0=0.0)
  cells = instances > 0
  np.testing.assert_allclose(w[cells].sum(), w[~cells].sum(), rtol=1e-5)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-5)


def test_fewer_than_two_cells_have_no_border_term():
  one = np.zeros((12, 12), np.int32)
  one[3:7, 3:7] = 4
  np.testing.assert_allclose(W.border_weight_map(one), _brute_force(one, 10.0, 5.0))
  assert np.allclose(W.border_weight_map(np.zeros((5, 5), np.int32)), 1.0)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='integer'):
    W.border_weight_map(np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="'balanced'"):
    W.border_weight_map(np.zeros((4, 4), np.int32), class_weights='equal')
  with pytest.raises(ValueError, match='pair'):
    W.border_weight_map(np.zeros((4, 4), np.int32), class_weights=(1.0, 2.0, 3.0))
  with pytest.raises(ValueError, match='connectivity'):
    W.instances_from_binary(np.zeros((4, 4), bool), connectivity=3)


@pytest.mark.parametrize('connectivity', [1, 2])
def test_instances_are_connected_components(connectivity):
  rng = np.random.default_rng(0)
  for mask in [rng.random((20, 24)) > 0.55, rng.random((6, 8, 9)) > 0.6]:
    ids = W.instances_from_binary(mask, connectivity=connectivity)
    expected = measure.label(mask, connectivity=connectivity)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, expected)


def test_on_an_isbi_slice(isbi_dir):
  labels = tifffile.imread(os.path.join(isbi_dir, 'train-labels.tif'))[0]
  instances = W.instances_from_binary(labels == 255)  # cells: the interior (255 on disk)
  assert instances.max() > 50
  crop = instances[:128, :128]
  np.testing.assert_allclose(W.border_weight_map(crop), _brute_force(crop, 10.0, 5.0),
                             rtol=1e-5, atol=1e-5)
  w = W.border_weight_map(instances)
  membrane = labels == 0
  assert w[membrane].mean() > 3 * w[~membrane].mean()
