"""Where a sweep's Optuna study lives: a storage opened from `--storage=URL`, by its scheme.

  (no --storage)                         sqlite:///<workdir>/study.db: one machine
  --storage=sqlite:///runs/study.db      a SQLite file: workers on one machine
  --storage=postgresql://USER:PASSWORD@HOST:5432/DB   workers on many machines (psycopg 3)
  --storage=mysql+pymysql://USER:PASSWORD@HOST/DB     the same on MySQL (pip install pymysql)
  --storage=journal:///mnt/shared/study.log           a journal file on a shared file system

Every storage here has a heartbeat: a worker records one for its running trial every
config.sweep.heartbeat_seconds; a trial whose heartbeat is older than
config.sweep.grace_seconds is failed by the next worker that looks (its worker died or hangs),
and `RetryHeartbeatStaleTrialCallback` queues it again, with its parameters and the values it
reported, at most config.sweep.max_retries times. SQL storages use Optuna's own heartbeat; the
journal file gets the same through trial system attributes (`JournalStorageWithHeartbeat`).

A URL that is malformed, names no known scheme, lacks its driver or cannot be reached is a
`StorageError` (a ValueError) of one line naming the URL, its password hidden, raised when the
storage is opened: before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable
import warnings

import optuna
from optuna.storages import journal
# BaseHeartbeat is the interface Optuna's own fail_stale_trials() reads; it is not exported.
from optuna.storages._heartbeat import BaseHeartbeat
import sqlalchemy

from unet_jax import storage

DEFAULT_FILE = 'study.db'
HEARTBEAT_ATTR = 'unet_jax:heartbeat'  # journal storages: a trial's last heartbeat (epoch s)
SCHEMA_ATTEMPTS = 4  # openings of a SQL storage whose tables another worker is creating
SCHEMA_RACE = ('already exists', 'UNIQUE constraint failed', 'duplicate key')  # their errors
EXAMPLES = ('sqlite:///PATH/study.db', 'postgresql://USER:PASSWORD@HOST:5432/DB',
            'mysql+pymysql://USER:PASSWORD@HOST/DB', 'journal:///SHARED/PATH/study.log')


class StorageError(ValueError):
  """A --storage URL that cannot be used; `str()` is one line naming it."""


@dataclasses.dataclass(frozen=True)
class Heartbeat:
  """How a dead worker's trial is found and queued again (config.sweep)."""
  interval_seconds: int
  grace_seconds: int
  max_retries: int

  def retry(self) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    # The retry inherits the reported values, so the pruner sees the whole curve.
    return optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=self.max_retries, inherit_intermediate_values=True)


class JournalStorageWithHeartbeat(journal.JournalStorage, BaseHeartbeat):
  """A journal file storage with the heartbeat that Optuna gives only its SQL storages.

  The heartbeat is a system attribute of the running trial holding the worker's wall clock, so
  the workers' clocks must agree to well within the grace period (NTP does).
  """

  def __init__(self, backend: journal.BaseJournalBackend, heartbeat: Heartbeat):
    super().__init__(backend)
    self._heartbeat = heartbeat
    self._retry = heartbeat.retry()

  def record_heartbeat(self, trial_id: int) -> None:
    self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

  def _get_stale_trial_ids(self, study_id: int) -> list[int]:
    now = time.time()
    stale = []
    for trial in self.get_all_trials(study_id, deepcopy=False,
                                     states=(optuna.trial.TrialState.RUNNING,)):
      # A retried trial carries its predecessor's heartbeat: its own start counts as one too.
      started = trial.datetime_start.timestamp() if trial.datetime_start else now
      beat = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
      if now - beat > self._heartbeat.grace_seconds:
        stale.append(self.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    return stale

  def get_heartbeat_interval(self) -> int:
    return self._heartbeat.interval_seconds

  def get_heartbeat_stale_trial_callback(self):
    return self._retry


def hidden(url: str) -> str:
  """The URL with its password replaced by ***."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except (sqlalchemy.exc.ArgumentError, ValueError):
    return url


def _rdb(driver: str | None) -> Callable[[str, Heartbeat], optuna.storages.BaseStorage]:
  """An opener of SQL URLs; `driver` replaces a bare scheme's (SQLAlchemy's default for
  postgresql:// is psycopg2, which is not installed; psycopg 3 is)."""

  def open_rdb(url: str, heartbeat: Heartbeat) -> optuna.storages.BaseStorage:
    scheme, rest = url.split('://', 1)
    if driver and '+' not in scheme:
      url = f'{scheme}+{driver}://{rest}'
    # Waits for a busy SQLite file and gives up on an unreachable server, instead of hanging.
    connect_args = ({'timeout': heartbeat.grace_seconds} if scheme.startswith('sqlite') else
                    {'connect_timeout': 10})
    for attempt in range(SCHEMA_ATTEMPTS):
      try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={'connect_args': connect_args},
            heartbeat_interval=heartbeat.interval_seconds, grace_period=heartbeat.grace_seconds,
            heartbeat_stale_trial_callback=heartbeat.retry())
      except sqlalchemy.exc.DBAPIError as e:
        # Workers started together race to create the tables of a new database: the loser's
        # CREATE or INSERT fails on what the winner just made; opening again finds it complete.
        if attempt + 1 == SCHEMA_ATTEMPTS or not any(m in str(e) for m in SCHEMA_RACE):
          raise
        time.sleep(0.5 * (attempt + 1))

  return open_rdb


