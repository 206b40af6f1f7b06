"""models/batch_norm.py against flax's nn.BatchNorm (the reference) and a numpy computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.models import UNet
from unet_jax.models import batch_norm
from unet_jax.models import blocks
from unet_jax.models import onednn


def _apply(module, variables, params, x, train):
  return module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                      mutable=['batch_stats'] if train else False)


@pytest.mark.parametrize('shape', [(2, 5, 7, 6), (3, 4, 5, 6, 3), (9, 4)])
def test_training_value_gradient_and_running_averages_equal_flax_in_float64(shape):
  rng = np.random.default_rng(0)
  features = shape[-1]
  results = []
  with jax.enable_x64():
    # An offset much larger than the spread: the centred forms keep their precision.
    x = jnp.asarray(rng.normal(30.0, 0.5, size=shape))
    params = {'scale': jnp.asarray(rng.normal(size=features)),
              'bias': jnp.asarray(rng.normal(size=features))}
    weights = jnp.asarray(rng.normal(size=shape))
    assert x.dtype == jnp.float64
    for module in (nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.float64),
                   batch_norm.BatchNorm(use_running_average=False, momentum=0.9,
                                        dtype=jnp.float64)):
      variables = module.init(jax.random.key(0), x)

      def loss(p, x, module=module, variables=variables):
        y, updates = _apply(module, variables, p, x, train=True)
        stats = updates['batch_stats']
        # Through the outputs and through the running averages, as flax lets gradients flow.
        return (jnp.sum(jnp.sin(y) * weights) + jnp.sum(stats['var'] ** 2)
                + 3 * jnp.sum(stats['mean'])), (y, updates)

      (value, (y, updates)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
          params, x)
      results.append((variables, value, y, updates, grads))
  (ref_vars, ref_value, ref_y, ref_updates, ref_grads), (vars_, value, y, updates, grads) = results
  assert jax.tree.structure(vars_) == jax.tree.structure(ref_vars)
  np.testing.assert_allclose(value, ref_value, rtol=1e-12)
  np.testing.assert_allclose(y, ref_y, rtol=1e-10, atol=1e-10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9),
               (updates, grads), (ref_updates, ref_grads))
  # The batch statistics themselves, from numpy (the averages are stored in float32).
  flat = np.asarray(x).reshape(-1, features)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * flat.var(0), rtol=1e-6)


def test_float32_gradient_matches_a_float64_reference():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, size=(4, 8, 8, 5)).astype(np.float32)
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  scale = rng.normal(size=5).astype(np.float32)
  bias = rng.normal(size=5).astype(np.float32)

  def grads(dtype):
    def f(x, s, b):
      y, _, _ = batch_norm.normalize(x, s, b, 1e-5, jnp.dtype(dtype))
      return jnp.sum(y * cotangent.astype(dtype))
    return jax.grad(f, argnums=(0, 1, 2))(*(jnp.asarray(a, dtype) for a in (x, scale, bias)))

  got = grads(jnp.float32)
  with jax.enable_x64():
    want = grads(jnp.float64)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * float(np.abs(w).max()))


def test_evaluation_uses_the_running_averages_and_bfloat16_output():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.bfloat16)
  stats = {'mean': jnp.asarray(rng.normal(size=4), jnp.float32),
           'var': jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)}
  params = {'scale': jnp.asarray(rng.normal(size=4), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=4), jnp.float32)}
  outputs = []
  for module in (nn.BatchNorm(use_running_average=True, momentum=0.9, dtype=jnp.bfloat16),
                 batch_norm.BatchNorm(use_running_average=True, momentum=0.9,
                                      dtype=jnp.bfloat16)):
    outputs.append(module.apply({'params': params, 'batch_stats': stats}, x))
  assert outputs[1].dtype == jnp.bfloat16
  x64 = np.asarray(x, np.float64)
  want = ((x64 - np.asarray(stats['mean'])) / np.sqrt(np.asarray(stats['var']) + 1e-5)
          * np.asarray(params['scale']) + np.asarray(params['bias']))
  np.testing.assert_allclose(np.asarray(outputs[1], np.float64), want, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(outputs[1], np.float32),
                             np.asarray(outputs[0], np.float32), rtol=1e-2, atol=1e-2)
  # Training in bfloat16: statistics in float32, output in bfloat16, as flax.
  train = batch_norm.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
  y, updates = _apply(train, {'batch_stats': stats}, params, x, train=True)
  assert y.dtype == jnp.bfloat16 and updates['batch_stats']['mean'].dtype == jnp.float32


def test_unet_gradient_with_batch_norm_equals_flax_batch_norm(monkeypatch):
  """The whole U-Net: the same parameters, loss gradient and running averages as when its
  Norm layers use flax's nn.BatchNorm."""
  model = UNet(num_classes=3, width=4, depth=1, padding='SAME', norm='batch', conv_impl='xla')
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 16, 16)))

  def run():
    variables = model.init(jax.random.key(0), x)

    def loss(params):
      logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                    x, train=True, mutable=['batch_stats'])
      log_p = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(log_p, labels[..., None], -1)), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
    return variables, value, updates, grads

  ours = run()
  monkeypatch.setattr(batch_norm, 'BatchNorm', nn.BatchNorm)
  flax_run = run()
  assert jax.tree.structure(ours[0]) == jax.tree.structure(flax_run[0])
  np.testing.assert_allclose(ours[1], flax_run[1], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               ours[2:], flax_run[2:])


@pytest.mark.parametrize('impl', ['xla', 'onednn'])
def test_evaluation_folds_batch_norm_into_the_convolution(impl):
  """A conv block in evaluation: two (3×3 convolution, batch norm over the running averages,
  ReLU) layers, computed here in float64 numpy-side lax, against the block's folded path."""
  if impl == 'onednn' and not onednn.available():
    pytest.fail('the oneDNN extension did not build (see test_onednn.py)')
  block = blocks.ConvBlock(6, padding='SAME', norm='batch', conv_impl=impl)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 10, 9, 3)), jnp.float32)
  abstract = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
  leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
  values = [rng.uniform(0.5, 2.0, leaf.shape) if jax.tree_util.keystr(path).endswith("['var']")
            else rng.normal(0.2, 0.5, leaf.shape) for path, leaf in leaves]
  variables = jax.tree_util.tree_unflatten(tree, [jnp.asarray(v, jnp.float32) for v in values])
  got = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)

  with jax.enable_x64():
    y = jnp.asarray(x, jnp.float64)
    for i in range(2):
      params, stats = variables['params'], variables['batch_stats'][f'norm{i}']['BatchNorm_0']
      norm = {k: np.asarray(v, np.float64) for k, v in params[f'norm{i}']['BatchNorm_0'].items()}
      kernel = jnp.asarray(params[f'conv{i}']['kernel'], jnp.float64)
      y = jax.lax.conv_general_dilated(y, kernel, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      y = ((y - np.asarray(stats['mean'], np.float64))
           / np.sqrt(np.asarray(stats['var'], np.float64) + 1e-5) * norm['scale'] + norm['bias'])
      y = jnp.maximum(y, 0)
    want = np.asarray(y)
  assert np.any(want == 0) and np.any(want > 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  text = jax.jit(lambda v, x: block.apply(v, x, train=False)).lower(variables, x).as_text()
  assert text.count(onednn.ops.EPILOGUE) == (2 if impl == 'onednn' else 0)
