"""Segmentation losses on channels-last logits of any spatial rank.

Shape conventions, shared by every function here:

* `logits`: float `(N, *spatial, C)`, unnormalised class scores, e.g. `(N, H, W, C)` for 2D or
  `(N, D, H, W, C)` for 3D.
* `labels`: integer `(N, *spatial)`, class ids in `[0, C)`.
* `weights`: optional float `(N, *spatial)` (or anything that broadcasts to it), non-negative
  per-pixel weights such as the border weight map of the U-Net paper.
* `ignore_label`: optional class id whose pixels contribute nothing. It may lie outside `[0, C)`
  (the usual choices are -1 and 255).

A label that is outside `[0, C)` and is not `ignore_label` is a data bug that cannot raise under
`jit`, so the loss of an example that contains one is NaN; this keeps such a bug loud instead of
letting it silently train on a subset of the pixels. Per-example losses have shape `(N,)`.
Shapes and dtypes are validated on static shapes, so validation also works under `jit`.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _check_inputs(logits: jax.Array, labels: jax.Array) -> None:
  """Raises ValueError unless `logits` is `(N, *spatial, C)` and `labels` is `(N, *spatial)`."""
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f'logits of shape {tuple(logits.shape)} do not match labels of shape '
        f'{tuple(labels.shape)}; expected logits (N, *spatial, C) and labels (N, *spatial)')
  if labels.ndim < 1:
    raise ValueError(f'labels need a batch axis; got shape {tuple(labels.shape)}')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must have an integer dtype; got {labels.dtype}')
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f'logits must have a floating dtype; got {logits.dtype}')


def _label_masks(labels: jax.Array, num_classes: int,
                 ignore_label: int | None) -> tuple[jax.Array, jax.Array]:
  """Returns `(valid, bad)` boolean masks shaped like `labels`.

  `valid` marks pixels that count; `bad` marks out-of-range labels that were not declared ignored.
  """
  # Compared in int32 so that e.g. ignore_label=-1 cannot wrap around to 255 on uint8 labels.
  labels = labels.astype(jnp.int32)
  in_range = (labels >= 0) & (labels < num_classes)
  ignored = jnp.zeros_like(in_range) if ignore_label is None else labels == ignore_label
  return in_range & ~ignored, ~in_range & ~ignored


def _nan_where_bad(loss: jax.Array, bad: jax.Array) -> jax.Array:
  """Replaces the per-example `loss` by NaN for examples with a bad label anywhere."""
  bad_example = jnp.any(bad.reshape(bad.shape[0], -1), axis=1)
  return jnp.where(bad_example, jnp.nan, loss)


def _compute_dtype(logits: jax.Array) -> jnp.dtype:
  # Half-precision logits are promoted so that the log-softmax and the sums over many pixels do
  # not lose the small differences that the loss is made of.
  return jnp.promote_types(logits.dtype, jnp.float32)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example, pixel-weighted softmax cross-entropy.

  For each example, `sum(w * ce * valid) / sum(w * valid)` over its pixels, where `ce` is the
  pixel's negative log-softmax probability of its true class and `valid` excludes
  `ignore_label`. An example without valid pixels (or with zero total weight) gives 0, and so does
  its gradient.

  Args:
    logits: float `(N, *spatial, C)`.
    labels: integer `(N, *spatial)`, class ids in `[0, C)` or `ignore_label`.
    weights: optional non-negative float pixel weights, `(N, *spatial)` or broadcastable to it.
      Defaults to 1 everywhere.
    ignore_label: optional label whose pixels are excluded; may be outside `[0, C)`.

  Returns:
    Float `(N,)` losses; NaN for an example containing a label outside `[0, C)` that is not
    `ignore_label`.

  Raises:
    ValueError: if shapes or dtypes do not follow the conventions above.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_inputs(logits, labels)
  dtype = _compute_dtype(logits)
  valid, bad = _label_masks(labels, logits.shape[-1], ignore_label)

  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  # Ignored and bad labels are swapped for class 0 before the gather so that no index ever leaves
  # [0, C); their pixels are masked out below.
  safe_labels = jnp.where(valid, labels.astype(jnp.int32), 0)
  ce = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]

  if weights is None:
    pixel_weights = valid.astype(dtype)
  else:
    weights = jnp.asarray(weights)
    try:
      broadcast = np.broadcast_shapes(weights.shape, labels.shape)
    except ValueError:
      broadcast = None
    if broadcast != labels.shape:
      raise ValueError(
          f'weights of shape {tuple(weights.shape)} do not broadcast to labels of shape '
          f'{tuple(labels.shape)}')
    pixel_weights = jnp.broadcast_to(weights.astype(dtype), labels.shape) * valid

  axes = tuple(range(1, labels.ndim))
  numerator = jnp.sum(pixel_weights * ce, axis=axes)
  denominator = jnp.sum(pixel_weights, axis=axes)
  # The inner where keeps the division (and its gradient) finite when nothing is valid.
  has_weight = denominator > 0
  loss = jnp.where(has_weight, numerator / jnp.where(has_weight, denominator, 1), 0)
  return _nan_where_bad(loss, bad)


def soft_dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    smooth: float = 1.0,
    include_background: bool = True,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example soft Dice loss on softmax probabilities.

  For example n and class c, with `p` the softmax probabilities and `t` the one-hot labels, both
  restricted to valid pixels (those not equal to `ignore_label`):

    dice[n, c] = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)

  with sums over the spatial dims, and `loss[n] = 1 - mean_c dice[n, c]`. A class absent from
  both prediction and truth of an example scores dice 1 thanks to `smooth`; with `smooth=0` it is
  0/0 = NaN.

  Args:
    logits: float `(N, *spatial, C)`.
    labels: integer `(N, *spatial)`, class ids in `[0, C)` or `ignore_label`.
    smooth: non-negative additive smoothing of numerator and denominator.
    include_background: if False, class 0 is left out of the mean over classes.
    ignore_label: optional label whose pixels are excluded; may be outside `[0, C)`.

  Returns:
    Float `(N,)` losses in `[0, 1]`; NaN for an example containing a label outside `[0, C)` that
    is not `ignore_label`.

  Raises:
    ValueError: if shapes or dtypes do not follow the conventions above, if `smooth` is negative,
      or if `include_background=False` leaves no class (C == 1).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_inputs(logits, labels)
  if isinstance(smooth, (int, float)) and smooth < 0:
    raise ValueError(f'smooth must be non-negative; got {smooth}')
  num_classes = logits.shape[-1]
  if not include_background and num_classes < 2:
    raise ValueError(
        f'include_background=False leaves no class to score: logits have {num_classes} class')
  dtype = _compute_dtype(logits)
  valid, bad = _label_masks(labels, num_classes, ignore_label)

  mask = valid[..., None].astype(dtype)
  probs = jax.nn.softmax(logits.astype(dtype), axis=-1) * mask
  # one_hot maps out-of-range ids to all-zero rows, so ignored pixels need no special index.
  targets = jax.nn.one_hot(labels, num_classes, dtype=dtype) * mask

  axes = tuple(range(1, logits.ndim - 1))
  intersection = jnp.sum(probs * targets, axis=axes)
  denominator = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
  dice = (2 * intersection + smooth) / (denominator + smooth)  # (N, C)
  if not include_background:
    dice = dice[:, 1:]
  return _nan_where_bad(1 - jnp.mean(dice, axis=-1), bad)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    'cross_entropy': softmax_cross_entropy,
    'dice': soft_dice_loss,
}


def make_loss(terms: Mapping[str, float], *, ignore_label: int | None = None) -> LossFn:
  """Builds a weighted sum of the losses in `LOSSES`.

  Args:
    terms: maps a name in `LOSSES` to its non-negative weight, e.g.
      `{'cross_entropy': 1.0, 'dice': 0.5}`.
    ignore_label: passed to every term.

  Returns:
    `loss_fn(logits, labels, *, weights=None) -> (total, parts)` with `logits` `(N, *spatial, C)`,
    `labels` `(N, *spatial)` and optional pixel `weights` `(N, *spatial)` (used by the terms that
    take pixel weights, ignored by the others). `parts[name]` is the term's mean over the batch
    and `total = sum(weight * parts[name])`, all scalars.

  Raises:
    ValueError: if `terms` is empty, names a loss not in `LOSSES`, or has a negative or
      non-finite weight.
  """
  if not terms:
    raise ValueError(f'config.loss.terms is empty; choose from {sorted(LOSSES)}')
  checked: dict[str, float] = {}
  for name, weight in terms.items():
    if name not in LOSSES:
      raise ValueError(
          f'config.loss.terms has unknown loss {name!r}; valid: {sorted(LOSSES)}')
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      raise ValueError(
          f'config.loss.terms[{name!r}] must be a number; got {weight!r}') from None
    if not math.isfinite(weight) or weight < 0:
      raise ValueError(
          f'config.loss.terms[{name!r}] must be a finite non-negative weight; got {weight}')
    checked[name] = weight
  takes_weights = {name: 'weights' in inspect.signature(LOSSES[name]).parameters
                   for name in checked}

  def loss_fn(
      logits: jax.Array,
      labels: jax.Array,
      *,
      weights: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    parts: dict[str, jax.Array] = {}
    total = jnp.zeros((), _compute_dtype(jnp.asarray(logits)))
    for name, weight in checked.items():
      kwargs = {'ignore_label': ignore_label}
      if weights is not None and takes_weights[name]:
        kwargs['weights'] = weights
      parts[name] = jnp.mean(LOSSES[name](logits, labels, **kwargs))
      total = total + weight * parts[name]
    return total, parts

  return loss_fn
