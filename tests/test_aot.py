"""Ahead-of-time compilation for TPU slices and NVIDIA GPUs on this CPU (requirements-aot.txt:
libtpu and the CUDA plugin's compile-only client).

The programs are compiled for real libtpu topologies and GPU target descriptions (abstract
devices, no accelerator present); the model's FLOP count is checked against hand-written
convolution arithmetic.
"""

import json
import os
import re
import subprocess
import sys


import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unet_jax.aot import programs
from unet_jax.aot import report
from unet_jax.aot import targets
from unet_jax.models import build_model
from unet_jax.models import fast_conv
from unet_jax.models import flops
from unet_jax.training import train_step

from experiments import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=900):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), '--mode=compile',
                         '--config=' + os.path.join(ROOT, 'experiments/quickstart.py:smoke'),
                         *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  """The launch's one `launch.py: error:` line, after checking it failed with status 1."""
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('launch.py: error:')]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def _unet_flops(*, width, depth, size, padding, in_channels=1, num_classes=2):
  """Multiply-adds ×2 of the U-Net's convolutions for one square image, written out by level."""
  trim = 2 if padding == 'VALID' else 0  # per 3×3 convolution
  total, channels, skips = 0, in_channels, []
  for level in range(depth + 1):
    features = width * 2**level
    for _ in range(2):
      size -= trim
      total += 2 * 9 * channels * features * size * size
      channels = features
    if level < depth:
      skips.append(features)
      size //= 2
  for level in reversed(range(depth)):
    features = width * 2**level
    size *= 2
    total += 2 * 4 * channels * features * (size // 2) ** 2  # 2×2 up-convolution per input pixel
    channels = 2 * features  # the cropped skip is concatenated
    for _ in range(2):
      size -= trim
      total += 2 * 9 * channels * features * size * size
      channels = features
  return total + 2 * channels * num_classes * size * size


@pytest.mark.parametrize('padding,size', [('SAME', 64), ('VALID', 92)])
def test_the_model_flop_count_is_the_convolution_arithmetic(padding, size):
  model_config = ml_collections.ConfigDict(dict(
      name='unet', width=8, depth=2, padding=padding, upsample='transpose', norm='none',
      activation='relu', dropout_rate=0.0, dtype='float32', remat='none', conv_impl='xla'))
  model = build_model(model_config, num_classes=2)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, size, size, 1)), train=False))
  counted = flops.forward_flops(model, variables, (3, size, size, 1))
  assert counted == 3 * _unet_flops(width=8, depth=2, size=size, padding=padding)


def test_auto_convolutions_follow_the_target_platform_not_the_host():
  assert fast_conv.impl_for_platforms('auto', ['tpu']) == 'xla'
  assert fast_conv.impl_for_platforms('auto', ['cpu', 'cuda']) == 'xla'
  # A CPU target never takes the host's oneDNN custom calls (see conv_impls.impl_for_platforms).
  assert fast_conv.impl_for_platforms('auto', ['cpu']) == 'portable'
  assert fast_conv.impl_for_platforms('fast', ['tpu']) == 'fast'  # an explicit choice stays
  config = quickstart.get_config('smoke')
  tpu = targets.tpu_target('v5e:2x2').devices
  assert train_step.build(config, input_channels=1, spatial_rank=2,
                          devices=tpu).model.conv_impl == 'xla'
  config.batch_size = 16
  assert train_step.build(config, input_channels=1, spatial_rank=2).model.conv_impl == 'auto'


def test_topologies_give_the_chips_and_hosts_of_the_slice():
  single = targets.tpu_target('v5e:2x4')
  assert (len(single.devices), single.num_processes, single.chip.name) == (8, 1, 'v5e')
  pod = targets.tpu_target('v5e:4x4')
  assert (len(pod.devices), pod.num_processes) == (16, 4)
  v4 = targets.tpu_target('v4:2x2x1')  # megacore: one device per chip
  assert (len(v4.devices), v4.devices[0].device_kind) == (4, 'TPU v4')
  two = targets.tpu_target('v5e:2x2', num_slices=2)
  assert (len(two.devices), len({d.slice_index for d in two.devices})) == (8, 2)
  for bad, says in [('v5e-16', 'GENERATION:AxB'), ('v9:2x2', "generation 'v9'"),
                    ('v5e:3x5', 'libtpu refused')]:
    with pytest.raises(targets.TargetError, match=says):
      targets.tpu_target(bad)


