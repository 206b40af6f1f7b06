"""What a program is compiled for without the hardware: a TPU slice's abstract devices and chip.

`tpu_target('v5e:4x4', num_slices=1)` asks libtpu (`pip install "jax[tpu]==0.10.2"`) for the
slice's topology; its devices have the platform, kind and process (host) of the real ones, so
`jax.jit(...).lower(...).compile()` on a mesh of them builds exactly the SPMD program every host
of the slice would run. The host's own backend stays CPU (launch.py sets `JAX_PLATFORMS=cpu`
and `TPU_SKIP_MDS_QUERY=1` before jax starts).

`gpu_target('h100:8')` does the same for NVIDIA GPUs through the CUDA plugin's compile-only
client (`pip install -r requirements-aot.txt`: jax-cuda13-plugin, ptxas and libdevice, no CUDA
driver): GPUS describes each GPU to XLA (a GpuTargetConfigProto written from the published
properties of its compute capability), and the programs compile to real GPU code. XLA's cost
analysis is not implemented for such compile-only GPU executables, and nothing is autotuned.

CHIPS holds the published peak figures the roofline bound uses, one row per JAX device kind, with
where each figure comes from. HBM is the capacity per device as published; the usable part is a
little less, which the TPU compiler itself enforces. A GPU's compiler enforces nothing, and JAX
preallocates 75% of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION), so that share is a GPU
program's budget.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from jax.experimental import topologies

from unet_jax import sharding

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published peak figures of one JAX device."""

  name: str  # what the topology names call it, e.g. 'v5e'
  hbm_bytes: int
  peak_bf16_flops: float  # per second, dense
  hbm_bytes_per_second: float
  source: str


# Keyed by `device.device_kind`. TPU v3 presents each of a chip's two TensorCores as a device, so
# its row is half a chip; v4 and v5p are compiled as megacore (one device per chip), as their
# runtime presents them.
CHIPS: dict[str, Chip] = {
    'TPU v3': Chip('v3', 16 * GIB, 123e12 / 2, 900e9 / 2,
                   'https://cloud.google.com/tpu/docs/v3 (per chip: 123 TFLOP/s bf16, '
                   '32 GiB, 900 GB/s; two devices per chip)'),
    'TPU v4': Chip('v4', 32 * GIB, 275e12, 1200e9,
                   'https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB, 1200 GB/s)'),
    'TPU v5 lite': Chip('v5e', 16 * GIB, 197e12, 819e9,
                        'https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB, '
                        '819 GB/s)'),
    'TPU v5': Chip('v5p', 95 * GIB, 459e12, 2765e9,
                   'https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB, 2765 GB/s)'),
    'TPU v6 lite': Chip('v6e', 32 * GIB, 918e12, 1638e9,
                        'https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB, '
                        '1638 GB/s)'),
}
TPU_GENERATIONS = tuple(chip.name for chip in CHIPS.values())


@dataclasses.dataclass(frozen=True)
class Gpu:
  """What XLA needs to know of an NVIDIA GPU to compile for it, and its peak figures."""

  device_kind: str
  compute_capability: tuple[int, int]
  arch_specific: bool  # sm_90a: Hopper's wgmma/TMA instructions
  sm_count: int
  fp32_lanes_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  l2_cache_bytes: int
  boost_clock_ghz: float
  chip: Chip


_SOURCES = ('NVIDIA CUDA C++ Programming Guide, "Compute Capabilities" (shared memory, threads, '
            'registers per SM); ')