def _journal(url: str, heartbeat: Heartbeat) -> optuna.storages.BaseStorage:
  path = url.split('://', 1)[1]
  if not path:
    raise StorageError(f'--storage={url} names no file; expected journal:///PATH/study.log')
  # The open-file lock works on NFS, where symlink locks may not.
  backend = journal.JournalFileBackend(path, lock_obj=journal.JournalFileOpenLock(path))
  return JournalStorageWithHeartbeat(backend, heartbeat)


# URL scheme (before '://') → opener.
STORAGES: dict[str, Callable[[str, Heartbeat], optuna.storages.BaseStorage]] = {
    'sqlite': _rdb(None),
    'postgresql': _rdb('psycopg'),
    'postgresql+psycopg': _rdb(None),
    'mysql': _rdb('pymysql'),
    'mysql+pymysql': _rdb(None),
    'journal': _journal,
}


def default_url(workdir: str) -> str:
  """The SQLite file of a sweep without --storage; SQLite cannot live in a bucket."""
  if storage.is_remote(workdir):
    raise StorageError(f'--workdir={workdir} is not a local directory, and the default study '
                       f'file ({DEFAULT_FILE}, SQLite) must be; pass --storage=URL, e.g. '
                       f'{EXAMPLES[1]}')
  return f'sqlite:///{os.path.abspath(os.path.join(workdir, DEFAULT_FILE))}'


def open_storage(url: str, heartbeat: Heartbeat) -> optuna.storages.BaseStorage:
  """The storage at `url`, connected (so an unreachable server fails here), or StorageError."""
  scheme = url.split('://', 1)[0] if '://' in url else None
  if scheme not in STORAGES:
    raise StorageError(f'--storage={hidden(url)} is not a storage URL of a known scheme '
                       f'({", ".join(STORAGES)}); expected e.g. {" or ".join(EXAMPLES)}')
  try:
    if scheme == 'sqlite' and os.path.dirname(url.split(':///', 1)[-1]):
      os.makedirs(os.path.dirname(url.split(':///', 1)[-1]), exist_ok=True)
    with warnings.catch_warnings():
      # Heartbeats and retries are marked experimental by Optuna; they are used on purpose.
      warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
      return STORAGES[scheme](url, heartbeat)
  except StorageError:
    raise
  except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError, ValueError) as e:
    # The driver's message names the cause (refused, unknown host, bad password, no file);
    # its first line is enough, and keeps the password out of it.
    cause = ' '.join(str(e).strip().splitlines()[0].split()) if str(e).strip() else ''
    hint = ' (install the driver the URL names, e.g. pip install pymysql)' if isinstance(
        e, ImportError) else ''
    raise StorageError(f'--storage={hidden(url)} cannot be opened: {type(e).__name__}'
                       f'{": " + cause if cause else ""}{hint}') from None
