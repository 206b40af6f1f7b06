"""Export round trip: the reloaded StableHLO predictor matches the model, in a fresh process too."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.inference import export
from unet_jax.models import UNet


@pytest.fixture(scope='module')
def exported_model(tmp_path_factory):
  model = UNet(num_classes=3, width=2, depth=2, padding='VALID', norm='batch')
  # He-scaled random variables (compiling model.init is slow on a loaded CPU); batch-norm
  # variances and scales positive.
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 1)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if any(k in jax.tree_util.keystr(path) for k in ('var', 'scale')):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
    return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, abstract)
  apply_fn = lambda v, x: model.apply(v, x, train=False)
  exported = export.export_predictor(apply_fn, variables, tile_shape=(48, 48), input_channels=1,
                                     platforms=('cpu',))
  path = str(tmp_path_factory.mktemp('export') / 'unet.stablehlo')
  files = export.save(exported, path, metadata={'tile_size': 48, 'mean': 0.5})
  reference = jax.jit(lambda x: jax.nn.softmax(apply_fn(variables, x), axis=-1))
  return path, files, reference


def test_round_trip_matches_the_model_for_any_batch_size(exported_model):
  path, files, reference = exported_model
  assert all(os.path.getsize(f) > 0 for f in files)
  signature = export.read_signature(path)
  assert signature['input']['shape'] == ['b', 48, 48, 1]
  assert signature['output']['shape'] == ['b', 8, 8, 3]
  assert signature['metadata'] == {'tile_size': 48, 'mean': 0.5}
  loaded = export.load(path)
  for batch in (1, 3):
    x = np.random.default_rng(batch).normal(size=(batch, 48, 48, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded.call(x)), np.asarray(reference(x)), rtol=1e-5,
                               atol=1e-6)
  x = np.ones((2, 48, 48, 1), np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(loaded.call)(x)), np.asarray(reference(x)),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    loaded.call(np.zeros((1, 44, 44, 1), np.float32))  # the tile shape is fixed


def test_a_fresh_process_runs_it_with_jax_alone(exported_model, tmp_path):
  """Neither unet_jax nor flax is imported: the module and signature are self-contained.

  The script is the recipe of export.load, written out with jax alone.
  """
  path, _, reference = exported_model
  x = np.random.default_rng(5).normal(size=(2, 48, 48, 1)).astype(np.float32)
  np.save(tmp_path / 'x.npy', x)
  script = f"""
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax import export
record = json.load(open({path!r} + '.json'))
shape = export.symbolic_shape(', '.join(map(str, record['input']['shape'])))
out = tuple(record['output']['shape'][1:])
stand_in = jax.jit(lambda x: jnp.zeros((x.shape[0], *out), jnp.float32))
template = export.export(stand_in, platforms=tuple(record['platforms']))(
    jax.ShapeDtypeStruct(shape, jnp.float32))
module = open({path!r}, 'rb').read()
exported = dataclasses.replace(template, mlir_module_serialized=module,
    calling_convention_version=record['calling_convention_version'],
    module_kept_var_idx=tuple(record['module_kept_var_idx']),
    uses_global_constants=record['uses_global_constants'])
x = np.load({str(tmp_path / 'x.npy')!r})
np.save({str(tmp_path / 'y.npy')!r}, np.asarray(exported.call(x)))
assert not any(m.startswith(('unet_jax', 'flax')) for m in sys.modules), 'model code was imported'
"""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  subprocess.run([sys.executable, '-c', script], check=True, env=env, cwd=str(tmp_path),
                 timeout=120)
  np.testing.assert_allclose(np.load(tmp_path / 'y.npy'), np.asarray(reference(x)), rtol=1e-5,
                             atol=1e-6)


def test_signature_errors(exported_model, tmp_path):
  path, _, _ = exported_model
  record = json.load(open(path + '.json', encoding='utf-8'))
  record['format'] = 'something-else'
  bad = str(tmp_path / 'bad.stablehlo')
  with open(bad, 'wb') as f:
    f.write(open(path, 'rb').read())
  with open(bad + '.json', 'w', encoding='utf-8') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match='signature'):
    export.load(bad)


def test_jax_own_serialization_round_trips_the_artifact(exported_model):
  """jax.export.serialize/deserialize (which need the pinned flatbuffers) take it too."""
  path, _, reference = exported_model
  blob = export.load(path).serialize()
  again = jax.export.deserialize(bytearray(blob))
  x = np.random.default_rng(7).normal(size=(2, 48, 48, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(again.call(x)), np.asarray(reference(x)), rtol=1e-5,
                             atol=1e-6)
