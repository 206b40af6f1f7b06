"""Fault injection: kill -9, broken checkpoints, non-finite losses, a disk that fills up.

The rest of the catalogue is in this folder: test_runs_that_collide.py (two launchers, eval
next to training, Ctrl-C, orphaned workers, sweeps) and test_bad_input.py (one-line errors,
damaged files, divergence, resumed logs).
"""

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import quickstart
from unet_jax import checkpointing
from unet_jax import storage
from unet_jax.training import metric_writers
from unet_jax.training import loop
from unet_jax.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
  for record in metric_writers.read_jsonl(storage.join(workdir, 'metrics.jsonl')):
    if 'train/loss' in record:
      assert curve.setdefault(record['step'], record['train/loss']) == record['train/loss']
  return curve


def _logged_steps(workdir):
  path = storage.join(workdir, 'metrics.jsonl')
  return len(_curve(workdir)) if storage.exists(path) else 0


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted') / 'run')
  reference = _launch(workdir)
  out, _ = reference.communicate(timeout=600)
  assert reference.returncode == 0, out
  return workdir


def test_kill_9_repeatedly_then_resume_equals_an_uninterrupted_run(uninterrupted_run,
                                                                    storage_root):
  """On local disk and in a bucket, where a kill also cuts checkpoint uploads short."""
  workdir = storage.join(storage_root, 'killed')
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

  ref = json.loads(storage.read_text(storage.join(uninterrupted_run, 'final_metrics.json')))
  got = json.loads(storage.read_text(storage.join(workdir, 'final_metrics.json')))
  assert got == ref  # bit for bit: same seed, same batches from the restored iterator
  assert _curve(workdir) == _curve(uninterrupted_run)


def _trained(tmp_path, **overrides):
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=6, eval_every=6, num_overlays=0, **overrides))
  config.checkpoint.every = 2
  config.checkpoint.keep_latest = 3  # steps 2, 4 and 6 stay
  loop.train_and_evaluate(config, str(tmp_path))
  return config


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """One 6-step run, trained once; each test damages a copy of it."""
  path = tmp_path_factory.mktemp('trained') / 'run'
  return _trained(path), path


def _copy(trained_run, tmp_path):
  config, source = trained_run
  shutil.copytree(source, tmp_path, dirs_exist_ok=True)
  return config.copy_and_resolve_references()


def _restore_latest(config, workdir):
  setup = train_step.build(config, input_channels=1, spatial_rank=2)
  return checkpointing.restore_latest(checkpointing.run_manager(config, str(workdir)),
                                      setup.abstract_state)


def test_a_half_written_checkpoint_is_ignored(trained_run, tmp_path):
  config = _copy(trained_run, tmp_path)
  partial = tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(os.urandom(100))
  state, _ = _restore_latest(config, tmp_path)
  assert int(state.step) == 6


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00corrupt')


def test_a_corrupted_latest_checkpoint_is_moved_aside_and_the_run_resumes_past_it(
    trained_run, tmp_path, caplog):
  config = _copy(trained_run, tmp_path)
  _corrupt(tmp_path / 'checkpoints' / '6')
  with caplog.at_level('WARNING', logger='unet_jax'):
    state, _ = _restore_latest(config, tmp_path)
  assert int(state.step) == 4
  assert any('checkpoints/6 is unreadable and is skipped' in r.getMessage()
             for r in caplog.records)
  # Kept for inspection, out of the way: the resumed run saves step 6 anew.
  assert (tmp_path / 'checkpoints_quarantine' / '6' / 'state').is_dir()
  assert checkpointing.complete_steps(str(tmp_path / 'checkpoints')) == [2, 4]
  config.num_steps = 8
  scores = loop.train_and_evaluate(config, str(tmp_path))
  assert json.load(open(tmp_path / 'final_metrics.json'))['step'] == 8 and scores


