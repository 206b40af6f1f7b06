"""Tests for the procedural EM-like data set (unet_jax/procedural.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from unet_jax.datasets import procedural
from unet_jax.datasets.procedural import describe, make_em_like

SIZE = 160


@pytest.fixture(scope='module')
def default_set() -> tuple[np.ndarray, np.ndarray]:
  return make_em_like(4, SIZE, seed=7)


def test_shapes_and_dtypes(default_set):
  images, labels = default_set
  assert images.shape == labels.shape == (4, SIZE, SIZE)
  assert images.dtype == labels.dtype == np.uint8


def test_rectangular_size():
  images, labels = make_em_like(2, (48, 72), seed=1)
  assert images.shape == labels.shape == (2, 48, 72)


def test_labels_are_isbi_polarity(default_set):
  _, labels = default_set
  assert set(np.unique(labels).tolist()) == {0, 255}


def test_images_use_the_grey_range(default_set):
  images, _ = default_set
  # Neither saturated nor flat: the clip to 0..255 should rarely bite with the defaults.
  assert images.std() > 20
  assert (images == 0).mean() < 0.01 and (images == 255).mean() < 0.01


def test_same_seed_same_arrays(default_set):
  images, labels = make_em_like(4, SIZE, seed=7)
  np.testing.assert_array_equal(images, default_set[0])
  np.testing.assert_array_equal(labels, default_set[1])


def test_image_depends_only_on_seed_and_index():
  images3, labels3 = make_em_like(3, 64, seed=11)
  images5, labels5 = make_em_like(5, 64, seed=11)
  np.testing.assert_array_equal(images3, images5[:3])
  np.testing.assert_array_equal(labels3, labels5[:3])


def test_images_within_a_set_differ():
  images, labels = make_em_like(2, 64, seed=0)
  assert not np.array_equal(labels[0], labels[1])
  assert not np.array_equal(images[0], images[1])


def test_different_seeds_differ():
  images_a, labels_a = make_em_like(2, 64, seed=0)
  images_b, labels_b = make_em_like(2, 64, seed=1)
  assert not np.array_equal(labels_a, labels_b)
  assert np.abs(images_a.astype(int) - images_b.astype(int)).mean() > 5


def test_membrane_fraction_and_contrast(default_set):
  stats = describe(*default_set)
  assert 0.12 <= stats['membrane_fraction'] <= 0.30
  # ISBI 2012 has about 85 on membrane against 138 inside cells.
  assert stats['interior_mean'] - stats['membrane_mean'] > 25
  assert 110 < stats['interior_mean'] < 165


def test_membrane_fraction_grows_with_width():
  thin = describe(*make_em_like(2, 96, seed=3, membrane_width=2.0))
  thick = describe(*make_em_like(2, 96, seed=3, membrane_width=5.0))
  assert thick['membrane_fraction'] > 1.8 * thin['membrane_fraction']


def _cell_areas(labels: np.ndarray) -> list[np.ndarray]:
  """Areas of the 4-connected interior components of each image."""
  areas = []
  for image_labels in labels:
    components, count = ndimage.label(image_labels == 255)
    areas.append(np.bincount(components.ravel(), minlength=count + 1)[1:])
  return areas


def test_cells_are_separated_and_sized_like_cell_diameter(default_set):
  _, labels = default_set
  cell_diameter = 28.0
  # A hexagonal lattice spaced d apart gives cells of area sqrt(3)/2 * d^2.
  cell_area = math.sqrt(3) / 2 * cell_diameter**2
  expected = SIZE * SIZE / cell_area
  for areas in _cell_areas(labels):
    # Border cells are cut, so a few more components than whole cells fit.
    assert 0.6 * expected <= len(areas) <= 2.0 * expected, (len(areas), expected)
    assert (areas > 0.1 * cell_area).mean() >= 0.6
    assert np.median(areas) > 0.4 * cell_area
    # No interior component leaks into its neighbours to span a large part of the image.
    assert areas.max() < 5 * cell_area


def test_cell_count_follows_cell_diameter():
  small = _cell_areas(make_em_like(2, 128, seed=5, cell_diameter=18.0)[1])
  large = _cell_areas(make_em_like(2, 128, seed=5, cell_diameter=36.0)[1])
  # Cell count scales like 1 / d^2, i.e. by about 4 here; border cells damp the ratio.
  assert sum(map(len, small)) > 2.5 * sum(map(len, large))


def test_organelles_are_dark_and_labelled_interior():
  options = dict(size=128, seed=2, blur_sigma=0.0, noise_std=0.0)
  with_organelles, labels = make_em_like(3, organelles_per_cell=2.0, **options)
  without, labels_without = make_em_like(3, organelles_per_cell=0.0, **options)
  # Organelles have their own random stream: the layout and labels do not change.
  np.testing.assert_array_equal(labels, labels_without)
  darker = without.astype(int) - with_organelles.astype(int)
  assert darker.min() >= 0
  organelle = darker > 10
  assert organelle.sum() > 100
  assert np.all(labels[organelle] == 255)
  # Dark, but lighter than membranes so that darkness alone does not give the label away.
  assert darker.max() < 60


def test_blur_and_noise_change_only_the_image():
  plain, plain_labels = make_em_like(2, 64, seed=4, blur_sigma=0.0, noise_std=0.0)
  noisy, noisy_labels = make_em_like(2, 64, seed=4, blur_sigma=2.0, noise_std=20.0)
  np.testing.assert_array_equal(plain_labels, noisy_labels)
  assert not np.array_equal(plain, noisy)


def test_two_nearest_matches_kdtree():
  rng = np.random.default_rng(0)
  seeds = rng.uniform(-40.0, 140.0, (120, 2))
  grid = np.stack(np.meshgrid(np.arange(70, dtype=np.float32), np.arange(45, dtype=np.float32),
                              indexing='ij'))
  sample = grid + rng.normal(0.0, 2.0, grid.shape).astype(np.float32)
  dist1_sq, dist2_sq, index1, index2 = procedural._two_nearest(sample, seeds)
  distances, indices = cKDTree(seeds).query(sample.reshape(2, -1).T, k=2)
  np.testing.assert_allclose(np.sqrt(dist1_sq).ravel(), distances[:, 0], atol=1e-3)
  np.testing.assert_allclose(np.sqrt(dist2_sq).ravel(), distances[:, 1], atol=1e-3)
  np.testing.assert_array_equal(index1.ravel(), indices[:, 0])
  np.testing.assert_array_equal(index2.ravel(), indices[:, 1])


def test_describe_exact_values():
  images = np.array([[[10, 20], [200, 100]]], np.uint8)
  labels = np.array([[[0, 0], [255, 255]]], np.uint8)
  stats = describe(images, labels)
  assert stats == {'membrane_fraction': 0.5, 'membrane_mean': 15.0, 'interior_mean': 150.0}


def test_describe_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='shape'):
    describe(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


@pytest.mark.parametrize('kwargs, name', [
    (dict(num_images=0), 'num_images'),
    (dict(num_images=2.5), 'num_images'),
    (dict(size=0), 'size'),
    (dict(size=(16,)), 'size'),
    (dict(size=(16, -4)), 'size'),
    (dict(seed=-1), 'seed'),
    (dict(cell_diameter=0.0), 'cell_diameter'),
    (dict(membrane_width=0.0), 'membrane_width'),
    (dict(membrane_width=-1.0), 'membrane_width'),
    (dict(cell_diameter=10.0, membrane_width=6.0), 'cell_diameter'),
    (dict(organelles_per_cell=-0.5), 'organelles_per_cell'),
    (dict(blur_sigma=-1.0), 'blur_sigma'),
    (dict(blur_sigma=float('nan')), 'blur_sigma'),
    (dict(noise_std=-3.0), 'noise_std'),
])
def test_argument_validation(kwargs, name):
  arguments = dict(num_images=1, size=32)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=name):
    make_em_like(arguments.pop('num_images'), arguments.pop('size'), **arguments)
