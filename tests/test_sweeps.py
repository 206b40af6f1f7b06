"""Sweeps as Optuna studies, with real parts: SQLite files, a PostgreSQL server started here,
launcher processes working on one study, kill -9 of a worker mid-trial, pruning, bad storages."""

import csv
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import optuna
import pytest

from experiments import quickstart
from unet_jax import sweeps
from unet_jax.config import validation
from unet_jax.config.schema import ConfigError
from unet_jax.training import metric_writers
from unet_jax.training import workdir as workdir_lib
from unet_jax.tuning import space as space_lib
from unet_jax.tuning import study_storage as storage_lib

import simulated_devices  # tests/ helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_BIN = '/usr/lib/postgresql/15/bin'
COMPLETE, FAIL, PRUNED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                          optuna.trial.TrialState.PRUNED)
# A config file of tiny trials; short heartbeats, so a dead worker's trial comes back in seconds.
CONFIG_FILE = '''
from experiments import quickstart


def get_config(arg=''):
  config = quickstart.get_config('smoke')
  config.num_overlays = 0
  config.num_steps = 12
  config.eval_every = 6
  config.log_every = 1
  config.checkpoint.every = 2
  config.eval.isbi_metrics = False
  config.sweep.heartbeat_seconds = 1
  config.sweep.grace_seconds = 4
  config.sweep.poll_seconds = 0.5
  return config


def sweep():  # seeds: the trials differ, their compiled programs do not (nor compile again)
  return [{{'seed': seed}} for seed in {seeds}]
'''


def _config_file(folder, seeds):
  path = folder / 'sweep_config.py'
  path.write_text(CONFIG_FILE.format(seeds=list(seeds)))
  return f'{path}:smoke'


def _start(config, workdir, *args):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={config}',
                           f'--workdir={workdir}', '--sweep', *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _load(name, url):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return optuna.load_study(study_name=name, storage=url)


def _losses(trial_dir):
  """step → train loss; a step redone after a resume is logged twice and must agree."""
  curve = {}
  for record in metric_writers.read_jsonl(os.path.join(trial_dir, 'metrics.jsonl')):
    if 'train/loss' in record:
      assert curve.setdefault(record['step'], record['train/loss']) == record['train/loss']
  return curve


def test_two_workers_share_a_sqlite_study_and_run_each_trial_once(tmp_path):
  seeds = [0, 1, 2, 3]
  config = _config_file(tmp_path, seeds)
  workdir = tmp_path / 'sweep'
  workers = [_start(config, workdir) for _ in range(2)]
  errors = [w.communicate(timeout=600)[1] for w in workers]
  assert [w.returncode for w in workers] == [0, 0], [e[-3000:] for e in errors]
  study = _load('sweep', f'sqlite:///{workdir}/study.db')
  assert [t.state for t in study.trials] == [COMPLETE] * 4
  assert sorted(t.params['seed'] for t in study.trials) == seeds
  taken = [sorted(int(n) for n in re.findall(r'trial (\d+) in ', e)) for e in errors]
  assert all(taken), taken  # both workers trained trials
  assert sorted(taken[0] + taken[1]) == [0, 1, 2, 3]  # each trial once
  for trial in study.trials:
    trial_dir = workdir / f'trial_{trial.number:03d}'
    assert sorted(_losses(trial_dir)) == list(range(1, 13))
    final = json.load(open(trial_dir / 'final_metrics.json'))
    assert final['step'] == 12 and final['dice_membrane'] == trial.value
  table = list(csv.DictReader(open(workdir / 'sweep_results.csv')))
  values = [float(r['dice_membrane']) for r in table]
  assert len(table) == 4 and values == sorted(values, reverse=True)
  assert (workdir / 'sweep.png').stat().st_size > 10_000