def test_when_no_checkpoint_is_readable_the_run_stops_unless_restarted(trained_run, tmp_path):
  config = _copy(trained_run, tmp_path)
  for step in checkpointing.complete_steps(str(tmp_path / 'checkpoints')):
    _corrupt(tmp_path / 'checkpoints' / str(step))
  with pytest.raises(checkpointing.CheckpointReadError, match='rerun with --restart'):
    loop.train_and_evaluate(config, str(tmp_path))
  quarantined = sorted(os.listdir(tmp_path / 'checkpoints_quarantine'))
  assert quarantined == ['2', '4', '6']
  scores = loop.train_and_evaluate(config, str(tmp_path), restart=True)
  assert scores and json.load(open(tmp_path / 'final_metrics.json'))['step'] == 6


def test_a_half_deleted_old_checkpoint_is_moved_aside_not_listed(trained_run, tmp_path):
  config = _copy(trained_run, tmp_path)
  # kill -9 while the retention policy deleted step 2: part of its files are gone.
  os.remove(tmp_path / 'checkpoints' / '2' / '_CHECKPOINT_METADATA')
  process = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--mode=eval', '--checkpoint=2',
       '--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke',
       f'--workdir={tmp_path}', '--config.num_steps=6', '--config.eval_every=6',
       '--config.num_overlays=0', '--config.checkpoint.every=2',
       '--config.checkpoint.keep_latest=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert process.returncode == 1, process.stderr[-2000:]
  assert process.stderr.strip().splitlines()[-1] == (
      f'launch.py: error: checkpoint 2 in {tmp_path}/checkpoints is incomplete (a save or '
      'deletion was cut short); choose another step')
  manager = checkpointing.run_manager(config, str(tmp_path))  # a training run clears it away
  assert manager.all_steps() == [4, 6]
  assert (tmp_path / 'checkpoints_quarantine' / '2').is_dir()
  manager.close()


def test_a_nan_loss_never_reaches_a_checkpoint(tmp_path, monkeypatch):
  make_iterator = loop.pipeline.train_iterator

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

  monkeypatch.setattr(loop.pipeline, 'train_iterator', poisoned)
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=10, eval_every=10, log_every=5, num_overlays=0))
  config.checkpoint.every = 1
  with pytest.raises(FloatingPointError, match='at step 5'):
    loop.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  state, _ = _restore_latest(config, tmp_path)
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


# ---------------------------------------------------------------------------- a disk that fills up


