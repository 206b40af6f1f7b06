"""Segmentation losses on channels-last logits of any spatial rank.

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

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
# The per-call keywords that make_loss passes itself; they are not term options.
_SHARED_KEYWORDS = ('weights', 'ignore_label')


def _check_inputs(logits: jax.Array, labels: jax.Array) -> None:
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


def _check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
  """Raises ValueError unless a static option is a finite number ≥ `minimum`."""
  if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= minimum):
    raise ValueError(f'{name} must be a finite number ≥ {minimum}; got {value}')


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


def _safe_power(base: jax.Array, exponent: float) -> jax.Array:
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
  _check_inputs(logits, labels)
  dtype = _compute_dtype(logits)
  valid, bad = _label_masks(labels, logits.shape[-1], ignore_label)
  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  # Ignored and bad labels are swapped for class 0 before the gather so that no index ever leaves
  # [0, C); their pixels are masked out by the weighted mean.
  safe_labels = jnp.where(valid, labels.astype(jnp.int32), 0)
  ce = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return _nan_where_bad(_weighted_pixel_mean(ce, valid, weights, dtype), bad)


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
  dtype = _compute_dtype(logits)
  valid, bad = _label_masks(labels, 2, ignore_label)
  x = logits.astype(dtype)
  y = jnp.where(valid, labels, 0).astype(dtype)
  bce = jax.nn.softplus(x) - x * y
  return _nan_where_bad(_weighted_pixel_mean(bce, valid, weights, dtype), bad)


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
  _check_inputs(logits, labels)
  _check_number('gamma', gamma)
  num_classes = logits.shape[-1]
  dtype = _compute_dtype(logits)
  valid, bad = _label_masks(labels, num_classes, ignore_label)
  safe_labels = jnp.where(valid, labels.astype(jnp.int32), 0)
  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  log_pt = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  # -expm1(log p) is 1 - p without the cancellation of 1 - exp(log p) for confident pixels.
  focal = -_safe_power(-jnp.expm1(log_pt), gamma) * log_pt
  if alpha is not None:
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.shape != (num_classes,) or not np.all(np.isfinite(alpha)) or np.any(alpha < 0):
      raise ValueError(
          f'alpha must hold one finite non-negative weight per class ({num_classes}); '
          f'got {alpha.tolist()}')
    focal = focal * jnp.asarray(alpha, dtype)[safe_labels]
  return _nan_where_bad(_weighted_pixel_mean(focal, valid, weights, dtype), bad)


# --- region (overlap) losses -----------------------------------------------------------------


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
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_inputs(logits, labels)
  _check_number('smooth', smooth)
  num_classes = logits.shape[-1]
  if not include_background and num_classes < 2:
    raise ValueError(
        f'include_background=False leaves no class to score: logits have {num_classes} class')
  dtype = _compute_dtype(logits)
  valid, bad = _label_masks(labels, num_classes, ignore_label)
  mask = valid[..., None].astype(dtype)
  probs = jax.nn.softmax(logits.astype(dtype), axis=-1)
  # one_hot maps out-of-range ids to all-zero rows, so ignored pixels need no special index.
  targets = jax.nn.one_hot(labels, num_classes, dtype=dtype) * mask
  axes = tuple(range(1, logits.ndim - 1))
  # FP and FN are summed directly rather than as differences, so they can never be negative.
  counts = (jnp.sum(probs * targets, axis=axes),
            jnp.sum(probs * (mask - targets), axis=axes),
            jnp.sum((1 - probs) * targets, axis=axes))
  if not include_background:
    counts = tuple(c[:, 1:] for c in counts)
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
  return _nan_where_bad(1 - jnp.mean(dice, axis=-1), bad)


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
  return _nan_where_bad(1 - jnp.mean(iou, axis=-1), bad)


def _tversky_index(logits, labels, *, alpha, beta, smooth, include_background, ignore_label):
  _check_number('alpha', alpha)
  _check_number('beta', beta)
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
  return _nan_where_bad(1 - jnp.mean(index, axis=-1), bad)


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
  return _nan_where_bad(jnp.mean(_safe_power(1 - index, gamma), axis=-1), bad)


# --- combination -----------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., jax.Array]] = {
    'cross_entropy': softmax_cross_entropy,
    'binary_cross_entropy': sigmoid_binary_cross_entropy,
    'focal': softmax_focal_loss,
    'dice': soft_dice_loss,
    'jaccard': soft_jaccard_loss,
    'tversky': tversky_loss,
    'focal_tversky': focal_tversky_loss,
}


def loss_options(name: str) -> tuple[str, ...]:
  """The keyword options that `make_loss(options={name: ...})` accepts for the term `name`."""
  parameters = inspect.signature(LOSSES[name]).parameters.values()
  return tuple(p.name for p in parameters
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _SHARED_KEYWORDS)


def _check_terms(terms: Mapping[str, float]) -> dict[str, float]:
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
  return checked


def _check_options(options: Mapping[str, Mapping[str, Any]] | None,
                   terms: Mapping[str, float]) -> dict[str, dict[str, Any]]:
  checked: dict[str, dict[str, Any]] = {name: {} for name in terms}
  for name, term_options in (options or {}).items():
    if name not in terms:
      raise ValueError(
          f'config.loss.options has options for {name!r}, which is not in config.loss.terms '
          f'{sorted(terms)}')
    valid = loss_options(name)
    for option, value in dict(term_options).items():
      if option not in valid:
        raise ValueError(
            f'config.loss.options[{name!r}] has unknown option {option!r}; valid: '
            f'{sorted(valid)}')
      checked[name][option] = value
  return checked


def _check_head_weights(weights: Sequence[float] | None) -> tuple[float, ...] | None:
  if weights is None:
    return None
  try:
    values = tuple(float(w) for w in weights)
  except (TypeError, ValueError):
    values = ()
  if (not values or not all(math.isfinite(w) and w >= 0 for w in values)
      or sum(values) <= 0):
    raise ValueError(
        'config.loss.deep_supervision_weights must be finite non-negative numbers with a '
        f'positive sum; got {list(weights)}')
  return values


def make_loss(
    terms: Mapping[str, float],
    *,
    ignore_label: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    deep_supervision_weights: Sequence[float] | None = None,
) -> LossFn:
  """Builds a weighted sum of the losses in `LOSSES`, optionally over several output heads.

  Args:
    terms: maps a name in `LOSSES` to its non-negative weight, e.g.
      `{'cross_entropy': 1.0, 'dice': 0.5}`.
    ignore_label: passed to every term.
    options: maps a term name to its keyword options, e.g.
      `{'focal': {'gamma': 2.0}, 'tversky': {'alpha': 0.3, 'beta': 0.7}}`; `loss_options(name)`
      lists what a term accepts. Values are checked when the loss is first called (traced).
    deep_supervision_weights: one non-negative weight per output head when `logits` is a
      sequence of heads (e.g. the nested outputs of a U-Net++); they are normalised to sum 1.
      None weighs every head equally.

  Returns:
    `loss_fn(logits, labels, *, weights=None) -> (total, parts)`. `logits` is one array
    `(N, *spatial, C)` or a tuple/list of such arrays, one per head, all of the same shape as
    each other and matching `labels` `(N, *spatial)`. `weights` are optional pixel weights
    `(N, *spatial)`, used by the terms that take them (see `loss_options` and the module
    docstring) and ignored by the others. `parts[name]` is the term's batch mean, combined over
    heads with the normalised head weights, and `total = sum(weight * parts[name])`; all are
    scalars.

  Raises:
    ValueError: if `terms` is empty, names a loss not in `LOSSES`, or has a negative or
      non-finite weight; if `options` names a term not in `terms` or an option the term does not
      take; if `deep_supervision_weights` is empty, negative, non-finite or sums to 0. At call
      time: if the number of heads differs from `len(deep_supervision_weights)`.
  """
  checked = _check_terms(terms)
  term_options = _check_options(options, checked)
  head_weights = _check_head_weights(deep_supervision_weights)
  takes_weights = {name: 'weights' in inspect.signature(LOSSES[name]).parameters
                   for name in checked}

  def head_parts(logits, labels, weights):
    parts = {}
    for name in checked:
      kwargs = {'ignore_label': ignore_label, **term_options[name]}
      if weights is not None and takes_weights[name]:
        kwargs['weights'] = weights
      parts[name] = jnp.mean(LOSSES[name](logits, labels, **kwargs))
    return parts

  def loss_fn(
      logits: jax.Array | Sequence[jax.Array],
      labels: jax.Array,
      *,
      weights: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    heads = list(logits) if isinstance(logits, (tuple, list)) else [logits]
    if not heads:
      raise ValueError('logits is an empty sequence of heads')
    mix = head_weights or (1.0,) * len(heads)
    if len(mix) != len(heads):
      raise ValueError(
          f'config.loss.deep_supervision_weights has {len(mix)} entries for {len(heads)} '
          'output heads')
    mix = [w / sum(mix) for w in mix]
    dtype = _compute_dtype(jnp.asarray(heads[0]))
    parts = {name: jnp.zeros((), dtype) for name in checked}
    for head, head_weight in zip(heads, mix):
      for name, value in head_parts(head, labels, weights).items():
        parts[name] = parts[name] + head_weight * value
    total = jnp.zeros((), dtype)
    for name, weight in checked.items():
      total = total + weight * parts[name]
    return total, parts

  return loss_fn
