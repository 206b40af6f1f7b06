"""Tests for unet_jax.losses against independent numpy references."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from unet_jax.config import overrides
from unet_jax.training import losses

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


# --- binary cross-entropy --------------------------------------------------------------------

_bce = jax.jit(losses.sigmoid_binary_cross_entropy, static_argnames=('ignore_label',))


def _reference_bce(logits, labels, weights=None, ignore_label=None):
  """Per-example weighted BCE from explicit sigmoid probabilities, pixel by pixel."""
  logits = np.asarray(logits, np.float64).reshape(labels.shape[0], -1)
  flat_labels = np.asarray(labels).reshape(labels.shape[0], -1)
  if weights is None:
    flat_weights = np.ones(flat_labels.shape)
  else:
    flat_weights = np.broadcast_to(weights, labels.shape).reshape(labels.shape[0], -1)
  out = np.zeros(labels.shape[0])
  for n in range(labels.shape[0]):
    num = den = 0.0
    for x, y, w in zip(logits[n], flat_labels[n], flat_weights[n]):
      if ignore_label is not None and y == ignore_label:
        continue
      p = scipy.special.expit(x)
      num += w * -(y * np.log(p) + (1 - y) * np.log1p(-p))
      den += w
    out[n] = num / den if den > 0 else 0.0
  return out


def _binary_inputs(seed, shape):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=2.0, size=shape + (1,)).astype(np.float32)
  labels = rng.integers(0, 2, size=shape).astype(np.int32)
  weights = rng.uniform(0.1, 3.0, size=shape).astype(np.float32)
  return logits, labels, weights


@pytest.mark.parametrize('shape', [(3, 5, 6), (2, 3, 4, 5)], ids=['2d', '3d'])
def test_binary_cross_entropy_matches_reference(shape):
  logits, labels, weights = _binary_inputs(50, shape)
  labels[0, 0] = 255
  got = _bce(logits, labels, weights=weights, ignore_label=255)
  assert got.shape == (shape[0],)
  want = _reference_bce(logits[..., 0], labels, weights, ignore_label=255)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_binary_cross_entropy_channel_axis_is_optional_and_matches_two_class_softmax():
  logits, labels, _ = _binary_inputs(51, (2, 4, 5))
  with_channel = _bce(logits, labels)
  np.testing.assert_allclose(_bce(logits[..., 0], labels), with_channel, rtol=1e-6)
  # softmax([0, x]) puts sigmoid(x) on class 1, so a 2-class CE on those logits is the same loss.
  two_class = np.concatenate([np.zeros_like(logits), logits], axis=-1)
  np.testing.assert_allclose(_ce(two_class, labels), with_channel, rtol=1e-5, atol=1e-6)


def test_binary_cross_entropy_perfect_and_wrong_and_bad_labels():
  labels = np.array([[[0, 1], [1, 0]]], np.int32)
  perfect = (np.where(labels == 1, 50.0, -50.0)[..., None]).astype(np.float32)
  np.testing.assert_allclose(_bce(perfect, labels), 0.0, atol=1e-6)
  np.testing.assert_allclose(_bce(-perfect, labels), 50.0, rtol=1e-6)
  assert np.isnan(np.asarray(_bce(perfect, np.full_like(labels, 2)))).all()


def test_binary_cross_entropy_rejects_multi_channel_logits():
  with pytest.raises(ValueError, match=r'\(N, \*spatial, 1\)') as info:
    losses.sigmoid_binary_cross_entropy(np.zeros((2, 4, 4, 2), np.float32),
                                        np.zeros((2, 4, 4), np.int32))
  assert '(2, 4, 4, 2)' in str(info.value) and '(2, 4, 4)' in str(info.value)


# --- focal -----------------------------------------------------------------------------------

_focal = jax.jit(losses.softmax_focal_loss, static_argnames=('gamma', 'alpha', 'ignore_label'))


def _reference_focal(logits, labels, gamma, alpha=None, weights=None, ignore_label=None):
  logits = np.asarray(logits, np.float64)
  num_examples, num_classes = logits.shape[0], logits.shape[-1]
  log_probs = scipy.special.log_softmax(logits, axis=-1).reshape(num_examples, -1, num_classes)
  flat_labels = np.asarray(labels).reshape(num_examples, -1)
  flat_weights = (np.ones(flat_labels.shape) if weights is None
                  else np.broadcast_to(weights, labels.shape).reshape(num_examples, -1))
  out = np.zeros(num_examples)
  for n in range(num_examples):
    num = den = 0.0
    for i, label in enumerate(flat_labels[n]):
      if ignore_label is not None and label == ignore_label:
        continue
      p = np.exp(log_probs[n, i, label])
      a = 1.0 if alpha is None else alpha[label]
      num += flat_weights[n, i] * -a * (1 - p) ** gamma * np.log(p)
      den += flat_weights[n, i]
    out[n] = num / den if den > 0 else 0.0
  return out


@pytest.mark.parametrize('gamma,alpha', [(2.0, None), (0.5, (0.25, 1.0, 2.0))])
def test_focal_matches_reference(gamma, alpha):
  logits, labels, weights = _random_inputs(60, (3, 5, 4), 3)
  labels[1, :2] = 255
  got = _focal(logits, labels, gamma=gamma, alpha=alpha, weights=weights, ignore_label=255)
  want = _reference_focal(logits, labels, gamma, alpha, weights, ignore_label=255)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_focal_with_gamma_zero_is_cross_entropy():
  logits, labels, weights = _random_inputs(61, (2, 4, 4), 3)
  np.testing.assert_allclose(_focal(logits, labels, gamma=0.0, weights=weights),
                             _ce(logits, labels, weights=weights), rtol=1e-6)


def test_focal_is_below_cross_entropy_and_zero_when_perfect():
  logits, labels, _ = _random_inputs(62, (2, 4, 4), 3)
  assert np.all(np.asarray(_focal(logits, labels)) < np.asarray(_ce(logits, labels)))
  np.testing.assert_allclose(_focal(_perfect_logits(labels, 3), labels), 0.0, atol=1e-6)


def test_focal_gradient_is_finite_on_saturated_logits_for_gamma_below_one():
  _, labels, _ = _random_inputs(63, (2, 3, 3), 3)
  perfect = _perfect_logits(labels, 3)  # p_t == 1 in float32, where (1 - p)^0.5 has no slope
  grad = _grad(lambda x: _focal(x, labels, gamma=0.5))(perfect)
  assert np.isfinite(grad).all()


def test_focal_option_validation():
  logits, labels, _ = _random_inputs(64, (1, 2, 2), 3)
  with pytest.raises(ValueError, match='gamma'):
    losses.softmax_focal_loss(logits, labels, gamma=-1.0)
  # eval_shape traces without running, which is all that validation needs.
  with pytest.raises(ValueError, match=r'one finite non-negative weight per class \(3\)'):
    jax.eval_shape(lambda x: losses.softmax_focal_loss(x, labels, alpha=(1.0, 1.0)), logits)
  with pytest.raises(ValueError, match='alpha'):
    jax.eval_shape(lambda x: losses.softmax_focal_loss(x, labels, alpha=(1.0, -1.0, 1.0)),
                   logits)


# --- jaccard, tversky, focal tversky ---------------------------------------------------------

_jaccard = jax.jit(losses.soft_jaccard_loss,
                   static_argnames=('include_background', 'ignore_label'))
_tversky = jax.jit(losses.tversky_loss, static_argnames=('include_background', 'ignore_label'))
_focal_tversky = jax.jit(losses.focal_tversky_loss,
                         static_argnames=('include_background', 'ignore_label'))


def _reference_region(kind, logits, labels, *, smooth=1.0, include_background=True,
                      ignore_label=None, alpha=0.3, beta=0.7, gamma=0.75):
  """Jaccard / Tversky / focal Tversky from per-class sums over the kept pixels."""
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
    scores = []
    for c in range(0 if include_background else 1, num_classes):
      t = (flat_labels[n][keep] == c).astype(np.float64)
      inter = np.sum(p[:, c] * t)
      union = p[:, c].sum() + t.sum() - inter
      if kind == 'jaccard':
        scores.append(1 - (inter + smooth) / (union + smooth))
      else:
        fp, fn = np.sum(p[:, c] * (1 - t)), np.sum((1 - p[:, c]) * t)
        index = (inter + smooth) / (inter + alpha * fp + beta * fn + smooth)
        scores.append(1 - index if kind == 'tversky' else (1 - index) ** gamma)
    out[n] = np.mean(scores)
  return out


@pytest.mark.parametrize('shape,include_background', [((3, 5, 6), True), ((2, 3, 4, 5), False)],
                         ids=['2d', '3d-without-background'])
def test_region_losses_match_reference(shape, include_background):
  logits, labels, _ = _random_inputs(70, shape, 3)
  labels[0, 0] = 255
  kwargs = dict(include_background=include_background, ignore_label=255)
  np.testing.assert_allclose(_jaccard(logits, labels, smooth=0.5, **kwargs),
                             _reference_region('jaccard', logits, labels, smooth=0.5, **kwargs),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      _tversky(logits, labels, alpha=0.2, beta=0.9, **kwargs),
      _reference_region('tversky', logits, labels, alpha=0.2, beta=0.9, **kwargs),
      rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      _focal_tversky(logits, labels, gamma=0.6, **kwargs),
      _reference_region('focal_tversky', logits, labels, gamma=0.6, **kwargs),
      rtol=RTOL, atol=ATOL)


def test_tversky_special_cases_reduce_to_dice_and_jaccard():
  logits, labels, _ = _random_inputs(71, (3, 4, 5), 3)
  # alpha = beta = 1/2 is Dice (exactly so only without smoothing); alpha = beta = 1 is Jaccard.
  # Every call passes the same keywords so that each function compiles once.
  np.testing.assert_allclose(_tversky(logits, labels, alpha=0.5, beta=0.5, smooth=0.0),
                             _dice(logits, labels, smooth=0.0), rtol=1e-5)
  np.testing.assert_allclose(_tversky(logits, labels, alpha=1.0, beta=1.0, smooth=1.0),
                             _jaccard(logits, labels, smooth=1.0), rtol=1e-5)
  np.testing.assert_allclose(_focal_tversky(logits, labels, gamma=1.0, smooth=1.0),
                             _tversky(logits, labels, alpha=0.3, beta=0.7, smooth=1.0), rtol=1e-5)


def test_tversky_beta_penalises_missed_foreground():
  labels = np.array([[[0, 1], [1, 1]]], np.int32)
  partial = _perfect_logits(np.array([[[0, 1], [0, 0]]]), 2, scale=20.0)  # 1 TP, 0 FP, 2 FN
  for beta in (0.2, 0.8):
    got = float(_tversky(partial, labels, alpha=0.5, beta=beta, smooth=0.0,
                         include_background=False)[0])
    assert got == pytest.approx(1 - 1 / (1 + beta * 2), abs=1e-5)


@pytest.mark.parametrize('fn', [_jaccard, _tversky, _focal_tversky])
def test_region_losses_perfect_is_zero_and_disjoint_is_one(fn):
  labels = np.array([[[0, 1, 2], [2, 1, 0]], [[1, 1, 0], [0, 2, 2]]], np.int32)
  np.testing.assert_allclose(fn(_perfect_logits(labels, 3), labels, smooth=1e-6), 0.0, atol=1e-6)
  wrong = _perfect_logits((labels + 1) % 3, 3)
  np.testing.assert_allclose(fn(wrong, labels, smooth=1e-6), 1.0, atol=1e-5)


def test_focal_tversky_gradient_is_finite_when_classes_match_exactly():
  logits, labels, _ = _random_inputs(72, (2, 3, 3), 3)
  labels[0] = 255  # every class has TI == 1 there, where (1 - TI)^0.75 has no slope
  loss = _focal_tversky(logits, labels, ignore_label=255)
  np.testing.assert_allclose(loss[0], 0.0, atol=1e-7)
  grad = _grad(lambda x: _focal_tversky(x, labels, ignore_label=255))(logits)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[0], 0.0)


def test_region_option_validation():
  logits, labels, _ = _random_inputs(73, (1, 2, 2), 2)
  with pytest.raises(ValueError, match='alpha'):
    losses.tversky_loss(logits, labels, alpha=-0.1)
  with pytest.raises(ValueError, match='beta'):
    losses.focal_tversky_loss(logits, labels, beta=float('nan'))
  with pytest.raises(ValueError, match='gamma'):
    losses.focal_tversky_loss(logits, labels, gamma=0.0)
  with pytest.raises(ValueError, match='smooth'):
    losses.soft_jaccard_loss(logits, labels, smooth=-1.0)
  with pytest.raises(ValueError, match='no class'):
    losses.tversky_loss(logits[..., :1], labels, include_background=False)


# --- shared properties -----------------------------------------------------------------------

def _binary_case(x, y, w):
  # The sigmoid loss sees the first channel and the labels folded onto {0, 1}.
  return losses.sigmoid_binary_cross_entropy(x[..., :1], jnp.where(y == 255, y, y % 2),
                                             weights=w, ignore_label=255)


_LOSS_CASES = {
    'ce': lambda x, y, w: losses.softmax_cross_entropy(x, y, weights=w, ignore_label=255),
    'bce': _binary_case,
    'focal': lambda x, y, w: losses.softmax_focal_loss(
        x, y, gamma=1.5, alpha=(0.5, 1.0, 2.0), weights=w, ignore_label=255),
    'dice': lambda x, y, w: losses.soft_dice_loss(x, y, ignore_label=255),
    'jaccard': lambda x, y, w: losses.soft_jaccard_loss(x, y, ignore_label=255),
    'tversky': lambda x, y, w: losses.tversky_loss(x, y, ignore_label=255),
    'focal_tversky': lambda x, y, w: losses.focal_tversky_loss(x, y, gamma=0.5,
                                                               ignore_label=255),
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
    # One compiled function gives both the values and the gradient.
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, weights).sum()))
    f = lambda x: float(value_and_grad(jnp.asarray(x))[0])
    grad = np.asarray(value_and_grad(jnp.asarray(logits))[1])
    eps = 1e-6
    rng = np.random.default_rng(0)
    for _ in range(5):
      idx = tuple(rng.integers(0, s) for s in (1,) + logits.shape[1:])
      bumped_up, bumped_down = logits.copy(), logits.copy()
      bumped_up[idx] += eps
      bumped_down[idx] -= eps
      numeric = (f(bumped_up) - f(bumped_down)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], numeric, rtol=1e-4, atol=1e-7)


# Jaccard and Tversky run the same code as Dice up to their last line; eager mode is slow on CPU.
@pytest.mark.parametrize('name', ['bce', 'ce', 'dice', 'focal', 'focal_tversky'])
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


_CLASS_LOSSES = [losses.softmax_cross_entropy, losses.softmax_focal_loss, losses.soft_dice_loss,
                 losses.soft_jaccard_loss, losses.tversky_loss, losses.focal_tversky_loss]


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize('fn', _CLASS_LOSSES, ids=lambda f: f.__name__)
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


@pytest.mark.parametrize('fn', _CLASS_LOSSES, ids=lambda f: f.__name__)
def test_float_labels_raise(fn):
  logits = np.zeros((2, 4, 4, 3), np.float32)
  with pytest.raises(ValueError, match='integer'):
    fn(logits, np.zeros((2, 4, 4), np.float32))


def test_bad_weight_shape_raises():
  logits, labels, _ = _random_inputs(30, (2, 4, 4), 3)
  with pytest.raises(ValueError, match='weights'):
    jax.eval_shape(lambda x: losses.softmax_cross_entropy(
        x, labels, weights=np.ones((2, 4, 5), np.float32)), logits)


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
  assert str(sorted(losses.LOSSES)) in message
  assert "'focal_tversky'" in message


def test_make_loss_rejects_empty_and_negative():
  with pytest.raises(ValueError, match='empty'):
    losses.make_loss({})
  with pytest.raises(ValueError, match='non-negative'):
    losses.make_loss({'dice': -1.0})


def test_losses_registry():
  assert losses.LOSSES == {
      'cross_entropy': losses.softmax_cross_entropy,
      'binary_cross_entropy': losses.sigmoid_binary_cross_entropy,
      'focal': losses.softmax_focal_loss,
      'dice': losses.soft_dice_loss,
      'jaccard': losses.soft_jaccard_loss,
      'tversky': losses.tversky_loss,
      'focal_tversky': losses.focal_tversky_loss,
      'skeleton_recall': losses.skeleton_recall_loss,
      'cldice': losses.soft_cldice_loss,
  }


def test_make_loss_options_reach_their_terms():
  logits, labels, weights = _inputs_with_ignored(42)
  loss_fn = losses.make_loss(
      {'focal': 1.0, 'tversky': 2.0}, ignore_label=255,
      options={'focal': {'gamma': 0.0}, 'tversky': {'alpha': 0.9, 'beta': 0.1}})
  total, parts = jax.jit(loss_fn)(logits, labels, weights=weights)
  # gamma=0 makes the focal term the weighted cross-entropy: proof that the option arrived.
  focal = _reference_ce(logits, labels, weights, ignore_label=255).mean()
  tversky = _reference_region('tversky', logits, labels, ignore_label=255, alpha=0.9,
                              beta=0.1).mean()
  np.testing.assert_allclose(parts['focal'], focal, rtol=RTOL)
  np.testing.assert_allclose(parts['tversky'], tversky, rtol=RTOL)
  np.testing.assert_allclose(total, focal + 2 * tversky, rtol=RTOL)


def test_make_loss_pixel_weights_reach_only_the_terms_that_take_them():
  logits, labels, weights = _random_inputs(43, (2, 4, 4), 3)
  loss_fn = jax.jit(losses.make_loss({'focal': 1.0, 'dice': 1.0}))
  _, weighted = loss_fn(logits, labels, weights=weights)
  _, plain = loss_fn(logits, labels)
  np.testing.assert_allclose(weighted['focal'],
                             _reference_focal(logits, labels, 2.0, weights=weights).mean(),
                             rtol=RTOL)
  assert not np.isclose(weighted['focal'], plain['focal'])
  np.testing.assert_allclose(weighted['dice'], plain['dice'], rtol=1e-6)
  assert losses.loss_options('dice') == ('smooth', 'include_background')
  assert losses.loss_options('cross_entropy') == ()


def test_make_loss_unknown_option_names_term_option_and_valid_options():
  with pytest.raises(ValueError) as info:
    losses.make_loss({'tversky': 1.0}, options={'tversky': {'alpha': 0.3, 'gama': 2.0}})
  message = str(info.value)
  assert "'tversky'" in message and "'gama'" in message
  assert str(sorted(losses.loss_options('tversky'))) in message
  # Keywords that make_loss passes itself are not options.
  with pytest.raises(ValueError, match="unknown option 'ignore_label'"):
    losses.make_loss({'dice': 1.0}, options={'dice': {'ignore_label': 0}})
  with pytest.raises(ValueError, match="options for 'focal', which is not in"):
    losses.make_loss({'dice': 1.0}, options={'focal': {'gamma': 1.0}})
  # A bad value is caught when the loss is traced.
  loss_fn = losses.make_loss({'focal': 1.0}, options={'focal': {'gamma': -2.0}})
  logits, labels, _ = _random_inputs(44, (1, 2, 2), 2)
  with pytest.raises(ValueError, match='gamma'):
    jax.jit(loss_fn)(logits, labels)


def test_make_loss_deep_supervision_combines_heads():
  rng = np.random.default_rng(45)
  logits, labels, weights = _inputs_with_ignored(45)
  heads = (logits, rng.normal(size=logits.shape).astype(np.float32),
           rng.normal(size=logits.shape).astype(np.float32))
  terms = {'cross_entropy': 1.0, 'dice': 0.5}

  def reference(head_weights):
    mix = np.asarray(head_weights, np.float64) / np.sum(head_weights)
    ce = sum(m * _reference_ce(h, labels, weights, ignore_label=255).mean()
             for m, h in zip(mix, heads))
    dice = sum(m * _reference_dice(h, labels, ignore_label=255).mean()
               for m, h in zip(mix, heads))
    return ce, dice

  equal = losses.make_loss(terms, ignore_label=255)
  weighted = losses.make_loss(terms, ignore_label=255, deep_supervision_weights=(4, 2, 2))
  total, parts = jax.jit(equal)(heads, labels, weights=weights)
  ce, dice = reference((1, 1, 1))
  np.testing.assert_allclose(parts['cross_entropy'], ce, rtol=RTOL)
  np.testing.assert_allclose(parts['dice'], dice, rtol=RTOL)
  np.testing.assert_allclose(total, ce + 0.5 * dice, rtol=RTOL)
  (total, parts), grads = jax.jit(jax.value_and_grad(
      lambda hs: weighted(hs, labels, weights=weights), has_aux=True))(heads)
  ce, dice = reference((4, 2, 2))
  assert set(parts) == set(terms)
  np.testing.assert_allclose(parts['cross_entropy'], ce, rtol=RTOL)
  np.testing.assert_allclose(parts['dice'], dice, rtol=RTOL)
  np.testing.assert_allclose(total, ce + 0.5 * dice, rtol=RTOL)
  assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in grads)
  # A list of heads is accepted like a tuple (tracing is enough to show it).
  assert jax.eval_shape(lambda hs: equal(hs, labels)[0], list(heads)).shape == ()


def test_make_loss_deep_supervision_validation():
  logits, labels, _ = _random_inputs(46, (1, 3, 3), 2)

  def trace(loss_fn, heads):
    return jax.eval_shape(lambda h: loss_fn(h, labels), heads)

  loss_fn = losses.make_loss({'dice': 1.0}, deep_supervision_weights=(1.0, 1.0))
  with pytest.raises(ValueError, match='2 entries for 3 output heads'):
    trace(loss_fn, (logits, logits, logits))
  with pytest.raises(ValueError, match='2 entries for 1 output heads'):
    trace(loss_fn, logits)
  with pytest.raises(ValueError, match='empty sequence'):
    trace(losses.make_loss({'dice': 1.0}), ())
  for bad in ((), (1.0, -1.0), (0.0, 0.0), (float('inf'),)):
    with pytest.raises(ValueError, match='deep_supervision_weights'):
      losses.make_loss({'dice': 1.0}, deep_supervision_weights=bad)
  with pytest.raises(ValueError, match='do not match'):
    trace(losses.make_loss({'dice': 1.0}), (logits, logits[:, :2]))


def test_a_term_of_weight_zero_is_off_and_may_keep_its_options():
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 8, 8)), jnp.int32)
  logits = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  both = losses.make_loss({'cross_entropy': 1.0, 'focal': 0.0}, options={'focal': {'gamma': 3.0}})
  alone = losses.make_loss({'cross_entropy': 1.0})
  (total, parts), (expected, _) = both(logits, labels), alone(logits, labels)
  assert set(parts) == {'cross_entropy'}
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


def test_the_configs_list_every_loss_so_one_flag_turns_it_on():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for arg, active in (('', {'cross_entropy'}), ('cpu', {'cross_entropy', 'dice'})):
    config = overrides.load_config_file(os.path.join(root, 'experiments', 'isbi.py') + f':{arg}')
    assert set(config.loss.terms) == set(losses.LOSSES)
    assert {name for name, weight in config.loss.terms.items() if weight > 0} == active
