"""The sampler and the pruner of a sweep's Optuna study, chosen by name from config.sweep.

  config.sweep.sampler.name = 'tpe'        # a key of SAMPLERS
  config.sweep.sampler.options = {...}     # its keyword options, e.g. {'n_startup_trials': 5}
  config.sweep.pruner.name = 'median'      # a key of PRUNERS
  config.sweep.pruner.options = {...}      # e.g. {'n_warmup_steps': 400}

The defaults (experiments/isbi.py) are TPE and the median pruner with Optuna's default options:
a trial is stopped at an evaluation whose monitored metric is worse than the median of the
finished trials at the same training step, once 5 trials have finished. Pruners see the training
step as the resource, so their step options (n_warmup_steps, min_resource, …) count steps.

The sampler only draws the values of a search space (`search_space(trial)` in the config file);
a list of points is queued as it is, each point once (tuning/space.py). config validation
(unet_jax/config/validation.py) builds both from the config, so a bad name or option is one
line before anything runs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections
import optuna

# name → the class, called with the options (and `seed=` for samplers).
SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    'tpe': optuna.samplers.TPESampler,
    'random': optuna.samplers.RandomSampler,
    'qmc': optuna.samplers.QMCSampler,
}
# A grid is a list of points (tuning/space.py grid()): queued, each run once. Optuna's
# GridSampler and BruteForceSampler end a study with Study.stop(), which only its optimize()
# loop allows, not the queue of workers that sweeps.py runs.
PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    'none': optuna.pruners.NopPruner,
    'median': optuna.pruners.MedianPruner,
    'percentile': optuna.pruners.PercentilePruner,  # options: percentile=25.0, ...
    'successive_halving': optuna.pruners.SuccessiveHalvingPruner,
    'hyperband': optuna.pruners.HyperbandPruner,
    'threshold': optuna.pruners.ThresholdPruner,  # options: lower= or upper=
}


def _options(options: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  return options.to_dict() if isinstance(options, ml_collections.ConfigDict) else dict(options)


def make_sampler(sweep: ml_collections.ConfigDict, *, seed: int | None
                 ) -> optuna.samplers.BaseSampler:
  """The sampler config.sweep.sampler names, seeded with `seed` (None: from the OS)."""
  return SAMPLERS[sweep.sampler.name](**_options(sweep.sampler.options), seed=seed)


def make_pruner(sweep: ml_collections.ConfigDict) -> optuna.pruners.BasePruner:
  """The pruner config.sweep.pruner names, with its options."""
  return PRUNERS[sweep.pruner.name](**_options(sweep.pruner.options))


def direction(config: ml_collections.ConfigDict) -> str:
  """'maximize' or 'minimize': the study optimises config.checkpoint.best_metric."""
  return 'maximize' if config.checkpoint.best_mode == 'max' else 'minimize'
