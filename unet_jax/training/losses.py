"""Segmentation losses by name: the LOSSES table that config.loss.terms chooses from, and
`make_loss`, which combines weighted terms, per-term options and deep supervision.

The loss functions live in pixel_losses.py (cross-entropy, binary cross-entropy, focal),
region_losses.py (Dice, Jaccard, Tversky, focal Tversky) and topology_losses.py (skeleton
recall, clDice); they are re-exported here so that `losses.soft_dice_loss` and
`losses.LOSSES['dice']` name the same function.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from unet_jax.training.pixel_losses import (LossFn, compute_dtype, sigmoid_binary_cross_entropy,
                                            softmax_cross_entropy, softmax_focal_loss)
from unet_jax.training.region_losses import (focal_tversky_loss, soft_dice_loss,
                                             soft_jaccard_loss, tversky_loss)
from unet_jax.training.topology_losses import skeleton_recall_loss, soft_cldice_loss

# The per-call keywords that make_loss passes itself; they are not term options.
_SHARED_KEYWORDS = ('weights', 'ignore_label')

LOSSES: dict[str, Callable[..., jax.Array]] = {
    'cross_entropy': softmax_cross_entropy,
    'binary_cross_entropy': sigmoid_binary_cross_entropy,
    'focal': softmax_focal_loss,
    'dice': soft_dice_loss,
    'jaccard': soft_jaccard_loss,
    'tversky': tversky_loss,
    'focal_tversky': focal_tversky_loss,
    'skeleton_recall': skeleton_recall_loss,
    'cldice': soft_cldice_loss,
}


def loss_options(name: str) -> tuple[str, ...]:
  """The keyword options that `make_loss(options={name: ...})` accepts for the term `name`."""
  parameters = inspect.signature(LOSSES[name]).parameters.values()
  return tuple(p.name for p in parameters
               if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _SHARED_KEYWORDS)


class LossConfigError(ValueError):
  """A term, weight or option that config.loss cannot take.

  `str()` is the message for callers of make_loss; the attributes let config validation write
  its one-line error (with a did-you-mean over `choices`) from this one check.
  """

  def __init__(self, message: str, *, field: str, value: Any, problem: str, expected: str = '',
               choices: Sequence[str] = (), what: str = '', key: str | None = None):
    super().__init__(message)
    self.field, self.value, self.problem, self.expected = field, value, problem, expected
    self.choices, self.what, self.key = tuple(choices), what, key


def check_terms(terms: Mapping[str, float]) -> dict[str, float]:
  """`terms` with float weights; LossConfigError for an empty table, an unknown loss, a weight
  that is not a finite number ≥ 0, or weights that are all 0."""
  if not terms:
    raise LossConfigError(f'config.loss.terms is empty; choose from {sorted(LOSSES)}',
                          field='config.loss.terms', value=dict(terms), problem='is empty',
                          choices=sorted(LOSSES), what='the losses')
  checked: dict[str, float] = {}
  for name, weight in terms.items():
    if name not in LOSSES:
      raise LossConfigError(
          f'config.loss.terms has unknown loss {name!r}; valid: {sorted(LOSSES)}',
          field=f'config.loss.terms.{name}', value=weight, problem='is not a loss',
          choices=sorted(LOSSES), what='the losses', key=name)
    try:
      number = float(weight)
    except (TypeError, ValueError):
      number = math.nan
    if isinstance(weight, bool) or not math.isfinite(number) or number < 0:
      raise LossConfigError(
          f'config.loss.terms[{name!r}] must be a finite non-negative weight; got {weight!r}',
          field=f'config.loss.terms.{name}', value=weight, problem='is not a valid weight',
          expected='a finite number ≥ 0')
    checked[name] = number
  if not sum(checked.values()) > 0:
    raise LossConfigError(
        f'config.loss.terms weighs every term 0: {checked}', field='config.loss.terms',
        value=dict(terms), problem='weighs every term 0', expected='at least one positive weight')
  return checked


def active_terms(terms: Mapping[str, float]) -> dict[str, float]:
  """`check_terms(terms)` without the terms of weight 0: 0 turns a term off, so that a config
  can list every loss and one flag turn one on."""
  return {name: weight for name, weight in check_terms(terms).items() if weight > 0}


def check_options(options: Mapping[str, Mapping[str, Any]] | None,
                  terms: Mapping[str, float]) -> dict[str, dict[str, Any]]:
  """Options per term; LossConfigError for options of a term not in `terms`, or an option the
  term does not take (`loss_options`)."""
  checked: dict[str, dict[str, Any]] = {name: {} for name in terms}
  for name, term_options in (options or {}).items():
    if name not in terms:
      raise LossConfigError(
          f'config.loss.options has options for {name!r}, which is not in config.loss.terms '
          f'{sorted(terms)}', field=f'config.loss.options.{name}', value=term_options,
          problem='is not a term', choices=sorted(terms),
          what='the terms of config.loss.terms', key=name)
    valid = loss_options(name)
    for option, value in dict(term_options).items():
      if option not in valid:
        raise LossConfigError(
            f'config.loss.options[{name!r}] has unknown option {option!r}; valid: '
            f'{sorted(valid)}', field=f'config.loss.options.{name}.{option}', value=value,
            problem='is not an option', choices=valid, what=f'the options of {name!r}',
            key=option)
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
      `{'cross_entropy': 1.0, 'dice': 0.5}`; a term of weight 0 is not computed.
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
    docstring) and ignored by the others. `parts[name]`, for each term of positive weight, is
    its batch mean, combined over heads with the normalised head weights, and
    `total = sum(weight * parts[name])`; all are scalars.

  Raises:
    ValueError: if `terms` is empty, names a loss not in `LOSSES`, has a negative or
      non-finite weight or only zero weights (LossConfigError); if `options` names a term not in `terms` or an option the term does not
      take; if `deep_supervision_weights` is empty, negative, non-finite or sums to 0. At call
      time: if the number of heads differs from `len(deep_supervision_weights)`.
  """
  checked = active_terms(terms)
  term_options = check_options(options, terms)
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
    dtype = compute_dtype(jnp.asarray(heads[0]))
    parts = {name: jnp.zeros((), dtype) for name in checked}
    for head, head_weight in zip(heads, mix):
      for name, value in head_parts(head, labels, weights).items():
        parts[name] = parts[name] + head_weight * value
    total = jnp.zeros((), dtype)
    for name, weight in checked.items():
      total = total + weight * parts[name]
    return total, parts

  return loss_fn