def test_compile_mode_reports_every_program_of_a_multi_host_slice(tmp_path):
  result = _launch('--topology=v5e:4x4', '--config.batch_size=32', '--config.eval_batch_size=16',
                   f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| train step | 2 |' in result.stdout and '| tiled prediction | 1 |' in result.stdout
  saved = json.loads((tmp_path / 'compile_v5e_4x4.json').read_text())
  assert (saved['devices'], saved['hosts'], saved['device_kind']) == (16, 4, 'TPU v5 lite')
  rows = {row['program']: row for row in saved['programs']}
  assert list(rows) == list(programs.PROGRAMS)
  chip = targets.CHIPS['TPU v5 lite']
  for row in rows.values():
    memory = row['memory']
    assert row['memory_total'] == (memory['arguments'] + memory['outputs'] + memory['temporaries']
                                   + memory['code'] - memory['aliased'])
    assert 0 < row['memory_total'] < chip.hbm_bytes
    assert row['seconds_bound'] == pytest.approx(max(
        row['xla_flops'] / chip.peak_bf16_flops, row['bytes_accessed'] / chip.hbm_bytes_per_second))
    assert row['examples_per_second_bound'] == pytest.approx(
        row['examples_per_chip'] / row['seconds_bound'])
    # XLA also counts element-wise work; the model counts convolutions only.
    assert row['model_flops'] <= row['xla_flops'] < 4 * row['model_flops'], row
  # The donated train state is reused in place; eval and prediction donate nothing.
  assert rows['train step']['memory']['aliased'] > 0
  assert rows['train step']['examples_per_chip'] == 2
  # The eval batch holds whole 64² procedural images; prediction, crop-sized tiles.
  assert rows['eval step']['model_flops'] == pytest.approx(
      1 * flops.forward_flops(*_smoke_model(64), (1, 64, 64, 1)))


def _smoke_model(size):
  config = quickstart.get_config('smoke')
  model = build_model(config.model, num_classes=2, platforms=['tpu'])
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, size, size, 1)), train=False))
  return model, variables


def test_a_program_that_does_not_fit_names_the_change_that_makes_it_fit(tmp_path):
  # The train step of 8 crops of 64² per chip plans about 37 MiB in float32 and 26 MiB in
  # bfloat16 (mostly code at this size); a 30.7 MiB budget takes the compiler's word for both.
  # (Filling a real 16 GiB chip takes shapes that compile for minutes here; the compiler's own
  # out-of-memory errors are read in the next test.)
  result = _launch('--topology=v5e:2x2', '--config.data.crop_size=64', '--config.batch_size=32',
                   '--memory_limit_gib=0.03', f'--workdir={tmp_path}')
  line = _one_error_line(result)
  assert 'the train step does not fit a TPU v5 lite of v5e:2x2' in line
  assert '--config.model.dtype=bfloat16 makes it fit' in line, line
  needed, limit, fitted = [float(x) for x in re.findall(r'([\d.]+) MiB', line)]
  assert fitted < limit < needed, line
  assert limit == pytest.approx(0.03 * 1024, abs=0.1)
  assert not list(tmp_path.glob('compile_*.json'))


def test_a_limit_no_change_can_meet_ends_after_compiling_the_strongest_changes(tmp_path):
  # 1 MiB per chip: not even the code of a train step fits, so the search must not compile its
  # 16 candidates one by one (7 minutes here) before saying so.
  result = _launch('--topology=v5e:2x2', '--config.data.crop_size=64', '--config.batch_size=32',
                   '--memory_limit_gib=0.001', f'--workdir={tmp_path}')
  line = _one_error_line(result)
  assert 'the train step does not fit a TPU v5 lite of v5e:2x2' in line, line
  # Batch 4 (the smallest that 4 chips take) does not combine with 32 micro-batches, so it is
  # tried alone after the combination of the others.
  assert ('does not fit even with --config.model.dtype=bfloat16 --config.model.remat=full '
          '--config.mesh.fsdp=4 --config.optimizer.grad_accum_steps=32, --config.batch_size=4: '
          'raise --memory_limit_gib, use a larger chip' in line), line
  tries = [x for x in result.stderr.splitlines() if 'train step: trying' in x]
  assert len(tries) == 2, tries


