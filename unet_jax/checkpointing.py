"""Orbax checkpoints: periodic, atomic, best-k by a validation metric, automatic resume.

A checkpoint holds the train state and a JSON record of the loop (the training data iterator's
position, the early-stopping record), so a resumed run continues with the batches an
uninterrupted run would have seen. Orbax writes each step into a
temporary directory and renames it when complete: a run killed mid-write leaves no half step
that a later restore could pick up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(directory: str, *, keep_best: int, best_metric: str, best_mode: str = 'max',
                 keep_latest: int = 2) -> ocp.CheckpointManager:
  """A manager that keeps the `keep_latest` newest steps (for resume) and the `keep_best` best.

  The best are ranked by `best_metric` of the metrics passed to `save` (e.g. 'dice_membrane').
  """
  if best_mode not in ('max', 'min'):
    raise ValueError(f"config.checkpoint.best_mode={best_mode!r} is not one of ('max', 'min')")
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
  the process exits. `metrics` rank the checkpoint among the best."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(extra)),
               metrics=metrics, force=True)


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
  manager.wait_until_finished()
