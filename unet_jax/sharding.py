"""The device mesh and how arrays are laid out on it.

Data parallel: the batch is split over the mesh axis 'data', parameters and optimizer state are
replicated. One code path serves 1 device, 8 simulated CPU devices and a multi-host TPU slice:
each process hands over only its local slice of the batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1D 'data' mesh over `num_devices` devices (-1: all of them, across every process)."""
  available = jax.device_count()
  n = available if num_devices == -1 else num_devices
  if n < 1 or n > available:
    raise ValueError(f'config.mesh.num_devices={num_devices} but {available} devices are '
                     'available (-1 uses all)')
  return Mesh(np.asarray(jax.devices()[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over 'data'; everything else whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, *, field: str) -> int:
  """Returns this process's share of `global_batch`, or a clear error naming `field`."""
  data_size = mesh.shape[DATA_AXIS]
  if global_batch < 1 or global_batch % data_size:
    raise ValueError(f'{field}={global_batch} must be a positive multiple of the data-parallel '
                     f'size {data_size} (devices on the mesh axis {DATA_AXIS!r})')
  if global_batch % jax.process_count():
    raise ValueError(f'{field}={global_batch} must be divisible by the number of processes '
                     f'{jax.process_count()}')
  return global_batch // jax.process_count()


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's local numpy batch into one globally sharded jax.Array tree."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
