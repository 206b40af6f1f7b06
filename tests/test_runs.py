"""Drivers over the loop: K-fold, checkpoint evaluation, and the launcher's modes (sweeps:
test_sweeps.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import quickstart
from unet_jax import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_copy_the_config_and_reject_unknown_paths():
  config = quickstart.get_config('smoke')
  changed = runs.apply_overrides(config, {'model.width': 7, 'optimizer.learning_rate': 0.5})
  assert changed.model.width == 7 and config.model.width == 4
  with pytest.raises(ValueError, match="'model.widht': config has no field 'widht'"):
    runs.apply_overrides(config, {'model.widht': 7})
  with pytest.raises(ValueError, match="config has no field 'modle'"):
    runs.apply_overrides(config, {'modle.width': 7})


def test_kfold_indices_are_disjoint_contiguous_and_cover():
  folds = runs.kfold_indices(30, 4)
  assert [len(f) for f in folds] == [8, 8, 7, 7]
  assert sorted(i for f in folds for i in f) == list(range(30))
  assert all(list(f) == list(range(f[0], f[-1] + 1)) for f in folds)
  with pytest.raises(ValueError, match='config.data.folds=1'):
    runs.kfold_indices(30, 1)


def test_two_fold_run_reports_mean_and_std(tmp_path):
  config = quickstart.get_config('smoke')
  config.data.folds = 2
  result = runs.run_kfold(config, str(tmp_path))
  values = [f['dice_membrane'] for f in result['folds']]
  assert result['summary']['dice_membrane']['mean'] == pytest.approx(np.mean(values))
  assert result['summary']['dice_membrane']['std'] == pytest.approx(np.std(values))
  used = [json.load(open(tmp_path / f'fold_{k}' / 'config.json'))['data']['val_indices']
          for k in range(2)]
  assert used == [[0, 1, 2], [3, 4, 5]]
  assert 'mean ± std' in (tmp_path / 'kfold.md').read_text()


def _launch(*args):
  command = [sys.executable, os.path.join(ROOT, 'launch.py'),
             '--config=' + os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke', *args]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_launcher_trains_with_overrides_then_evaluates_a_checkpoint(tmp_path):
  done = _launch(f'--workdir={tmp_path}', '--config.model.width=2', '--config.num_steps=3')
  assert done.returncode == 0, done.stderr
  assert json.load(open(tmp_path / 'config.json'))['model']['width'] == 2
  final = json.load(open(tmp_path / 'final_metrics.json'))
  assert 'final (step 3)' in done.stderr
  evaluated = _launch(f'--workdir={tmp_path}', '--config.model.width=2', '--config.num_steps=3',
                      '--mode=eval', '--split=val', '--checkpoint=latest')
  assert evaluated.returncode == 0, evaluated.stderr
  scores = json.load(open(tmp_path / 'eval_val_step3.json'))
  assert scores['dice_membrane'] == final['dice_membrane']
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / 'in')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52), np.uint8)).save(
      tmp_path / 'in' / 'x.png')
  predicted = _launch(f'--workdir={tmp_path}', '--config.model.width=2', '--config.num_steps=3',
                      '--mode=predict', f'--input={tmp_path / "in"}',
                      f'--output={tmp_path / "out"}', '--tta=flips')
  assert predicted.returncode == 0, predicted.stderr
  mask = np.asarray(Image.open(tmp_path / 'out' / 'x_mask.png'))
  assert mask.shape == (40, 52) and set(np.unique(mask)) <= {0, 1}
  bad = _launch(f'--workdir={tmp_path}', '--config.model.widht=2')
  assert bad.returncode != 0 and 'widht' in bad.stderr


def test_evaluate_checkpoint_on_other_splits_and_errors(tmp_path):
  config = quickstart.get_config('smoke')
  from unet_jax.training import loop  # pylint: disable=g-import-not-at-top
  loop.train_and_evaluate(config, str(tmp_path))
  all_scores = runs.evaluate_checkpoint(config, str(tmp_path), split='all', checkpoint='best')
  assert 0 <= all_scores['pixel_error'] <= 1
  assert (tmp_path / 'eval_all_step4.json').exists() or (tmp_path / 'eval_all_step2.json').exists()
  with pytest.raises(ValueError, match="--split='test' is not one of"):
    runs.evaluate_checkpoint(config, str(tmp_path), split='test')
  with pytest.raises(ValueError, match='--checkpoint=.99. is not'):
    runs.evaluate_checkpoint(config, str(tmp_path), checkpoint='99')
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    runs.evaluate_checkpoint(config, str(tmp_path / 'empty'))
