"""Region segmentation losses from soft counts: Dice, Jaccard, Tversky and focal Tversky.

Shapes and conventions as in pixel_losses.py: logits `(N, *spatial, C)`, labels `(N, *spatial)`,
per-example losses `(N,)`. Soft counts per example and class, over the valid pixels:

  I = sum(p * t),  FP = sum(p * (1 - t)),  FN = sum((1 - p) * t)

with `p` the softmax probability of a class and `t` its one-hot label. Weight maps are not
taken: a per-pixel weight has no agreed meaning inside an overlap ratio.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from unet_jax.training import pixel_losses


def class_maps(
    logits: jax.Array,
    labels: jax.Array,
    *,
    include_background: bool,
    ignore_label: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Validates inputs and returns `(probs, targets, mask, bad)`.

  `probs` are the softmax probabilities and `targets` the one-hot labels, `(N, *spatial, C')`
  with C' = C, or C - 1 without the background class 0; both are 0 on pixels that do not
  count. `mask` `(N, *spatial, 1)` marks the pixels that count, and `bad` the undeclared
  out-of-range labels (`pixel_losses.label_masks`).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  pixel_losses.check_inputs(logits, labels)
  num_classes = logits.shape[-1]
  if not include_background and num_classes < 2:
    raise ValueError(
        f'include_background=False leaves no class to score: logits have {num_classes} class')
  dtype = pixel_losses.compute_dtype(logits)
  valid, bad = pixel_losses.label_masks(labels, num_classes, ignore_label)
  mask = valid[..., None].astype(dtype)
  probs = jax.nn.softmax(logits.astype(dtype), axis=-1) * mask
  # one_hot maps out-of-range ids to all-zero rows, so ignored pixels need no special index.
  targets = jax.nn.one_hot(labels, num_classes, dtype=dtype) * mask
  first = 0 if include_background else 1
  return probs[..., first:], targets[..., first:], mask, bad


def _soft_counts(
    logits: jax.Array,
    labels: jax.Array,
    *,
    smooth: float,
    include_background: bool,
    ignore_label: int | None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
  """Validates inputs and returns `((I, FP, FN), bad)`, each count `(N, C')` per example/class.

  C' is C, or C - 1 without the background class 0.
  """
  probs, targets, mask, bad = class_maps(logits, labels, include_background=include_background,
                                         ignore_label=ignore_label)
  pixel_losses.check_number('smooth', smooth)
  axes = tuple(range(1, probs.ndim - 1))
  # FP and FN are summed directly rather than as differences, so they can never be negative.
  counts = (jnp.sum(probs * targets, axis=axes),
            jnp.sum(probs * (mask - targets), axis=axes),
            jnp.sum((1 - probs) * targets, axis=axes))
  return counts, bad


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
  0/0 = NaN. Pixel weights are not taken.

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
  (inter, fp, fn), bad = _soft_counts(logits, labels, smooth=smooth,
                                      include_background=include_background,
                                      ignore_label=ignore_label)
  dice = (2 * inter + smooth) / (2 * inter + fp + fn + smooth)
  return pixel_losses.nan_where_bad(1 - jnp.mean(dice, axis=-1), bad)


def soft_jaccard_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    smooth: float = 1.0,
    include_background: bool = True,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example soft Jaccard (IoU) loss: `1 - mean_c (I + smooth) / (I + FP + FN + smooth)`.

  `I + FP + FN = sum(p) + sum(t) - sum(p * t)` is the soft union. Arguments, edge cases and
  errors are those of `soft_dice_loss`.
  """
  (inter, fp, fn), bad = _soft_counts(logits, labels, smooth=smooth,
                                      include_background=include_background,
                                      ignore_label=ignore_label)
  iou = (inter + smooth) / (inter + fp + fn + smooth)
  return pixel_losses.nan_where_bad(1 - jnp.mean(iou, axis=-1), bad)


def _tversky_index(logits, labels, *, alpha, beta, smooth, include_background, ignore_label):
  pixel_losses.check_number('alpha', alpha)
  pixel_losses.check_number('beta', beta)
  (inter, fp, fn), bad = _soft_counts(logits, labels, smooth=smooth,
                                      include_background=include_background,
                                      ignore_label=ignore_label)
  return (inter + smooth) / (inter + alpha * fp + beta * fn + smooth), bad


def tversky_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
    include_background: bool = True,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example Tversky loss (Salehi et al. 2017): `1 - mean_c TI[n, c]`, where

    TI = (I + smooth) / (I + alpha * FP + beta * FN + smooth).

  `alpha = beta = 1` is the Jaccard loss; `beta > alpha` (the default 0.3/0.7 of the paper)
  penalises missed foreground more than false alarms, which helps small structures.

  Args:
    logits, labels, smooth, include_background, ignore_label: as in `soft_dice_loss`.
    alpha: non-negative weight of the false positives.
    beta: non-negative weight of the false negatives.

  Returns:
    Float `(N,)` losses; NaN for an example containing a bad label.

  Raises:
    ValueError: as `soft_dice_loss`, or for a negative alpha or beta.
  """
  index, bad = _tversky_index(logits, labels, alpha=alpha, beta=beta, smooth=smooth,
                              include_background=include_background, ignore_label=ignore_label)
  return pixel_losses.nan_where_bad(1 - jnp.mean(index, axis=-1), bad)


def focal_tversky_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 0.75,
    smooth: float = 1.0,
    include_background: bool = True,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example focal Tversky loss (Abraham & Khan 2019): `mean_c (1 - TI[n, c]) ** gamma`.

  `TI` is the Tversky index of `tversky_loss`. Here `gamma` is the exponent itself; the paper
  writes it as `1 / γ` and recommends γ = 4/3, which is the default 0.75. `gamma < 1` raises the
  loss of classes that are already well segmented less than that of the hard ones; `gamma = 1`
  is the Tversky loss.

  Args:
    logits, labels, alpha, beta, smooth, include_background, ignore_label: as in
      `tversky_loss`.
    gamma: positive exponent.

  Returns:
    Float `(N,)` losses; NaN for an example containing a bad label.

  Raises:
    ValueError: as `tversky_loss`, or for a non-positive gamma.
  """
  if isinstance(gamma, (int, float)) and not (math.isfinite(gamma) and gamma > 0):
    raise ValueError(f'gamma must be a finite positive number; got {gamma}')
  index, bad = _tversky_index(logits, labels, alpha=alpha, beta=beta, smooth=smooth,
                              include_background=include_background, ignore_label=ignore_label)
  # The guarded power keeps the gradient finite where a class is matched exactly (TI == 1).
  return pixel_losses.nan_where_bad(jnp.mean(pixel_losses.safe_power(1 - index, gamma), axis=-1), bad)
