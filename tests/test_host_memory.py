"""host_memory.keep_freed_memory: XLA:CPU's temporary buffer stops being faulted in every call.

Each case runs in a fresh interpreter, since the setting must come before JAX starts its
threads and changes the allocator of the whole process. The program's temporary buffer is
192 MiB, far above what glibc serves from a thread's arena (64 MiB); the page-fault counts are the kernel's.
"""

import json
import subprocess
import sys

import pytest

_PROGRAM = r'''
import json, resource, sys
from unet_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else None
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  # Three 64 MiB intermediates that XLA cannot fuse away (each is read along both axes), so
  # they live in the execution's temporary buffer.
  a = jnp.sin(x) + 1.0
  b = jnp.cos(a.T) * x
  c = jnp.exp(b.T) - a
  return a.sum(0) + b.sum(1) + c.sum(0) + c.sum(1)

x = jnp.linspace(0.0, 1.0, 4096 * 4096, dtype=jnp.float32).reshape(4096, 4096)
late = host_memory.keep_freed_memory() if sys.argv[1] == 'late' else None
f(x).block_until_ready()
f(x).block_until_ready()
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'applied': applied, 'late': late, 'faults': faults,
                  'temp_bytes': f.lower(x).compile().memory_analysis().temp_size_in_bytes,
                  'value': float(out[0])}))
'''


def _run(mode: str) -> tuple[dict, str]:
  result = subprocess.run([sys.executable, '-c', _PROGRAM, mode], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator only')
def test_kept_memory_removes_the_per_call_page_faults_and_keeps_the_values():
  default, _ = _run('default')
  kept, _ = _run('keep')
  assert kept['applied'] is True
  page = 4096
  # glibc's default maps the temporary buffer anew on every call: at least one fault per page.
  assert default['temp_bytes'] > 64 * 2**20
  assert min(default['faults']) >= 0.9 * default['temp_bytes'] / page, default
  # Kept: freed pages are reused. The one heap still grows now and then while free blocks
  # settle around the other allocations, so some calls fault; most of the later ones do not.
  later = kept['faults'][10:]
  assert sum(f < 0.02 * kept['temp_bytes'] / page for f in later) >= 6, kept
  assert kept['value'] == default['value']


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator only')
def test_a_call_after_jax_started_changes_nothing_and_says_so():
  late, stderr = _run('late')
  assert late['late'] is False
  assert 'before the first JAX computation' in stderr
  assert min(late['faults']) >= 0.9 * late['temp_bytes'] / 4096, late