@pytest.fixture(scope='module')
def postgres():
  """A PostgreSQL 15 server in a temporary folder on 127.0.0.1; yields its URL base."""
  if not os.path.exists(os.path.join(PG_BIN, 'initdb')):
    pytest.skip(f'PostgreSQL 15 is not installed ({PG_BIN})')
  folder = tempfile.mkdtemp(prefix='unet_jax_postgres_')
  # initdb refuses to run as root: the server then runs as an unprivileged user.
  owner = {}
  if os.geteuid() == 0:
    nobody = pwd.getpwnam('nobody')
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    owner = {'user': nobody.pw_uid, 'group': nobody.pw_gid}
  data = os.path.join(folder, 'data')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  run = lambda *cmd: subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=True,
                                    timeout=120, **owner)
  run(f'{PG_BIN}/initdb', '-D', data, '-U', 'sweeps', '--auth=trust', '-E', 'UTF8', '--no-sync')
  run(f'{PG_BIN}/pg_ctl', '-D', data, '-l', os.path.join(folder, 'server.log'), '-w', '-o',
      f'-h 127.0.0.1 -p {port} -k {folder} -F', 'start')
  try:
    run(f'{PG_BIN}/createdb', '-h', '127.0.0.1', '-p', str(port), '-U', 'sweeps', 'sweeps')
    yield f'postgresql://sweeps@127.0.0.1:{port}/sweeps'
  finally:
    run(f'{PG_BIN}/pg_ctl', '-D', data, '-m', 'immediate', 'stop')
    shutil.rmtree(folder, ignore_errors=True)


def _checkpointed_trial(workdir, workers, *, min_step):
  """(trial folder, pid holding it) once a trial has saved a step ≥ min_step."""
  deadline = time.time() + 300
  while time.time() < deadline:
    for w in workers:
      assert w.poll() is None, w.communicate()[1][-3000:]
    for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
      trial_dir = workdir / name
      try:
        steps = [int(n) for n in os.listdir(trial_dir / 'checkpoints') if n.isdigit()]
        pid = json.load(open(trial_dir / workdir_lib.LOCK_FILE))['pid']
      except (OSError, ValueError):
        continue
      if steps and max(steps) >= min_step:
        return trial_dir, pid
    time.sleep(0.05)
  raise AssertionError('no trial saved a checkpoint in time')


def test_a_worker_killed_mid_trial_is_resumed_from_its_checkpoint_on_postgresql(
    postgres, tmp_path):
  seeds = [0, 1, 2]
  config = _config_file(tmp_path, seeds)
  workdir = tmp_path / 'sweep'
  run = ['--study=killed', f'--storage={postgres}']
  workers = [_start(config, workdir, *run) for _ in range(2)]
  killed_dir, pid = _checkpointed_trial(workdir, workers, min_step=2)
  killed = next(w for w in workers if w.pid == pid)
  killed.send_signal(signal.SIGKILL)
  killed.communicate(timeout=60)
  survivor = next(w for w in workers if w is not killed)
  _, err = survivor.communicate(timeout=600)
  assert survivor.returncode == 0, err[-3000:]

  study = _load('killed', postgres)
  number = int(killed_dir.name.removeprefix('trial_'))
  first = study.trials[number]
  retries = [t for t in study.trials if t.system_attrs.get('failed_trial') == number]
  assert first.state == FAIL and [t.state for t in retries] == [COMPLETE]
  assert retries[0].params == first.params
  # Every point finished once: nothing lost, nothing counted twice.
  done = [t for t in study.trials if t.state == COMPLETE]
  assert sorted(t.params['seed'] for t in done) == seeds
  assert len(study.trials) == len(seeds) + 1
  # The retry trained in the killed trial's folder, from its checkpoint on.
  assert f'trial {retries[0].number} in {killed_dir} (a retry: resumes from its checkpoint)' in err
  resumed = re.findall(r'resuming from step (\d+)', err)
  assert len(resumed) == 1 and int(resumed[0]) >= 2, err[-3000:]
  assert sorted(_losses(killed_dir)) == list(range(1, 13))
  assert json.load(open(killed_dir / 'final_metrics.json'))['step'] == 12
  assert len(list(csv.DictReader(open(workdir / 'sweep_results.csv')))) == 3


def test_a_journal_trial_whose_heartbeat_stops_is_retried_at_most_max_retries_times(tmp_path):
  heartbeat = storage_lib.Heartbeat(interval_seconds=1, grace_seconds=2, max_retries=1)
  storage = storage_lib.open_storage(f'journal://{tmp_path}/study.log', heartbeat)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    study = optuna.create_study(study_name='beats', storage=storage)
    study.enqueue_trial({'seed': 3}, user_attrs={'point': 0})
    for attempt in range(2):  # the trial, then its one retry: each worker dies after a beat
      trial = study.ask()
      storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
          storage.get_study_id_from_name('beats'), trial.number))
      optuna.storages.fail_stale_trials(study)
      assert study.trials[-1].state == optuna.trial.TrialState.RUNNING  # alive: not stale
      time.sleep(3)
      optuna.storages.fail_stale_trials(study)
  states = [t.state for t in study.trials]
  assert states == [FAIL, FAIL]  # max_retries=1: no third attempt is queued
  retry = study.trials[1]
  assert retry.system_attrs['failed_trial'] == 0 and retry.user_attrs == {'point': 0}
  assert retry.system_attrs['fixed_params'] == {'seed': 3}


