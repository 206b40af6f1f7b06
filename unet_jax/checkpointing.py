"""Orbax checkpoints: periodic, atomic, best-k by a validation metric, automatic resume.

A checkpoint holds the train state and a JSON record of the loop (the training data iterator's
position, the early-stopping record), so a resumed run continues with the batches an
uninterrupted run would have seen. Orbax writes each step into a
temporary directory and renames it when complete: a run killed mid-write leaves no half step
that a later restore could pick up.

In a bucket (a gs:// workdir) Orbax writes a step in place and marks it complete with
`commit_success.txt` last; a step without that marker was cut short and is moved aside like a
damaged one, so it is never taken as complete.

A save that the file system refuses (no space left, quota exceeded, file too large) raises
`CheckpointWriteError` in the calling thread, naming the directory, the step and the complete
checkpoints that remain; the half-written step stays a temporary directory that the next run
removes before it resumes from the newest complete one.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unet_jax import sharding
from unet_jax import storage
from unet_jax.models import build_model

BEST_MODES = ('max', 'min')
CHECKPOINTS = ('best', 'latest')  # or a step number
# Unreadable or half-written steps of `<workdir>/checkpoints` are moved into its sibling
# `<workdir>/checkpoints_quarantine`, never deleted: inside the checkpoint directory, Orbax's
# clean-up would delete them in a bucket, where it takes any unmarked folder for a temporary one.
QUARANTINE_SUFFIX = '_quarantine'
# Files every complete step directory holds (orbax metadata, the state tree, the loop record).
STEP_FILES = ('_CHECKPOINT_METADATA', 'state/_METADATA', 'data/metadata')
COMMIT_MARKER = 'commit_success.txt'  # written last into a step saved to a bucket
log = logging.getLogger('unet_jax')
# errno → what it means for a checkpoint write. EFBIG also comes from a process file-size limit
# (ulimit -f, RLIMIT_FSIZE), not only from the file system.
STORAGE_ERRNOS = {
    errno.ENOSPC: 'no space left on device',
    errno.EDQUOT: 'disk quota exceeded',
    errno.EFBIG: 'file too large for the file system or the file-size limit (ulimit -f)',
}
# tensorstore reports OS errors inside its own message: "... File too large [os_error_code='27']".
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")


class _PeriodicSaveFilter(logging.Filter):
  """Periodic saves (config.checkpoint.every) carry no metrics on purpose: they never rank
  among the best. Orbax warns about that at every such save; the warning says nothing here."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


class _StorageErrorTracebackFilter(logging.Filter):
  """A write the file system refused (a full disk) is reported once, by CheckpointWriteError.
  Orbax logs the same OS error from each of its save threads with the whole chained traceback
  (hundreds of lines), and asyncio its unretrieved write tasks; their records keep their
  message here, without the traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and storage_errno(error) is not None:
      record.exc_info = record.exc_text = None
    return True


logging.getLogger('absl').addFilter(_PeriodicSaveFilter())
for _logger in ('absl', 'asyncio'):
  logging.getLogger(_logger).addFilter(_StorageErrorTracebackFilter())


class CheckpointReadError(OSError):
  """No checkpoint of a run can be read; `str()` is one line that says what to do."""


class CheckpointWriteError(OSError):
  """A checkpoint write refused by the file system; earlier complete checkpoints are intact.

  `str()` is the one-line message alone; `errno` is the code of STORAGE_ERRNOS behind it.
  """

  def __init__(self, message: str, code: int | None = None):
    super().__init__(message)
    self.errno = code


def run_manager(config: ml_collections.ConfigDict, workdir: str, *, read_only: bool = False
                ) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints` with the config's retention and best metric.

  `read_only` managers (eval, predict, export) never create, delete or clean up anything, so
  reading the workdir of a run that is still training cannot remove the checkpoint it writes.
  """
  directory = storage.join(workdir, 'checkpoints')
  if not read_only and jax.process_index() == 0:
    for step in damaged_steps(directory):
      quarantine(directory, step, 'is incomplete (a save or deletion was cut short)')
  if read_only:
    return read_only_manager(directory, best_metric=config.checkpoint.best_metric,
                             best_mode=config.checkpoint.best_mode)
  return make_manager(directory, keep_best=config.checkpoint.keep_best,
                      best_metric=config.checkpoint.best_metric,
                      best_mode=config.checkpoint.best_mode,
                      keep_latest=config.checkpoint.keep_latest)


