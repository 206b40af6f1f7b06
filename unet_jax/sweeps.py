r"""Hyperparameter sweeps as Optuna studies: every launcher started with --sweep is a worker.

  python launch.py --config=experiments/isbi.py:cpu --workdir=runs/sweep --sweep \
      --config.data.directory=../shared/data/isbi2012
  # the same study from workers on several machines (DIR in a bucket, gs://..., or on a
  # file system they all mount):
  python launch.py --config=... --workdir=DIR --sweep --study=isbi_lr \
      --storage=postgresql://USER:PASSWORD@HOST:5432/DB

The config file defines what is tried (tuning/space.py: a list of points, or a search space),
config.sweep how (tuning/engines.py: sampler, pruner, number of trials; tuning/study_storage.py:
heartbeat and retries). A worker takes queued trials from the study one at a time until none is
left and none is running anywhere; each trial trains in `DIR/trial_NNN` with the one training
loop, reports the monitored metric (config.checkpoint.best_metric) at every evaluation, where
the pruner may stop it, and is told its final value. At the end a worker writes the study's
ranked table and sweep.png (tuning/results.py).

Trials, as the study records them:
  - the config of every trial is validated before it compiles (a list's points all up front);
    a trial whose config is invalid is failed with the one-line reason (user attribute
    'fail_reason') and the worker goes on; so is a trial whose loss diverged;
  - a worker that dies stops its trial's heartbeat: after config.sweep.grace_seconds the next
    worker that looks fails it and queues a retry, which trains in the same trial_NNN workdir
    and resumes from its latest checkpoint (it is neither lost nor run twice); a SIGTERM or
    Ctrl-C queues the retry at once; each trial is retried at most config.sweep.max_retries
    times;
  - with several hosts per run (--distributed), process 0 takes each trial from the study and
    broadcasts it, every process trains it, process 0 reports and tells; only process 0 talks
    to the storage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from typing import Any, Iterator
import warnings

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optuna

from unet_jax import storage
from unet_jax.config import overrides as overrides_lib
from unet_jax.config import validation
from unet_jax.training import loop
from unet_jax.training import workdir as workdir_lib
from unet_jax.tuning import engines
from unet_jax.tuning import results
from unet_jax.tuning import space as space_lib
from unet_jax.tuning import study_storage as storage_lib

log = logging.getLogger('unet_jax')
TrialState = optuna.trial.TrialState


class _Study:
  """Process 0's handle on the study: the Study for ask/tell, and its storage for the queue
  and the heartbeat, which Study does not expose."""

  def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage,
               heartbeat: storage_lib.Heartbeat):
    self.study, self.storage, self.heartbeat = study, storage, heartbeat
    self.study_id = storage.get_study_id_from_name(study.study_name)
    self.seen: int | None = None  # trials at the last look: is the creator still queueing?

  def trial_id(self, number: int) -> int:
    return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

  def pop(self) -> tuple[optuna.Trial, optuna.trial.FrozenTrial] | None:
    """The first queued trial, now RUNNING and ours, or None. Only a WAITING trial is taken:
    the queue holds every trial of the sweep, so a worker never creates one."""
    for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
      trial_id = self.trial_id(frozen.number)
      # A heartbeat first: a worker killed right after taking the trial leaves it stale, not
      # running for ever (SQL storages ignore running trials that never had a heartbeat).
      self.storage.record_heartbeat(trial_id)
      try:
        if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
          return optuna.Trial(self.study, trial_id), frozen
      except optuna.exceptions.UpdateFinishedTrialError:
        pass  # another worker took it and finished it already
    return None

  def requeue(self, trial: optuna.Trial) -> None:
    """Fails a trial that was interrupted (not its config's fault) and queues its retry."""
    trial_id = self.trial_id(trial.number)
    if self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
      self.heartbeat.retry()(self.study, self.storage.get_trial(trial_id))

  @contextlib.contextmanager
  def beating(self, trial_id: int) -> Iterator[None]:
    """Records the trial's heartbeat every interval while the block runs."""
    stop = threading.Event()

    def beat():
      while True:
        try:
          self.storage.record_heartbeat(trial_id)
        except Exception as e:  # pylint: disable=broad-except  (a blip of the database)
          log.warning('heartbeat of trial id %d not recorded (%s: %s)', trial_id,
                      type(e).__name__, e)
        if stop.wait(self.heartbeat.interval_seconds):
          return

    thread = threading.Thread(target=beat, name='sweep-heartbeat', daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()


def _open_study(config: ml_collections.ConfigDict, workdir: str, space: space_lib.Space, *,
                study_name: str | None, storage_url: str | None) -> _Study:
  sweep = config.sweep
  heartbeat = storage_lib.Heartbeat(interval_seconds=sweep.heartbeat_seconds,
                                    grace_seconds=sweep.grace_seconds,
                                    max_retries=sweep.max_retries)
  url = storage_url or storage_lib.default_url(workdir)
  storage = storage_lib.open_storage(url, heartbeat)
  name = study_name or os.path.basename(os.path.normpath(workdir)) or 'sweep'
  fingerprint = {'metric': config.checkpoint.best_metric, 'source': space.source,
                 'points': [dict(p) for p in space.points] if space.points else None}
  pruner = engines.make_pruner(sweep)
  try:
    # Creation is atomic in the storage: exactly one worker creates the study and queues it.
    study = optuna.create_study(storage=storage, study_name=name, pruner=pruner,
                                direction=engines.direction(config),
                                sampler=engines.make_sampler(sweep, seed=sweep.seed))
  except optuna.exceptions.DuplicatedStudyError:
    # A joining worker draws other values than the creator: its sampler is seeded afresh.
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner,
                              sampler=engines.make_sampler(sweep, seed=None))
    deadline = time.time() + sweep.grace_seconds
    while 'metric' not in study.user_attrs and time.time() < deadline:
      time.sleep(sweep.poll_seconds)  # the creator writes it just after creating the study
    theirs = {k: study.user_attrs.get(k) for k in fingerprint}
    if theirs['metric'] is not None and (theirs['metric'] != fingerprint['metric'] or theirs[
        'points'] != json.loads(json.dumps(fingerprint['points']))):
      raise ValueError(f'study {name!r} in {storage_lib.hidden(url)} is another sweep '
                       f'(created from {theirs["source"]} for {theirs["metric"]}); give this one '
                       'another --study') from None
    log.info('joined study %r in %s: %d trials so far', name, storage_lib.hidden(url),
             len(study.trials))
  else:
    for key, value in fingerprint.items():
      study.set_user_attr(key, value)
    for params, attrs in space.queue_entries() or space.missing([], sweep.num_trials):
      study.enqueue_trial(params, user_attrs=attrs)
    log.info('created study %r in %s with %d trials', name, storage_lib.hidden(url),
             space.size(sweep.num_trials))
  return _Study(study, storage, heartbeat)


# What process 0 hands the other processes of a worker instead of a trial's job.
_DONE, _WAIT = None, {'wait': True}


def _next_job(handle: _Study, space: space_lib.Space, config: ml_collections.ConfigDict
              ) -> tuple[dict[str, Any] | None, optuna.Trial | None]:
  """One look at the study by process 0: (a trial's job, the trial) to train, (_WAIT, None)
  when there is none to take now, or (_DONE, None) when the sweep has run every trial. A wait
  lasts one poll, so the other processes of a multi-host worker never sit long in a broadcast."""
  sweep = config.sweep
  optuna.storages.fail_stale_trials(handle.study)  # dead workers' trials: failed, re-queued
  popped = handle.pop()
  if popped:
    trial, frozen = popped
    with handle.beating(handle.trial_id(trial.number)):
      overrides, reason = _prepare(trial, config, space)
    if reason:
      _fail(handle, trial, reason)
      return _WAIT, None
    original = results.original_number(frozen)
    return {'trial': trial.number, 'number': original, 'overrides': overrides,
            'retry': original != trial.number}, trial
  trials = handle.study.get_trials(deepcopy=False)
  if any(t.state == TrialState.RUNNING for t in trials):
    # Another worker's trial: it ends, or its worker died and it comes back as a retry.
    time.sleep(sweep.poll_seconds)
    return _WAIT, None
  missing = space.missing([t for t in trials if results.original_number(t) == t.number],
                          sweep.num_trials)
  if not missing:
    return _DONE, None
  # Entries not queued yet: the creator may be queueing them now (or died doing it, or
  # num_trials grew since); queue them when the study has not changed for a poll.
  if len(trials) != handle.seen:
    handle.seen = len(trials)
    time.sleep(sweep.poll_seconds)
    return _WAIT, None
  for params, attrs in missing:
    handle.study.enqueue_trial(params, user_attrs=attrs)
  return _WAIT, None


def _share(value: Any) -> Any:
  """Process 0's JSON-able `value` on every process (itself when there is one)."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else \
      np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  buffer = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def _prepare(trial: optuna.Trial, config: ml_collections.ConfigDict, space: space_lib.Space
             ) -> tuple[dict[str, Any], str | None]:
  """(overrides, None) for a trial ready to train, or ({}, the one-line reason it cannot)."""
  try:
    overrides = space.overrides(trial)
    for path, value in overrides.items():
      overrides_lib.check_path(config, path, value)
    validation.validate(overrides_lib.apply_overrides(config, overrides))
    return overrides, None
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code too)
    reason = ' '.join(str(e).split()) or type(e).__name__
    return {}, f'{type(e).__name__}: {reason}' if not isinstance(
        e, validation.ConfigError) else reason


def _fail(handle: _Study, trial: optuna.Trial, reason: str) -> None:
  trial.set_user_attr(results.REASON_ATTR, reason)
  handle.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
  log.warning('trial %d failed: %s', trial.number, reason)


def _reporter(trial: optuna.Trial | None, metric: str):
  """on_eval for the training loop: reports the metric; raises TrialPruned on every process
  when process 0's pruner says so."""

  def on_eval(step: int, scores: dict[str, float]) -> None:
    value = float(scores.get(metric, math.nan))
    prune = False
    if trial is not None:
      if math.isfinite(value):
        trial.report(value, step)
      prune = trial.should_prune()
    if _share(prune):
      raise optuna.TrialPruned(f'pruned at step {step} with {metric}={value:.4f}')

  return on_eval


def run(config: ml_collections.ConfigDict, workdir: str, space: space_lib.Space, *,
        study_name: str | None = None, storage_url: str | None = None
        ) -> list[dict[str, Any]] | None:
  """Works on the sweep's study until it is done; returns the ranked rows (process 0)."""
  validation.validate(config)
  if space.points is not None:
    validation.validate_points(config, space.points)
  chief = jax.process_index() == 0
  metric = config.checkpoint.best_metric
  with warnings.catch_warnings():
    # Heartbeats, retries and QMC are marked experimental by Optuna; they are used on purpose.
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    handle = _open_study(config, workdir, space, study_name=study_name,
                         storage_url=storage_url) if chief else None
    while True:
      job, trial = _next_job(handle, space, config) if chief else (None, None)
      job = _share(job)
      if job is _DONE:
        break
      if job == _WAIT:
        continue
      if not _train_trial(handle, trial, job, config, workdir, metric):
        break  # SIGTERM or Ctrl-C: the trial is queued again; this worker stops
    if chief:
      return results.write(handle.study, config, workdir)
  return None


def _train_trial(handle: _Study | None, trial: optuna.Trial | None, job: dict[str, Any],
                 config: ml_collections.ConfigDict, workdir: str, metric: str) -> bool:
  """Trains one trial on every process; process 0 tells the study. False when interrupted."""
  trial_dir = storage.join(workdir, results.trial_dir_name(job['number']))
  log.info('trial %d in %s%s: %s', job['trial'], trial_dir,
           ' (a retry: resumes from its checkpoint)' if job['retry'] else '', job['overrides'])
  if trial is not None and job['retry']:
    # The study failed the previous attempt as dead, which its lock cannot show from another
    # machine; the heartbeat decides.
    storage.remove(storage.join(trial_dir, workdir_lib.LOCK_FILE))
  with handle.beating(handle.trial_id(trial.number)) if trial else contextlib.nullcontext():
    try:
      scores = loop.train_and_evaluate(overrides_lib.apply_overrides(config, job['overrides']),
                                       trial_dir, on_eval=_reporter(trial, metric))
    except optuna.TrialPruned as e:
      if trial is not None:
        handle.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        log.info('trial %d %s', trial.number, e)
      return True
    except FloatingPointError as e:  # a diverged run: these hyperparameters' doing
      if trial is not None:
        _fail(handle, trial, ' '.join(str(e).split()))
      return True
    except BaseException:
      if trial is not None:
        handle.requeue(trial)  # another worker resumes it from its checkpoint
      raise
  if not scores:  # SIGTERM or Ctrl-C: saved, to be resumed
    if trial is not None:
      handle.requeue(trial)
      log.info('trial %d queued again, to resume from its checkpoint; this worker stops',
               trial.number)
    return False
  if trial is not None:
    trial.set_user_attr(results.SCORES_ATTR, {k: float(v) for k, v in scores.items()})
    value = float(scores.get(metric, math.nan))
    handle.study.tell(trial, value, skip_if_finished=True)
    log.info('trial %d finished: %s=%.4f', trial.number, metric, value)
  return True
