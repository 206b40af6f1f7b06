"""Topology losses on skeletons: skeleton recall and clDice.

Thin structures (membranes, vessels, cracks) are judged by whether they stay connected: a
membrane with a one-pixel gap merges two cells and costs the Rand error far more than its pixel
count says. Overlap losses (Dice, cross-entropy) barely see such a gap. These losses weigh the
centre line of each structure instead:

- `skeleton_recall_loss` (Kirchhoff et al., "Skeleton Recall Loss for Connectivity Conserving
  and Resource Efficient Segmentation of Thin Tubular Structures", ECCV 2024): the share of the
  true skeleton, widened to a tube, that the prediction covers. The skeleton comes from the
  labels only, so it costs a few pooling passes and no gradient.
- `soft_cldice_loss` (Shit et al., "clDice", CVPR 2021): the harmonic mean of that recall and
  the precision of the predicted probabilities' soft skeleton against the labels.

Shapes and conventions as in pixel_losses.py: logits `(N, *spatial, C)` (2D or 3D), labels
`(N, *spatial)`, per-example losses `(N,)`. Skeletons are morphological, computed with min and
max pooling (the soft skeleton of clDice): erosion with the cross of the axis neighbours,
dilation with the full 3×3(×3) cube, and no erosion from outside the image, so a structure
that touches the border keeps its skeleton there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unet_jax.training import pixel_losses
from unet_jax.training import region_losses


def _check_count(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{name} must be an int ≥ 0; got {value!r}')


def _pool(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """Max over a centred window on the spatial axes of `(N, *spatial, C)`; outside is -inf."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1,) * x.ndim, 'SAME')


def erode(x: jax.Array) -> jax.Array:
  """Grey erosion with the cross: each pixel and its axis neighbours."""
  spatial = x.ndim - 2
  lines = [-_pool(-x, tuple(3 if a == axis else 1 for a in range(spatial)))
           for axis in range(spatial)]
  return jnp.min(jnp.stack(lines), axis=0)


def dilate(x: jax.Array) -> jax.Array:
  """Grey dilation with the full cube of side 3."""
  return _pool(x, (3,) * (x.ndim - 2))


def soft_skeleton(x: jax.Array, *, iterations: int) -> jax.Array:
  """Morphological skeleton of maps `x` in [0, 1], `(N, *spatial, C)`.

  The union over k = 0..iterations of what opening removes from the k-times eroded map
  (Lantuéjoul's formula); for a binary map it is binary. A structure up to
  `2 * iterations + 1` pixels across is reduced to its centre line; one wider than that leaves
  no skeleton at all, so `iterations` must cover the widest structure. Differentiable in `x`.
  """
  _check_count('iterations', iterations)
  skeleton = jax.nn.relu(x - dilate(erode(x)))
  for _ in range(iterations):
    x = erode(x)
    delta = jax.nn.relu(x - dilate(erode(x)))
    skeleton = skeleton + jax.nn.relu(delta - skeleton * delta)  # a soft union
  return skeleton


def label_skeleton(targets: jax.Array, mask: jax.Array, *, iterations: int,
                   tube_radius: int) -> jax.Array:
  """The skeleton of one-hot `targets` `(N, *spatial, C')`, widened by `tube_radius` dilations
  and kept inside the valid pixels `mask` `(N, *spatial, 1)`; no gradient flows into it."""
  tube = soft_skeleton(jax.lax.stop_gradient(targets), iterations=iterations)
  for _ in range(tube_radius):
    tube = dilate(tube)
  return tube * mask


def _per_class_ratio(numerator, denominator, smooth):
  axes = tuple(range(1, numerator.ndim - 1))
  return (jnp.sum(numerator, axis=axes) + smooth) / (jnp.sum(denominator, axis=axes) + smooth)


def skeleton_recall_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    iterations: int = 10,
    tube_radius: int = 1,
    smooth: float = 1.0,
    include_background: bool = False,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example loss `1 - mean_c recall[n, c]` of the labels' skeleton tube.

    recall[n, c] = (sum(p * s) + smooth) / (sum(s) + smooth)

  with `p` the softmax probability of class c and `s` the skeleton of its label mask (see
  `soft_skeleton`), dilated `tube_radius` times with the 3×3(×3) cube, both restricted to the
  valid pixels. A class absent from an example scores recall 1 thanks to `smooth`.

  Args:
    logits: float `(N, *spatial, C)`.
    labels: integer `(N, *spatial)`, class ids in `[0, C)` or `ignore_label`.
    iterations: erosions of the skeleton; structures up to `2 * iterations + 1` pixels across
      are reduced to a line, wider ones are missed.
    tube_radius: dilations of the skeleton; 1 makes a 3-pixel-wide tube, as in the paper.
    smooth: non-negative additive smoothing of numerator and denominator.
    include_background: if False (the default), class 0 is left out: the skeleton of the
      background between thin structures is not a structure.
    ignore_label: label value excluded from the loss.

  Returns:
    Float `(N,)` losses; NaN for an example containing a bad label.
  """
  _check_count('tube_radius', tube_radius)
  pixel_losses.check_number('smooth', smooth)
  probs, targets, mask, bad = region_losses.class_maps(
      logits, labels, include_background=include_background, ignore_label=ignore_label)
  tube = label_skeleton(targets, mask, iterations=iterations, tube_radius=tube_radius)
  recall = _per_class_ratio(probs * tube, tube, smooth)
  return pixel_losses.nan_where_bad(1 - jnp.mean(recall, axis=-1), bad)


def soft_cldice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    iterations: int = 10,
    smooth: float = 1.0,
    include_background: bool = False,
    ignore_label: int | None = None,
) -> jax.Array:
  """Per-example loss `1 - mean_c cldice[n, c]`, the soft clDice of Shit et al.:

    precision[n, c] = (sum(S(p) * t) + smooth) / (sum(S(p)) + smooth)
    recall[n, c]    = (sum(p * S(t)) + smooth) / (sum(S(t)) + smooth)
    cldice[n, c]    = 2 * precision * recall / (precision + recall)

  with `S` the soft skeleton (`soft_skeleton`), `p` the softmax probabilities and `t` the
  one-hot labels, restricted to the valid pixels. The gradient flows through `S(p)`, which
  costs `iterations` erosions and openings of the probabilities in the backward pass too.

  Args:
    logits: float `(N, *spatial, C)`.
    labels: integer `(N, *spatial)`, class ids in `[0, C)` or `ignore_label`.
    iterations: erosions of both skeletons.
    smooth: non-negative additive smoothing of numerators and denominators.
    include_background: if False (the default), class 0 is left out.
    ignore_label: label value excluded from the loss.

  Returns:
    Float `(N,)` losses; NaN for an example containing a bad label.
  """
  pixel_losses.check_number('smooth', smooth)
  probs, targets, mask, bad = region_losses.class_maps(
      logits, labels, include_background=include_background, ignore_label=ignore_label)
  label_skel = label_skeleton(targets, mask, iterations=iterations, tube_radius=0)
  prob_skel = soft_skeleton(probs, iterations=iterations) * mask
  precision = _per_class_ratio(prob_skel * targets, prob_skel, smooth)
  recall = _per_class_ratio(probs * label_skel, label_skel, smooth)
  cldice = 2 * precision * recall / (precision + recall)
  return pixel_losses.nan_where_bad(1 - jnp.mean(cldice, axis=-1), bad)
