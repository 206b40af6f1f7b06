"""On-device augmentation: agreement with the host ops, alignment, determinism, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi

from unet_jax.augment import on_device as D
from unet_jax.augment import geometric as G
from unet_jax.augment import intensity as I
from unet_jax import sharding
from unet_jax.augment import transforms as T

GEOMETRIC = ('elastic(p=1, sigma=3)|rotate(p=1, degrees=30)|scale(p=1, min=0.8, max=1.25)|'
             'shift(p=1, max=2.5)|flip|rot90')
MEAN, STD = 0.5, 0.2


def _smooth(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = ndi.gaussian_filter(rng.normal(size=shape), 2.0, mode='wrap')
  return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


def _draws(ops, rank, seed):
  rng = np.random.default_rng(seed)
  return [(rng.random(op.num_uniform(rank)), rng.standard_normal(op.num_normal(rank)))
          for op in ops]


_apply_geometry = jax.jit(D.apply_geometry, static_argnums=1)


@pytest.mark.parametrize('spec', [GEOMETRIC, 'flip|rot90', "rotate(p=1, degrees=45, axis='random')"])
@pytest.mark.parametrize('shape', [(20, 20), (6, 12, 12)])
def test_device_geometry_matches_host_for_the_same_random_numbers(spec, shape):
  ops = T.parse_augment(spec)
  image = np.stack([_smooth(shape), _smooth(shape, 1)], axis=-1)
  example = {'image': image, 'label': (image[..., 0] > 0.5).astype(np.int32),
             'weight': image[..., 1] + 1, 'instances': (image[..., 1] * 4).astype(np.int32)}
  for seed in range(2):
    draws = _draws(ops, len(shape), seed)
    host = G.GeometricAugment(ops, order=1).apply(example, draws)
    device = _apply_geometry({k: jnp.asarray(v) for k, v in example.items()}, ops,
                             [(jnp.asarray(u, jnp.float32), jnp.asarray(z, jnp.float32))
                              for u, z in draws])
    np.testing.assert_allclose(device['image'], host['image'], atol=1e-4)
    np.testing.assert_allclose(device['weight'], host['weight'], atol=1e-4)
    for key in ('label', 'instances'):  # nearest: only float32 rounding ties may differ
      assert device[key].dtype == jnp.int32
      assert np.mean(np.asarray(device[key]) != host[key]) < 0.01
    if spec == 'flip|rot90':  # integer coordinates: exact
      np.testing.assert_array_equal(device['image'], host['image'])
      np.testing.assert_array_equal(device['label'], host['label'])


def test_device_intensity_matches_host_and_scipy():
  spec = ('brightness(p=1, delta=0.2)|contrast(p=1)|gamma(p=1, min=0.5, max=2)|'
          'noise(p=1, std=0.05)|blur(p=1, sigma_min=1, sigma_max=1)')
  ops = T.parse_augment(spec)
  image = 0.2 + 0.6 * _smooth((16, 18))[..., None]
  rng = np.random.default_rng(0)
  draws = [(rng.random(op.num_uniform), rng.standard_normal(image.shape).astype(np.float32)
            if op.needs_noise else None) for op in ops]
  host = image
  for op, (u, noise) in zip(ops, draws):
    host = op.apply(host, u, noise, np).astype(np.float32)
  device = D.apply_intensity(jnp.asarray((image - MEAN) / STD), ops,
                             [(jnp.asarray(u, jnp.float32), None if z is None else jnp.asarray(z))
                              for u, z in draws], mean=MEAN, std=STD)
  np.testing.assert_allclose(np.asarray(device) * STD + MEAN, host, atol=1e-5)
  # The last op, blur, against scipy (kernel radius 4 σ, mirror borders).
  before_blur = image
  for op, (u, noise) in zip(ops[:-1], draws[:-1]):
    before_blur = op.apply(before_blur, u, noise, np)
  expected = ndi.gaussian_filter(before_blur, (1, 1, 0), mode='mirror', truncate=4.0)
  np.testing.assert_allclose(np.asarray(device) * STD + MEAN, expected, atol=1e-5)
  skipped = D.apply_intensity(jnp.asarray(image), (I.Brightness(p=0.5),),
                              [(jnp.array([0.7, 0.9]), None)], mean=MEAN, std=STD)
  np.testing.assert_allclose(skipped, image, atol=1e-6)  # u[0] >= p: not applied


@functools.partial(jax.jit, static_argnames='spec')
def _augment(rng, batch, spec):
  return D.augment_batch(rng, batch, spec=spec, mean=MEAN, std=STD)


def _batch(n=8, size=16, seed=0):
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, (n, size, size)).astype(np.float32)
  return {'image': jnp.asarray(((raw / 255 - MEAN) / STD)[..., None]),
          'label': jnp.asarray((raw > 127).astype(np.int32)),
          'weight': jnp.asarray(raw * 0.5), 'index': jnp.arange(n)}


def _raw(batch):
  return np.round((np.asarray(batch['image'][..., 0]) * STD + MEAN) * 255)


def test_augment_batch_jits_keeps_alignment_and_is_deterministic():
  spec = 'flip|rot90|shift(p=0)|brightness(p=0)'  # exact geometry, so alignment is exact
  batch = _batch()
  out = _augment(jax.random.key(0), batch, spec)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == \
         {k: (v.shape, v.dtype) for k, v in batch.items()}
  raw = _raw(out)
  np.testing.assert_array_equal(out['label'], (raw > 127).astype(np.int32))
  np.testing.assert_allclose(out['weight'], raw * 0.5, atol=1e-3)
  np.testing.assert_array_equal(out['index'], batch['index'])
  originals = _raw(batch)
  variants = 0
  for i in range(len(raw)):  # each example is an exact flip/turn of itself, drawn separately
    options = [np.rot90(np.flip(originals[i], a) if a is not None else originals[i], k)
               for a in (None, 0, 1, (0, 1)) for k in range(4)]
    assert any(np.array_equal(raw[i], o) for o in options)
    variants += not np.array_equal(raw[i], originals[i])
  assert variants >= 3
  again = _augment(jax.random.key(0), batch, spec)
  other = _augment(jax.random.key(1), batch, spec)
  np.testing.assert_array_equal(again['image'], out['image'])
  assert not np.array_equal(other['image'], out['image'])


def test_augment_batch_on_a_sharded_batch():
  spec = 'rotate(p=0.5)|flip'
  batch_sharding = sharding.batch_sharding(sharding.make_mesh())
  batch = _batch(n=len(jax.devices()))
  out = _augment(jax.random.key(2), jax.device_put(batch, batch_sharding), spec)
  reference = _augment(jax.random.key(2), batch, spec)
  assert out['image'].sharding.is_equivalent_to(batch_sharding, out['image'].ndim)
  np.testing.assert_allclose(out['image'], reference['image'], atol=1e-5)
  np.testing.assert_array_equal(out['label'], reference['label'])


def test_empty_spec_and_spec_errors():
  batch = _batch(n=2)
  assert D.augment_batch(jax.random.key(0), batch, spec='') is batch
  with pytest.raises(ValueError, match="unknown op 'elastc'"):
    D.augment_batch(jax.random.key(0), batch, spec='elastc(p=1)')