def read_only_manager(directory: str, *, best_metric: str, best_mode: str = 'max'
                      ) -> ocp.CheckpointManager:
  directory = storage.absolute(directory)
  if not storage.is_dir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}: it does not exist; train into this '
                            'workdir first')
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         best_fn=lambda m: m[best_metric], best_mode=best_mode)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data'))


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
  # Creating the manager runs Orbax's first barrier, a collective: every process arrives
  # here from its own data loading and compiling, so they meet first.
  sharding.wait_for_all_processes('checkpoint manager')
  return ocp.CheckpointManager(storage.absolute(directory), options=options,
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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, *,
                   restart: bool = False) -> tuple[Any, dict[str, Any]] | None:
  """(state, extra) of the newest readable checkpoint, or None if there is none.

  Orbax only renames a step directory into place once it is complete, so a write killed half
  way is never listed. A listed checkpoint that cannot be read (corrupted on disk) is moved to
  `checkpoints_quarantine/` with a warning naming it, and the one before it is used; the run
  then saves that step anew instead of colliding with the unreadable one. When checkpoints
  exist but none is readable, CheckpointReadError says so, unless `restart` (start from step 0).

  `abstract_state` (from jax.eval_shape, with shardings) gives the tree structure and where
  every array lands, so optimizer state comes back as its own types, already sharded.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      return restore(manager, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file means skip it)
      reason = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
      log.warning('checkpoint %s is unreadable and is skipped (%s); trying the one before it',
                  storage.join(str(manager.directory), str(step)), reason)
      if jax.process_index() == 0:
        quarantine(str(manager.directory), step, 'is unreadable')
      manager.reload()
  if steps and not restart:
    raise CheckpointReadError(
        f'none of the {len(steps)} checkpoint(s) in {manager.directory} could be read; they were '
        f'moved to {quarantine_directory(str(manager.directory))}; rerun with --restart to '
        'train from step 0')
  return None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict[str, Any]]:
  """(state, extra) of checkpoint `step`, laid out as `abstract_state` says."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  log.info('restored checkpoint of step %d from %s', step,
                                     manager.directory)
  return restored['state'], restored['data']


