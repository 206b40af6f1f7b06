"""Tests for the data preparation scripts data/isbi2012.py and data/procedural.py."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from types import ModuleType

import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_jax.datasets.procedural import make_em_like

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / 'data'


def _load(name: str) -> ModuleType:
  # data/ holds scripts, not a package; a name of its own keeps data/procedural.py apart from
  # unet_jax.procedural.
  spec = importlib.util.spec_from_file_location(f'data_script_{name}', DATA / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


isbi = _load('isbi2012')
procedural_cli = _load('procedural')


def _volume(depth: int = 3, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (depth, size, size), dtype=np.uint8)
  labels = np.where(rng.random((depth, size, size)) < 0.2, 0, 255).astype(np.uint8)
  return images, labels


def _write_pair(directory: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  tifffile.imwrite(directory / 'train-volume.tif', images, photometric='minisblack')
  tifffile.imwrite(directory / 'train-labels.tif', labels, photometric='minisblack')


def _write_slices(directory: pathlib.Path, stack: np.ndarray, suffix: str = '.png') -> None:
  directory.mkdir(parents=True, exist_ok=True)
  for index, page in enumerate(stack):
    if suffix == '.png':
      Image.fromarray(page).save(directory / f'{index}.png')
    else:
      tifffile.imwrite(directory / f'{index}{suffix}', page)


# ----------------------------------------------------------------------------------------------
# isbi2012.py stack


def test_stack_round_trip_in_numeric_order(tmp_path, capsys):
  # 12 slices, so that a lexical sort would put 10.png and 11.png before 2.png.
  images, labels = _volume(depth=12)
  test_images, _ = _volume(depth=12, seed=1)
  _write_slices(tmp_path / 'img', images)
  _write_slices(tmp_path / 'lbl', labels)
  _write_slices(tmp_path / 'test', test_images, suffix='.tif')
  (tmp_path / 'img' / 'notes.txt').write_text('not a slice')
  out = tmp_path / 'out'
  rc = isbi.main(['stack', '--images', str(tmp_path / 'img'), '--labels', str(tmp_path / 'lbl'),
                  '--test', str(tmp_path / 'test'), '--out', str(out)])
  assert rc == 0
  np.testing.assert_array_equal(tifffile.imread(out / 'train-volume.tif'), images)
  np.testing.assert_array_equal(tifffile.imread(out / 'train-labels.tif'), labels)
  np.testing.assert_array_equal(tifffile.imread(out / 'test-volume.tif'), test_images)
  with Image.open(out / 'train-volume.tif') as stacked:
    assert stacked.n_frames == 12
  assert 'train-volume.tif' in capsys.readouterr().out
  assert isbi.main(['verify', str(out)]) == 0


def test_stack_test_volume_alone(tmp_path):
  test_images, _ = _volume(depth=4)
  _write_slices(tmp_path / 'test', test_images)
  assert isbi.main(['stack', '--test', str(tmp_path / 'test'), '--out', str(tmp_path)]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'test-volume.tif'), test_images)
  assert not (tmp_path / 'train-volume.tif').exists()


def test_stack_rejects_bad_label_values(tmp_path, capsys):
  images, labels = _volume()
  labels[0, 0, 0] = 1
  _write_slices(tmp_path / 'img', images)
  _write_slices(tmp_path / 'lbl', labels)
  rc = isbi.main(['stack', '--images', str(tmp_path / 'img'), '--labels', str(tmp_path / 'lbl'),
                  '--out', str(tmp_path / 'out')])
  assert rc == 1
  assert 'label values [1]' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_stack_rejects_duplicate_indices(tmp_path, capsys):
  images, labels = _volume()
  _write_slices(tmp_path / 'img', images)
  tifffile.imwrite(tmp_path / 'img' / '0.tif', images[0])
  _write_slices(tmp_path / 'lbl', labels)
  rc = isbi.main(['stack', '--images', str(tmp_path / 'img'), '--labels', str(tmp_path / 'lbl'),
                  '--out', str(tmp_path / 'out')])
  assert rc == 1
  assert 'slice 0' in capsys.readouterr().err


def test_stack_needs_labels_with_images(tmp_path, capsys):
  images, _ = _volume()
  _write_slices(tmp_path / 'img', images)
  rc = isbi.main(['stack', '--images', str(tmp_path / 'img'), '--out', str(tmp_path / 'out')])
  assert rc == 1
  assert '--labels' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# isbi2012.py verify


def test_verify_accepts_a_correct_pair(tmp_path, capsys):
  images, labels = _volume()
  _write_pair(tmp_path, images, labels)
  assert isbi.main(['verify', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert out.rstrip().endswith('OK')
  # Tiny stacks are reported, not refused; so is the digest mismatch of a re-encoded file.
  assert 'WARNING: train-volume.tif: shape (3, 16, 16)' in out
  assert 'sha256 differs' in out
  assert 'test-volume.tif: absent (optional)' in out


@pytest.mark.parametrize('name', ['train-volume.tif', 'train-labels.tif'])
def test_verify_fails_on_wrong_dtype(tmp_path, capsys, name):
  images, labels = _volume()
  _write_pair(tmp_path, images, labels)
  tifffile.imwrite(tmp_path / name, images.astype(np.uint16) * 3, photometric='minisblack')
  assert isbi.main(['verify', str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert f'ERROR: {name}: expected dtype uint8, got uint16' in err


def test_verify_fails_on_label_values(tmp_path, capsys):
  images, labels = _volume()
  labels[1, 2, 3] = 128
  _write_pair(tmp_path, images, labels)
  assert isbi.main(['verify', str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert 'ERROR: train-labels.tif: label values [128]' in err


@pytest.mark.parametrize('name', ['train-volume.tif', 'train-labels.tif'])
def test_verify_fails_on_missing_file(tmp_path, capsys, name):
  images, labels = _volume()
  _write_pair(tmp_path, images, labels)
  (tmp_path / name).unlink()
  assert isbi.main(['verify', str(tmp_path)]) == 1
  assert f'ERROR: {name}: missing' in capsys.readouterr().err


def test_verify_fails_on_mismatched_shapes(tmp_path, capsys):
  images, labels = _volume()
  _write_pair(tmp_path, images, labels[:2])
  assert isbi.main(['verify', str(tmp_path)]) == 1
  assert 'ERROR: train-labels.tif: shape (2, 16, 16) differs' in capsys.readouterr().err


def test_verify_fails_on_a_single_page(tmp_path, capsys):
  images, labels = _volume()
  _write_pair(tmp_path, images, labels)
  tifffile.imwrite(tmp_path / 'test-volume.tif', images[0])
  assert isbi.main(['verify', str(tmp_path)]) == 1
  assert 'ERROR: test-volume.tif: expected a (Z, H, W) stack' in capsys.readouterr().err


def test_verify_warns_about_inverted_labels(tmp_path, capsys):
  images, labels = make_em_like(2, 64, seed=0)
  _write_pair(tmp_path, images, 255 - labels)
  assert isbi.main(['verify', str(tmp_path)]) == 0
  assert 'may be inverted' in capsys.readouterr().out


def test_verify_command_line_exit_code(tmp_path):
  images, labels = _volume()
  labels[0, 0, 0] = 7
  _write_pair(tmp_path, images, labels)
  result = subprocess.run([sys.executable, str(DATA / 'isbi2012.py'), 'verify', str(tmp_path)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert 'train-labels.tif' in result.stderr


def test_verify_real_isbi_digests(isbi_dir, capsys):
  # isbi_dir (tests/conftest.py) reads UNET_JAX_ISBI_DIR and skips when it is unset.
  assert isbi.main(['verify', isbi_dir]) == 0
  out = capsys.readouterr().out
  for name, digest in isbi.KNOWN_SHA256.items():
    assert f'{name}: sha256 OK ({digest})' in out
  assert 'WARNING' not in out
  assert 'membrane (label 0) fraction: 0.2196' in out


def test_stack_reproduces_the_known_digests(isbi_dir, tmp_path):
  # Splitting the real stacks into PNG slices and stacking them again gives the same bytes,
  # which is how the reference copies were made from the public per-slice mirror.
  directory = pathlib.Path(isbi_dir)
  _write_slices(tmp_path / 'img', tifffile.imread(directory / 'train-volume.tif'))
  _write_slices(tmp_path / 'lbl', tifffile.imread(directory / 'train-labels.tif'))
  assert isbi.main(['stack', '--images', str(tmp_path / 'img'), '--labels',
                    str(tmp_path / 'lbl'), '--out', str(tmp_path / 'out')]) == 0
  for name in ('train-volume.tif', 'train-labels.tif'):
    assert isbi.sha256_of(tmp_path / 'out' / name) == isbi.KNOWN_SHA256[name]


# ----------------------------------------------------------------------------------------------
# procedural.py


def test_procedural_cli_writes_isbi_layout(tmp_path, capsys):
  out = tmp_path / 'em'
  rc = procedural_cli.main(['--out', str(out), '--num-images', '3', '--num-test-images', '2',
                            '--size', '48', '40', '--seed', '5'])
  assert rc == 0
  images, labels = make_em_like(5, (48, 40), seed=5)
  np.testing.assert_array_equal(tifffile.imread(out / 'train-volume.tif'), images[:3])
  np.testing.assert_array_equal(tifffile.imread(out / 'train-labels.tif'), labels[:3])
  np.testing.assert_array_equal(tifffile.imread(out / 'test-volume.tif'), images[3:])
  assert 'membrane fraction' in capsys.readouterr().out
  assert isbi.main(['verify', str(out)]) == 0


def test_procedural_cli_rejects_bad_arguments(tmp_path):
  with pytest.raises(SystemExit) as raised:
    procedural_cli.main(['--out', str(tmp_path), '--membrane-width', '0'])
  assert raised.value.code == 2
  assert not (tmp_path / 'train-volume.tif').exists()


def test_procedural_cli_as_a_script(tmp_path):
  # Without PYTHONPATH: the script has to find the package from its own location.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
      [sys.executable, str(DATA / 'procedural.py'), '--out', str(tmp_path), '--num-images', '2',
       '--size', '32'], capture_output=True, text=True, check=False, cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr
  assert tifffile.imread(tmp_path / 'train-labels.tif').shape == (2, 32, 32)
