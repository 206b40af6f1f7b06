"""Test setup: 8 simulated CPU devices (set before jax is imported), a persistent compilation
cache for the session, and the shared data paths.

The suite runs on two workers (`python -m pytest -q -n 2 tests`, pytest-xdist); each worker
has its own module-scoped fixtures, so a module's trained run may be built by both.

The package is imported as installed (`pip install -e .`); `python -m pytest` from the checkout
also finds the configs in experiments/.
"""

import atexit
import os
import shutil
import tempfile

# LLVM level 1 instead of XLA's default 2: the suite compiles hundreds of small programs that
# then run for milliseconds, and level 2 spends most of their time optimising them. Launches
# outside the tests keep XLA's default.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent XLA cache for the session, inherited by every launcher the tests start: most
# of them run the same smoke programs, and compiling those again is most of a launch's time.
# The cache holds compiled programs only; every test still runs them.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='unet_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared data sits beside the checkout; the variables override where it is.
for _variable, _folder in [('UNET_JAX_ISBI_DIR', 'isbi2012'),
                           ('UNET_JAX_NUCLEI_DIR', 'dsb2018_stardist_sample')]:
  _default = os.path.join(ROOT, '..', 'shared', 'data', _folder)
  if _variable not in os.environ and os.path.isdir(_default):
    os.environ[_variable] = os.path.abspath(_default)

import pytest  # pylint: disable=g-import-not-at-top


def _shared_dir(variable: str) -> str:
  path = os.environ.get(variable)
  if not path:
    if os.environ.get('CI'):
      pytest.fail(f'{variable} is not set; .ci/run must point it at ../shared/data')
    pytest.skip(f'{variable} is not set')
  if not os.path.isdir(path):
    pytest.fail(f'{variable}={path} is not a directory')
  return path


@pytest.fixture
def isbi_dir() -> str:
  """The real ISBI 2012 stacks (../shared/data/isbi2012, set by .ci/run)."""
  return _shared_dir('UNET_JAX_ISBI_DIR')


@pytest.fixture
def nuclei_dir() -> str:
  """The real DSB2018 nuclei sample (../shared/data/dsb2018_stardist_sample)."""
  return _shared_dir('UNET_JAX_NUCLEI_DIR')


@pytest.fixture(scope='session')
def gcs_emulator():
  """A real GCS emulator (fake-gcs-server) on 127.0.0.1 for the whole session; every storage
  client of this process and of the launchers it starts is pointed at it (gcs_emulator.py)."""
  import gcs_emulator as emulator_lib  # pylint: disable=g-import-not-at-top  (tests/ helper)
  emulator = emulator_lib.Emulator()
  os.environ.update(emulator_lib.client_environment(emulator.url))
  yield emulator
  emulator.stop()


@pytest.fixture
def bucket(gcs_emulator) -> str:
  """gs:// URL of a new, empty bucket in the emulator."""
  return f'gs://{gcs_emulator.create_bucket()}'


@pytest.fixture(params=['local', 'gcs'])
def storage_root(request, tmp_path) -> str:
  """Where a test's runs go: a local folder, then an emulator bucket (gs://...)."""
  if request.param == 'local':
    return str(tmp_path)
  return request.getfixturevalue('bucket')
