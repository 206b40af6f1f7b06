"""The workdir of a run: writable, used by one launcher at a time, and holding no run of
another config.

A workdir remembers its config (`config.json`); resuming it with another config beyond
RESUMABLE_CHANGES is refused unless the caller allows it, and evaluating it with another config
names the fields that differ (`config_differences`).

`WorkdirLock` keeps a second launcher out: process 0 of a run creates `workdir/run.lock`
atomically (O_EXCL on a disk, a create-only precondition in a bucket), holding its pid, host and
start time, refreshes the lock's heartbeat every LOCK_HEARTBEAT_SECONDS, and removes it when the
run ends. A lock whose owner is provably dead is taken over: on the same host, that pid no longer
runs or is another process; on any host, its heartbeat is older than LOCK_STALE_SECONDS (a
preempted TPU VM never removes its lock from the bucket). Any other lock refuses the run with
one line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import ml_collections

from unet_jax import storage

log = logging.getLogger('unet_jax')
LOCK_FILE = 'run.lock'
# A live launcher rewrites its lock this often; one silent for LOCK_STALE_SECONDS (five missed
# beats: a long pause of the VM, a slow bucket) is dead wherever it ran.
LOCK_HEARTBEAT_SECONDS = 60.0
LOCK_STALE_SECONDS = 300.0


class WorkdirBusyError(OSError):
  """Another live launcher holds the workdir's lock; `str()` is one line naming it."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (it tells a reused pid apart), or None if it runs not."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return ''  # alive; no /proc to read its start time from


class WorkdirLock:
  """`with WorkdirLock(workdir, enabled=chief):` holds `workdir/run.lock` for the run."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = storage.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self.enabled = enabled
    self._held = False
    self._record: dict[str, Any] = {}
    self._stop_beating = threading.Event()
    self._beater: threading.Thread | None = None

  def _new_record(self) -> dict[str, Any]:
    return {'pid': os.getpid(), 'host': socket.gethostname(),
            'process_start': _process_start(os.getpid()),
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'heartbeat': time.time()}

  def _owner_is_dead(self, owner: dict[str, Any]) -> bool:
    beat = owner.get('heartbeat')
    if isinstance(beat, (int, float)) and time.time() - beat > LOCK_STALE_SECONDS:
      return True
    if owner.get('host') != socket.gethostname():
      return False  # another machine's process cannot be checked from here
    start = _process_start(int(owner.get('pid', -1)))
    return start is None or (bool(owner.get('process_start')) and bool(start)
                             and start != owner['process_start'])

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(2):
      self._record = self._new_record()
      if storage.create_exclusive(self.path, json.dumps(self._record).encode()):
        self._held = True
        self._beater = threading.Thread(target=self._beat, daemon=True, name='workdir-lock')
        self._beater.start()
        return
      try:
        owner = json.loads(storage.read_text(self.path))
      except FileNotFoundError:
        continue  # released between the two calls
      except (OSError, ValueError):
        owner = {}  # a lock file cut short while written: its owner died at once
      if owner and not self._owner_is_dead(owner):
        raise WorkdirBusyError(
            f'workdir {self.workdir} is in use by pid {owner.get("pid")} on '
            f'{owner.get("host")} since {owner.get("started")}; wait for that run, or use '
            f'another --workdir (remove {self.path} only if that process is gone)')
      log.warning('taking over %s from a run that is no longer alive (%s)', self.path,
                  owner or 'unreadable lock')
      storage.remove(self.path)
    raise WorkdirBusyError(f'{self.path} could not be taken; another launcher took it first')

  def _beat(self) -> None:
    while not self._stop_beating.wait(LOCK_HEARTBEAT_SECONDS):
      self._record['heartbeat'] = time.time()
      try:
        storage.write_atomic(self.path, json.dumps(self._record))
      except OSError as e:  # a missed beat is retried; the run itself goes on
        log.warning('could not refresh %s (%s)', self.path, e)

  def release(self) -> None:
    if self._held:
      self._held = False
      self._stop_beating.set()
      if self._beater is not None:
        self._beater.join()
      storage.remove(self.path)

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# Fields that may change between a run and its resumption: how long and how it is observed or
# laid out, not what is trained.
RESUMABLE_CHANGES = ('num_steps', 'log_every', 'eval_every', 'num_overlays', 'eval',
                     'data.num_workers', 'data.num_threads', 'data.prefetch', 'mesh',
                     'checkpoint.keep_best', 'early_stopping', 'divergence', 'sweep')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_differences(config: ml_collections.ConfigDict, workdir: str, *,
                       ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
  """'field: saved → current' for every field where `config` differs from the workdir's saved
  config.json (fields in `ignore` and their children aside); [] if none is saved."""
  saved_path = storage.join(workdir, 'config.json')
  if not storage.exists(saved_path):
    return []
  saved = _flatten(json.loads(storage.read_text(saved_path)))
  current = _flatten(json.loads(config.to_json_best_effort()))

  def value(flat, key):
    # A loss term a config does not list weighs 0, as one it lists with weight 0 (configs
    # written before every term was listed name only the terms they use).
    return flat.get(key, 0.0 if key.startswith('loss.terms.') else None)

  changed = sorted(k for k in saved.keys() | current.keys()
                   if value(saved, k) != value(current, k)
                   and not any(k == f or k.startswith(f + '.') for f in ignore))
  return [f'{k}: {value(saved, k)!r} → {value(current, k)!r}' for k in changed]


def check_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                  allow_config_change: bool) -> None:
  """Fails early on an unwritable workdir (a missing bucket, no credentials or no permission
  to write included), or on resuming a run that had another config."""
  storage.check_writable(workdir)
  if allow_config_change:
    return
  changed = config_differences(config, workdir)
  if changed:
    raise ValueError(f'workdir {workdir} holds a run with another config '
                     f'({", ".join(changed[:5])}); use a new --workdir, or pass '
                     '--allow_config_change to resume it anyway')
