"""Orbax checkpoints: periodic, atomic, best-k by a validation metric, automatic resume.

A checkpoint holds the train state and a JSON record of the loop (the training data iterator's
position, the early-stopping record), so a resumed run continues with the batches an
uninterrupted run would have seen. Orbax writes each step into a
temporary directory and renames it when complete: a run killed mid-write leaves no half step
that a later restore could pick up.

A save that the file system refuses (no space left, quota exceeded, file too large) raises
`CheckpointWriteError` in the calling thread, naming the directory, the step and the complete
checkpoints that remain; the half-written step stays a temporary directory that the next run
removes before it resumes from the newest complete one.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

BEST_MODES = ('max', 'min')
# errno → what it means for a checkpoint write. EFBIG also comes from a process file-size limit
# (ulimit -f, RLIMIT_FSIZE), not only from the file system.
STORAGE_ERRNOS = {
    errno.ENOSPC: 'no space left on device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EFBIG: 'file too large for the file system or the file-size limit (ulimit -f)',
}
# tensorstore reports OS errors inside its own message: "... File too large [os_error_code='27']".
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


class CheckpointWriteError(OSError):
  """A checkpoint write refused by the file system; earlier complete checkpoints are intact.

  `str()` is the one-line message alone; `errno` is the code of STORAGE_ERRNOS behind it.
  """

  def __init__(self, message: str, code: int | None = None):
    super().__init__(message)
    self.errno = code


def make_manager(directory: str, *, keep_best: int, best_metric: str, best_mode: str = 'max',
                 keep_latest: int = 2) -> ocp.CheckpointManager:
  """A manager that keeps the `keep_latest` newest steps (for resume) and the `keep_best` best.

  The best are ranked by `best_metric` of the metrics passed to `save` (e.g. 'dice_membrane').
  """
  if best_mode not in BEST_MODES:
    raise ValueError(f'config.checkpoint.best_mode={best_mode!r} is not one of {BEST_MODES}')
  metric = lambda metrics: metrics[best_metric]
  policies = [ocp.checkpoint_managers.LatestN(n=keep_latest)]
  if keep_best > 0:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=metric, reverse=best_mode == 'min', n=keep_best,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      best_fn=metric, best_mode=best_mode,  # so that manager.best_step() names the best
      cleanup_tmp_directories=True,  # debris of a write that was killed half way
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, extra: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` and the JSON-able `extra`; `wait(manager)` before
  the process exits. `metrics` rank the checkpoint among the best.

  Raises CheckpointWriteError when the file system refuses this write or the previous one,
  which is still in flight when this is called (named by its own step).
  """
  wait(manager)
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(extra)),
                 metrics=metrics, force=True)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the disk refused it)
    _raise_if_storage_error(e, manager, step)
    raise


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict[str, Any]] | None:
  """(state, extra) of the newest readable checkpoint, or None if there is none.

  Orbax only renames a step directory into place once it is complete, so a write killed half
  way is never listed. A listed checkpoint that cannot be read (corrupted on disk) is skipped
  with a warning naming it, and the one before it is used.

  `abstract_state` (from jax.eval_shape, with shardings) gives the tree structure and where
  every array lands, so optimizer state comes back as its own types, already sharded.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file means skip it)
      logging.getLogger('unet_jax').warning(
          'checkpoint %s is unreadable and is skipped (%s: %s); trying the one before it',
          os.path.join(str(manager.directory), str(step)), type(e).__name__,
          str(e).splitlines()[0][:200] if str(e) else '')
  return None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict[str, Any]]:
  """(state, extra) of checkpoint `step`, laid out as `abstract_state` says."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  logging.getLogger('unet_jax').info('restored checkpoint of step %d from %s', step,
                                     manager.directory)
  return restored['state'], restored['data']


def choose_step(manager: ocp.CheckpointManager, which: str) -> int:
  """'latest', 'best' (by the manager's metric; the latest if none has metrics) or a step."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}; train first')
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    best = manager.best_step()
    return manager.latest_step() if best is None else best
  if which.isdigit() and int(which) in steps:
    return int(which)
  raise ValueError(f'--checkpoint={which!r} is not "best", "latest" or one of the saved steps '
                   f'{sorted(steps)}')


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the save in flight is complete; CheckpointWriteError if the disk refused it."""
  in_flight = manager.latest_step()  # orbax lists a step from the moment its save starts
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless the disk refused it)
    _raise_if_storage_error(e, manager, in_flight)
    raise


def storage_errno(error: BaseException) -> int | None:
  """The errno of STORAGE_ERRNOS behind `error` (its causes and contexts included), or None.

  Orbax hands over background-thread failures as they were raised there: an OSError from a
  Python write, or a tensorstore ValueError that carries the OS error code in its message.
  """
  seen: set[int] = set()
  pending = [error]
  while pending:
    e = pending.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
      match = _TENSORSTORE_ERRNO.search(str(e))
      code = int(match.group(1)) if match else next(  # messages that carry only the strerror
          (c for c in STORAGE_ERRNOS if os.strerror(c) in str(e)), None)
    if code in STORAGE_ERRNOS:
      return code
    pending += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
  return None


def complete_steps(directory: str) -> list[int]:
  """Steps whose checkpoint directory is complete on disk (orbax renames a step into place
  only once it is fully written; temporary directories carry a suffix)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _raise_if_storage_error(error: Exception, manager: ocp.CheckpointManager,
                            step: int | None) -> None:
  code = storage_errno(error)
  if code is None:
    return
  directory = str(manager.directory)
  intact = [s for s in complete_steps(directory) if s != step]
  kept = (f'earlier checkpoints {intact} are intact and a rerun resumes from step {intact[-1]}'
          if intact else 'no earlier checkpoint exists, so a rerun starts from step 0')
  raise CheckpointWriteError(
      f'{STORAGE_ERRNOS[code]} ({errno.errorcode[code]}) in {directory} while writing '
      f'checkpoint {step if step is not None else "?"}; {kept}; free space or choose another '
      '--workdir', code) from error
