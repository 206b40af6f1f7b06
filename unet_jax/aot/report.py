"""Compile mode: every program of a run compiled for a target, a per-chip table, and what to change
when a program does not fit.

`compile_for_target(config, target, shapes=..., spatial_rank=...)` compiles the PROGRAMS of
programs.py and returns their rows; `table` prints them with a roofline lower bound on the step
time from the chip's published peak bf16 FLOP/s and HBM bandwidth (targets.CHIPS):

  time ≥ max(XLA FLOPs / peak FLOP/s, XLA bytes accessed / HBM bandwidth)

A program the compiler cannot fit raises `NoFit` with one line naming the first change that
makes it fit, found by compiling the candidates of CHANGES in order (cheapest to the run
first): one change at a time, then the strongest change of each kind together. The strongest
candidates are compiled first, so that a program nothing makes fit is refused after one or two
compiles rather than after all of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Callable, Iterator

import ml_collections

from unet_jax.aot import programs
from unet_jax.aot import targets
from unet_jax.config import overrides
from unet_jax.config import validation

log = logging.getLogger('unet_jax')
GIB = targets.GIB

# A change: (override path, value); the candidates a program's fit search compiles, cheapest
# to the run first. Each takes the config and the target, and yields changes valid for them.
Change = tuple[str, Any]


def _bf16(config: ml_collections.ConfigDict, target: targets.Target) -> Iterator[Change]:
  del target
  if config.model.dtype == 'float32':
    yield ('model.dtype', 'bfloat16')


def _remat(config: ml_collections.ConfigDict, target: targets.Target) -> Iterator[Change]:
  del target
  for policy in ('conv', 'full')[('none', 'conv', 'full').index(config.model.remat):]:
    if policy != config.model.remat:
      yield ('model.remat', policy)


def _fsdp(config: ml_collections.ConfigDict, target: targets.Target) -> Iterator[Change]:
  size = config.mesh.fsdp * 2
  while size <= len(target.devices):
    yield ('mesh.fsdp', size)
    size *= 2


def _micro_batches(config: ml_collections.ConfigDict, target: targets.Target) -> Iterator[Change]:
  # Smaller per-chip batches, same update: gradient accumulation over micro-batches.
  del target
  steps = config.optimizer.grad_accum_steps * 2
  while steps <= config.batch_size:
    yield ('optimizer.grad_accum_steps', steps)
    steps *= 2


def _halve(field: str) -> Callable[[ml_collections.ConfigDict, targets.Target], Iterator[Change]]:
  def changes(config: ml_collections.ConfigDict, target: targets.Target) -> Iterator[Change]:
    del target
    value = config[field] // 2
    while value >= 1:
      yield (field, value)
      value //= 2
  return changes


CHANGES: dict[str, tuple[Callable[..., Iterator[Change]], ...]] = {
    'train step': (_bf16, _remat, _fsdp, _micro_batches, _halve('batch_size')),
    'eval step': (_bf16, _halve('eval_batch_size')),
    'tiled prediction': (_bf16, _halve('eval_batch_size')),
}


class NoFit(ValueError):
  """A program does not fit one chip; the message is the launcher's one line."""


def _flag(change: Change) -> str:
  return f'--config.{change[0]}={change[1]}'


def _valid(config: ml_collections.ConfigDict, target: targets.Target, spatial_rank: int) -> bool:
  try:
    validation.validate(config, mode='compile', spatial_rank=spatial_rank, data_paths=False,
                        devices=target.devices)
  except validation.ConfigError:
    return False
  return True


Candidate = tuple[list[Change], ml_collections.ConfigDict]


def _singles(name: str, config: ml_collections.ConfigDict, target: targets.Target,
             spatial_rank: int) -> list[list[Candidate]]:
  """Per kind of CHANGES[name] that has any, its valid changes alone, weakest first."""
  kinds = []
  for kind in CHANGES[name]:
    valid = []
    for change in kind(config, target):
      candidate = overrides.apply_overrides(config, dict([change]))
      if _valid(candidate, target, spatial_rank):
        valid.append(([change], candidate))
    if valid:
      kinds.append(valid)
  return kinds


def _combinations(kinds: list[list[Candidate]], config: ml_collections.ConfigDict,
                  target: targets.Target, spatial_rank: int) -> list[Candidate]:
  """The strongest change of each kind together, one kind more each time, where valid."""
  strongest = [valid[-1][0][0] for valid in kinds]
  combinations = []
  for count in range(2, len(strongest) + 1):
    candidate = overrides.apply_overrides(config, dict(strongest[:count]))
    if _valid(candidate, target, spatial_rank):
      combinations.append((strongest[:count], candidate))
  return combinations