def _points_config(**sweep):
  config = quickstart.get_config('smoke')
  config.num_overlays = 0
  config.eval.isbi_metrics = False
  config.sweep.poll_seconds = 0.2
  for key, value in sweep.items():
    config.sweep[key] = value
  return config


def test_a_hopeless_trial_is_pruned_before_its_last_evaluation(tmp_path):
  config = _points_config(pruner={'name': 'median', 'options': {'n_startup_trials': 1}})
  config.num_steps, config.eval_every = 12, 3
  points = [{'optimizer.learning_rate': 1e-2}, {'optimizer.learning_rate': 1e-8}]
  rows = sweeps.run(config, str(tmp_path), space_lib.Space(source='test', points=points))
  study = _load(tmp_path.name, f'sqlite:///{tmp_path}/study.db')
  good, bad = study.trials
  assert good.state == COMPLETE and sorted(good.intermediate_values) == [3, 6, 9, 12]
  assert bad.state == PRUNED and max(bad.intermediate_values) < 12
  assert [r['state'] for r in rows] == ['COMPLETE', 'PRUNED']
  assert not (tmp_path / 'trial_001' / 'final_metrics.json').exists()


def test_an_invalid_trial_fails_with_its_reason_and_the_worker_goes_on_journal_file(tmp_path):
  config = _points_config(num_trials=2)
  config.num_steps, config.eval_every = 12, 6

  def search_space(trial):  # the first trial's width is invalid
    trial.suggest_int('seed', 0, 3)
    return {'model.width': 0 if trial.number == 0 else 4}

  journal = f'journal://{tmp_path}/study.log'  # the journal file storage and its heartbeat
  rows = sweeps.run(config, str(tmp_path), space_lib.Space(source='test', suggest=search_space),
                    storage_url=journal)
  study = optuna.load_study(study_name=tmp_path.name, storage=storage_lib.open_storage(
      journal, storage_lib.Heartbeat(interval_seconds=1, grace_seconds=4, max_retries=1)))
  assert len(study.trials) == 2  # the invalid one is not retried
  invalid, valid = study.trials
  assert valid.state == COMPLETE and invalid.state == FAIL
  assert invalid.user_attrs['fail_reason'].startswith(
      'config.model.width=0 is out of range; expected ≥ 1')
  assert json.load(open(tmp_path / 'trial_001' / 'config.json'))['model']['width'] == 4
  assert not (tmp_path / 'trial_000').exists()  # failed before anything was built
  assert [r['state'] for r in rows] == ['COMPLETE', 'FAIL']
  assert rows[1]['note'] == invalid.user_attrs['fail_reason']


def test_bad_storage_urls_are_one_line_naming_them(tmp_path):
  heartbeat = storage_lib.Heartbeat(interval_seconds=1, grace_seconds=4, max_retries=1)
  for url, expected in [
      ('postgres//db.example:5432/x', '--storage=postgres//db.example:5432/x is not a storage '
       'URL of a known scheme (sqlite, postgresql,'),
      ('postgresql://me:secret@127.0.0.1:1/x', '--storage=postgresql://me:***@127.0.0.1:1/x '
       'cannot be opened: OperationalError: (psycopg.OperationalError) connection failed'),
      (f'journal://{tmp_path}/missing/study.log', f'--storage=journal://{tmp_path}/missing/'
       'study.log cannot be opened: FileNotFoundError')]:
    with pytest.raises(storage_lib.StorageError) as info:
      storage_lib.open_storage(url, heartbeat)
    assert str(info.value).startswith(expected) and '\n' not in str(info.value)
    assert 'secret' not in str(info.value)
  with pytest.raises(storage_lib.StorageError, match='gs://b/sweep is not a local directory'):
    storage_lib.default_url('gs://b/sweep')
  # Through the launcher: one line, status 1, before any trial is built.
  config = _config_file(tmp_path, [0])
  process = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={config}',
       f'--workdir={tmp_path / "sweep"}', '--sweep', '--storage=postgresql://me@127.0.0.1:1/x'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert process.returncode == 1
  lines = process.stderr.strip().splitlines()
  assert lines[-1].startswith('launch.py: error: --storage=postgresql://me@127.0.0.1:1/x cannot '
                              'be opened: OperationalError'), process.stderr[-2000:]
  assert 'Traceback' not in process.stderr and not (tmp_path / 'sweep').exists()


