"""The programs a run executes, built from a config alone and compiled for a target's devices.

PROGRAMS names them: the sharded train step (`training/train_step.py`, with the config's mesh,
remat, dtype and gradient accumulation), the eval step on whole mirror-padded images
(`evaluation/evaluator.py`) and the tiled-prediction step (`inference/tiled.py`). Each is the
very function a run jits, lowered on `jax.ShapeDtypeStruct`s carrying the run's shardings, so no
data is read and no array is allocated. `compile_program` returns XLA's per-device memory plan,
its FLOP and byte counts, the model's own FLOP count and the compile time; a program that the
target's memory cannot hold raises `DoesNotFit`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from unet_jax import sharding
from unet_jax.datasets import pipeline
from unet_jax.evaluation import evaluator
from unet_jax.inference import tiled
from unet_jax.models import flops as model_flops
from unet_jax.models import whole_image
from unet_jax.training import train_step


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a run would learn from its data: one example's spatial shape and channels."""

  image: tuple[int, ...]
  channels: int


@dataclasses.dataclass(frozen=True)
class MemoryUse:
  """XLA's memory plan of one device, in bytes."""

  arguments: int
  outputs: int
  temporaries: int
  code: int
  aliased: int  # outputs that reuse donated arguments' buffers

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries + self.code - self.aliased


@dataclasses.dataclass(frozen=True)
class Compiled:
  """One program compiled for a target, and what the compiler says of it (per device)."""

  name: str
  examples: int  # per call, global
  examples_per_device: float
  memory: MemoryUse
  xla_flops: float
  bytes_accessed: float
  model_flops: float
  compile_seconds: float


class DoesNotFit(Exception):
  """The compiler could not fit `program` into one device's memory."""

  def __init__(self, program: str, needed: float | None, available: float | None, text: str):
    super().__init__(text)
    self.program, self.needed, self.available = program, needed, available


@dataclasses.dataclass(frozen=True)
class _Program:
  fn: Callable
  args: tuple[Any, ...]
  examples: int
  model_flops: float  # global, per call


def _abstract(spec: pipeline.BatchSpec, batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for k, (shape, dtype) in spec.items()}


def _variables(setup: train_step.Setup) -> Any:
  return evaluator.eval_variables(setup.abstract_state)


def _train(config: ml_collections.ConfigDict, setup: train_step.Setup, shapes: Shapes,
           rank: int) -> _Program:
  mesh = setup.mesh
  spec = pipeline.train_batch_spec(config.data, batch_size=config.batch_size, spatial_rank=rank,
                                   channels=shapes.channels)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  forward = model_flops.forward_flops(setup.model, _variables(setup), spec['image'][0])
  return _Program(train_step.make_step_fn(config, setup),
                  (setup.abstract_state, _abstract(spec, sharding.batch_sharding(mesh)), rng),
                  config.batch_size, model_flops.TRAIN_FLOPS_PER_FORWARD * forward)


def _eval(config: ml_collections.ConfigDict, setup: train_step.Setup, shapes: Shapes,
          rank: int) -> _Program:
  del rank
  mesh = setup.mesh
  pads = whole_image.model_padding(setup.model, shapes.image)
  spec = pipeline.eval_batch_spec(shapes.image, batch_size=config.eval_batch_size, pads=pads,
                                  channels=shapes.channels)
  fn = evaluator.make_eval_fn(setup.model, mesh, len(config.data.class_names),
                              tta=config.eval.tta)
  forward = model_flops.forward_flops(setup.model, _variables(setup), spec['image'][0])
  return _Program(fn, (setup.abstract_state, _abstract(spec, sharding.batch_sharding(mesh))),
                  config.eval_batch_size, forward)


def _predict(config: ml_collections.ConfigDict, setup: train_step.Setup, shapes: Shapes,
             rank: int) -> _Program:
  # launch.py's predict mode: tiles of crop_size, eval_batch_size of them per call.
  mesh = setup.mesh
  tile = whole_image.crop_shape(config.data.crop_size, rank)
  count = tiled.tile_batch_size(config.eval_batch_size, mesh)
  tiles = jax.ShapeDtypeStruct((count, *tile, shapes.channels), 'float32',
                               sharding=sharding.batch_sharding(mesh))
  variables = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      _variables(setup))
  fn = tiled.tile_function(tiled.model_apply_fn(setup.model), mesh)
  return _Program(fn, (variables, tiles), count,
                  model_flops.forward_flops(setup.model, variables, tiles.shape))


# name → how to build it; the order is the order of the report.
PROGRAMS: dict[str, Callable[..., _Program]] = {
    'train step': _train,
    'eval step': _eval,
    'tiled prediction': _predict,
}

# libtpu says e.g. "Ran out of memory on HBM, the total memory required for HLO temporaries
# (231.78G) exceeds available HBM (15.75G)" or "Used 21.30G of 15.75G hbm": needed, then limit.
_SIZE = re.compile(r'(\d+(?:\.\d+)?)\s?([KMGT])i?B?\b')
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _does_not_fit(program: str, error: Exception) -> DoesNotFit | None:
  text = ' '.join(str(error).split())
  if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
    return None
  sizes = [float(value) * _UNITS[unit] for value, unit in _SIZE.findall(text)]
  needed, available = (sizes + [None, None])[:2]
  return DoesNotFit(program, needed, available, text)


def _memory(compiled: Any) -> MemoryUse:
  stats = compiled.memory_analysis()
  return MemoryUse(stats.argument_size_in_bytes, stats.output_size_in_bytes,
                   stats.temp_size_in_bytes, stats.generated_code_size_in_bytes,
                   stats.alias_size_in_bytes)


def _costs(compiled: Any) -> dict[str, float]:
  costs = compiled.cost_analysis()
  return (costs[0] if isinstance(costs, (list, tuple)) else costs) or {}


def build_setup(config: ml_collections.ConfigDict, devices: Sequence[Any], *, shapes: Shapes,
                spatial_rank: int) -> train_step.Setup:
  """The run's mesh, model and abstract state on `devices`, shared by all its programs."""
  return train_step.build(config, input_channels=shapes.channels, spatial_rank=spatial_rank,
                          devices=devices)


def compile_program(name: str, config: ml_collections.ConfigDict, setup: train_step.Setup, *,
                    shapes: Shapes, spatial_rank: int) -> Compiled:
  """Compiles program `name` of PROGRAMS for the devices of `setup` (from `build_setup` with
  this validated config).

  Raises:
    DoesNotFit: the compiler found the program too large for one device's memory.
  """
  program = PROGRAMS[name](config, setup, shapes, spatial_rank)
  start = time.perf_counter()
  try:
    compiled = program.fn.lower(*program.args).compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA's error types vary by backend)
    problem = _does_not_fit(name, e)
    if problem is None:
      raise
    raise problem from None
  seconds = time.perf_counter() - start
  costs = _costs(compiled)
  size = setup.mesh.size
  return Compiled(name, program.examples, program.examples / size, _memory(compiled),
                  float(costs.get('flops', float('nan'))),
                  float(costs.get('bytes accessed', float('nan'))),
                  program.model_flops / size, seconds)
