"""Skeleton recall and clDice, against skeletons and ratios computed here with scipy.ndimage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from unet_jax.training import losses
from unet_jax.training import topology_losses


def reference_skeleton(mask: np.ndarray, iterations: int) -> np.ndarray:
  """Lantuéjoul's skeleton of a binary (*spatial) mask: the union over k of what opening removes
  from the k-times eroded mask; erosion by the axis cross with the outside counted as inside,
  dilation by the full cube with the outside counted as outside."""
  cross = ndimage.generate_binary_structure(mask.ndim, 1)
  cube = np.ones((3,) * mask.ndim, bool)
  erode = lambda m: ndimage.binary_erosion(m, cross, border_value=1)
  opening = lambda m: ndimage.binary_dilation(erode(m), cube, border_value=0)
  skeleton = mask & ~opening(mask)
  for _ in range(iterations):
    mask = erode(mask)
    skeleton |= mask & ~opening(mask)
  return skeleton


def _blobs(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """A random binary mask of smooth blobs and thin ridges."""
  noise = np.random.default_rng(seed).normal(size=shape)
  smooth = ndimage.gaussian_filter(noise, 2.0)
  return np.abs(smooth) < 0.25 * smooth.std()


def _skeleton(mask: np.ndarray, iterations: int) -> np.ndarray:
  x = jnp.asarray(mask, jnp.float32)[None, ..., None]
  return np.asarray(topology_losses.soft_skeleton(x, iterations=iterations))[0, ..., 0]


@pytest.mark.parametrize('shape,iterations', [((64, 80), 0), ((64, 80), 3), ((64, 80), 10),
                                              ((20, 24, 28), 4)])
def test_skeleton_of_a_binary_mask_matches_the_reference(shape, iterations):
  mask = _blobs(shape, seed=iterations)
  ours = _skeleton(mask, iterations)
  assert set(np.unique(ours)) <= {0.0, 1.0}  # binary in, binary out
  np.testing.assert_array_equal(ours.astype(bool), reference_skeleton(mask, iterations))
  assert not (ours.astype(bool) & ~mask).any()


def test_a_bar_across_the_image_becomes_its_centre_line():
  mask = np.zeros((15, 40), bool)
  mask[5:10] = True  # 5 pixels thick, touching the left and right borders
  expected = np.zeros_like(mask)
  expected[7] = True
  np.testing.assert_array_equal(_skeleton(mask, 2).astype(bool), expected)
  # Too few erosions: the bar never thins to a line, so it leaves no skeleton at all.
  assert not _skeleton(mask, 1).any()


def test_skeleton_of_a_real_isbi_membrane_map(isbi_dir):
  import tifffile  # pylint: disable=g-import-not-at-top
  membrane = tifffile.imread(f'{isbi_dir}/train-labels.tif')[3, :160, :160] == 0
  ours = _skeleton(membrane, 10).astype(bool)
  np.testing.assert_array_equal(ours, reference_skeleton(membrane, 10))
  assert 0.1 < ours.sum() / membrane.sum() < 0.4  # a line through membranes some pixels wide


def _logits(probability_of_class_1: np.ndarray) -> jnp.ndarray:
  p = np.clip(probability_of_class_1.astype(np.float64), 1e-6, 1 - 1e-6)
  return jnp.asarray(np.stack([np.zeros_like(p), np.log(p / (1 - p))], -1), jnp.float32)[None]


def test_skeleton_recall_is_the_covered_share_of_the_tube():
  labels = np.zeros((32, 48), np.int32)
  labels[10:17, 4:44] = 1
  tube = ndimage.binary_dilation(reference_skeleton(labels == 1, 10), np.ones((3, 3), bool))
  prediction = (labels == 1).astype(float)
  prediction[:, 20:23] = 0  # a gap across the membrane: it would merge the cells on each side
  expected = 1 - (prediction * tube).sum() / tube.sum()
  loss = topology_losses.skeleton_recall_loss(_logits(prediction), jnp.asarray(labels)[None],
                                              smooth=0.0)
  np.testing.assert_allclose(np.asarray(loss), [expected], rtol=1e-4)
  # Dice counts the same gap by pixels, so it barely moves; recall loses a whole tube section.
  dice = losses.soft_dice_loss(_logits(prediction), jnp.asarray(labels)[None],
                               include_background=False, smooth=0.0)
  assert expected > 0.06 and float(dice[0]) < expected
  perfect = topology_losses.skeleton_recall_loss(_logits((labels == 1).astype(float)),
                                                 jnp.asarray(labels)[None], smooth=0.0)
  assert float(perfect[0]) < 1e-4


def test_skeleton_recall_gradient_lives_on_the_tube_only():
  labels = np.zeros((24, 24), np.int32)
  labels[8:13, :] = 1
  logits = jnp.zeros((1, 24, 24, 2))
  grad = jax.grad(lambda l: topology_losses.skeleton_recall_loss(
      l, jnp.asarray(labels)[None]).sum())(logits)
  touched = np.abs(np.asarray(grad)[0]).sum(-1) > 0
  np.testing.assert_array_equal(touched[:, 0], [False] * 9 + [True] * 3 + [False] * 12)
  assert (np.asarray(grad)[0, 9:12, :, 1] < 0).all()  # more membrane on the tube: lower loss


def test_ignored_pixels_are_left_out_and_bad_labels_give_nan():
  labels = np.zeros((1, 20, 30), np.int32)
  labels[0, 8:12] = 1
  ignored = labels.copy()
  ignored[0, :, 15:] = 255  # the right half is not annotated
  prediction = (labels[0] == 1).astype(float)
  prediction[:, 15:] = 0  # wrong exactly where nothing is known
  loss = topology_losses.skeleton_recall_loss(_logits(prediction), jnp.asarray(ignored),
                                              ignore_label=255, smooth=0.0)
  assert float(loss[0]) < 1e-4
  bad = labels.copy()
  bad[0, 0, 0] = 7
  assert np.isnan(topology_losses.skeleton_recall_loss(_logits(prediction), jnp.asarray(bad))[0])


def test_cldice_of_hard_predictions_matches_the_reference():
  labels = _blobs((48, 56), seed=5).astype(np.int32)
  prediction = ndimage.binary_erosion(labels == 1) | _blobs((48, 56), seed=6) & (labels == 1)
  skel_p, skel_t = reference_skeleton(prediction, 10), reference_skeleton(labels == 1, 10)
  precision = (skel_p & (labels == 1)).sum() / skel_p.sum()
  recall = (prediction & skel_t).sum() / skel_t.sum()
  expected = 1 - 2 * precision * recall / (precision + recall)
  loss = topology_losses.soft_cldice_loss(_logits(prediction.astype(float)),
                                          jnp.asarray(labels)[None], smooth=0.0)
  np.testing.assert_allclose(np.asarray(loss), [expected], atol=1e-4)
  assert 0.02 < expected < 0.9


def test_cldice_is_differentiable_through_the_predicted_skeleton():
  labels = jnp.asarray(_blobs((32, 32), seed=1).astype(np.int32))[None]
  logits = jax.random.normal(jax.random.key(0), (1, 32, 32, 2))
  grad = jax.grad(lambda l: topology_losses.soft_cldice_loss(l, labels).sum())(logits)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_topology_terms_train_through_make_loss_in_2d_and_3d():
  for shape in ((2, 24, 24), (1, 12, 12, 12)):
    labels = jnp.asarray(_blobs(shape, seed=2).astype(np.int32))
    loss_fn = losses.make_loss({'cross_entropy': 1.0, 'skeleton_recall': 1.0, 'cldice': 0.5},
                               options={'skeleton_recall': {'iterations': 4}})
    logits = jax.random.normal(jax.random.key(1), (*shape, 2))
    (total, parts), grad = jax.jit(jax.value_and_grad(
        lambda l: loss_fn(l, labels), has_aux=True))(logits)
    assert set(parts) == {'cross_entropy', 'skeleton_recall', 'cldice'}
    expected = parts['cross_entropy'] + parts['skeleton_recall'] + 0.5 * parts['cldice']
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()
  assert losses.loss_options('skeleton_recall') == ('iterations', 'tube_radius', 'smooth',
                                                    'include_background')


@pytest.mark.parametrize('option,value', [('iterations', -1), ('iterations', 2.5),
                                          ('tube_radius', -1), ('smooth', -1.0)])
def test_bad_options_are_refused(option, value):
  labels = jnp.zeros((1, 8, 8), jnp.int32)
  with pytest.raises(ValueError, match=option):
    topology_losses.skeleton_recall_loss(jnp.zeros((1, 8, 8, 2)), labels, **{option: value})