def test_a_worker_refuses_a_study_of_another_sweep(tmp_path):
  url = f'sqlite:///{tmp_path}/study.db'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    other = optuna.create_study(study_name='shared', storage=url, direction='maximize')
  other.set_user_attr('metric', 'dice_membrane')
  other.set_user_attr('source', 'other.py')
  other.set_user_attr('points', [{'seed': 7}])
  space = space_lib.Space(source='this.py', points=({'seed': 0},))
  with pytest.raises(ValueError, match=r"study 'shared' in sqlite:///.* is another sweep \(created "
                     r'from other.py for dice_membrane\); give this one another --study'):
    sweeps.run(quickstart.get_config('smoke'), str(tmp_path), space, study_name='shared',
               storage_url=url)
  assert not (tmp_path / 'trial_000').exists() and len(other.trials) == 0


def test_sweep_definitions_and_their_config_are_checked():
  module = type(sys)('config_file')
  with pytest.raises(space_lib.SpaceError, match='defines neither sweep'):
    space_lib.from_module(module, 'x.py')
  module.sweep = lambda: [{'data.val_indices': (1, 2)}]
  with pytest.raises(space_lib.SpaceError, match=r'sets data.val_indices=\(1, 2\), a tuple'):
    space_lib.from_module(module, 'x.py')
  module.sweep = lambda: space_lib.grid(**{'optimizer.learning_rate': [1e-3, 2e-3],
                                           'model.width': [4, 8]})
  assert len(space_lib.from_module(module, 'x.py').points) == 4
  module.search_space = lambda trial: None
  with pytest.raises(space_lib.SpaceError, match='defines both'):
    space_lib.from_module(module, 'x.py')
  config = quickstart.get_config('smoke')
  config.sweep.pruner.name = 'medain'
  with pytest.raises(ConfigError, match=r"config.sweep.pruner.name='medain' is not one of the "
                     r"valid choices \(did you mean 'median'\?\)"):
    validation.validate(config)
  config = quickstart.get_config('smoke')
  config.sweep.sampler.options = {'n_startup_trails': 3}
  with pytest.raises(ConfigError, match="config.sweep.sampler.options=.* is rejected by the "
                     "'tpe' sampler: .*n_startup_trails"):
    validation.validate(config)
  config = quickstart.get_config('smoke')
  config.sweep.grace_seconds = config.sweep.heartbeat_seconds
  with pytest.raises(ConfigError, match='config.sweep.grace_seconds=30 is not longer than'):
    validation.validate(config)
  with pytest.raises(ConfigError, match=r"the point=\{'seed': 0.5\} cannot be applied: Could not "
                     r"override field 'seed'.*\(sweep point 1 of 1"):
    validation.validate_points(quickstart.get_config('smoke'), [{'seed': 0.5}])


def test_a_trial_spans_the_processes_of_a_multi_host_worker(tmp_path):
  """Two processes × 4 CPU devices are one worker: process 0 takes the trial and broadcasts
  it, both train it as one 8-device run, and both then learn that the study is done."""
  config = _config_file(tmp_path, [0])
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=simulated_devices.xla_flags(4))
  workdir = tmp_path / 'sweep'
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={config}',
       f'--workdir={workdir}', '--sweep', '--config.num_steps=4', '--config.eval_every=2',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], [o[-3000:] for o in outputs]
  study = _load('sweep', f'sqlite:///{workdir}/study.db')
  assert [t.state for t in study.trials] == [COMPLETE]
  for output in outputs:  # both processes trained the trial, process 1 as told by process 0
    assert re.findall(r'trial (\d+) in ', output) == ['0'], output[-3000:]
  assert '8 devices' in outputs[0]  # one mesh over both processes
  assert 'created study' in outputs[0]  # only process 0 talks to the storage
  assert 'created study' not in outputs[1] and 'joined study' not in outputs[1]
  for trial in study.trials:
    final = json.load(open(workdir / f'trial_{trial.number:03d}' / 'final_metrics.json'))
    assert final['step'] == 4 and final['dice_membrane'] == trial.value
