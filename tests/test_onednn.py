"""unet_jax.models.onednn: oneDNN's convolutions against lax in float64, in a whole U-Net against
the 'xla' path, the name table's choices, export, the build cache and the fallback.

The extension is built here (CI has the compiler): a failed build fails these tests.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import jax
from jax import export as jax_export
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.models import UNet
from unet_jax.models import conv_impls
from unet_jax.models import fast_conv
from unet_jax.models import onednn
from unet_jax.models.onednn import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random(seed: int, shape, scale: float = 1.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _lax_value_and_grads(x, kernel, cotangent, padding, strides):
  """lax.conv_general_dilated and its VJP at `cotangent` (a function of y's shape), in the
  dtype of the inputs."""
  rank = x.ndim - 2
  spatial = 'DHW'[-rank:]
  spec = ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C')
  fn = lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=spec)
  y, vjp = jax.vjp(fn, x, kernel)
  return (y, *vjp(jnp.asarray(cotangent(y.shape), y.dtype)))


def _numpy_variables(model, x) -> dict:
  """The model's variables drawn with numpy: compiling the flax initialisers takes longer
  than everything else in these tests."""
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
  values = [np.ones(leaf.shape, np.float32) if jax.tree_util.keystr(path).endswith("['var']")
            else _random(i, leaf.shape, 0.3) for i, (path, leaf) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(tree, [jnp.asarray(v) for v in values])


def test_the_extension_builds_and_loads():
  assert onednn.available(), f'see the warning above; build cache {build.cache_root()}'


CASES = [
    # rank, x shape, kernel shape, padding, strides
    (2, (2, 9, 8, 5), (3, 3, 5, 7), ((1, 1), (1, 1)), (1, 1)),  # SAME
    (2, (2, 9, 8, 16), (3, 3, 16, 8), ((0, 0), (0, 0)), (1, 1)),  # VALID
    (2, (1, 10, 9, 1), (3, 3, 1, 4), ((2, 0), (1, 3)), (2, 1)),  # uneven pads, a stride
    (2, (3, 12, 12, 8), (5, 5, 8, 8), ((2, 2), (2, 2)), (2, 2)),  # 5×5, stride 2
    (1, (2, 11, 6), (3, 6, 4), ((1, 1),), (1,)),
    (3, (2, 6, 7, 5, 3), (3, 3, 3, 3, 4), ((1, 1),) * 3, (1, 1, 1)),
    (3, (1, 7, 6, 6, 4), (3, 3, 3, 4, 2), ((0, 0),) * 3, (1, 1, 1)),
]


@pytest.mark.parametrize('rank,x_shape,k_shape,padding,strides', CASES)
def test_conv_value_and_gradients_match_lax_in_float64(rank, x_shape, k_shape, padding, strides):
  x, kernel = _random(0, x_shape), _random(1, k_shape, 0.3)
  cotangent = lambda shape: _random(2, shape)
  with jax.enable_x64(True):
    want = [np.asarray(a) for a in _lax_value_and_grads(
        jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64), cotangent, padding,
        strides)]
  assert want[0].dtype == np.float64
  fn = lambda x, k: onednn.conv(x, k, padding=padding, strides=strides)
  got = jax.jit(lambda x, k, g: (fn(x, k), *jax.vjp(fn, x, k)[1](g)))(
      x, kernel, cotangent(want[0].shape))
  for name, g, w in zip(('y', 'dx', 'dkernel'), got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    assert _relative_error(g, w) < 2e-6, name
  # And as close to the float64 result as lax's own float32 convolution is.
  lax32 = _lax_value_and_grads(jnp.asarray(x), jnp.asarray(kernel), cotangent, padding,
                               strides)
  for g, l, w in zip(got, lax32, want):
    assert _relative_error(g, w) < 4 * _relative_error(l, w) + 1e-7


@pytest.mark.parametrize('x_shape,c_out', [((2, 6, 5, 8), 4), ((1, 3, 4, 3, 6), 5), ((2, 7, 3), 2)])
def test_conv_transpose_value_and_gradients_match_lax_in_float64(x_shape, c_out):
  rank = len(x_shape) - 2
  spatial = 'DHW'[-rank:]
  spec = ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C')
  reference = lambda x, k: lax.conv_transpose(x, k, (2,) * rank, 'VALID', dimension_numbers=spec)
  x, kernel = _random(0, x_shape), _random(1, (2,) * rank + (x_shape[-1], c_out), 0.3)
  cotangent = _random(2, (x_shape[0], *(2 * s for s in x_shape[1:-1]), c_out))
  with jax.enable_x64(True):
    x64, k64 = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
    y, vjp = jax.vjp(reference, x64, k64)
    want = [np.asarray(a) for a in (y, *vjp(jnp.asarray(cotangent, jnp.float64)))]
  fn = lambda x, k: onednn.conv_transpose(x, k, strides=(2,) * rank)
  got = jax.jit(lambda x, k, g: (fn(x, k), *jax.vjp(fn, x, k)[1](g)))(x, kernel, cotangent)
  for name, g, w in zip(('y', 'dx', 'dkernel'), got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    assert _relative_error(g, w) < 2e-6, name
  with pytest.raises(ValueError, match='kernel_size == strides'):
    onednn.conv_transpose(x, kernel, strides=(1,) * rank)


@pytest.mark.parametrize('x_shape,k_shape,padding,relu', [
    ((2, 9, 8, 5), (3, 3, 5, 7), ((1, 1), (1, 1)), True),
    ((1, 6, 7, 5, 3), (3, 3, 3, 3, 4), ((0, 0),) * 3, False),
])
def test_conv_epilogue_value_and_gradients_match_lax_in_float64(x_shape, k_shape, padding, relu):
  rank = len(x_shape) - 2
  spatial = 'DHW'[-rank:]
  spec = ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C')
  strides = (1,) * rank

  def reference(x, k, b):
    y = lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=spec) + b
    return jnp.maximum(y, 0) if relu else y

  x, kernel, bias = _random(0, x_shape), _random(1, k_shape, 0.3), _random(2, k_shape[-1:])
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in (x, kernel, bias)]
    y, vjp = jax.vjp(reference, *args64)
    cotangent = _random(3, y.shape)
    want = [np.asarray(a) for a in (y, *vjp(jnp.asarray(cotangent, jnp.float64)))]
  fn = lambda x, k, b: onednn.conv_epilogue(x, k, b, padding=padding, strides=strides,
                                            relu=relu)
  got = jax.jit(lambda x, k, b, g: (fn(x, k, b), *jax.vjp(fn, x, k, b)[1](g)))(
      x, kernel, bias, cotangent)
  assert relu == bool(np.any(want[0] == 0))  # the ReLU clips something, or there is none
  for name, g, w in zip(('y', 'dx', 'dkernel', 'dbias'), got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    assert _relative_error(g, w) < 2e-6, name
  with pytest.raises(ValueError, match='bias'):
    onednn.conv_epilogue(x, kernel, bias[:-1], padding=padding, strides=strides, relu=relu)


def test_calls_with_new_kernel_values_never_reuse_an_old_reordered_kernel():
  """The forward calls keep the kernel they last reordered into oneDNN's layout and skip the
  reorder while the caller's kernel holds the same bytes: a kernel that differs in its very last
  element must still be reordered anew, and going back to the first kernel too."""
  x = _random(0, (2, 12, 12, 16))
  bias = _random(1, (16,))
  spec = ('NHWC', 'HWIO', 'NHWC')
  pads = ((1, 1), (1, 1))
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=spec)
  # (oneDNN op, lax reference, kernel size); 16 channels, so oneDNN takes a blocked layout.
  ops = [
      (lambda x, k: onednn.conv_epilogue(x, k, bias, padding=pads, strides=(1, 1), relu=False),
       lambda x, k: conv(x, k) + bias, 3),
      (lambda x, k: onednn.conv(x, k, padding=pads, strides=(1, 1)), conv, 3),
      (lambda x, k: onednn.conv_transpose(x, k, strides=(2, 2)),
       lambda x, k: lax.conv_transpose(x, k, (2, 2), 'VALID', dimension_numbers=spec), 2),
  ]
  for op, reference, size in ops:
    first = _random(2, (size, size, 16, 16), 0.3)
    second = first.copy()
    second[-1, -1, -1, -1] += 1.0
    fn = jax.jit(op)
    outputs = []
    for kernel in (first, first, second, first, second):
      got = np.asarray(fn(x, kernel))
      assert _relative_error(got, reference(x, kernel)) < 1e-5
      outputs.append(got)
    assert not np.allclose(outputs[1], outputs[2])  # the change reaches the output


def test_conv_under_vmap_and_rejections():
  x, kernel = _random(0, (3, 2, 6, 6, 4)), _random(1, (3, 3, 4, 5))
  pads = ((1, 1), (1, 1))
  got = jax.vmap(lambda x: onednn.conv(x, kernel, padding=pads, strides=(1, 1)))(x)
  want = jax.vmap(lambda x: fast_conv.conv(x, kernel, padding=pads))(x)
  assert _relative_error(got, want) < 1e-5
  with pytest.raises(ValueError, match='float32'):
    onednn.conv(x[0].astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), padding=pads,
                strides=(1, 1))
  with pytest.raises(ValueError, match='non-negative'):
    onednn.conv(x[0], kernel, padding=((-1, 1), (1, 1)), strides=(1, 1))


@pytest.mark.parametrize('rank,padding,size,depth', [(2, 'SAME', 16, 2), (2, 'VALID', 60, 2),
                                                    (3, 'SAME', 8, 1)])
def test_whole_unet_gradient_equals_the_xla_path(rank, padding, size, depth):
  x = jnp.asarray(_random(0, (2, *(size,) * rank, 1)))
  models = {impl: UNet(num_classes=3, width=4, depth=depth, padding=padding, norm='batch',
                       conv_impl=impl) for impl in ('xla', 'onednn')}
  variables = _numpy_variables(models['xla'], x)
  out = jax.eval_shape(lambda v, x: models['xla'].apply(v, x, train=False), variables, x)
  cotangent = jnp.asarray(_random(1, out.shape))

  def loss(model, params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(logits * cotangent)

  results = {}
  for impl, model in models.items():
    lowered = jax.jit(jax.value_and_grad(lambda p, m=model: loss(m, p))).lower(
        variables['params'])
    for target in (*onednn.ops.TARGETS['conv'], *onednn.ops.TARGETS['deconv']):
      assert (target in lowered.as_text()) == (impl == 'onednn'), target
    results[impl] = lowered.compile()(variables['params'])
  (want_loss, want), (got_loss, got) = results['xla'], results['onednn']
  assert _relative_error(got_loss, want_loss) < 1e-5
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
  assert _relative_error(flat(got), flat(want)) < 1e-5
  # Leaf by leaf too, but not the up-convolutions' biases: batch norm cancels them, and their
  # gradients are rounding noise of the order of 1e-6.
  scale = np.max(np.abs(flat(want)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if np.max(np.abs(w)) > 1e-4 * scale:
      assert _relative_error(g, w) < 1e-4


def test_the_names_table_picks_onednn_on_one_cpu_device_only():
  resolve = lambda impl, **kw: conv_impls.resolve_impl(
      impl, **{'kernel_size': (3, 3), 'in_features': 16, 'out_features': 16,
               'spatial_shape': (64, 64), **kw})
  assert jax.device_count() > 1  # conftest's 8 simulated devices
  assert resolve('onednn') == 'onednn'
  assert resolve('auto') == resolve('portable') == 'xla'  # several devices: no custom calls
  assert resolve('onednn', dtype=jnp.bfloat16) == 'xla'  # float32 only
  assert resolve('onednn', kernel_size=(1, 1)) == 'fast'  # matrix products
  assert resolve('onednn', kernel_size=(2, 2), transposed=True) == 'onednn'
  assert resolve('onednn', padding=((-1, 0), (0, 0))) == 'xla'
  for backend in ('gpu', 'tpu'):
    assert resolve('onednn', backend=backend) == resolve('auto', backend=backend) == 'xla'
  assert fast_conv.IMPLS == conv_impls.IMPLS and 'onednn' in conv_impls.IMPLS
  # Programs for other platforms, or to be exported, never hold the custom calls.
  assert conv_impls.impl_for_platforms('auto', ['cpu']) == 'portable'
  assert conv_impls.impl_for_platforms('onednn', ['cpu']) == 'portable'
  assert conv_impls.impl_for_platforms('onednn', ['cpu', 'tpu']) == 'xla'


def test_auto_takes_onednn_in_a_one_device_process():
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from unet_jax.models import UNet, conv_impls
      assert jax.device_count() == 1
      assert conv_impls.resolve_impl('auto', kernel_size=(3, 3), in_features=8, out_features=8,
                                     spatial_shape=(64, 64)) == 'onednn'
      model = UNet(num_classes=2, width=4, depth=1, padding='SAME')
      x = jnp.zeros((1, 16, 16, 1))
      variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
      text = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
      print('custom calls', text.count('unet_jax_onednn_conv_forward'))
      """)
  env = {**os.environ, 'XLA_FLAGS': ''}
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert 'custom calls 6' in result.stdout  # 3 conv blocks × 2 convolutions of 3×3


