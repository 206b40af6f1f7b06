"""Segmentation metrics from confusion matrices.

Shape conventions: `predictions` and `labels` are integer class ids of the same shape, any rank
(`(N, H, W)`, `(N, D, H, W)`, a single image, ...). A confusion matrix is `(C, C)` with rows =
true class and columns = predicted class.

Scores are computed on the host from a confusion matrix accumulated over a whole evaluation set,
so they are exact set-level numbers rather than averages of per-batch averages. The device side
(`confusion_matrix`) is jit-friendly; the host side (`segmentation_scores`,
`ConfusionAccumulator`) works in int64/float64 numpy.
"""

from __future__ import annotations

from typing import Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    predictions: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
) -> jax.Array:
  """Counts (true class, predicted class) pairs over all pixels.

  Pixels whose label is outside `[0, num_classes)` (e.g. an ignore label of -1 or 255) are not
  counted, and neither are pixels whose prediction is out of range, which has no column to go to.

  Args:
    predictions: integer predicted class ids, e.g. `argmax(logits, -1)`, any shape.
    labels: integer true class ids, same shape as `predictions`.
    num_classes: C, the number of classes.

  Returns:
    int32 `(C, C)` counts, rows = true class, columns = predicted class.

  Raises:
    ValueError: on a shape mismatch, a non-integer dtype, or a non-positive `num_classes`.
  """
  predictions = jnp.asarray(predictions)
  labels = jnp.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(
        f'predictions of shape {tuple(predictions.shape)} do not match labels of shape '
        f'{tuple(labels.shape)}')
  for name, array in (('predictions', predictions), ('labels', labels)):
    if not jnp.issubdtype(array.dtype, jnp.integer):
      raise ValueError(f'{name} must have an integer dtype; got {array.dtype}')
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer; got {num_classes}')
  num_classes = int(num_classes)

  labels = labels.reshape(-1).astype(jnp.int32)
  predictions = predictions.reshape(-1).astype(jnp.int32)
  valid = ((labels >= 0) & (labels < num_classes)
           & (predictions >= 0) & (predictions < num_classes))
  # Invalid pixels get a harmless in-range index and zero weight, which keeps shapes static.
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes**2)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """Elementwise `numerator / denominator`, NaN where the denominator is 0."""
  out = np.full(np.shape(numerator), np.nan, dtype=np.float64)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def _nanmean(values: np.ndarray) -> float:
  with warnings.catch_warnings():
    # All-NaN input is an expected case (nothing defined), whose answer is NaN.
    warnings.simplefilter('ignore', category=RuntimeWarning)
    return float(np.nanmean(values)) if values.size else float('nan')


def segmentation_scores(
    confusion: np.ndarray,
    *,
    class_names: Sequence[str],
) -> dict[str, float]:
  """Set-level segmentation scores from an accumulated confusion matrix.

  With `tp`, `fp`, `fn` per class taken from the matrix:

  * `pixel_accuracy`: trace / total.
  * `pixel_error`: 1 - pixel accuracy of the argmax prediction. This is not the ISBI 2012
    challenge's "pixel error", which is 1 - the maximal F-score over binarisation thresholds.
  * `dice_{n}` = 2tp / (2tp + fp + fn), `iou_{n}` = tp / (tp + fp + fn),
    `precision_{n}` = tp / (tp + fp), `recall_{n}` = tp / (tp + fn) for each class name n.
  * `dice_mean`, `iou_mean`: means over the classes whose score is defined.

  A ratio with a zero denominator is NaN: dice and IoU of a class absent from both truth and
  prediction, precision of a class never predicted, recall of a class never present. NaN classes
  are left out of the means; if every class is NaN, so is the mean. With an empty matrix, pixel
  accuracy and error are NaN too.

  Args:
    confusion: `(C, C)` non-negative counts, rows = true class, columns = predicted class, e.g.
      the sum of `confusion_matrix` over an evaluation set.
    class_names: C distinct names used in the keys.

  Returns:
    A flat dict of Python floats.

  Raises:
    ValueError: if `confusion` is not square, has negative entries, or `class_names` has the wrong
      length or repeated names.
  """
  confusion = np.asarray(jax.device_get(confusion))
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'confusion must be a square (C, C) matrix; got shape {confusion.shape}')
  num_classes = confusion.shape[0]
  class_names = list(class_names)
  if len(class_names) != num_classes:
    raise ValueError(
        f'got {len(class_names)} class_names {class_names} for a confusion matrix of '
        f'{num_classes} classes')
  if len(set(class_names)) != len(class_names):
    raise ValueError(f'class_names must be distinct; got {class_names}')
  confusion = confusion.astype(np.float64)
  if np.any(confusion < 0):
    raise ValueError('confusion has negative counts')

  tp = np.diag(confusion)
  fp = confusion.sum(axis=0) - tp
  fn = confusion.sum(axis=1) - tp
  total = confusion.sum()
  dice = _ratio(2 * tp, 2 * tp + fp + fn)
  iou = _ratio(tp, tp + fp + fn)
  precision = _ratio(tp, tp + fp)
  recall = _ratio(tp, tp + fn)
  accuracy = float(_ratio(np.array(tp.sum()), np.array(total)))

  scores = {'pixel_accuracy': accuracy, 'pixel_error': 1.0 - accuracy}
  for i, name in enumerate(class_names):
    scores[f'dice_{name}'] = float(dice[i])
    scores[f'iou_{name}'] = float(iou[i])
    scores[f'precision_{name}'] = float(precision[i])
    scores[f'recall_{name}'] = float(recall[i])
  scores['dice_mean'] = _nanmean(dice)
  scores['iou_mean'] = _nanmean(iou)
  return scores


class ConfusionAccumulator:
  """Host-side running sum of `(C, C)` confusion matrices, kept in int64 so it cannot overflow.

  Typical use: `update(confusion_matrix(...))` once per evaluation batch, then `result(names)`.
  """

  def __init__(self, num_classes: int | None = None):
    """`num_classes` fixes C up front; if None it is taken from the first update."""
    self._num_classes = num_classes
    self._total: np.ndarray | None = None
    self.reset()

  def reset(self) -> None:
    """Forgets everything added so far."""
    if self._num_classes is None:
      self._total = None
    else:
      self._total = np.zeros((self._num_classes, self._num_classes), dtype=np.int64)

  def update(self, confusion: jax.Array | np.ndarray) -> None:
    """Adds one `(C, C)` confusion matrix (device or numpy) to the running total."""
    confusion = np.asarray(jax.device_get(confusion)).astype(np.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
      raise ValueError(f'confusion must be a square (C, C) matrix; got shape {confusion.shape}')
    if self._total is None:
      self._total = np.zeros(confusion.shape, dtype=np.int64)
    if confusion.shape != self._total.shape:
      raise ValueError(
          f'confusion of shape {confusion.shape} does not match the accumulated shape '
          f'{self._total.shape}')
    self._total += confusion

  @property
  def total(self) -> np.ndarray:
    """A copy of the accumulated int64 `(C, C)` matrix."""
    if self._total is None:
      raise ValueError('nothing accumulated yet and num_classes was not given')
    return self._total.copy()

  def result(self, class_names: Sequence[str]) -> dict[str, float]:
    """`segmentation_scores` of the accumulated matrix."""
    return segmentation_scores(self.total, class_names=class_names)