def _in_order(kinds: list[list[Candidate]], combinations: list[Candidate]) -> list[Candidate]:
  """Cheapest to the run first: one change at a time, then the combinations."""
  return [candidate for valid in kinds for candidate in valid] + combinations


def _candidates(name: str, config: ml_collections.ConfigDict, target: targets.Target,
                spatial_rank: int) -> list[Candidate]:
  """Valid changed configs in the order the search compiles them: one change at a time, then
  the strongest change of each kind together, one kind more each time."""
  kinds = _singles(name, config, target, spatial_rank)
  return _in_order(kinds, _combinations(kinds, config, target, spatial_rank))


def _floor(kinds: list[list[Candidate]], combinations: list[Candidate]) -> list[Candidate]:
  """The candidates every other one needs at least as much memory as: the longest valid
  combination of the strongest changes, and the strongest change of each kind after it."""
  if not kinds:
    return []
  longest = combinations[-1] if combinations else kinds[0][-1]
  return [longest] + [valid[-1] for valid in kinds[len(longest[0]):]]


def _compile_within(name: str, config: ml_collections.ConfigDict, setup: Any,
                    shapes: programs.Shapes, spatial_rank: int, limit: float | None
                    ) -> programs.Compiled:
  """Compiles a program; DoesNotFit when the compiler refuses it or it exceeds `limit` bytes."""
  compiled = programs.compile_program(name, config, setup, shapes=shapes,
                                      spatial_rank=spatial_rank)
  if limit is not None and compiled.memory.total > limit:
    raise programs.DoesNotFit(name, compiled.memory.total, limit, 'over --memory_limit_gib')
  return compiled


def _fit_search(name: str, config: ml_collections.ConfigDict, target: targets.Target,
                shapes: programs.Shapes, spatial_rank: int, problem: programs.DoesNotFit,
                limit: float | None, allowed: str) -> str:
  needed = (f'needs {_bytes(problem.needed)} of the {_bytes(problem.available)}{allowed} '
            if problem.needed and problem.available else 'does not fit the memory ')
  head = (f'the {name} does not fit a {target.devices[0].device_kind} of {target.name}: it '
          f'{needed}per chip')
  compiled = {}

  def fits(changes: list[Change], candidate: ml_collections.ConfigDict) -> float | None:
    """The candidate's bytes per chip when it fits, else None; each is compiled once."""
    key = tuple(changes)
    if key not in compiled:
      log.info('%s: trying %s', name, ' '.join(_flag(c) for c in changes))
      try:
        setup = programs.build_setup(candidate, target.devices, shapes=shapes,
                                     spatial_rank=spatial_rank)
        compiled[key] = _compile_within(name, candidate, setup, shapes, spatial_rank,
                                        limit).memory.total
      except programs.DoesNotFit:
        compiled[key] = None
    return compiled[key]

  # The strongest candidates first: the longest valid combination of each kind's strongest
  # change, and the strongest change of each kind it leaves out. Each change only lowers the
  # memory, so every other candidate needs at least as much as one of these; when none of them
  # fits, the search ends here, after a compile or two instead of a dozen or more.
  kinds = _singles(name, config, target, spatial_rank)
  combinations = _combinations(kinds, config, target, spatial_rank)
  floor = _floor(kinds, combinations)
  if floor and all(fits(changes, candidate) is None for changes, candidate in floor):
    strongest = ', '.join(' '.join(_flag(c) for c in changes) for changes, _ in floor)
    raise_limit = 'raise --memory_limit_gib, ' if 'memory_limit_gib' in allowed else ''
    return (f'{head}; it does not fit even with {strongest}: {raise_limit}use a larger chip '
            'or a smaller config.data.crop_size')
  tried = []
  for changes, candidate in _in_order(kinds, combinations):
    flags = ' '.join(_flag(c) for c in changes)
    tried.append(flags)
    fitted = fits(changes, candidate)
    if fitted is not None:
      return f'{head}; {flags} makes it fit ({_bytes(fitted)} per chip, found by compiling it)'
  return (f'{head}; none of {", ".join(tried) or "the usual changes"} made it fit, alone or '
          'together: use a larger chip or a smaller config.data.crop_size')


