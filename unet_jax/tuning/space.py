r"""What a sweep tries, as the config file defines it: a list of points or a search space.

A config file given to `launch.py --sweep` defines one of

  def sweep() -> list[dict]:          points: override dicts (dotted config path → value);
      return grid(**{'optimizer.learning_rate': [1e-3, 4e-3], 'model.width': [16, 24]})

  def search_space(trial) -> dict | None:   suggestions named by dotted config paths
      trial.suggest_float('optimizer.learning_rate', 1e-4, 1e-2, log=True)
      trial.suggest_categorical('model.width', [16, 24])

A list runs as a grid: each point is queued in the study once, in order, and runs once whatever
the number of workers. A search space runs config.sweep.num_trials trials whose values the
sampler draws (tuning/engines.py); the overrides of a trial are its suggested parameters, updated
by the dict search_space() returns, if any (for values derived from them).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from typing import Any, Callable, Mapping, Sequence

import optuna

# A list point's values become Optuna parameters, which hold only these types.
PARAM_TYPES = (type(None), bool, int, float, str)
POINT_ATTR = 'point'  # user attribute of a queued list point: its index in the list


class SpaceError(ValueError):
  """A config file whose sweep cannot be used; `str()` is one line."""


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """Every combination: grid(**{'optimizer.learning_rate': [1e-3, 1e-4], 'model.width': [8]})."""
  names = list(axes)
  return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class Space:
  """A sweep: `points` (a list) or `suggest` (a search space), from `source`."""
  source: str
  points: tuple[Mapping[str, Any], ...] | None = None
  suggest: Callable[[optuna.Trial], Mapping[str, Any] | None] | None = None

  def _choices(self, name: str) -> list[Any]:
    return _values(self.points, name)

  def size(self, num_trials: int) -> int:
    """Trials the study runs in all (not counting retries of dead workers' trials)."""
    return len(self.points) if self.points is not None else num_trials

  def queue_entries(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(params, user attributes) of each entry queued at the study's creation: the points, or
    nothing (a search space's trials are queued empty; the sampler fills them in)."""
    return [(dict(p), {POINT_ATTR: i}) for i, p in enumerate(self.points or ())]

  def missing(self, queued: Sequence[optuna.trial.FrozenTrial], num_trials: int
              ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The entries not yet among `queued` (the study's trials that are no retries)."""
    if self.points is not None:
      have = {t.user_attrs.get(POINT_ATTR) for t in queued}
      return [e for e in self.queue_entries() if e[1][POINT_ATTR] not in have]
    return [({}, {})] * max(0, num_trials - len(queued))

  def overrides(self, trial: optuna.Trial) -> dict[str, Any]:
    """The config overrides of `trial`, recorded as its parameters."""
    if self.points is not None:
      point = self.points[trial.user_attrs[POINT_ATTR]]
      # The queued values come back as parameters over every value the list gives the name
      # (Optuna keeps one distribution per name); a retry already holds them.
      return {name: trial.suggest_categorical(name, self._choices(name)) for name in point}
    derived = self.suggest(trial) or {}
    if not isinstance(derived, Mapping):
      raise SpaceError(f'search_space() of {self.source} returned {type(derived).__name__}; '
                       'expected None or a dict of further overrides')
    return {**trial.params, **derived}


def _values(points: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
  """The distinct values of `name` over `points`, in order (True and 1 kept apart)."""
  found: dict[tuple[str, str], Any] = {}
  for point in points:
    if name in point:
      found.setdefault((type(point[name]).__name__, repr(point[name])), point[name])
  return list(found.values())


def from_module(module: Any, source: str) -> Space:
  """The Space a loaded config file defines (sweep() or search_space(), not both)."""
  has_points, has_space = hasattr(module, 'sweep'), hasattr(module, 'search_space')
  if has_points == has_space:
    raise SpaceError(f'--sweep: {source} defines {"both" if has_points else "neither"} '
                     'sweep() (a list of points) and search_space(trial); define one')
  if has_space:
    return Space(source=source, suggest=module.search_space)
  points = module.sweep()
  if not isinstance(points, (list, tuple)) or not points or not all(
      isinstance(p, Mapping) for p in points):
    raise SpaceError(f'--sweep: sweep() of {source} returned {points!r:.80}; expected a '
                     'non-empty list of override dicts')
  for index, point in enumerate(points):
    bad = {k: v for k, v in point.items() if not isinstance(v, PARAM_TYPES)}
    if bad:
      name, value = next(iter(bad.items()))
      raise SpaceError(f'--sweep: point {index + 1} of sweep() in {source} sets {name}='
                       f'{value!r}, a {type(value).__name__}; points hold None, bool, int, '
                       'float or str (derive other values in search_space(trial))')
  return Space(source=source, points=tuple(dict(p) for p in points))


def load(path: str) -> Space:
  """The Space of the config file at `path` (without the ':arg' that get_config takes)."""
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return from_module(module, path)
