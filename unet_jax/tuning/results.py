"""A sweep's results, read from its study: the ranked table and sweep.png.

  <workdir>/sweep_results.csv, .md   one row per trial of the sweep (a retried trial shows its
                                     last attempt): trial, state, its parameters, the final
                                     scores; finished trials ranked by the monitored metric
                                     (config.checkpoint.best_metric), then pruned, then failed
  <workdir>/sweep.png                the metric against each swept parameter (plots.plot_sweep)

Everything is written through unet_jax/storage.py, so the workdir may be a gs:// URL.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence
import warnings

import ml_collections
import optuna

from unet_jax import storage
from unet_jax.training import metric_writers
from unet_jax.training import plots

log = logging.getLogger('unet_jax')
TrialState = optuna.trial.TrialState
SCORES_ATTR = 'scores'  # user attribute: the final validation scores of a finished trial
REASON_ATTR = 'fail_reason'  # user attribute: why a trial failed, in one line
# Order of the states in the table, after the finished trials' ranking.
STATE_ORDER = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
               TrialState.WAITING)


def original_number(trial: optuna.trial.FrozenTrial) -> int:
  """The number of the trial a retry continues (its workdir's), else the trial's own."""
  with warnings.catch_warnings():  # marked experimental by Optuna since 2.8
    warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
  return trial.number if retried is None else retried


def trial_dir_name(number: int) -> str:
  return f'trial_{number:03d}'


def rows(study: optuna.Study, config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """One row per trial of the sweep (its latest attempt), ranked as the table shows them."""
  latest: dict[int, optuna.trial.FrozenTrial] = {}
  for trial in study.get_trials(deepcopy=False):
    latest[original_number(trial)] = trial  # trials come in number order: a retry comes later
  metric, maximise = config.checkpoint.best_metric, config.checkpoint.best_mode == 'max'
  table = []
  for number, trial in latest.items():
    scores = dict(trial.user_attrs.get(SCORES_ATTR, {}))
    if metric not in scores and trial.intermediate_values:  # pruned: its last evaluation
      scores[metric] = trial.intermediate_values[max(trial.intermediate_values)]
    table.append({'trial': f'{number:03d}', 'state': trial.state.name,
                  'step': max(trial.intermediate_values, default=''), **trial.params,
                  **scores, 'note': trial.user_attrs.get(REASON_ATTR, '')})

  def key(row):
    value = row.get(metric, math.nan)
    state = STATE_ORDER.index(TrialState[row['state']])
    return (state, not math.isfinite(value), -value if maximise else value)

  return sorted(table, key=key)


def _columns(table: Sequence[dict[str, Any]], params: Sequence[str], metric: str) -> list[str]:
  scores = sorted({k for r in table for k, v in r.items() if isinstance(v, float)}
                  - set(params) - {metric})
  return ['trial', 'state', 'step', *params, metric, *scores, 'note']


def write(study: optuna.Study, config: ml_collections.ConfigDict, workdir: str
          ) -> list[dict[str, Any]]:
  """Writes sweep_results.{csv,md} and sweep.png into `workdir`; returns the ranked rows."""
  table = rows(study, config)
  metric = config.checkpoint.best_metric
  params = list(dict.fromkeys(p for t in study.get_trials(deepcopy=False) for p in t.params))
  metric_writers.write_table(table, storage.join(workdir, 'sweep_results'),
                             columns=_columns(table, params, metric))
  finished = [dict(r, run=r['trial']) for r in table if r['state'] == TrialState.COMPLETE.name]
  if finished and params:
    try:
      plots.plot_sweep(finished, workdir, metric, params=params,
                       maximise=config.checkpoint.best_mode == 'max')
    except Exception as e:  # pylint: disable=broad-except  (the ranking is written; keep it)
      log.warning('sweep.png not written to %s (%s: %s)', workdir, type(e).__name__, e)
  return table
