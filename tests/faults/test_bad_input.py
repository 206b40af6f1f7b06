"""Bad input and silent wrong answers: one-line errors, damaged files, divergence, logs of a
resumed run, and what a run says about itself."""

import json
import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from experiments import quickstart
from unet_jax.datasets import images as image_files
from unet_jax.datasets import loaders
from unet_jax.datasets.dataset import DataError
from unet_jax.inference import predict
from unet_jax.training import loop
from unet_jax.training import metric_writers
from unet_jax.training import plots

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = ['--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke']


def _launch(*args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *SMOKE, *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('bad_input') / 'run'
  config = quickstart.get_config('smoke')
  loop.train_and_evaluate(config, str(workdir))
  return workdir


# ------------------------------------------------------------------------ one-line errors

def _one_line(process, status):
  lines = [line for line in process.stderr.splitlines() if line.strip()]
  assert process.returncode == status, process.stderr[-3000:]
  assert 'Traceback' not in process.stderr, process.stderr[-3000:]
  errors = [line for line in lines if line.startswith('launch.py: error: ')]
  assert len(errors) == 1, lines[-10:]
  return errors[0]


def _data_error_folder(root):
  for folder in ('images', 'masks'):
    (root / folder).mkdir(parents=True)
  for name in ('a', 'b'):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'images' / f'{name}.png')
    shape = (8, 6) if name == 'a' else (8, 8)  # a mask that does not fit its image
    Image.fromarray(np.zeros(shape, np.uint8)).save(root / 'masks' / f'{name}.png')
  return ['--config.data.source=folder', f'--config.data.images_dir={root / "images"}',
          f'--config.data.masks_dir={root / "masks"}', '--config.data.val_indices=(1,)']


@pytest.fixture(scope='module')
def launched(trained_workdir, tmp_path_factory):
  """Every bad launch of the table below, run side by side: name → finished process."""
  root = tmp_path_factory.mktemp('launches')
  (root / 'file').write_text('x')
  cases = {
      'checkpoint': ['--mode=eval', '--checkpoint=foo'],
      'split': ['--mode=eval', '--split=test'],
      'tile_size': ['--mode=predict', '--tile_size=abc', '--input=x.png', '--output=o'],
      'output': ['--mode=predict', '--input=x.png'],
      'resume': ['--config.model.width=8'],
      'eval_config': ['--mode=eval', '--config.model.width=8'],
  }
  commands = {name: [f'--workdir={trained_workdir}', *args] for name, args in cases.items()}
  commands['file'] = [f'--workdir={root / "file"}']
  commands['data'] = [f'--workdir={root / "run"}', *_data_error_folder(root / 'data')]
  processes = {name: subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), *SMOKE, *args], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
  results = {}
  for name, process in processes.items():
    out, err = process.communicate(timeout=900)
    results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
  return results, root


@pytest.mark.parametrize('name,status,expected', [
    ('checkpoint', 1, "--checkpoint='foo' is not one of"),
    ('split', 1, "--split='test' is not one of"),
    ('tile_size', 2, "--tile_size='abc' is not an int"),
    ('output', 2, '--mode=predict needs --output'),
    ('resume', 1, 'holds a run with another config (model.width: 4 → 8)'),
    ('eval_config', 1, 'the config differs from the one'),
    ('file', 1, 'is a file, not a directory'),
    ('data', 1, 'has shape (8, 6) but image file'),
])
def test_flag_run_and_data_errors_are_one_line(launched, name, status, expected):
  processes, root = launched
  error = _one_line(processes[name], status)
  assert expected in error, error
  if name == 'data':
    assert str(root / 'data' / 'masks' / 'a.png') in error  # the file is named


# ------------------------------------------------------------------------ damaged files