def choose_step(manager: ocp.CheckpointManager, which: str | int) -> int:
  """'latest', 'best' (by the manager's metric; the latest if none has metrics) or a step."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {manager.directory}; train first')
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    best = manager.best_step()
    if best is None:
      log.warning('no checkpoint in %s carries validation metrics; using the latest (step %d)',
                  manager.directory, manager.latest_step())
      return manager.latest_step()
    return best
  if str(which).isdigit() and int(which) in steps:
    if int(which) in damaged_steps(str(manager.directory)):
      raise CheckpointReadError(f'checkpoint {which} in {manager.directory} is incomplete (a save '
                                'or deletion was cut short); choose another step')
    return int(which)
  raise ValueError(f'--checkpoint={which!r} is not one of {CHECKPOINTS} or a saved step '
                   f'{sorted(steps)}')


@dataclasses.dataclass(frozen=True)
class Restored:
  """A trained model ready for inference: module, variables and the input it was trained on."""

  model: nn.Module
  variables: dict[str, Any]
  step: int
  spatial_rank: int
  input_channels: int


def _input_signature(model: nn.Module, params: Any, tile: int) -> tuple[int, int]:
  """(spatial rank, input channels) of the checkpoint's parameters for `model`.

  The rank is that of the convolution kernels; the channel count is read from the one
  parameter whose shape depends on the number of input channels.
  """
  kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if 'kernel' in jax.tree_util.keystr(path)]
  if not kernels:
    raise ValueError('the checkpoint holds no kernels to infer the input layout from')
  rank = max(len(shape) for shape in kernels) - 2
  if rank not in (2, 3):
    raise ValueError(f'the checkpoint holds {len(max(kernels, key=len))}-dim kernels; expected a '
                     '2D or 3D model')
  shapes = [jax.eval_shape(model.init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, *(tile,) * rank, c), np.float32))['params']
            for c in (1, 2)]
  saved = {jax.tree_util.keystr(p): leaf.shape for p, leaf in
           jax.tree_util.tree_leaves_with_path(params)}
  for (path, one), two in zip(jax.tree_util.tree_leaves_with_path(shapes[0]),
                              jax.tree.leaves(shapes[1])):
    key = jax.tree_util.keystr(path)
    if one.shape != two.shape and key in saved:
      axis = next(i for i, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b)
      return rank, int(saved[key][axis])
  return rank, 1


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str, *,
                          checkpoint: str | int = 'best',
                          mesh: jax.sharding.Mesh | None = None) -> Restored:
  """The model of `config` with the parameters of a checkpoint in `workdir/checkpoints`.

  Only the parameters (the EMA parameters when the run kept them), batch statistics and step
  are read, replicated over `mesh`; the optimizer state stays on disk.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  manager = run_manager(config, workdir, read_only=True)
  step = choose_step(manager, checkpoint)
  path = ocp.step.find_step_path(manager.directory, ocp.step.standard_name_format(), step=step)
  saved = ocp.PyTreeCheckpointHandler().metadata(path / 'state').tree
  keys = [k for k in ('params', 'batch_stats', 'ema_params', 'step') if saved.get(k)]
  replicated = sharding.replicated(mesh)
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                            saved[k], is_leaf=lambda m: hasattr(m, 'shape')) for k in keys}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))['state']
  manager.close()

  model = build_model(config.model, num_classes=len(config.data.class_names))
  crop = int(np.ravel(config.data.crop_size)[0])  # a size the model takes, to trace its shapes
  rank, channels = _input_signature(model, state['params'], crop)
  expected = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, *(crop,) * rank, channels), np.float32))
  found = {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  want = {'params': expected['params'], 'batch_stats': expected.get('batch_stats', {})}
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  if shapes(found) != shapes(want):
    raise ValueError(f'the checkpoint of step {step} in {workdir} does not fit config.model '
                     f'({dict(config.model)}); predict with the config it was trained with')
  variables = {'params': state.get('ema_params') or state['params']}
  if found['batch_stats']:
    variables['batch_stats'] = found['batch_stats']
  log.info('restored step %d (%s) from %s: %dD model, %d input channel(s)', step, checkpoint,
           manager.directory, rank, channels)
  return Restored(model, variables, step, rank, channels)


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
  """Steps whose checkpoint directory is in place (on a disk orbax renames a step into place
  only once it is fully written; temporary directories carry a suffix)."""
  if not storage.is_dir(directory):
    return []
  return sorted(int(name) for name in storage.list_names(directory) if name.isdigit())


def damaged_steps(directory: str) -> list[int]:
  """Listed steps that lack a file every complete checkpoint has: a step whose deletion by the
  retention policy was killed half way, or, in a bucket, one whose upload was."""
  required = STEP_FILES + ((COMMIT_MARKER,) if storage.is_remote(directory) else ())
  return [step for step in complete_steps(directory)
          if not all(storage.exists(storage.join(directory, str(step), name))
                     for name in required)]


def quarantine_directory(directory: str) -> str:
  return os.fspath(directory).rstrip('/') + QUARANTINE_SUFFIX


def quarantine(directory: str, step: int, reason: str) -> str:
  """Moves checkpoint `step` to `directory`_quarantine/ (kept for inspection, never deleted)."""
  target = quarantine_directory(directory)
  storage.makedirs(target)
  destination, suffix = storage.join(target, str(step)), 1
  while storage.exists(destination):
    destination, suffix = storage.join(target, f'{step}.{suffix}'), suffix + 1
  source = storage.join(directory, str(step))
  storage.move(source, destination)
  log.warning('checkpoint %s %s; moved to %s', source, reason, destination)
  return destination


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
