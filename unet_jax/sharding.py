"""The device mesh and how arrays are laid out on it.

The mesh has two axes, 'data' and 'fsdp' (config.mesh.data × config.mesh.fsdp devices). The
batch is split over both. Parameters and optimizer state are replicated over 'data' and, when
fsdp > 1, each large array is split over 'fsdp' along its largest divisible dim (ZeRO-3 style:
XLA gathers a layer's weights where they are used). One code path serves 1 device, 8 simulated
CPU devices and a multi-host TPU slice: each process hands over only its local slice of the batch.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(data: int = -1, fsdp: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; data=-1 takes every device left after fsdp (across processes).

  `devices` defaults to `jax.devices()`; ahead-of-time compilation passes a target's abstract
  devices (unet_jax/aot/targets.py).
  """
  devices = list(jax.devices() if devices is None else devices)
  available = len(devices)
  if fsdp < 1 or available % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} must be ≥ 1 and divide the {available} devices')
  data = available // fsdp if data == -1 else data
  if data < 1 or data * fsdp > available:
    raise ValueError(f'config.mesh.data={data} × config.mesh.fsdp={fsdp} needs {data * fsdp} '
                     f'devices but {available} are available (data=-1 uses all)')
  # jax.devices() lists each process's devices together, so 'fsdp' groups stay within a host
  # where possible and the all-gathers of fsdp use the fastest links.
  devices = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
  return Mesh(devices, (DATA_AXIS, FSDP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every device of the mesh; everything else whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def param_sharding(shape: tuple[int, ...], mesh: Mesh, *, min_size: int = 2**14
                   ) -> NamedSharding:
  """Replicated, or split over 'fsdp' along the largest dim it divides (arrays ≥ min_size).

  Small arrays (biases, norm scales, step counters) stay replicated: splitting them saves
  nothing and costs a collective each.
  """
  fsdp = mesh.shape[FSDP_AXIS]
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return replicated(mesh)
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """A sharding for every leaf of an abstract (jax.eval_shape) train state."""
  return jax.tree.map(lambda x: param_sharding(x.shape, mesh), abstract_state)


def process_count(devices: Mesh | Sequence[Any]) -> int:
  """How many processes (hosts) hold `devices` (a mesh's, or a list such as a target's)."""
  if isinstance(devices, Mesh):
    devices = devices.devices.flat
  return len({d.process_index for d in devices})


def on_cpu(mesh: Mesh) -> bool:
  """Whether every device of `mesh` is a CPU device (the host's own cores do the work)."""
  return {d.platform for d in mesh.devices.flat} == {'cpu'}


def check_batch_size(global_batch: int, mesh: Mesh, *, field: str) -> int:
  """Returns each process's share of `global_batch`, or a clear error naming `field`."""
  size = mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]
  if global_batch < 1 or global_batch % size:
    raise ValueError(f'{field}={global_batch} must be a positive multiple of the number of '
                     f'devices the batch is split over, {size} (mesh data × fsdp)')
  processes = process_count(mesh)
  if global_batch % processes:
    raise ValueError(f'{field}={global_batch} must be divisible by the number of processes '
                     f'{processes}')
  return global_batch // processes


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's local numpy batch into one globally sharded jax.Array tree."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# Every process passes the same barriers in the same order; the count keeps each one's key new.
_barriers = itertools.count()


def wait_for_all_processes(name: str, *, timeout_s: float = 1800.0) -> None:
  """Blocks until every process reaches the barrier `name`; no-op for one process.

  CPU collectives (gloo) give the processes of a new device group 30 s to meet at its first
  collective and then fail with "Gloo context initialization failed". Processes drift further
  apart than that when loading data or compiling takes them unequal time (a loaded host, a
  compilation cache hit on one of them). The coordination service's barrier waits as long as
  start-up may take, so processes meet here first and reach the collective together.
  """
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=f'unet_jax:{next(_barriers)}:{name}',
                                        timeout_ms=int(timeout_s * 1000))


def compile_then_wait(jitted: Callable, name: str) -> Callable:
  """`jitted`, whose first call, with more than one process, compiles ahead of time, waits for
  every process to finish compiling (`wait_for_all_processes`) and only then runs.

  Compile times that differ between processes (a compilation cache hit on one of them) then
  never count against the deadline of the device group's first collective: the train step's,
  or in `--mode=eval` the eval step's. Later calls, new argument shapes included, go straight
  to `jitted` (its cache holds the first compile): once the group has met, a process that is
  late at a collective is waited for.
  """
  if jax.process_count() == 1:
    return jitted
  waited = False

  def call(*args):
    nonlocal waited
    if not waited:
      jitted.lower(*args).compile()
      wait_for_all_processes(name)
      waited = True
    return jitted(*args)

  return call
