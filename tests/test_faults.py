"""Fault injection: kill -9, interrupted and corrupted checkpoints, non-finite losses."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import quickstart
from unet_jax import checkpointing
from unet_jax import metric_writers
from unet_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ['--config.num_steps=20', '--config.eval_every=10', '--config.log_every=1',
       '--config.checkpoint.every=2', '--config.num_overlays=0']


def _launch(workdir):
  command = [sys.executable, os.path.join(ROOT, 'launch.py'),
             '--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke',
             f'--workdir={workdir}', *RUN]
  return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _curve(workdir):
  """step → loss; a step redone after a kill is logged twice and must agree with itself."""
  curve = {}
  for record in metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
    if 'train/loss' in record:
      assert curve.setdefault(record['step'], record['train/loss']) == record['train/loss']
  return curve


def _logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return len(_curve(workdir)) if os.path.exists(path) else 0


def test_kill_9_repeatedly_then_resume_equals_an_uninterrupted_run(tmp_path):
  reference = _launch(tmp_path / 'reference')
  out, _ = reference.communicate(timeout=600)
  assert reference.returncode == 0, out

  workdir = tmp_path / 'killed'
  rng = random.Random(0)
  kills = 0
  for target in (rng.randint(3, 6), rng.randint(8, 12), rng.randint(14, 17)):
    process = _launch(workdir)
    deadline = time.time() + 300
    while process.poll() is None and _logged_steps(workdir) < target and time.time() < deadline:
      time.sleep(0.05)
    if process.poll() is None:
      process.send_signal(signal.SIGKILL)
      kills += 1
    process.communicate(timeout=120)
  assert kills >= 2  # the run really was cut short several times
  final = _launch(workdir)
  out, _ = final.communicate(timeout=600)
  assert final.returncode == 0, out

  ref = json.load(open(tmp_path / 'reference' / 'final_metrics.json'))
  got = json.load(open(workdir / 'final_metrics.json'))
  assert got == ref  # bit for bit: same seed, same batches from the restored iterator
  assert _curve(workdir) == _curve(tmp_path / 'reference')


def _trained(tmp_path, **overrides):
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=6, eval_every=6, num_overlays=0, **overrides))
  config.checkpoint.every = 2
  train.train_and_evaluate(config, str(tmp_path))
  return config


def _restore_latest(config, workdir):
  setup = train.build(config, input_channels=1, spatial_rank=2)
  return checkpointing.restore_latest(train.make_manager(config, str(workdir)),
                                      setup.abstract_state)


def test_a_half_written_checkpoint_is_ignored(tmp_path):
  config = _trained(tmp_path)
  partial = tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(os.urandom(100))
  state, _ = _restore_latest(config, tmp_path)
  assert int(state.step) == 6


def test_a_corrupted_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
  config = _trained(tmp_path)
  latest = tmp_path / 'checkpoints' / '6' / 'state'
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00corrupt')
  with caplog.at_level('WARNING', logger='unet_jax'):
    state, _ = _restore_latest(config, tmp_path)
  assert int(state.step) == 4
  assert any('checkpoints/6 is unreadable and is skipped' in r.getMessage()
             for r in caplog.records)


def test_a_nan_loss_never_reaches_a_checkpoint(tmp_path, monkeypatch):
  make_iterator = train.input_pipeline.train_iterator

  def poisoned(*args, **kwargs):
    inner = make_iterator(*args, **kwargs)

    class Poisoned:
      calls = 0

      def __next__(self):
        Poisoned.calls += 1
        batch = next(inner)
        if Poisoned.calls >= 5:  # from step 5 on, the data are NaN
          batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        return batch

      def get_state(self):
        return inner.get_state()

      def set_state(self, state):
        inner.set_state(state)

    return Poisoned()

  monkeypatch.setattr(train.input_pipeline, 'train_iterator', poisoned)
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=10, eval_every=10, log_every=5, num_overlays=0))
  config.checkpoint.every = 1
  with pytest.raises(FloatingPointError, match='at step 5'):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  state, _ = _restore_latest(config, tmp_path)
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
