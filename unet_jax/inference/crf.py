"""Fully connected CRF refinement of 2D probability maps (Krähenbühl & Koltun, NeurIPS 2011).

Shapes: probabilities `(H, W, C)`, image `(H, W)` or `(H, W, K)` with intensities in the units
of `bilateral_sigma_rgb` (e.g. uint8 0..255 values); the result is `(H, W, C)` float32.

Energy: unary −log p(x_i) from the network, plus Potts pairwise terms weighted by two kernels,
  spatial    w_spatial   · exp(−|p_i − p_j|² / 2 spatial_sigma²)
  bilateral  w_bilateral · exp(−|p_i − p_j|² / 2 bilateral_sigma_xy²
                              − |I_i − I_j|² / 2 bilateral_sigma_rgb²).
Mean-field inference iterates
  Q_i(l) ∝ exp(log p_i(l) + Σ_m w_m Σ_{j≠i} k_m(i, j) Q_j(l)),
which is the Potts update up to a per-pixel constant that the normalisation removes.

Approximations (instead of the permutohedral lattice of the paper, which needs scatter/gather
into a hash table): both kernels are truncated to a square window. The spatial Gaussian is
separable and runs as two 1D convolutions of radius ⌈4 · spatial_sigma⌉ (exact up to the
truncation). The bilateral kernel is not separable; its messages are summed over the offsets of
a (2·window + 1)² square, one shifted copy of Q at a time inside a `fori_loop`, so memory stays
O(H·W·C) and the time is O(window² · H·W·C) per iteration. Pairs further apart than `window`
pixels along either axis do not interact, so choose `window` ≳ 2 · bilateral_sigma_xy (beyond
that the kernel is below e^-2); the paper's sigma_xy = 80 is out of reach of this form.
Neighbours outside the image contribute nothing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _gaussian_blur(q: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian filter of `(H, W, C)` with zero padding; radius is static."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * (offsets / sigma)**2)
  x = jnp.moveaxis(q, -1, 0)[..., None]  # (C, H, W, 1): channels as the batch
  numbers = ('NHWC', 'HWIO', 'NHWC')
  x = jax.lax.conv_general_dilated(x, taps[:, None, None, None], (1, 1), 'SAME',
                                   dimension_numbers=numbers)
  x = jax.lax.conv_general_dilated(x, taps[None, :, None, None], (1, 1), 'SAME',
                                   dimension_numbers=numbers)
  return jnp.moveaxis(x[..., 0], 0, -1)


def _bilateral_message(q: jax.Array, image: jax.Array, sigma_xy: jax.Array,
                       sigma_rgb: jax.Array, window: int) -> jax.Array:
  """Σ_{j ≠ i, |offset| ≤ window} k_bilateral(i, j) Q_j, one shifted copy at a time."""
  height, width, _ = q.shape
  pad = ((window, window), (window, window), (0, 0))
  q_pad = jnp.pad(q, pad)
  image_pad = jnp.pad(image, pad)
  inside_pad = jnp.pad(jnp.ones((height, width, 1), q.dtype), pad)
  side = 2 * window + 1

  def add_offset(index, message):
    dy, dx = index // side - window, index % side - window
    start = (dy + window, dx + window, 0)
    shifted = lambda x: jax.lax.dynamic_slice(x, start, (height, width, x.shape[-1]))
    distance = jnp.sum((image - shifted(image_pad))**2, axis=-1, keepdims=True)
    spatial = (dy**2 + dx**2).astype(q.dtype)
    weight = jnp.exp(-spatial / (2 * sigma_xy**2) - distance / (2 * sigma_rgb**2))
    weight = jnp.where((dy == 0) & (dx == 0), 0.0, weight) * shifted(inside_pad)
    return message + weight * shifted(q_pad)

  return jax.lax.fori_loop(0, side * side, add_offset, jnp.zeros_like(q))


@functools.partial(jax.jit, static_argnames=('iterations', 'window', 'spatial_radius'))
def _mean_field(log_p: jax.Array, image: jax.Array, params: jax.Array, *, iterations: int,
                window: int, spatial_radius: int) -> jax.Array:
  spatial_sigma, sigma_xy, sigma_rgb, w_spatial, w_bilateral = params

  def step(_, q):
    spatial = _gaussian_blur(q, spatial_sigma, spatial_radius) - q  # j ≠ i: drop k(i, i) = 1
    bilateral = _bilateral_message(q, image, sigma_xy, sigma_rgb, window)
    return jax.nn.softmax(log_p + w_spatial * spatial + w_bilateral * bilateral, axis=-1)

  return jax.lax.fori_loop(0, iterations, step, jax.nn.softmax(log_p, axis=-1))


def crf_refine(probabilities: np.ndarray | jax.Array, image: np.ndarray | jax.Array, *,
               iterations: int = 5, spatial_sigma: float = 3.0, bilateral_sigma_xy: float = 8.0,
               bilateral_sigma_rgb: float = 13.0, w_spatial: float = 3.0,
               w_bilateral: float = 5.0, window: int = 12, eps: float = 1e-6) -> jax.Array:
  """Mean-field refinement of `probabilities (H, W, C)` guided by `image (H, W[, K])`.

  Args:
    probabilities: the network's softmax output; renormalised after clipping at `eps`.
    image: the raw image (not the normalised network input): `bilateral_sigma_rgb` is in its
      intensity units.
    iterations: mean-field updates (5 is usually converged).
    spatial_sigma: pixels; the smoothness kernel.
    bilateral_sigma_xy, bilateral_sigma_rgb: pixels and intensity units; the appearance kernel.
    w_spatial, w_bilateral: kernel weights; both 0 returns the input, renormalised.
    window: radius in pixels of the square the bilateral kernel is truncated to (module
      docstring).
    eps: floor of the probabilities before the logarithm.

  Returns:
    Refined probabilities `(H, W, C)` float32.
  """
  probabilities = jnp.asarray(probabilities, jnp.float32)
  image = jnp.asarray(image, jnp.float32)
  if probabilities.ndim != 3:
    raise ValueError(f'probabilities of shape {probabilities.shape} are not (H, W, C); the CRF '
                     'is 2D (refine a volume slice by slice)')
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[:2] != probabilities.shape[:2] or image.ndim != 3:
    raise ValueError(f'image of shape {image.shape} does not match probabilities of shape '
                     f'{probabilities.shape}')
  for name, value in [('spatial_sigma', spatial_sigma), ('bilateral_sigma_xy', bilateral_sigma_xy),
                      ('bilateral_sigma_rgb', bilateral_sigma_rgb)]:
    if value <= 0:
      raise ValueError(f'{name}={value} must be > 0')
  if iterations < 0 or window < 0:
    raise ValueError(f'iterations={iterations} and window={window} must be ≥ 0')
  log_p = jnp.log(jnp.maximum(probabilities, eps))
  params = jnp.asarray([spatial_sigma, bilateral_sigma_xy, bilateral_sigma_rgb, w_spatial,
                        w_bilateral], jnp.float32)
  return _mean_field(log_p, image, params, iterations=int(iterations), window=int(window),
                     spatial_radius=max(1, math.ceil(4 * spatial_sigma)))


__all__ = ['crf_refine']
