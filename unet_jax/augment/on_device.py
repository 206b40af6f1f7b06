"""On-device augmentation of a batch, for use inside a jitted train step.

The spec string, the op dataclasses and the geometry are those of the host pipeline
(transforms.parse_augment, geometric, intensity): only the random numbers (jax.random) and the
resampling (jax.scipy.ndimage.map_coordinates, mirror borders) differ. Given the same random
numbers, host and device produce the same geometry; `draw` and `apply` expose that split.

Batch (all arrays share N and the spatial dims; rank 2 or 3):
  'image':     (N, *spatial, C) float32, normalised as (x / 255 - mean) / std
  'label':     (N, *spatial)    int class ids         — nearest pixel
  'weight':    (N, *spatial)    float pixel weights   — linear (optional)
  'instances': (N, *spatial)    int instance ids      — nearest pixel (optional)
Other keys pass through unchanged. Every example draws its own parameters (vmap over split keys).
A batch sharded over a mesh with Auto axes (sharding.make_mesh) stays sharded the same way;
Explicit-axis meshes are not supported.

Shapes are static, so nothing is cropped here (crop on the host) and 90° turns of a non-square
(H, W) plane are 0° or 180° only. All geometric ops of the spec fuse into one resampling with
spline order 1 for images and weights (the only orders jax offers are 0 and 1); flips and 90°
turns land on integer coordinates and stay exact. Intensity ops then act on the image in [0, 1]
(undoing `mean`/`std` for them), in spec order.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.augment import examples
from unet_jax.augment import geometric as G
from unet_jax.augment import intensity as I
from unet_jax.augment import transforms as T

Batch = dict[str, jax.Array]


def _split_ops(spec: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  ops = T.parse_augment(spec)
  return (tuple(op for op in ops if isinstance(op, G.GeometricOp)),
          tuple(op for op in ops if isinstance(op, I.IntensityOp)))


def draw(key: jax.Array, spec: str, example: Batch) -> dict[str, list[Any]]:
  """The random numbers one example's augmentation uses (what a host op draws from its rng).

  Returns {'geometric': [(u, z) per geometric op], 'intensity': [(u, noise or None) per op]}.
  """
  geometric, intensity = _split_ops(spec)
  rank, shape = example['label'].ndim, example['image'].shape
  keys = jax.random.split(key, 2 * (len(geometric) + len(intensity)) + 1)
  geo = [(jax.random.uniform(keys[2 * i], (op.num_uniform(rank),)),
          jax.random.normal(keys[2 * i + 1], (op.num_normal(rank),)))
         for i, op in enumerate(geometric)]
  keys = keys[2 * len(geometric):]
  inten = [(jax.random.uniform(keys[2 * i], (op.num_uniform,)),
            jax.random.normal(keys[2 * i + 1], shape) if op.needs_noise else None)
           for i, op in enumerate(intensity)]
  return {'geometric': geo, 'intensity': inten}


def apply_geometry(example: Batch, ops: tuple[Any, ...], draws: list[Any]) -> Batch:
  """One example through the fused geometric `ops` with the given (u, z) per op."""
  if not ops:
    return example
  shape = example['label'].shape
  matrix, field = G.compose(ops, draws, shape=shape, xp=jnp)
  coords = G.source_coordinates(matrix, field, shape, (np.asarray(shape) - 1) / 2, jnp)
  coords = list(coords.astype(jnp.float32))

  def sample(x, order):
    return jax.scipy.ndimage.map_coordinates(x, coords, order=order, mode='mirror')

  out = dict(example)
  for key in examples.SPATIAL_KEYS:
    if key not in example:
      continue
    x = example[key]
    if key == 'image':
      out[key] = jax.vmap(lambda c: sample(c, 1), in_axes=-1, out_axes=-1)(x)
    else:
      out[key] = sample(x, 0 if key in examples.NEAREST_KEYS else 1)
  return out


def apply_intensity(image: jax.Array, ops: tuple[Any, ...], draws: list[Any], *, mean: float,
                    std: float) -> jax.Array:
  """The normalised image through the intensity `ops` with the given (u, noise) per op."""
  if not ops:
    return image
  x = image * std + mean
  for op, (u, noise) in zip(ops, draws):
    x = jnp.where(u[0] < op.p, op.apply(x, u, noise, jnp), x)
  return ((x - mean) / std).astype(image.dtype)


def augment_example(key: jax.Array, example: Batch, *, spec: str, mean: float = 0.0,
                    std: float = 1.0) -> Batch:
  """One example (no batch axis) augmented by `spec`."""
  geometric, intensity = _split_ops(spec)
  draws = draw(key, spec, example)
  out = apply_geometry(example, geometric, draws['geometric'])
  if intensity:
    out['image'] = apply_intensity(out['image'], intensity, draws['intensity'], mean=mean,
                                   std=std)
  return out


def augment_batch(rng: jax.Array, batch: Batch, *, spec: str, mean: float = 0.0,
                  std: float = 1.0) -> Batch:
  """Augments every example of `batch` by `spec` with its own parameters; jit- and vmap-able.

  Args:
    rng: a PRNG key; split per example.
    batch: see the module docstring; 'label' sets the batch size and spatial shape.
    spec: config.data.augment syntax (static; parsed at trace time). '' returns `batch`.
    mean, std: the normalisation of 'image', undone for the intensity ops.
  """
  if not T.parse_augment(spec):
    return batch
  spatial = {k: batch[k] for k in examples.SPATIAL_KEYS if k in batch}
  keys = jax.random.split(rng, batch['label'].shape[0])
  fn = functools.partial(augment_example, spec=spec, mean=mean, std=std)
  return {**batch, **jax.vmap(fn)(keys, spatial)}