@dataclasses.dataclass(frozen=True)
class Row:
  """One compiled program and its roofline bound on one chip."""

  compiled: programs.Compiled
  chip: targets.Chip

  @property
  def _times(self) -> tuple[float, float]:
    """(compute, memory) seconds; without XLA's cost analysis (compile-only GPU programs) the
    model's FLOPs alone, and no memory term."""
    c = self.compiled
    if math.isnan(c.xla_flops):
      return c.model_flops / self.chip.peak_bf16_flops, 0.0
    return (c.xla_flops / self.chip.peak_bf16_flops,
            c.bytes_accessed / self.chip.hbm_bytes_per_second)

  @property
  def seconds_bound(self) -> float:
    return max(self._times)

  @property
  def bound_by(self) -> str:
    compute, memory = self._times
    if math.isnan(self.compiled.xla_flops):
      return 'compute (model FLOP)'
    return 'compute' if compute >= memory else 'memory'

  @property
  def examples_per_second(self) -> float:
    return self.compiled.examples_per_device / self.seconds_bound

  def as_dict(self) -> dict[str, Any]:
    """The row for JSON: figures XLA did not provide are None."""
    c = self.compiled
    known = lambda x: None if math.isnan(x) else x
    return {'program': c.name, 'examples': c.examples,
            'examples_per_chip': c.examples_per_device, 'memory': dataclasses.asdict(c.memory),
            'memory_total': c.memory.total, 'hbm': self.chip.hbm_bytes,
            'xla_flops': known(c.xla_flops), 'model_flops': c.model_flops,
            'bytes_accessed': known(c.bytes_accessed), 'seconds_bound': self.seconds_bound,
            'bound_by': self.bound_by, 'examples_per_second_bound': self.examples_per_second,
            'compile_seconds': c.compile_seconds}


def compile_for_target(config: ml_collections.ConfigDict, target: targets.Target, *,
                       shapes: programs.Shapes, spatial_rank: int,
                       memory_limit: float | None = None) -> list[Row]:
  """Compiles every program of PROGRAMS for `target` (a config validated for it).

  `memory_limit`: bytes per chip a program may use (default: on a TPU what its compiler
  accepts, the chip's HBM; on a GPU the share JAX preallocates); less leaves room for whatever
  else shares the chip.

  Raises:
    NoFit: a program does not fit one chip; the message names the change that makes it fit.
  """
  if memory_limit is not None:
    allowed = ' (--memory_limit_gib)'
  elif target.memory_limit is not None:
    memory_limit = target.memory_limit
    allowed = f' that JAX preallocates ({targets.GPU_MEMORY_FRACTION:.0%} of HBM)'
  else:
    allowed = ''
  setup = programs.build_setup(config, target.devices, shapes=shapes, spatial_rank=spatial_rank)
  rows = []
  for name in programs.PROGRAMS:
    log.info('compiling the %s for %s', name, target.name)
    try:
      compiled = _compile_within(name, config, setup, shapes, spatial_rank, memory_limit)
    except programs.DoesNotFit as problem:
      raise NoFit(_fit_search(name, config, target, shapes, spatial_rank, problem,
                              memory_limit, allowed)) from None
    rows.append(Row(compiled, target.chip))
  return rows


def _bytes(n: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      value = n / size
      return f'{value:.3g} {unit}' if value < 999.5 else f'{value:.0f} {unit}'
  return f'{n:.0f} B'


def _si(n: float) -> str:
  if math.isnan(n):
    return 'n/a'
  for prefix, size in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if n >= size:
      return f'{n / size:.3g} {prefix}'
  return f'{n:.3g}'


def table(rows: list[Row], target: targets.Target) -> str:
  """The per-chip markdown table of the compiled programs, with the chip's figures under it."""
  chip = target.chip
  lines = [
      f'Compiled for {target.describe()}; per chip:', '',
      '| program | examples | arguments | outputs | temporaries | code | total | of HBM | '
      'XLA FLOP | model FLOP | roofline time | bound | examples/s ≤ | compile s |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    c, m = row.compiled, row.compiled.memory
    lines.append(
        f'| {c.name} | {c.examples_per_device:g} | {_bytes(m.arguments)} | {_bytes(m.outputs)} | '
        f'{_bytes(m.temporaries)} | {_bytes(m.code)} | {_bytes(m.total)} | '
        f'{m.total / chip.hbm_bytes:.1%} | {_si(c.xla_flops)} | {_si(c.model_flops)} | '
        f'{row.seconds_bound * 1e3:.3g} ms | {row.bound_by} | '
        f'{row.examples_per_second:.4g} | {c.compile_seconds:.1f} |')
  lines += ['',
            'total = arguments + outputs + temporaries + code − output buffers that reuse donated '
            'arguments. Model FLOP: convolutions and matrix products of the forward pass (×3 for '
            f'a train step). Roofline: {chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16 and '
            f'{chip.hbm_bytes_per_second / 1e9:g} GB/s HBM per device; source: {chip.source}.']
  return '\n'.join(lines)


def to_json(rows: list[Row], target: targets.Target) -> str:
  return json.dumps({'target': target.name, 'device_kind': target.devices[0].device_kind,
                     'devices': len(target.devices), 'hosts': target.num_processes,
                     'programs': [r.as_dict() for r in rows]}, indent=2)
