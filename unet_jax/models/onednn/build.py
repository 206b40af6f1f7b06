"""Builds the oneDNN convolution extension (conv.cc) on first use and registers its FFI targets.

The shared library is compiled once per hash of (conv.cc, the build flags, the oneDNN version,
the compiler's version, the jax version) into a per-user cache:

  $UNET_JAX_CACHE_DIR/onednn/<hash>/    default: $XDG_CACHE_HOME/unet_jax, else ~/.cache/unet_jax
    libunet_jax_onednn.so, build.log

Builders take a file lock and the library is written under a temporary name and renamed into
place, so processes that start together build it once and never load a half-written file.

Needs the wheels `onednn-cpu-gomp` and `onednn-devel-cpu-gomp` (oneDNN with the OpenMP CPU
runtime; pinned in requirements.txt for Linux x86-64) and a C++17 compiler: $UNET_JAX_CXX,
else $CXX, else g++. When any of it is missing or the build fails, `load()` returns False after
one warning line that names what failed (and the build log), and callers keep the XLA path.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile

import jax

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'conv.cc')
LIBRARY = 'libunet_jax_onednn.so'
RUNTIME_WHEEL = 'onednn-cpu-gomp'
HEADERS_WHEEL = 'onednn-devel-cpu-gomp'
# FFI target name → the handler symbol conv.cc defines for it.
TARGETS = {
    'unet_jax_onednn_conv_forward': 'UnetJaxOnednnConvForward',
    'unet_jax_onednn_conv_forward_epilogue': 'UnetJaxOnednnConvForwardEpilogue',
    'unet_jax_onednn_conv_backward_data': 'UnetJaxOnednnConvBackwardData',
    'unet_jax_onednn_conv_backward_weights': 'UnetJaxOnednnConvBackwardWeights',
    'unet_jax_onednn_deconv_forward': 'UnetJaxOnednnDeconvForward',
    'unet_jax_onednn_deconv_backward_data': 'UnetJaxOnednnDeconvBackwardData',
    'unet_jax_onednn_deconv_backward_weights': 'UnetJaxOnednnDeconvBackwardWeights',
}
FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w')
# Seconds one compile may take (it takes ~10 s; a stuck compiler must not hang an import).
_COMPILE_TIMEOUT = 600

_log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
  """What is missing or failed, in one line."""


def cache_root() -> str:
  """The per-user directory the extension is built into."""
  explicit = os.environ.get('UNET_JAX_CACHE_DIR')
  if explicit:
    return os.path.join(explicit, 'onednn')
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'unet_jax', 'onednn')


def _wheel_file(wheel: str, suffix: str) -> str:
  """The installed file of `wheel` whose path ends with `suffix`."""
  try:
    dist = importlib.metadata.distribution(wheel)
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f'the wheel {wheel} is not installed') from None
  for file in dist.files or ():
    # RECORD paths are relative to site-packages ('../../libdnnl.so.3'): compare resolved ones.
    path = os.path.normpath(str(dist.locate_file(file)))
    if path.replace(os.sep, '/').endswith('/' + suffix):
      return path
  raise Unavailable(f'the wheel {wheel} has no {suffix}')


def onednn_paths() -> tuple[str, str, str]:
  """(include dir, directory of libdnnl.so.3, oneDNN wheel version) of the installed wheels."""
  header = _wheel_file(HEADERS_WHEEL, 'oneapi/dnnl/dnnl.hpp')
  library = _wheel_file(RUNTIME_WHEEL, 'libdnnl.so.3')
  include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
  return include, os.path.dirname(library), importlib.metadata.version(RUNTIME_WHEEL)


def compiler() -> tuple[str, str]:
  """(path, first line of --version) of the C++ compiler."""
  name = os.environ.get('UNET_JAX_CXX') or os.environ.get('CXX') or 'g++'
  path = shutil.which(name)
  if path is None:
    raise Unavailable(f'no C++ compiler {name!r} (set UNET_JAX_CXX or CXX)')
  try:
    version = subprocess.run([path, '--version'], capture_output=True, text=True, timeout=60,
                             check=True).stdout.splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError) as error:
    raise Unavailable(f'the C++ compiler {path} does not run: {error}') from None
  return path, version


def _command(cxx: str, include: str, lib_dir: str, output: str) -> list[str]:
  return [cxx, *FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{include}', SOURCE, '-o', output,
          f'-L{lib_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{lib_dir}']


def build() -> str:
  """The path of the built library, compiling it into the cache unless it is there already.

  Raises:
    Unavailable: the wheels or the compiler are missing, or the compile failed.
  """
  include, lib_dir, version = onednn_paths()
  cxx, cxx_version = compiler()
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join([source, ' '.join(FLAGS).encode(), version.encode(),
                                   cxx_version.encode(), jax.__version__.encode(),
                                   lib_dir.encode()])).hexdigest()[:16]
  directory = os.path.join(cache_root(), key)
  library = os.path.join(directory, LIBRARY)
  if os.path.exists(library):
    return library
  os.makedirs(directory, exist_ok=True)
  log = os.path.join(directory, 'build.log')
  with open(os.path.join(directory, 'lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
    if os.path.exists(library):
      return library
    handle, partial = tempfile.mkstemp(dir=directory, prefix='.building-', suffix='.so')
    os.close(handle)
    command = _command(cxx, include, lib_dir, partial)
    try:
      with open(log, 'w') as out:
        out.write(' '.join(command) + '\n')
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                timeout=_COMPILE_TIMEOUT, check=False)
      if result.returncode != 0:
        raise Unavailable(f'compiling {os.path.basename(SOURCE)} with {cxx} failed '
                          f'(exit {result.returncode}); build log: {log}')
      os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as error:
      raise Unavailable(f'compiling {os.path.basename(SOURCE)} with {cxx} failed ({error}); '
                        f'build log: {log}') from None
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  return library


def thread_count() -> int:
  """The OpenMP team size: OMP_NUM_THREADS if set, else the CPUs this process may run on
  (what XLA:CPU sizes its own thread pool by)."""
  explicit = os.environ.get('OMP_NUM_THREADS', '').split(',')[0]
  if explicit.isdigit() and int(explicit) > 0:
    return int(explicit)
  return len(os.sched_getaffinity(0))


def keep_awake_ms() -> float:
  """How long after each call the extension keeps the team's CPUs busy at the lowest priority
  (conv.cc, KeepAwake): $UNET_JAX_ONEDNN_KEEP_AWAKE_MS, else 1 ms; 0 turns it off.

  1 ms spans the gaps between the calls of a pass (XLA's own work between two convolutions)
  and ends soon after the pass; 2 and 5 ms were no better and cost the training step more.
  """
  value = os.environ.get('UNET_JAX_ONEDNN_KEEP_AWAKE_MS', '1')
  try:
    return max(float(value), 0.0)
  except ValueError:
    raise ValueError(f'UNET_JAX_ONEDNN_KEEP_AWAKE_MS={value!r}: expected milliseconds, e.g. 1 '
                     'or 0 (off)') from None


@functools.cache
def load() -> bool:
  """Builds (once per cache) and loads the extension and registers its FFI targets for CPU.

  Returns False, after one warning line, when it cannot; True when the targets are registered.
  """
  try:
    path = build()
    try:
      library = ctypes.CDLL(path)
    except OSError as error:
      raise Unavailable(f'loading {path} failed: {error}') from None
  except Unavailable as error:
    _log.warning('oneDNN convolutions unavailable, using the XLA path: %s', error)
    return False
  library.unet_jax_onednn_set_threads(ctypes.c_int(thread_count()))
  library.unet_jax_onednn_keep_awake(ctypes.c_double(keep_awake_ms()))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return True
