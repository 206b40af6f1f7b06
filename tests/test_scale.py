"""Scale: a real 2-process jax.distributed run, and checkpoints restored on other meshes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import quickstart
from unet_jax import checkpointing
from unet_jax.training import metric_writers
from unet_jax import sharding
from unet_jax import storage
from unet_jax.training import train_step

import simulated_devices  # tests/ helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data, fsdp=1):
  config = quickstart.get_config('smoke')
  config.model.width = 16  # some kernels are large enough for fsdp to split
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def _trained_state(config):
  setup = train_step.build(config, input_channels=1, spatial_rank=2)
  state = train_step.initial_state(setup, 0)
  step = train_step.make_step_fn(config, setup)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(8, 32, 32, 1)).astype(np.float32)
  batch = {'image': image, 'label': (image[..., 0] > 0).astype(np.int32)}
  state, _ = step(state, sharding.to_global(batch, setup.mesh), jax.random.key(0))
  return state


def _save_then_restore(tmp_path, save_config, restore_config):
  state = _trained_state(save_config)
  manager = checkpointing.make_manager(str(tmp_path), keep_best=0, best_metric='dice_membrane')
  checkpointing.save(manager, 1, state, {'iterator': {'next_index': 1}})
  checkpointing.wait(manager)
  setup = train_step.build(restore_config, input_channels=1, spatial_rank=2)
  restored, extra = checkpointing.restore(
      checkpointing.make_manager(str(tmp_path), keep_best=0, best_metric='dice_membrane'), 1,
      setup.abstract_state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  assert extra == {'iterator': {'next_index': 1}}
  return restored, setup


def test_checkpoint_from_8_devices_restores_on_1(tmp_path):
  restored, _ = _save_then_restore(tmp_path, _config(2, 4), _config(1))
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored))


def test_checkpoint_from_1_device_restores_on_8_with_fsdp(tmp_path):
  restored, setup = _save_then_restore(tmp_path, _config(1), _config(4, 2))
  kernels = [x for x in jax.tree.leaves(restored.params) if x.ndim == 4]
  assert all(len(x.sharding.device_set) == 8 for x in kernels)
  assert any(not x.sharding.is_fully_replicated for x in kernels)
  expected = jax.tree.leaves(setup.state_sharding)
  assert [x.sharding for x in jax.tree.leaves(restored)] == expected


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Each process sums its rows of a global batch; process 1 reaches the program 35 s late, past the
# 30 s that CPU collectives (gloo) give a new device group to meet. Then a batch of another shape:
# a second program, compiled and waited for in turn.
_LATE_PROCESS = """
import sys, time
import jax, numpy as np
port, pid = int(sys.argv[1]), int(sys.argv[2])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from unet_jax import sharding
mesh = sharding.make_mesh()
total = sharding.compile_then_wait(
    jax.jit(lambda x: x.sum(), in_shardings=sharding.batch_sharding(mesh),
            out_shardings=sharding.replicated(mesh)), 'sum compiled')
rows = sharding.to_global(np.arange(2, dtype=np.float32) + 2 * pid, mesh)
if pid == 1:
  time.sleep(35)
print('total', float(total(rows)), flush=True)
rows = sharding.to_global(np.arange(3, dtype=np.float32) + 3 * pid, mesh)
print('second total', float(total(rows)), flush=True)
"""


def test_a_process_that_arrives_late_at_the_first_collective_is_waited_for():
  # Without compile_then_wait, process 0 fails after 30 s ("Gloo context initialization
  # failed"); the checkpoint manager's barrier and the train step rely on this wait.
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=simulated_devices.xla_flags(1))
  procs = [subprocess.Popen([sys.executable, '-c', _LATE_PROCESS, str(port), str(i)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for output, returncode in [(p.communicate(timeout=300)[0], p.returncode) for p in procs]:
    assert returncode == 0, output[-3000:]
    assert 'total 6.0' in output, output[-3000:]  # 0 + 1 + 2 + 3 over both processes
    assert 'second total 15.0' in output, output[-3000:]  # 0 + 1 + ... + 5


TWO_PROCESS_RUN = ['--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke',
                   '--config.num_steps=6', '--config.log_every=1', '--config.eval_every=3']


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory):
  """The 6-step run on one process with 8 devices, the reference for two processes × 4."""
  workdir = tmp_path_factory.mktemp('one_process') / 'one'
  single = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), f'--workdir={workdir}', *TWO_PROCESS_RUN],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=simulated_devices.xla_flags(8)))
  assert single.returncode == 0, single.stderr
  return str(workdir)


def _launch_two_processes(*args: str) -> list[str]:
  """launch.py with `args` as processes 0 and 1 of 4 devices each; their outputs."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=simulated_devices.xla_flags(4))
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), *args,
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    if proc.returncode != 0:  # the tail: the error comes after pages of start-up logs
      pytest.fail(f'process {i} exited with {proc.returncode}:\n{output[-6000:]}', pytrace=False)
  return outputs


def test_two_processes_train_like_one(one_process_run, bucket):
  """Two processes on one mesh match one process, with the workdir in a bucket, where only
  process 0 writes the run's files. (A local workdir takes the same path through
  unet_jax/storage.py; the bucket is the case that also checks the single writer.)"""
  outputs = _launch_two_processes(f'--workdir={storage.join(bucket, "two")}', *TWO_PROCESS_RUN)
  assert '8 devices' in outputs[0]  # 2 processes × 4 devices form one mesh
  losses = lambda d: [r['train/loss'] for r in
                      metric_writers.read_jsonl(storage.join(d, 'metrics.jsonl'))
                      if 'train/loss' in r]
  two_dir = storage.join(bucket, 'two')
  # One record per step: a second writer would have appended its own.
  np.testing.assert_allclose(losses(two_dir), losses(one_process_run), rtol=1e-5)
  one = json.load(open(os.path.join(one_process_run, 'final_metrics.json')))
  two = json.loads(storage.read_text(storage.join(two_dir, 'final_metrics.json')))
  assert one['step'] == two['step'] == 6
  for key in ('dice_membrane', 'pixel_error', 'isbi_rand_error'):
    np.testing.assert_allclose(two[key], one[key], atol=1e-3)


def test_two_processes_evaluate_a_checkpoint_like_the_run_did(one_process_run):
  """--mode=eval on 2 processes × 4 devices: the eval step's first collective is the first of
  the device group, reached after each process compiled on its own (compile_then_wait)."""
  _launch_two_processes('--mode=eval', '--checkpoint=latest', f'--workdir={one_process_run}',
                        *TWO_PROCESS_RUN)
  final = json.load(open(os.path.join(one_process_run, 'final_metrics.json')))
  scores = json.load(open(os.path.join(one_process_run, 'eval_val_step6.json')))
  assert scores['step'] == 6
  for key in ('dice_membrane', 'pixel_error', 'isbi_rand_error'):
    np.testing.assert_allclose(scores[key], final[key], atol=1e-3)