def _launch_with_file_size_limit(workdir, limit, *overrides):
  """launch.py in a process whose files may not grow past `limit` bytes (RLIMIT_FSIZE), with
  SIGXFSZ ignored: a write beyond the limit then fails with EFBIG, as a full disk fails with
  ENOSPC, instead of killing the process."""
  limited = ('import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
             'resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); '
             'os.execv(sys.executable, [sys.executable, *sys.argv[2:]])')
  command = [sys.executable, '-c', limited, str(limit), os.path.join(ROOT, 'launch.py'),
             '--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke',
             f'--workdir={workdir}', *overrides]
  # It reads the session's compilation cache but writes nothing to it: an entry cut short at
  # the limit would be read back, and compiled anew, by every later test that needs it.
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(1 << 40))
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_a_full_disk_fails_clearly_keeps_the_earlier_checkpoint_and_a_rerun_resumes(
    tmp_path, caplog):
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=2, eval_every=6, log_every=2, num_overlays=0))
  config.checkpoint.every = 2
  loop.train_and_evaluate(config, str(tmp_path))  # checkpoint 2, written with room to spare
  directory = str(tmp_path / 'checkpoints')
  assert checkpointing.complete_steps(directory) == [2]

  # Now files may not grow past 16 KiB: config.json, metrics.jsonl and the event file stay below
  # it (a few KiB), every checkpoint holds larger files (_METADATA alone is ~50 KiB).
  process = _launch_with_file_size_limit(
      tmp_path, 16 << 10, '--config.num_steps=6', '--config.eval_every=6',
      '--config.log_every=2', '--config.num_overlays=0', '--config.checkpoint.every=2')
  assert process.returncode == 1, process.stderr[-3000:]
  errors = [line for line in process.stderr.splitlines() if line.startswith('launch.py: error:')]
  assert errors == [
      'launch.py: error: file too large for the file system or the file-size limit (ulimit -f) '
      f'(EFBIG) in {directory} while writing checkpoint 4; earlier checkpoints [2] are intact '
      'and a rerun resumes from step 2; free space or choose another --workdir'
  ], process.stderr[-4000:]
  assert 'launch.py", line' not in process.stderr  # no traceback of the main thread
  # Nor the floods: orbax's chained tracebacks of the same OS error from each save thread
  # (over a hundred lines each) and the echoes of the save's other writes into orbax's closed
  # event loop. The bound leaves room for the few one-line records that stay.
  assert 'Event loop is closed' not in process.stderr, process.stderr[-3000:]
  assert len(process.stderr.splitlines()) < 40, process.stderr[-3000:]
  assert checkpointing.complete_steps(directory) == [2]

  state, extra = _restore_latest(config, tmp_path)
  assert int(state.step) == 2 and 'iterator' in extra
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))

  config.num_steps = 6  # the same run with space again
  with caplog.at_level('INFO', logger='unet_jax'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert any('resuming from step 2' in r.getMessage() for r in caplog.records)
  assert json.load(open(tmp_path / 'final_metrics.json'))['step'] == 6
  assert checkpointing.complete_steps(directory)[-1] == 6


def test_orbax_logs_a_refused_write_without_its_traceback_and_other_errors_with_it():
  for name in ('absl', 'asyncio'):  # orbax's save threads; asyncio's unretrieved write tasks
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
      for error in (OSError(errno.ENOSPC, 'No space left on device'), ValueError('a bug')):
        try:
          raise error
        except Exception:  # pylint: disable=broad-except
          logger.exception('save thread failed')
    finally:
      logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ['save thread failed'] * 2, name
    assert records[0].exc_info is None and records[1].exc_info[1].args == ('a bug',), name


@pytest.mark.parametrize('error,code', [
    (OSError(errno.ENOSPC, 'No space left on device'), errno.ENOSPC),
    (ValueError("OUT_OF_RANGE: Error writing local file \"/w/x\": Disk quota exceeded "
                "[os_error_code='122']"), errno.EDQUOT),
    (ValueError('File too large [os_error_code=27]'), errno.EFBIG),
    (RuntimeError('write failed: No space left on device'), errno.ENOSPC),
    (RuntimeError('commit failed'), None),
    (OSError(errno.EACCES, 'Permission denied'), None),
])
def test_storage_errors_are_recognised_in_the_forms_orbax_hands_over(error, code):
  assert checkpointing.storage_errno(error) == code
  try:  # a chained cause, as orbax re-raises background failures
    raise RuntimeError('save failed') from error
  except RuntimeError as chained:
    assert checkpointing.storage_errno(chained) == code


def test_no_space_left_while_saving_names_the_step_and_the_intact_checkpoints(tmp_path,
                                                                           monkeypatch):
  manager = checkpointing.make_manager(str(tmp_path), keep_best=0, best_metric='dice_membrane')
  state = {'w': np.arange(3, dtype=np.float32)}
  for step in (1, 2):
    checkpointing.save(manager, step, state, {'iterator': step})
  checkpointing.wait(manager)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(manager, 'save', full)
  with pytest.raises(checkpointing.CheckpointWriteError) as info:
    checkpointing.save(manager, 3, state, {'iterator': 3})
  assert info.value.errno == errno.ENOSPC
  assert str(info.value) == (
      f'no space left on device (ENOSPC) in {tmp_path} while writing checkpoint 3; earlier '
      'checkpoints [1, 2] are intact and a rerun resumes from step 2; free space or choose '
      'another --workdir')
  monkeypatch.undo()
  restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         data=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(restored['state']['w'], state['w'])
  manager.close()
