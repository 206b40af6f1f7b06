"""Loop features: schedules, weight-decay masks, EMA, accumulation, non-finite steps, early
stopping and SIGTERM save-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import quickstart
from unet_jax.training import metric_writers
from unet_jax.training import optimizers
from unet_jax import sharding
from unet_jax.config import validation
from unet_jax.training import loop
from unet_jax.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _optimizer_config(**overrides):
  config = quickstart.get_config('smoke').optimizer
  config.update(overrides)
  return config


def test_schedules_take_their_documented_values():
  lr = 0.1
  cosine = optimizers.make_schedule(
      _optimizer_config(learning_rate=lr, warmup_steps=10, schedule='cosine',
                        final_lr_fraction=0.0), num_steps=110)
  assert float(cosine(0)) == 0.0
  np.testing.assert_allclose(float(cosine(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(10)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(60)), lr * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
  np.testing.assert_allclose(float(cosine(110)), 0.0, atol=1e-7)
  poly = optimizers.make_schedule(
      _optimizer_config(learning_rate=lr, warmup_steps=0, schedule='polynomial', power=2.0,
                        final_lr_fraction=0.0), num_steps=100)
  np.testing.assert_allclose(float(poly(50)), lr * (1 - 0.5)**2, rtol=1e-5)
  step = optimizers.make_schedule(
      _optimizer_config(learning_rate=lr, warmup_steps=0, schedule='step',
                        step_boundaries=(0.5, 0.75), step_factor=0.1), num_steps=100)
  np.testing.assert_allclose([float(step(s)) for s in (0, 49, 51, 80)],
                             [lr, lr, lr * 0.1, lr * 0.01], rtol=1e-5)
  constant = optimizers.make_schedule(
      _optimizer_config(learning_rate=lr, warmup_steps=4, schedule='constant'), num_steps=100)
  np.testing.assert_allclose([float(constant(s)) for s in (0, 2, 4, 99)], [0, lr / 2, lr, lr],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="config.optimizer.schedule='cosin' is not one of"):
    optimizers.make_schedule(_optimizer_config(schedule='cosin'), num_steps=10)


def test_weight_decay_skips_biases_and_norms():
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2)), 'bias': jnp.ones((2,))},
            'norm': {'scale': jnp.ones((2,))}}
  # Plain SGD with L2 decay and zero gradients: the update is -lr·decay·p where decay applies.
  tx, _ = optimizers.make_optimizer(
      _optimizer_config(name='sgd', momentum=0.0, learning_rate=1.0, warmup_steps=0,
                        schedule='constant', weight_decay=0.5), num_steps=1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5)
  np.testing.assert_allclose(updates['conv']['bias'], 0.0)
  np.testing.assert_allclose(updates['norm']['scale'], 0.0)
  with pytest.raises(ValueError, match="config.optimizer.name='adamm' is not one of"):
    optimizers.make_optimizer(_optimizer_config(name='adamm'), num_steps=1)


def test_ema_update_matches_the_formula():
  ema, params = {'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([3.0, 6.0])}
  for step, decay in [(0, 0.99), (1000, 0.99), (5, 0.5)]:
    rate = min(decay, (1 + step) / (10 + step))
    out = optimizers.update_ema(ema, params, decay=decay, step=jnp.asarray(step))
    np.testing.assert_allclose(out['w'], rate * np.array([1, 2]) + (1 - rate) * np.array([3, 6]),
                               rtol=1e-6)


def _smoke(**overrides):
  config = quickstart.get_config('smoke')
  config.update(overrides)
  config.model.dropout_rate = 0.0
  return config


def _run_steps(config, batches, devices=8):
  config.mesh.data = devices
  setup = train_step.build(config, input_channels=1, spatial_rank=2)
  state = train_step.initial_state(setup, 0)
  step = train_step.make_step_fn(config, setup)
  metrics = []
  for batch in batches:
    state, m = step(state, sharding.to_global(batch, setup.mesh), jax.random.key(1))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _batches(count, n=8, size=32):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    image = rng.normal(size=(n, size, size, 1)).astype(np.float32)
    out.append({'image': image, 'label': (image[..., 0] > 0.2).astype(np.int32)})
  return out


def test_gradient_accumulation_equals_the_whole_batch():
  batches = _batches(2)
  plain = _smoke()
  plain.model.norm = 'none'  # batch statistics of a micro-batch differ from the whole batch's
  whole, m1 = _run_steps(plain, batches)
  config = _smoke()
  config.model.norm = 'none'
  config.optimizer.grad_accum_steps = 4
  accumulated, m4 = _run_steps(config, batches)
  np.testing.assert_allclose(m1[-1]['loss'], m4[-1]['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               whole.params, accumulated.params)


def test_ema_is_kept_evaluated_and_differs_from_params():
  config = _smoke()
  config.optimizer.ema_decay = 0.9
  state, _ = _run_steps(config, _batches(3))
  assert state.ema_params
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state.ema_params, state.params)
  assert max(jax.tree.leaves(diff)) > 0


def test_nonfinite_steps_are_skipped_when_configured():
  batches = _batches(3)
  batches[1] = dict(batches[1], image=np.full_like(batches[1]['image'], np.nan))
  config = _smoke(nonfinite='skip')
  state, metrics = _run_steps(config, batches[:2])
  reference, _ = _run_steps(_smoke(), batches[:1])
  assert int(state.step) == 2
  assert [int(m['nonfinite_steps']) for m in metrics] == [0, 1]
  jax.tree.map(np.testing.assert_array_equal, state.params, reference.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, reference.opt_state)


def test_bad_nonfinite_policy_and_accumulation_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="config.nonfinite='ignore' is not one of"):
    validation.validate(_smoke(nonfinite='ignore'))
  config = _smoke()
  config.optimizer.grad_accum_steps = 3
  with pytest.raises(ValueError, match='grad_accum_steps=3 must be'):
    validation.validate(config)


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
  config = _smoke(num_steps=40, eval_every=4, log_every=4)
  config.optimizer.learning_rate = 0.0  # nothing improves after the first evaluation
  config.model.norm = 'none'  # batch-norm statistics would still move
  config.early_stopping.patience = 2
  loop.train_and_evaluate(config, str(tmp_path))
  final = json.load(open(tmp_path / 'final_metrics.json'))
  assert final['stopped_early'] is True
  assert final['step'] == 12  # evaluations at 4 (best), 8 and 12 (two without improvement)


def _constant_smoke(num_steps):
  config = _smoke(num_steps=num_steps, eval_every=10, log_every=1)
  config.optimizer.schedule = 'constant'
  return config


def test_sigterm_mid_run_saves_and_the_resumed_run_is_identical(tmp_path, monkeypatch):
  loop.train_and_evaluate(_constant_smoke(30), str(tmp_path / 'reference'))

  make_iterator = loop.pipeline.train_iterator

  def iterator_with_sigterm(*args, **kwargs):
    inner = make_iterator(*args, **kwargs)

    class Wrapped:  # delivers SIGTERM to this process while batch 17 is being read
      calls = 0

      def __next__(self):
        Wrapped.calls += 1
        if Wrapped.calls == 17:
          signal.raise_signal(signal.SIGTERM)
        return next(inner)

      def get_state(self):
        return inner.get_state()

      def set_state(self, state):
        inner.set_state(state)

    return Wrapped()

  monkeypatch.setattr(loop.pipeline, 'train_iterator', iterator_with_sigterm)
  assert loop.train_and_evaluate(_constant_smoke(30), str(tmp_path / 'run')) == {}
  monkeypatch.undo()
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'run' / 'checkpoints') if d.isdigit())
  assert steps[-1] == 17 and not (tmp_path / 'run' / 'final_metrics.json').exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again

  loop.train_and_evaluate(_constant_smoke(30), str(tmp_path / 'run'))
  ref = json.load(open(tmp_path / 'reference' / 'final_metrics.json'))
  assert json.load(open(tmp_path / 'run' / 'final_metrics.json')) == ref
  assert _train_losses(tmp_path / 'run') == _train_losses(tmp_path / 'reference')


def _train_losses(workdir):
  return {r['step']: r['train/loss']
          for r in metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r}


def test_sigterm_to_the_launcher_exits_zero_with_a_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, os.path.join(ROOT, 'launch.py'),
             '--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke',
             f'--workdir={workdir}', '--config.num_steps=1000000', '--config.log_every=1']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  jsonl = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (jsonl.exists() and jsonl.read_text().count('\n') >= 3):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, out
  assert 'SIGTERM at step' in out and 'rerun the same command to resume' in out
  assert any(d.isdigit() for d in os.listdir(workdir / 'checkpoints'))


def test_device_augmentation_runs_inside_the_step_and_changes_the_update():
  batches = _batches(1)
  plain = _smoke()
  plain.optimizer.warmup_steps = 0  # a first step with learning rate 0 would change nothing
  host, _ = _run_steps(plain, batches, devices=1)
  config = _smoke()
  config.optimizer.warmup_steps = 0
  config.data.augment = 'flip|rot90|brightness(p=1.0, delta=0.2)'
  config.data.augment_on = 'device'
  device, metrics = _run_steps(config, batches, devices=1)
  assert np.isfinite(metrics[0]['loss'])
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), host.params, device.params)
  assert max(jax.tree.leaves(diff)) > 0
  config.data.augment_on = 'gpu'
  with pytest.raises(ValueError, match="config.data.augment_on='gpu' is not one of"):
    validation.validate(config)


def test_a_run_ended_by_an_error_leaves_no_threads_behind(tmp_path):
  """A sweep worker goes on after a trial ends on an error (pruning): the run's metric writer
  and checkpoint manager are closed, their threads gone."""
  import threading  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=4, eval_every=2, num_overlays=0))
  loop.train_and_evaluate(config, str(tmp_path / 'warm'))  # process-wide threads start here
  before = {t.ident for t in threading.enumerate()}

  class Pruned(Exception):
    pass

  def prune(step, scores):
    del scores
    raise Pruned(f'at step {step}')

  with pytest.raises(Pruned, match='at step 2'):
    loop.train_and_evaluate(config, str(tmp_path / 'pruned'), on_eval=prune)
  deadline = time.time() + 10
  while time.time() < deadline:
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    if not left:
      break
    time.sleep(0.1)
  assert not left, left
  records = metric_writers.read_jsonl(str(tmp_path / 'pruned' / 'metrics.jsonl'))
  assert max(r['step'] for r in records) == 2  # what the run wrote before the error is stored