def test_out_of_memory_messages_of_libtpu_are_read():
  gib = 2**30
  for text, needed, available in [
      ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
       'temporaries (231.78G) exceeds available HBM (15.75G).', 231.78 * gib, 15.75 * gib),
      ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space '
       'hbm. Used 21.30G of 15.75G hbm. Exceeded hbm capacity by 5.55G.', 21.30 * gib,
       15.75 * gib)]:
    problem = programs._does_not_fit('train step', RuntimeError(text))  # pylint: disable=protected-access
    assert problem.needed == pytest.approx(needed) and problem.available == pytest.approx(available)
  assert programs._does_not_fit('x', RuntimeError('INVALID_ARGUMENT: bad')) is None  # pylint: disable=protected-access


def test_fit_candidates_are_single_changes_then_the_strongest_together():
  config = quickstart.get_config('smoke')
  config.batch_size = 16
  target = targets.tpu_target('v5e:2x2')
  found = [changes for changes, _ in report._candidates('train step', config, target, 2)]  # pylint: disable=protected-access
  singles = [c[0] for c in found if len(c) == 1]
  assert singles[:3] == [('model.dtype', 'bfloat16'), ('model.remat', 'conv'),
                         ('model.remat', 'full')]
  assert ('mesh.fsdp', 2) in singles and ('mesh.fsdp', 4) in singles
  assert ('optimizer.grad_accum_steps', 4) in singles
  # batch 16 on 4 chips halves to 8 and 4; 2 would not split over the chips and is skipped
  assert ('batch_size', 4) in singles and ('batch_size', 2) not in singles
  assert found[-1][:3] == [('model.dtype', 'bfloat16'), ('model.remat', 'full'), ('mesh.fsdp', 4)]
  assert all(len(c) > 1 for c in found[len(singles):])


def test_roofline_takes_the_slower_of_compute_and_memory():
  chip = targets.CHIPS['TPU v5 lite']
  memory = programs.MemoryUse(1, 1, 1, 1, 0)
  compute_bound = report.Row(programs.Compiled('p', 8, 2, memory, 197e12, 819e9 / 10, 1, 1), chip)
  assert compute_bound.seconds_bound == pytest.approx(1.0) and compute_bound.bound_by == 'compute'
  assert compute_bound.examples_per_second == pytest.approx(2.0)
  memory_bound = report.Row(programs.Compiled('p', 8, 2, memory, 1e12, 819e9 * 3, 1, 1), chip)
  assert memory_bound.seconds_bound == pytest.approx(3.0) and memory_bound.bound_by == 'memory'
  assert np.isclose(memory.total, 4)


def test_compile_mode_for_gpu_hosts_compiles_gpu_code_and_budgets_the_preallocated_share(
    tmp_path):
  gpus = targets.target('h100:2x4')
  assert (len(gpus.devices), gpus.num_processes, gpus.platform) == (8, 2, 'gpu')
  assert gpus.devices[0].device_kind == 'NVIDIA H100 80GB HBM3'
  assert gpus.memory_limit == pytest.approx(0.75 * 80e9)
  for bad in ('h100:0', 'b300:8', 'h100:8x'):
    with pytest.raises(targets.TargetError):
      targets.target(bad)
  with pytest.raises(targets.TargetError, match='slices are TPU only'):
    targets.target('a100:8', num_slices=2)

  result = _launch('--topology=a100:4', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((tmp_path / 'compile_a100_4.json').read_text())
  assert (saved['devices'], saved['device_kind']) == (4, 'NVIDIA A100-SXM4-80GB')
  chip = targets.GPUS['a100'].chip
  for row in saved['programs']:
    assert 0 < row['memory_total'] < chip.hbm_bytes
    # No XLA cost analysis for compile-only GPU programs: the bound is the model's FLOPs.
    assert row['bound_by'] == 'compute (model FLOP)'
    assert row['seconds_bound'] == pytest.approx(row['model_flops'] / chip.peak_bf16_flops)
  assert '| n/a |' in result.stdout  # XLA FLOP
  assert all(row['xla_flops'] is None for row in saved['programs'])