GPUS: dict[str, Gpu] = {
    'a100': Gpu('NVIDIA A100-SXM4-80GB', (8, 0), False, 108, 64, 164 * 1024, 163 * 1024,
                40 * 2**20, 1.41,
                Chip('a100', 80 * 10**9, 312e12, 2039e9, _SOURCES + 'NVIDIA A100 datasheet '
                     '(SXM4 80GB: 312 TFLOP/s dense bf16, 80 GB HBM2e, 2039 GB/s)')),
    'h100': Gpu('NVIDIA H100 80GB HBM3', (9, 0), True, 132, 128, 228 * 1024, 227 * 1024,
                50 * 2**20, 1.98,
                Chip('h100', 80 * 10**9, 989e12, 3350e9, _SOURCES + 'NVIDIA H100 datasheet '
                     '(SXM5: 989 TFLOP/s dense bf16, 80 GB HBM3, 3.35 TB/s)')),
    'h200': Gpu('NVIDIA H200', (9, 0), True, 132, 128, 228 * 1024, 227 * 1024, 50 * 2**20, 1.98,
                Chip('h200', 141 * 10**9, 989e12, 4800e9, _SOURCES + 'NVIDIA H200 datasheet '
                     '(SXM: 989 TFLOP/s dense bf16, 141 GB HBM3e, 4.8 TB/s)')),
}
# The cuDNN the CUDA plugin of this JAX requires (jax-cuda13-plugin 0.10.2: cudnn ≥ 9.12).
_CUDNN = (9, 12, 0)
GPU_MEMORY_FRACTION = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION


def gpu_target_config(gpu: Gpu) -> str:
  """The GpuTargetConfigProto (text format) that describes `gpu` to XLA's GPU compiler."""
  major, minor = gpu.compute_capability
  extension = 'ACCELERATED_FEATURES' if gpu.arch_specific else 'NONE'
  info = {
      'threads_per_block_limit': 1024, 'threads_per_warp': 32, 'shared_memory_per_block': 48 * 1024,
      'shared_memory_per_core': gpu.shared_memory_per_sm, 'threads_per_core_limit': 2048,
      'core_count': gpu.sm_count, 'fpus_per_core': gpu.fp32_lanes_per_sm,
      'block_dim_limit_x': 2**31 - 1, 'block_dim_limit_y': 65535, 'block_dim_limit_z': 65535,
      'memory_bandwidth': int(gpu.chip.hbm_bytes_per_second), 'l2_cache_size': gpu.l2_cache_bytes,
      'clock_rate_ghz': gpu.boost_clock_ghz, 'device_memory_size': gpu.chip.hbm_bytes,
      'shared_memory_per_block_optin': gpu.shared_memory_per_block_optin,
      'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536,
      'thread_dim_limit_x': 1024, 'thread_dim_limit_y': 1024, 'thread_dim_limit_z': 64,
  }
  lines = ['gpu_device_info {', *(f'  {k}: {v}' for k, v in info.items()),
           f'  cuda_compute_capability {{ major: {major} minor: {minor} '
           f'feature_extension: {extension} }}', f'  name: "{gpu.device_kind}"', '}',
           'platform_name: "CUDA"',
           'dnn_version_info {{ major: {} minor: {} patch: {} }}'.format(*_CUDNN),
           f'device_description_str: "{gpu.device_kind}"']
  return '\n'.join(lines) + '\n'

# Generations whose hosts hold up to 8 chips in one 2×4 board; libtpu's default host shape is
# 2×2, so small slices of these are named as the single host they are.
_EIGHT_CHIP_HOSTS = ('v5e', 'v6e')
_MEGACORE = ('v4',)


