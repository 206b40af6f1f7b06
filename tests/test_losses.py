"""Tests for unet_jax.losses against independent numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from unet_jax import losses

RTOL = 1e-5
ATOL = 1e-5

# Eager dispatch compiles every primitive per new shape, which is slow on CPU; most tests go
# through jit (parity with eager mode is tested on its own below).
_ce = jax.jit(losses.softmax_cross_entropy, static_argnames=('ignore_label',))
_dice = jax.jit(losses.soft_dice_loss, static_argnames=('include_background', 'ignore_label'))


def _grad(fn):
  """jit-compiled gradient of `fn(logits).sum()`."""
  return jax.jit(jax.grad(lambda x: fn(x).sum()))


def _random_inputs(seed: int, shape: tuple[int, ...], num_classes: int):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=shape + (num_classes,)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  weights = rng.uniform(0.1, 3.0, size=shape).astype(np.float32)
  return logits, labels, weights


def _reference_ce(logits, labels, weights=None, ignore_label=None):
  """Per-example weighted CE with a double loop over examples and pixels."""
  logits = np.asarray(logits, np.float64)
  num_examples, num_classes = logits.shape[0], logits.shape[-1]
  flat_logits = logits.reshape(num_examples, -1, num_classes)
  flat_labels = np.asarray(labels).reshape(num_examples, -1)
  if weights is None:
    flat_weights = np.ones(flat_labels.shape)
  else:
    flat_weights = np.broadcast_to(weights, labels.shape).reshape(num_examples, -1)
  out = np.zeros(num_examples)
  for n in range(num_examples):
    log_probs = scipy.special.log_softmax(flat_logits[n], axis=-1)
    num = den = 0.0
    for i, label in enumerate(flat_labels[n]):
      if ignore_label is not None and label == ignore_label:
        continue
      num += flat_weights[n, i] * -log_probs[i, label]
      den += flat_weights[n, i]
    out[n] = num / den if den > 0 else 0.0
  return out


def _reference_dice(logits, labels, smooth=1.0, include_background=True, ignore_label=None):
  logits = np.asarray(logits, np.float64)
  num_examples, num_classes = logits.shape[0], logits.shape[-1]
  probs = scipy.special.softmax(logits, axis=-1).reshape(num_examples, -1, num_classes)
  flat_labels = np.asarray(labels).reshape(num_examples, -1)
  out = np.zeros(num_examples)
  for n in range(num_examples):
    keep = np.ones(flat_labels.shape[1], bool)
    if ignore_label is not None:
      keep = flat_labels[n] != ignore_label
    p = probs[n][keep]
    classes = range(num_classes) if include_background else range(1, num_classes)
    dices = []
    for c in classes:
      t = (flat_labels[n][keep] == c).astype(np.float64)
      dices.append((2 * np.sum(p[:, c] * t) + smooth) / (p[:, c].sum() + t.sum() + smooth))
    out[n] = 1 - np.mean(dices)
  return out


def _perfect_logits(labels, num_classes, scale=100.0):
  return (scale * np.eye(num_classes, dtype=np.float32)[labels]).astype(np.float32)


# --- cross-entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(3, 5, 6), (2, 3, 4, 5)], ids=['2d', '3d'])
def test_cross_entropy_matches_reference(shape):
  logits, labels, _ = _random_inputs(0, shape, 4)
  got = _ce(logits, labels)
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, _reference_ce(logits, labels), rtol=RTOL, atol=ATOL)


def test_cross_entropy_weights_and_ignore_label_match_reference():
  logits, labels, weights = _random_inputs(1, (4, 6, 5), 3)
  labels[0, :2] = 255
  labels[1, 3:, :] = 255
  got = _ce(logits, labels, weights=weights, ignore_label=255)
  want = _reference_ce(logits, labels, weights, ignore_label=255)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Weighting must actually change the result, or the check above proves little.
  unweighted = _ce(logits, labels, ignore_label=255)
  assert not np.allclose(got, unweighted)


def test_cross_entropy_negative_ignore_label():
  logits, labels, _ = _random_inputs(2, (2, 4, 4), 3)
  labels[:, 0] = -1
  got = _ce(logits, labels, ignore_label=-1)
  np.testing.assert_allclose(got, _reference_ce(logits, labels, ignore_label=-1), rtol=RTOL,
                             atol=ATOL)


def test_cross_entropy_broadcast_weights():
  logits, labels, _ = _random_inputs(3, (3, 4, 4), 2)
  per_example = np.array([1.0, 2.0, 0.5], np.float32)[:, None, None]
  got = _ce(logits, labels, weights=per_example)
  # A constant weight per example cancels in the weighted mean.
  np.testing.assert_allclose(got, _ce(logits, labels), rtol=RTOL)


def test_cross_entropy_all_ignored_example_is_zero_with_finite_grad():
  logits, labels, weights = _random_inputs(4, (2, 3, 3), 3)
  labels[1] = 255
  loss = _ce(logits, labels, weights=weights, ignore_label=255)
  assert loss[1] == 0.0
  assert np.isfinite(loss).all()
  grad = _grad(lambda x: _ce(x, labels, weights=weights, ignore_label=255))(logits)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[1], 0.0)
  assert np.abs(grad[0]).sum() > 0


def test_cross_entropy_zero_weights_give_zero():
  logits, labels, _ = _random_inputs(5, (2, 3, 3), 3)
  loss = _ce(logits, labels, weights=np.zeros(labels.shape, np.float32))
  np.testing.assert_array_equal(loss, 0.0)


def test_cross_entropy_perfect_prediction_is_zero():
  _, labels, _ = _random_inputs(6, (2, 5, 5), 4)
  loss = _ce(_perfect_logits(labels, 4), labels)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_cross_entropy_is_stable_for_huge_logits():
  logits = np.array([[[1e4, -1e4], [-1e4, 1e4]]], np.float32)  # (1, 2, 2)
  labels = np.array([[1, 1]], np.int32)
  loss = _ce(logits, labels)
  np.testing.assert_allclose(loss, [1e4], rtol=1e-6)


def test_cross_entropy_bfloat16_logits():
  logits, labels, _ = _random_inputs(7, (2, 4, 4), 3)
  got = _ce(jnp.asarray(logits, jnp.bfloat16), labels)
  assert got.dtype == jnp.float32
  want = _reference_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), labels)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_undeclared_out_of_range_label_gives_nan_for_that_example_only():
  logits, labels, _ = _random_inputs(8, (3, 3, 3), 3)
  labels[1, 0, 0] = 255
  for fn in (_ce, _dice):
    loss = np.asarray(fn(logits, labels))
    assert np.isnan(loss[1])
    assert np.isfinite(loss[[0, 2]]).all()


def test_uint8_labels_with_ignore_label():
  logits, labels, _ = _random_inputs(9, (2, 4, 4), 3)
  labels[0, 0] = 255
  small = labels.astype(np.uint8)
  for fn in (_ce, _dice):
    np.testing.assert_allclose(fn(logits, small, ignore_label=255),
                               fn(logits, labels, ignore_label=255), rtol=1e-6)
    # -1 must not silently match the stored 255.
    assert np.isnan(np.asarray(fn(logits, small, ignore_label=-1))[0])


# --- dice ------------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(3, 5, 6), (2, 3, 4, 5)], ids=['2d', '3d'])
@pytest.mark.parametrize('include_background', [True, False])
@pytest.mark.parametrize('smooth', [1.0, 1e-3])
def test_dice_matches_reference(shape, include_background, smooth):
  logits, labels, _ = _random_inputs(10, shape, 3)
  got = _dice(logits, labels, smooth=smooth,
                              include_background=include_background)
  assert got.shape == (shape[0],)
  want = _reference_dice(logits, labels, smooth, include_background)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_dice_ignore_label_matches_reference():
  logits, labels, _ = _random_inputs(11, (3, 6, 6), 4)
  labels[0, :3] = 255
  labels[2, :, 1] = 255
  got = _dice(logits, labels, ignore_label=255)
  np.testing.assert_allclose(got, _reference_dice(logits, labels, ignore_label=255), rtol=RTOL,
                             atol=ATOL)
  # The ignored pixels' probabilities must not leak into the sums.
  assert not np.allclose(got[0], _reference_dice(logits, np.where(labels == 255, 0, labels))[0])


def test_dice_perfect_prediction_is_zero():
  labels = np.array([[[0, 1, 2], [2, 1, 0], [1, 1, 2]]], np.int32)
  loss = _dice(_perfect_logits(labels, 3), labels)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_dice_totally_wrong_prediction_is_one():
  labels = np.array([[[0, 1], [1, 0]], [[1, 1], [0, 0]]], np.int32)
  logits = _perfect_logits(1 - labels, 2)
  loss = _dice(logits, labels, smooth=1e-6)
  np.testing.assert_allclose(loss, 1.0, atol=1e-5)


def test_dice_all_ignored_example_has_zero_loss_and_finite_grad():
  logits, labels, _ = _random_inputs(12, (2, 3, 3), 3)
  labels[0] = -1
  loss = _dice(logits, labels, ignore_label=-1)
  # Every class is absent from both sides, so dice = smooth / smooth = 1 for each.
  np.testing.assert_allclose(loss[0], 0.0, atol=1e-7)
  grad = _grad(lambda x: _dice(x, labels, ignore_label=-1))(logits)
  assert np.isfinite(grad).all()
  np.testing.assert_allclose(grad[0], 0.0, atol=1e-7)


def test_dice_single_class_without_background_raises():
  logits, labels, _ = _random_inputs(13, (1, 2, 2), 1)
  with pytest.raises(ValueError, match='no class'):
    losses.soft_dice_loss(logits, labels, include_background=False)


def test_dice_negative_smooth_raises():
  logits, labels, _ = _random_inputs(14, (1, 2, 2), 2)
  with pytest.raises(ValueError, match='smooth'):
    losses.soft_dice_loss(logits, labels, smooth=-1.0)


# --- shared properties -----------------------------------------------------------------------

_LOSS_CASES = {
    'ce': lambda x, y, w: losses.softmax_cross_entropy(x, y, weights=w, ignore_label=255),
    'dice': lambda x, y, w: losses.soft_dice_loss(x, y, ignore_label=255),
}


def _inputs_with_ignored(seed, shape=(4, 5, 5), num_classes=3):
  logits, labels, weights = _random_inputs(seed, shape, num_classes)
  labels[0, 0] = 255
  labels[-1] = 255
  return logits, labels, weights


@pytest.mark.parametrize('name', sorted(_LOSS_CASES))
def test_gradients_are_finite(name):
  logits, labels, weights = _inputs_with_ignored(20)
  fn = _LOSS_CASES[name]
  grad = _grad(lambda x: fn(x, labels, weights))(logits)
  assert grad.shape == logits.shape
  assert np.isfinite(grad).all()
  # Ignored pixels receive no gradient.
  np.testing.assert_array_equal(grad[-1], 0.0)
  np.testing.assert_array_equal(grad[0, 0], 0.0)


@pytest.mark.parametrize('name', sorted(_LOSS_CASES))
def test_gradient_matches_finite_differences(name):
  logits, labels, weights = _inputs_with_ignored(21, shape=(2, 3, 3), num_classes=3)
  logits = logits.astype(np.float64)
  fn = _LOSS_CASES[name]
  with jax.enable_x64():
    f = jax.jit(lambda x: fn(x, labels, weights).sum())
    grad = np.asarray(jax.grad(f)(jnp.asarray(logits)))
    eps = 1e-6
    rng = np.random.default_rng(0)
    for _ in range(5):
      idx = tuple(rng.integers(0, s) for s in (1,) + logits.shape[1:])
      bumped_up, bumped_down = logits.copy(), logits.copy()
      bumped_up[idx] += eps
      bumped_down[idx] -= eps
      numeric = (float(f(jnp.asarray(bumped_up))) - float(f(jnp.asarray(bumped_down)))) / (2 * eps)
      np.testing.assert_allclose(grad[idx], numeric, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('name', sorted(_LOSS_CASES))
def test_jit_matches_eager(name):
  logits, labels, weights = _inputs_with_ignored(22)
  fn = _LOSS_CASES[name]
  eager = fn(logits, labels, weights)
  jitted = jax.jit(fn)(logits, labels, weights)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(_LOSS_CASES))
def test_vmap_matches_batched_call(name):
  logits, labels, weights = _inputs_with_ignored(23)
  fn = _LOSS_CASES[name]
  batched = jax.jit(fn)(logits, labels, weights)
  # Each vmapped call sees one example with a batch axis of 1.
  mapped = jax.jit(jax.vmap(lambda x, y, w: fn(x[None], y[None], w[None])[0]))(
      logits, labels, weights)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [losses.softmax_cross_entropy, losses.soft_dice_loss])
@pytest.mark.parametrize('logits_shape,labels_shape', [
    ((2, 4, 4, 3), (2, 4, 5)),  # spatial mismatch
    ((2, 4, 4, 3), (3, 4, 4)),  # batch mismatch
    ((2, 4, 4, 3), (2, 4, 4, 3)),  # labels given one-hot-like rank
    ((2, 4, 4), (2, 4, 4)),  # logits without a class axis
])
def test_shape_mismatch_raises_with_both_shapes(fn, logits_shape, labels_shape):
  logits = np.zeros(logits_shape, np.float32)
  labels = np.zeros(labels_shape, np.int32)
  with pytest.raises(ValueError) as info:
    fn(logits, labels)
  assert str(logits_shape) in str(info.value)
  assert str(labels_shape) in str(info.value)


def test_shape_mismatch_raises_under_jit():
  logits = np.zeros((2, 4, 4, 3), np.float32)
  labels = np.zeros((2, 4, 5), np.int32)
  with pytest.raises(ValueError, match='do not match'):
    jax.jit(losses.softmax_cross_entropy)(logits, labels)


@pytest.mark.parametrize('fn', [losses.softmax_cross_entropy, losses.soft_dice_loss])
def test_float_labels_raise(fn):
  logits = np.zeros((2, 4, 4, 3), np.float32)
  with pytest.raises(ValueError, match='integer'):
    fn(logits, np.zeros((2, 4, 4), np.float32))


def test_bad_weight_shape_raises():
  logits, labels, _ = _random_inputs(30, (2, 4, 4), 3)
  with pytest.raises(ValueError, match='weights'):
    losses.softmax_cross_entropy(logits, labels, weights=np.ones((2, 4, 5), np.float32))


# --- make_loss -------------------------------------------------------------------------------


def test_make_loss_weighted_sum():
  logits, labels, weights = _inputs_with_ignored(40)
  loss_fn = losses.make_loss({'cross_entropy': 1.0, 'dice': 0.5}, ignore_label=255)
  total, parts = jax.jit(loss_fn)(logits, labels, weights=weights)
  ce = _reference_ce(logits, labels, weights, ignore_label=255).mean()
  dice = _reference_dice(logits, labels, ignore_label=255).mean()
  assert set(parts) == {'cross_entropy', 'dice'}
  assert total.shape == () and parts['dice'].shape == ()
  np.testing.assert_allclose(parts['cross_entropy'], ce, rtol=RTOL)
  np.testing.assert_allclose(parts['dice'], dice, rtol=RTOL)
  np.testing.assert_allclose(total, ce + 0.5 * dice, rtol=RTOL)


def test_make_loss_without_weights_and_under_jit():
  logits, labels, _ = _random_inputs(41, (2, 4, 4), 3)
  loss_fn = losses.make_loss({'cross_entropy': 2.0})
  total, parts = jax.jit(loss_fn)(logits, labels)
  np.testing.assert_allclose(total, 2 * _reference_ce(logits, labels).mean(), rtol=RTOL)
  np.testing.assert_allclose(parts['cross_entropy'], _reference_ce(logits, labels).mean(),
                             rtol=RTOL)
  grad = jax.jit(jax.grad(lambda x: loss_fn(x, labels)[0]))(logits)
  assert np.isfinite(grad).all()


def test_make_loss_unknown_term_lists_valid_names():
  with pytest.raises(ValueError) as info:
    losses.make_loss({'cross_entropy': 1.0, 'dise': 1.0})
  message = str(info.value)
  assert "unknown loss 'dise'" in message
  assert "['cross_entropy', 'dice']" in message


def test_make_loss_rejects_empty_and_negative():
  with pytest.raises(ValueError, match='empty'):
    losses.make_loss({})
  with pytest.raises(ValueError, match='non-negative'):
    losses.make_loss({'dice': -1.0})


def test_losses_registry():
  assert losses.LOSSES == {
      'cross_entropy': losses.softmax_cross_entropy,
      'dice': losses.soft_dice_loss,
  }
