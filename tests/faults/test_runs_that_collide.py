"""Runs that must not get stuck or wreck each other, with real processes: two launchers on one
workdir, eval next to a training run, Ctrl-C, grain workers of a killed launcher, sweeps."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from unet_jax.training import metric_writers
from unet_jax.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = '--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke'


def _start(workdir, *args):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), SMOKE,
                           f'--workdir={workdir}', *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, process, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.1)


def _steps_logged(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  return len({r['step'] for r in metric_writers.read_jsonl(path) if 'train/loss' in r})


LONG = ['--config.num_steps=400', '--config.log_every=1', '--config.eval_every=400',
        '--config.num_overlays=0']


def test_a_second_launcher_on_a_busy_workdir_is_refused_in_one_line(tmp_path):
  first = _start(tmp_path, *LONG)
  try:
    _wait_for(lambda: _steps_logged(tmp_path) >= 2, first)
    lock = json.load(open(tmp_path / workdir_lib.LOCK_FILE))
    assert lock['pid'] == first.pid and lock['host'] == socket.gethostname()
    second = subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), SMOKE,
                             f'--workdir={tmp_path}', *LONG], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith(f'launch.py: error: workdir {tmp_path} is in use by pid '
                                 f'{first.pid} on {socket.gethostname()} since ')
    assert 'Traceback' not in second.stderr
    assert first.poll() is None  # the first run goes on undisturbed
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
  assert first.returncode == 0
  steps = [r['step'] for r in metric_writers.read_jsonl(str(tmp_path / 'metrics.jsonl'))
           if 'train/loss' in r]
  assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def test_the_lock_of_a_dead_launcher_is_taken_over(tmp_path):
  dead = subprocess.Popen(['true'])
  dead.wait()
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(
      {'pid': dead.pid, 'host': socket.gethostname(), 'started': 'earlier'}))
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))['pid'] == os.getpid()
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(
      {'pid': 1, 'host': 'another-host', 'started': 'earlier'}))
  with pytest.raises(workdir_lib.WorkdirBusyError, match='in use by pid 1 on another-host'):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_eval_next_to_a_training_run_leaves_it_alone(tmp_path):
  train = _start(tmp_path, '--config.num_steps=40', '--config.log_every=1',
                 '--config.eval_every=40', '--config.num_overlays=0',
                 '--config.checkpoint.every=1')
  evaluations = 0
  try:
    _wait_for(lambda: _steps_logged(tmp_path) >= 3, train)
    while train.poll() is None and evaluations < 2:
      evaluation = subprocess.run(
          [sys.executable, os.path.join(ROOT, 'launch.py'), SMOKE, f'--workdir={tmp_path}',
           '--mode=eval', '--checkpoint=latest', '--config.num_steps=40',
           '--config.log_every=1', '--config.eval_every=40', '--config.num_overlays=0',
           '--config.checkpoint.every=1'], cwd=ROOT, capture_output=True, text=True,
          timeout=300)
      assert evaluation.returncode == 0, evaluation.stderr[-3000:]
      evaluations += 1
  finally:
    out, err = train.communicate(timeout=600)
  assert train.returncode == 0, err[-3000:]
  assert evaluations >= 1
  assert json.load(open(tmp_path / 'final_metrics.json'))['step'] == 40


def test_ctrl_c_saves_and_exits_cleanly_like_sigterm(tmp_path):
  run = _start(tmp_path, *LONG, '--config.checkpoint.every=0')
  _wait_for(lambda: _steps_logged(tmp_path) >= 3, run)
  run.send_signal(signal.SIGINT)
  _, err = run.communicate(timeout=300)
  assert run.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
  assert 'SIGINT at step' in err
  saved = [int(n) for n in os.listdir(tmp_path / 'checkpoints') if n.isdigit()]
  assert saved and max(saved) >= 3


def _children(pid):
  found = []
  for name in os.listdir('/proc'):
    if name.isdigit():
      try:
        with open(f'/proc/{name}/stat', encoding='utf-8') as f:
          if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
            found.append(int(name))
      except (OSError, IndexError, ValueError):
        pass
  return found


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def test_grain_workers_die_with_a_killed_launcher(tmp_path):
  run = _start(tmp_path, *LONG, '--config.data.num_workers=2')
  _wait_for(lambda: _steps_logged(tmp_path) >= 2, run)
  workers = [p for p in _children(run.pid)]
  assert workers, 'the launcher started no worker processes'
  run.send_signal(signal.SIGKILL)
  run.communicate(timeout=60)
  deadline = time.time() + 30
  while any(_alive(p) for p in workers) and time.time() < deadline:
    time.sleep(0.2)
  assert not [p for p in workers if _alive(p)], 'workers outlived their launcher'


def test_the_readme_sweep_command_runs_with_a_config_argument(tmp_path):
  process = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), SMOKE, f'--workdir={tmp_path}',
       '--sweep', '--config.num_overlays=0', '--config.checkpoint.every=1'], cwd=ROOT,
      capture_output=True, text=True, timeout=900)
  assert process.returncode == 0, process.stderr[-3000:]
  assert (tmp_path / 'sweep_results.csv').exists()
  assert {'trial_000', 'trial_001', 'study.db'} <= set(os.listdir(tmp_path))
  # Procedural runs are not compared with the ISBI paper, and periodic saves (which carry no
  # metrics on purpose) raise no orbax warning.
  assert 'paper:' not in process.stderr
  assert 'tracked_metric' not in process.stderr