class TargetError(ValueError):
  """A --topology that names no slice or GPU host this JAX can compile for, or its plugin
  missing."""


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices of a slice (or several), their chip, and how many hosts run them."""

  name: str
  devices: tuple[Any, ...]
  chip: Chip

  @property
  def platform(self) -> str:
    return self.devices[0].platform

  @property
  def memory_limit(self) -> float | None:
    """Bytes a program may use per device when the compiler does not enforce it (GPUs)."""
    return None if self.platform == 'tpu' else GPU_MEMORY_FRACTION * self.chip.hbm_bytes

  @property
  def num_processes(self) -> int:
    return sharding.process_count(self.devices)

  def describe(self) -> str:
    hosts = self.num_processes
    return (f'{self.name}: {len(self.devices)} × {self.devices[0].device_kind} '
            f'({self.chip.hbm_bytes / GIB:.0f} GiB HBM each) on {hosts} host'
            f'{"s" if hosts > 1 else ""}')


def target(topology: str, *, num_slices: int = 1) -> Target:
  """A TPU slice ('v5e:4x4') or GPU hosts ('h100:8', 'a100:2x8'): see tpu_target, gpu_target."""
  if topology.split(':')[0].strip() in GPUS:
    if num_slices != 1:
      raise TargetError(f'--num_slices={num_slices}: slices are TPU only; name GPU hosts as '
                        'GPU:HOSTSxPER_HOST, e.g. h100:2x8')
    return gpu_target(topology)
  return tpu_target(topology, num_slices=num_slices)


def _parse(topology: str) -> tuple[str, tuple[int, ...]]:
  match = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+){1,2})', topology.strip())
  if not match:
    raise TargetError(f'--topology={topology!r} is not GENERATION:AxB[xC], e.g. v5e:4x4 or '
                      f'v4:2x2x2 (generations: {", ".join(TPU_GENERATIONS)})')
  generation, bounds = match.group(1), tuple(int(b) for b in match.group(2).split('x'))
  if generation not in TPU_GENERATIONS:
    raise TargetError(f'--topology={topology!r}: generation {generation!r} is not one of '
                      f'{", ".join(TPU_GENERATIONS)} (the chips with published figures in '
                      'unet_jax/aot/targets.py CHIPS)')
  return generation, bounds


def tpu_target(topology: str, *, num_slices: int = 1) -> Target:
  """The abstract devices of `num_slices` TPU slices of `topology` (e.g. 'v5e:4x4').

  Raises:
    TargetError: for a name libtpu does not know, a bad slice count, or no libtpu installed.
  """
  generation, bounds = _parse(topology)
  if num_slices < 1:
    raise TargetError(f'--num_slices={num_slices} must be ≥ 1')
  kwargs: dict[str, Any] = {}
  if generation in _EIGHT_CHIP_HOSTS and math.prod(bounds) <= 8:
    kwargs['chips_per_host_bounds'] = (*bounds, 1)[:3]
  if generation in _MEGACORE:
    kwargs['chip_config_name'] = 'megacore'
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  if importlib.util.find_spec('libtpu') is None:
    raise TargetError('compiling for a TPU needs libtpu on this machine: pip install '
                      '-r requirements-tpu.txt (jax[tpu], about 700 MB)')
  # No TPU is opened, so the lock libtpu takes on a TPU VM's chips is not needed: without this a
  # second compile (or a test process and its launcher) is refused while one runs. Nor is the
  # GCE metadata server, which libtpu would otherwise query off Google Cloud.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  try:
    devices = topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                           **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu's own error types)
    text = ' '.join(str(e).split())
    raise TargetError(f'--topology={topology!r}: libtpu refused it: {text[:300]}') from None
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise TargetError(f'--topology={topology!r} gives {kind!r} devices, which have no row in '
                      'unet_jax/aot/targets.py CHIPS')
  name = topology if num_slices == 1 else f'{num_slices}×{topology}'
  return Target(name, tuple(devices), CHIPS[kind])


def gpu_target(topology: str) -> Target:
  """The compile-only devices of `topology` = 'GPU:N' (one host with N GPUs) or
  'GPU:HOSTSxN', e.g. 'h100:8', 'a100:2x8'.

  Raises:
    TargetError: for an unknown GPU, a malformed count, or no CUDA plugin installed.
  """
  match = re.fullmatch(r'(\w+):(?:(\d+)x)?(\d+)', topology.strip())
  if not match or match.group(1) not in GPUS:
    raise TargetError(f'--topology={topology!r} is not GPU:N or GPU:HOSTSxN with GPU one of '
                      f'{", ".join(GPUS)} (e.g. h100:8)')
  gpu = GPUS[match.group(1)]
  hosts, per_host = int(match.group(2) or 1), int(match.group(3))
  if hosts < 1 or per_host < 1:
    raise TargetError(f'--topology={topology!r}: hosts and GPUs per host must be ≥ 1')
  if importlib.util.find_spec('jax_plugins.xla_cuda13') is None:
    raise TargetError('compiling for a GPU needs the CUDA plugin (no GPU or driver): pip install '
                      '-r requirements-aot.txt')
  try:
    devices = topologies.get_topology_desc(platform='cuda', target_config=gpu_target_config(gpu),
                                           topology=f'1x{hosts}x{per_host}').devices
  except Exception as e:  # pylint: disable=broad-except  (the plugin's own error types)
    raise TargetError(f'--topology={topology!r}: the CUDA plugin refused it: '
                      f'{" ".join(str(e).split())[:300]}') from None
  return Target(topology, tuple(devices), gpu.chip)
