"""Whole-image prediction with mirror padding.

A VALID-padding U-Net sees `(in - out) / 2` pixels of context beyond each border of its output;
the paper supplies that context at image borders by mirroring. `model_padding` says how much to
mirror so that one forward pass covers a whole image, and `predict_logits` runs it. For a SAME
net the padding only rounds the size up to a multiple of 2**depth.

Alignment: after padding by `model_padding`, output pixel i lies over image pixel i, so logits
are sliced `[:size]` along every spatial dim.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.models import output_size, valid_input_size
from unet_jax import transforms as T


def model_padding(spatial_shape: Sequence[int], *, depth: int, padding: str
                  ) -> list[tuple[int, int]]:
  """(before, after) mirror padding per spatial dim for one pass over an image of this shape."""
  pads = []
  for size in spatial_shape:
    needed = valid_input_size(size, depth=depth, padding=padding)
    border = (needed - output_size(needed, depth=depth, padding=padding)) // 2
    pads.append((border, needed - size - border))
  return pads


def crop_to(logits: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """The leading `spatial_shape` of the output, which lines up with the unpadded image."""
  return logits[(slice(None),) + tuple(slice(0, s) for s in spatial_shape)]


def predict_logits(apply_fn: Callable[[jax.Array], jax.Array], images: np.ndarray, *, depth: int,
                   padding: str) -> jax.Array:
  """Logits `(N, *spatial, C)` for images `(N, *spatial, C_in)` (already normalised)."""
  spatial = images.shape[1:-1]
  pads = model_padding(spatial, depth=depth, padding=padding)
  padded = T.mirror_pad(np.asarray(images), [(0, 0), *pads, (0, 0)])
  return crop_to(apply_fn(jnp.asarray(padded)), spatial)


def probabilities(logits: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits, axis=-1)


__all__: list[Any] = ['model_padding', 'crop_to', 'predict_logits', 'probabilities']
