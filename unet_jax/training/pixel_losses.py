"""Pixel-wise segmentation losses, and the input checks every loss shares.

Shape conventions, shared by every function here:

* `logits`: float `(N, *spatial, C)`, unnormalised class scores, e.g. `(N, H, W, C)` for 2D or
  `(N, D, H, W, C)` for 3D. The sigmoid loss also takes a single channel, see
  `sigmoid_binary_cross_entropy`.
* `labels`: integer `(N, *spatial)`, class ids in `[0, C)`.
* `weights`: optional float `(N, *spatial)` (or anything that broadcasts to it), non-negative
  per-pixel weights such as the border weight map of the U-Net paper. The pixel-wise losses
  (cross-entropy, binary cross-entropy, focal) take them; the region losses (Dice, Jaccard,
  Tversky, focal Tversky) do not, because a weight map designed for a per-pixel average has no
  agreed meaning inside an overlap ratio.
* `ignore_label`: optional class id whose pixels contribute nothing. It may lie outside `[0, C)`
  (the usual choices are -1 and 255).

A label that is outside `[0, C)` and is not `ignore_label` is a data bug that cannot raise under
`jit`, so the loss of an example that contains one is NaN; this keeps such a bug loud instead of
letting it silently train on a subset of the pixels. Per-example losses have shape `(N,)`.
Shapes, dtypes and options are validated on static values, so validation also works under `jit`.

The pixel-wise losses are weighted means over the valid pixels of each example; the region
losses compare soft (probability-weighted) counts per example and class:

  I = sum(p * t),  FP = sum(p * (1 - t)),  FN = sum((1 - p) * t)

with `p` the softmax probability of a class and `t` its one-hot label, summed over the valid
pixels of one example. `make_loss` combines named terms, per-term options and deep supervision.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def check_inputs(logits: jax.Array, labels: jax.Array) -> None:
  """Raises ValueError unless `logits` is `(N, *spatial, C)` and `labels` is `(N, *spatial)`."""
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f'logits of shape {tuple(logits.shape)} do not match labels of shape '
        f'{tuple(labels.shape)}; expected logits (N, *spatial, C) and labels (N, *spatial)')
  _check_dtypes(logits, labels)


def _check_dtypes(logits: jax.Array, labels: jax.Array) -> None:
  if labels.ndim < 1:
    raise ValueError(f'labels need a batch axis; got shape {tuple(labels.shape)}')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must have an integer dtype; got {labels.dtype}')
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f'logits must have a floating dtype; got {logits.dtype}')


def check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
  """Raises ValueError unless a static option is a finite number ≥ `minimum`."""
  if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= minimum):
    raise ValueError(f'{name} must be a finite number ≥ {minimum}; got {value}')


def label_masks(labels: jax.Array, num_classes: int,
                 ignore_label: int | None) -> tuple[jax.Array, jax.Array]:
  """Returns `(valid, bad)` boolean masks shaped like `labels`.

  `valid` marks pixels that count; `bad` marks out-of-range labels that were not declared ignored.
  """
  # Compared in int32 so that e.g. ignore_label=-1 cannot wrap around to 255 on uint8 labels.
  labels = labels.astype(jnp.int32)
  in_range = (labels >= 0) & (labels < num_classes)
  ignored = jnp.zeros_like(in_range) if ignore_label is None else labels == ignore_label
  return in_range & ~ignored, ~in_range & ~ignored


def nan_where_bad(loss: jax.Array, bad: jax.Array) -> jax.Array:
  """Replaces the per-example `loss` by NaN for examples with a bad label anywhere."""
  bad_example = jnp.any(bad.reshape(bad.shape[0], -1), axis=1)
  return jnp.where(bad_example, jnp.nan, loss)


def compute_dtype(logits: jax.Array) -> jnp.dtype:
  # Half-precision logits are promoted so that the log-softmax and the sums over many pixels do
  # not lose the small differences that the loss is made of.
  return jnp.promote_types(logits.dtype, jnp.float32)


def _weighted_pixel_mean(per_pixel: jax.Array, valid: jax.Array, weights: jax.Array | None,
                         dtype: jnp.dtype) -> jax.Array:
  """Per-example `sum(w * x * valid) / sum(w * valid)`; 0 (with zero gradient) if nothing counts."""
  if weights is None:
    pixel_weights = valid.astype(dtype)
  else:
    weights = jnp.asarray(weights)
    try:
      broadcast = np.broadcast_shapes(weights.shape, valid.shape)
    except ValueError:
      broadcast = None
    if broadcast != valid.shape:
      raise ValueError(
          f'weights of shape {tuple(weights.shape)} do not broadcast to labels of shape '
          f'{tuple(valid.shape)}')
    pixel_weights = jnp.broadcast_to(weights.astype(dtype), valid.shape) * valid
  axes = tuple(range(1, valid.ndim))
  numerator = jnp.sum(pixel_weights * per_pixel, axis=axes)
  denominator = jnp.sum(pixel_weights, axis=axes)
  # The inner where keeps the division (and its gradient) finite when nothing is valid.
  has_weight = denominator > 0
  return jnp.where(has_weight, numerator / jnp.where(has_weight, denominator, 1), 0)


def safe_power(base: jax.Array, exponent: float) -> jax.Array:
  """`base ** exponent` for `base ≥ 0` whose gradient stays finite at `base == 0`."""
  positive = base > 0
  # 0 ** 0 is 1; for exponent < 1 the plain power's gradient at 0 is inf * 0 = NaN. The exponent
  # may be traced (e.g. a jit argument), so the special case is a where, not an if.
  at_zero = jnp.where(jnp.asarray(exponent) == 0, 1.0, 0.0).astype(base.dtype)
  return jnp.where(positive, jnp.where(positive, base, 1) ** exponent, at_zero)


# --- pixel-wise losses -----------------------------------------------------------------------


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
  check_inputs(logits, labels)
  dtype = compute_dtype(logits)
  valid, bad = label_masks(labels, logits.shape[-1], ignore_label)
  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  # Ignored and bad labels are swapped for class 0 before the gather so that no index ever leaves
  # [0, C); their pixels are masked out by the weighted mean.
  safe_labels = jnp.where(valid, labels.astype(jnp.int32), 0)
  ce = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return nan_where_bad(_weighted_pixel_mean(ce, valid, weights, dtype), bad)


def sigmoid_binary_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example, pixel-weighted binary cross-entropy of a single sigmoid output.

  For a model with one output channel whose sigmoid is the foreground probability. Each pixel
  costs `softplus(x) - x * y` (the numerically stable form of `-y log σ(x) - (1-y) log(1-σ(x))`),
  averaged per example like `softmax_cross_entropy`.

  Args:
    logits: float `(N, *spatial, 1)` or `(N, *spatial)`, the foreground logit. A trailing channel
      axis must have size 1; a C-class output belongs to `softmax_cross_entropy`.
    labels: integer `(N, *spatial)`: 0 (background), 1 (foreground) or `ignore_label`.
    weights: optional non-negative float pixel weights, `(N, *spatial)` or broadcastable to it.
    ignore_label: optional label whose pixels are excluded.

  Returns:
    Float `(N,)` losses; NaN for an example containing a label other than 0, 1 and
    `ignore_label`.

  Raises:
    ValueError: if the shapes are neither of the two forms above or dtypes are wrong.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim == labels.ndim + 1 and logits.shape[:-1] == labels.shape and logits.shape[-1] == 1:
    logits = logits[..., 0]
  elif logits.shape != labels.shape:
    raise ValueError(
        f'logits of shape {tuple(logits.shape)} do not match labels of shape '
        f'{tuple(labels.shape)}; the sigmoid loss expects logits (N, *spatial, 1) or '
        '(N, *spatial) and labels (N, *spatial)')
  _check_dtypes(logits, labels)
  dtype = compute_dtype(logits)
  valid, bad = label_masks(labels, 2, ignore_label)
  x = logits.astype(dtype)
  y = jnp.where(valid, labels, 0).astype(dtype)
  bce = jax.nn.softplus(x) - x * y
  return nan_where_bad(_weighted_pixel_mean(bce, valid, weights, dtype), bad)


def softmax_focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    weights: jax.Array | None = None,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example, pixel-weighted multi-class focal loss (Lin et al. 2017).

  Each pixel costs `-alpha[y] * (1 - p_y) ** gamma * log(p_y)`, with `p_y` the softmax
  probability of its true class, and is averaged per example like `softmax_cross_entropy` (the
  denominator is `sum(w * valid)`, not re-weighted by alpha). With `gamma=0` and no alpha it
  equals the cross-entropy.

  Args:
    logits: float `(N, *spatial, C)`.
    labels: integer `(N, *spatial)`, class ids in `[0, C)` or `ignore_label`.
    gamma: focusing exponent ≥ 0; larger values down-weight pixels that are already right.
    alpha: optional C non-negative class weights; None weighs every class 1.
    weights: optional non-negative float pixel weights, `(N, *spatial)` or broadcastable to it.
    ignore_label: optional label whose pixels are excluded; may be outside `[0, C)`.

  Returns:
    Float `(N,)` losses; NaN for an example containing a bad label.

  Raises:
    ValueError: on bad shapes or dtypes, a negative gamma, or an alpha that does not have one
      non-negative entry per class.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  check_inputs(logits, labels)
  check_number('gamma', gamma)
  num_classes = logits.shape[-1]
  dtype = compute_dtype(logits)
  valid, bad = label_masks(labels, num_classes, ignore_label)
  safe_labels = jnp.where(valid, labels.astype(jnp.int32), 0)
  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  log_pt = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  # -expm1(log p) is 1 - p without the cancellation of 1 - exp(log p) for confident pixels.
  focal = -safe_power(-jnp.expm1(log_pt), gamma) * log_pt
  if alpha is not None:
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (num_classes,) or not np.all(np.isfinite(alpha)) or np.any(alpha < 0):
      raise ValueError(
          f'alpha must hold one finite non-negative weight per class ({num_classes}); '
          f'got {alpha.tolist()}')
    focal = focal * jnp.asarray(alpha, dtype)[safe_labels]
  return nan_where_bad(_weighted_pixel_mean(focal, valid, weights, dtype), bad)


# --- region (overlap) losses -----------------------------------------------------------------