def test_a_truncated_multipage_tiff_is_refused_not_read_as_one_slice(tmp_path, trained_workdir):
  stack = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
  tifffile.imwrite(tmp_path / 'stack.tif', stack, photometric='minisblack')
  data = (tmp_path / 'stack.tif').read_bytes()
  # Cut inside the last pages (tifffile logs it and returns the first ones) and inside the
  # first (tifffile raises): both are refused.
  for name, size in [('cut.tif', len(data) * 3 // 4), ('short.tif', len(data) // 3)]:
    (tmp_path / name).write_bytes(data[:size])
    with pytest.raises(DataError, match=f'{name} is not a readable TIFF'):
      image_files.read_image(str(tmp_path / name))
  config = quickstart.get_config('smoke')
  summary = predict.run(config, str(trained_workdir), str(tmp_path), str(tmp_path / 'out'),
                        checkpoint='latest', progress=False, write_overlays=False)
  assert summary.predicted == 1  # stack.tif
  assert sorted(os.path.basename(p) for p, _ in summary.failed) == ['cut.tif', 'short.tif']


def _png_header_only(path, width, height):
  """A valid PNG signature and IHDR that claim width × height pixels, and almost no data."""
  def chunk(kind, payload):
    return (struct.pack('>I', len(payload)) + kind + payload
            + struct.pack('>I', zlib.crc32(kind + payload) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
                   + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def test_a_decompression_bomb_png_is_refused_before_decoding(tmp_path):
  _png_header_only(tmp_path / 'bomb.png', 12_000, 12_000)
  assert (tmp_path / 'bomb.png').stat().st_size < 300
  with pytest.raises(DataError, match=r'claims 12000×12000 = 144,000,000 pixels'):
    image_files.read_image(str(tmp_path / 'bomb.png'), max_pixels=10_000_000)


def test_grayscale_rgba_pngs_train_as_one_channel(tmp_path):
  for folder in ('images', 'masks'):
    (tmp_path / folder).mkdir()
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
  for i, g in enumerate(gray):
    rgba = np.stack([g, g, g, np.full_like(g, 255)], -1)
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'images' / f'{i}.png')
    Image.fromarray((g > 127).astype(np.uint8)).save(tmp_path / 'masks' / f'{i}.png')
  data = loaders.load_folder(str(tmp_path / 'images'), str(tmp_path / 'masks'), num_classes=2)
  assert data.images.shape == (2, 16, 16, 1)
  np.testing.assert_array_equal(data.images[..., 0], gray)


# ------------------------------------------------------------------------ divergence

def test_a_huge_learning_rate_is_reported_as_divergence(tmp_path):
  error = _one_line(_launch(f'--workdir={tmp_path}', '--config.optimizer.name=adam',
                            '--config.optimizer.learning_rate=10000.0',
                            '--config.optimizer.warmup_steps=0', '--config.num_steps=8',
                            '--config.log_every=1', '--config.eval_every=8'), 1)
  assert 'the run diverged: the loss is' in error and 'lower config.optimizer.learning_rate' \
      in error


def test_divergence_policy_warn_only_warns_and_a_collapse_is_named(caplog):
  config = quickstart.get_config('smoke')
  config.divergence.policy = 'warn'
  detector = loop._Divergence(config, None)  # pylint: disable=protected-access
  detector.first_step(1.2)
  with caplog.at_level(logging.WARNING, logger='unet_jax'):
    detector.check_loss(5, 11.0)  # under 10 × 1.2: nothing
    assert not caplog.records
    detector.check_loss(6, 13.0)
    detector.check_scores(6, {'recall_interior': 1.0, 'recall_membrane': 0.0})
  assert 'the run diverged: the loss is 13 at step 6' in caplog.records[0].getMessage()
  assert "every validation pixel as 'interior' at step 6" in caplog.records[1].getMessage()
  config.divergence.policy = 'halt'
  halting = loop._Divergence(config, detector.record())  # pylint: disable=protected-access
  assert halting.reference == 1.2  # carried by the checkpoint across a resume
  with pytest.raises(loop.DivergenceError, match='at step 7'):
    halting.check_loss(7, 100.0)


# ------------------------------------------------------------------------ logs of a resumed run

def test_curves_take_the_last_record_of_a_redone_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  records = [{'step': s, 'time': 0, 'train/loss': 1.0 / s} for s in (1, 2, 3, 4)]
  records += [{'step': s, 'time': 1, 'train/loss': 5.0 + s} for s in (3, 4, 5)]  # resumed at 2
  records.append({'step': 4, 'time': 1, 'val/dice_membrane': 0.5})
  path.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"step": 6, "tr')
  latest = metric_writers.latest_per_step(metric_writers.read_jsonl(str(path)))
  losses = [(r['step'], r['train/loss']) for r in latest if 'train/loss' in r]
  assert losses == [(1, 1.0), (2, 0.5), (3, 8.0), (4, 9.0), (5, 10.0)]
  series = plots._series(latest)  # pylint: disable=protected-access
  steps = series['train/loss'][0]
  assert list(steps) == sorted(steps)  # no loop back in loss.png
  assert plots.plot_curves(str(path), str(tmp_path / 'plots'))


# A plugin that fails to start, logged as jax._src.xla_bridge logs it, through launch.py's filter.
_PLUGIN_ERROR_LOGGED = """
import logging, sys
import launch
logging.getLogger(launch.PLUGIN_LOGGER).addFilter(launch._PluginErrorInOneLine())
log = logging.getLogger(launch.PLUGIN_LOGGER)
try:
  try:
    raise RuntimeError('cuDNN not found.')
  except RuntimeError as e:
    raise RuntimeError('Unable to load cuDNN. Is it installed?') from e
except RuntimeError:
  log.exception('Jax plugin configuration error: Exception when calling %s.initialize()',
                'jax_plugins.xla_cuda13')
try:
  raise KeyError('other')
except KeyError:
  log.exception('something else failed')
"""


def test_a_plugin_that_fails_to_start_is_one_line_and_other_errors_keep_their_traceback():
  result = subprocess.run([sys.executable, '-c', _PLUGIN_ERROR_LOGGED], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stderr.splitlines()
  assert lines[0] == ('Jax plugin configuration error: Exception when calling '
                      'jax_plugins.xla_cuda13.initialize(): Unable to load cuDNN. Is it installed?')
  assert lines[1] == 'something else failed'
  assert lines[2].startswith('Traceback'), result.stderr
  assert "KeyError: 'other'" in result.stderr
  assert 'cuDNN not found' not in result.stderr  # the chained cause went with the traceback
  # The filter matches what this JAX logs, and where.
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  source = open(xla_bridge.__file__).read()
  assert xla_bridge.logger.name == 'jax._src.xla_bridge'
  assert 'logger.exception("Jax plugin configuration error: Exception when "' in source