def test_3d_gradients_in_steps_dispatched_back_to_back():
  # With oneDNN's own scratchpad, the 3D kernel gradient crashed the process (a memset out of
  # bounds) when steps were dispatched without waiting, as a training loop does; the extension
  # now hands every primitive its scratchpad. In a child process, so that a crash fails this
  # test instead of the session.
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax import lax
      from unet_jax.models.onednn import ops
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(1, 16, 16, 16, 4)), jnp.float32)
      k = jnp.asarray(0.3 * rng.normal(size=(3, 3, 3, 4, 4)), jnp.float32)
      pad = ((1, 1),) * 3
      def steps(conv):
        @jax.jit
        def step(x, k):
          y, vjp = jax.vjp(conv, x, k)
          dx, dk = vjp(jnp.sin(y))
          return x - 1e-4 * dx, k - 1e-4 * dk
        state = (x, k)
        for _ in range(40):
          state = step(*state)
        return state
      got = steps(lambda x, k: ops.conv(x, k, padding=pad, strides=(1, 1, 1)))
      want = steps(lambda x, k: lax.conv_general_dilated(
          x, k, (1, 1, 1), pad, dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')))
      print('relative difference', max(float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
                                       for g, w in zip(got, want)))
      """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env={**os.environ, 'XLA_FLAGS': ''}, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(result.stdout.split('relative difference')[1]) < 1e-5, result.stdout


def test_export_of_a_cpu_model_holds_no_custom_call():
  model = UNet(num_classes=2, width=4, depth=1, padding='SAME', conv_impl='onednn')
  x = jax.ShapeDtypeStruct((1, 16, 16, 1), jnp.float32)
  variables = _numpy_variables(model, x)
  apply = lambda m: jax.jit(lambda x: m.apply(variables, x, train=False))
  # jax.export refuses the custom calls themselves ...
  with pytest.raises(ValueError, match='custom calls'):
    jax_export.export(apply(model))(x)
  # ... so exports take the portable path, which computes the same function.
  portable = model.clone(conv_impl=conv_impls.impl_for_platforms(model.conv_impl, ['cpu']))
  exported = jax_export.export(apply(portable))(x)
  assert 'unet_jax_onednn' not in exported.mlir_module()
  image = jnp.asarray(_random(0, x.shape))
  assert _relative_error(exported.call(image), apply(model)(image)) < 1e-5


_FALLBACK = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from unet_jax.models import UNet, conv_impls, onednn
    assert not onednn.available()
    for impl in ('auto', 'onednn'):
      assert conv_impls.resolve_impl(impl, kernel_size=(3, 3), in_features=1, out_features=4,
                                     spatial_shape=(16, 16)) == 'fast'
      model = UNet(num_classes=2, width=2, depth=1, padding='SAME', conv_impl=impl)
      x = jnp.ones((1, 8, 8, 1))
      variables = jax.tree.map(lambda a: jnp.full(a.shape, 0.1, a.dtype), jax.eval_shape(
          lambda x: model.init(jax.random.key(0), x, train=False), x))
      text = jax.jit(lambda x: model.apply(variables, x, train=False)).lower(x).as_text()
      assert 'unet_jax_onednn' not in text
    print('fallback ok')
    """)


def test_without_a_compiler_one_warning_and_the_xla_path(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '', 'UNET_JAX_CACHE_DIR': str(tmp_path),
         'UNET_JAX_CXX': str(tmp_path / 'no-such-compiler')}
  result = subprocess.run([sys.executable, '-c', _FALLBACK], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert 'fallback ok' in result.stdout
  warnings = [line for line in result.stderr.splitlines() if 'oneDNN' in line]
  assert len(warnings) == 1, result.stderr
  assert 'unavailable' in warnings[0] and 'no-such-compiler' in warnings[0]


def test_a_failed_build_warns_with_its_log(tmp_path):
  compiler = tmp_path / 'broken-c++'
  compiler.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\n'
                      'echo "error: no such luck" >&2; exit 3\n')
  compiler.chmod(0o755)
  env = {**os.environ, 'XLA_FLAGS': '', 'UNET_JAX_CACHE_DIR': str(tmp_path / 'cache'),
         'UNET_JAX_CXX': str(compiler)}
  result = subprocess.run([sys.executable, '-c', _FALLBACK], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stderr.splitlines() if 'oneDNN' in line]
  assert len(warnings) == 1 and 'exit 3' in warnings[0], result.stderr
  log = warnings[0].rsplit('build log: ', 1)[1].strip()
  assert 'no such luck' in open(log).read()
  assert not glob.glob(str(tmp_path / 'cache' / '**' / '*.so'), recursive=True)


def test_processes_building_at_once_share_one_cached_library(tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '', 'UNET_JAX_CACHE_DIR': str(tmp_path)}
  script = ('from unet_jax.models.onednn import build\n'
            'assert build.load()\nprint(build.build())')
  processes = [subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
  paths = {out.strip() for out, _ in outputs}
  assert len(paths) == 1 and paths.pop().startswith(str(tmp_path))
  assert len(glob.glob(str(tmp_path / '**' / '*.so'), recursive=True)) == 1
  assert not glob.glob(str(tmp_path / '**' / '.building-*'), recursive=True)


# Calls a convolution, then reads the policy (field 41 of /proc/.../stat, SCHED_IDLE = 5) and CPU
# time of the extension's spinners right after the call, and 0.3 s later.
_KEEP_AWAKE = """
import glob, sys, time
import jax, numpy as np
from unet_jax.models import onednn
def spinners():
  out = {}
  for task in glob.glob('/proc/self/task/*'):
    if open(task + '/comm').read().strip() == 'onednn-awake':
      fields = open(task + '/stat').read().rsplit(')', 1)[1].split()
      out[task] = (int(fields[38]), int(open(task + '/schedstat').read().split()[0]))
  return out
assert onednn.available()
x = np.ones((2, 16, 16, 4), np.float32); k = np.ones((3, 3, 4, 4), np.float32)
conv = jax.jit(lambda x, k: onednn.conv(x, k, padding=((1, 1), (1, 1)), strides=(1, 1)))
y = np.asarray(conv(x, k))
assert np.allclose(y[:, 1:-1, 1:-1], 36.0)
time.sleep(0.1)
idle = spinners()
time.sleep(0.3)
later = spinners()
print('spinners', len(idle), 'policies', sorted({p for p, _ in idle.values()}),
      'ns while idle', max([later[t][1] - idle[t][1] for t in idle], default=-1))
"""


@pytest.mark.parametrize('window, count', [('1', 2), ('0', 0)])
def test_spinners_keep_the_cpus_awake_at_idle_priority_and_then_sleep(window, count):
  env = {**os.environ, 'XLA_FLAGS': '', 'OMP_NUM_THREADS': '2',
         'UNET_JAX_ONEDNN_KEEP_AWAKE_MS': window}
  result = subprocess.run([sys.executable, '-c', _KEEP_AWAKE], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('spinners')][0]
  if count:
    # One per thread of the team, preempted by any other thread, asleep once the window passed.
    assert line.startswith(f'spinners {count} policies [5] ns while idle '), line
    assert int(line.rsplit(' ', 1)[1]) < 1_000_000, line  # < 1 ms of CPU in 0.3 s
  else:
    assert line == 'spinners 0 policies [] ns while idle -1', line


def test_a_bad_keep_awake_window_is_one_clear_error(monkeypatch):
  monkeypatch.setenv('UNET_JAX_ONEDNN_KEEP_AWAKE_MS', 'soon')
  with pytest.raises(ValueError, match="UNET_JAX_ONEDNN_KEEP_AWAKE_MS='soon': expected "
                                       'milliseconds'):
    build.keep_awake_ms()
  monkeypatch.setenv('UNET_JAX_ONEDNN_KEEP_AWAKE_MS', '2.5')
  assert build.keep_awake_ms() == 2.5
