"""Figures written at the end of a run and of a sweep: real PNGs, the right size, not blank."""

import json
import logging
import os

import numpy as np
import optuna
import pytest
from PIL import Image

from experiments import quickstart
from unet_jax.training import plots
from unet_jax.training import loop
from unet_jax import visualize
from unet_jax.tuning import results


def _open_png(path, *, min_size=(300, 200), max_size=(3000, 3000)):
  """RGB array of a PNG after checking its format, its size bounds and that it is not blank."""
  with Image.open(path) as image:
    assert image.format == 'PNG', path
    width, height = image.size
    pixels = np.asarray(image.convert('RGB'))
  assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], (
      path, image.size)
  assert pixels.std() > 5, f'{path} is (nearly) blank'
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f'{path} has too few colours'
  return pixels


def _pixels_near(pixels, colour, tolerance=12):
  return int((np.abs(pixels.astype(int) - np.asarray(colour, int)).max(-1) <= tolerance).sum())


def _write_jsonl(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in records))


def test_plot_curves_from_a_handwritten_log(tmp_path):
  records = [{'step': s, 'time': 0.0, 'train/loss': 1.0 / s, 'train/pixel_accuracy': 0.5}
             for s in range(1, 21)]
  records[3]['train/loss'] = 'nan'  # how the writer stores a non-finite value
  records += [{'step': s, 'time': 0.0, 'val/dice_membrane': 0.2 + s / 40,
               'val/dice_interior': 0.9, 'val/dice_mean': 0.6, 'val/pixel_error': 0.3 - s / 100,
               'val/isbi_rand_error': 0.5, 'val/isbi_rand_threshold': 0.4}
              for s in (5, 10, 15, 20)]
  _write_jsonl(tmp_path / 'metrics.jsonl', records)
  paths = plots.plot_curves(str(tmp_path / 'metrics.jsonl'), str(tmp_path / 'out'),
                            class_names=('interior', 'membrane'))
  assert [os.path.basename(p) for p in paths] == ['loss.png', 'metrics.png']
  loss = _open_png(paths[0])
  assert loss.shape[:2] == (400, 700)  # 7 × 4 inches at 100 dpi
  metrics = _open_png(paths[1])
  # 4 panels (dice, pixel_error, ISBI errors, ISBI thresholds) → 3 columns × 2 rows.
  assert metrics.shape[:2] == (640, 1260)
  # Per-class curves are drawn in the palette colours of their classes.
  assert _pixels_near(metrics, visualize.class_colour(1)) > 100  # membrane: red
  assert _pixels_near(metrics, visualize.class_colour(0), tolerance=0) > 100  # interior: black


def test_metric_groups_and_units():
  names = ('interior', 'membrane')
  assert plots.metric_group('val/dice_membrane', names) == 'dice'
  assert plots.metric_group('val/dice_mean', names) == 'dice'
  assert plots.metric_group('val/hd95_membrane', names) == 'hd95'
  assert plots.metric_group('val/isbi_warping_error', names) == 'isbi_error'
  assert plots.metric_group('val/isbi_pixel_threshold', names) == 'isbi_threshold'
  assert plots.metric_group('val/pixel_error', names) == 'pixel_error'
  assert plots.metric_label('val/hd_membrane') == 'hd_membrane (pixels)'
  assert 'higher is better' in plots.metric_label('dice')
  assert 'lower is better' in plots.metric_label('isbi_rand_error')


def test_plot_curves_names_the_file_when_it_lacks_the_loss(tmp_path):
  _write_jsonl(tmp_path / 'metrics.jsonl', [{'step': 1, 'time': 0.0, 'val/dice_membrane': 0.5}])
  with pytest.raises(ValueError, match=r'metrics.jsonl has no "train/loss"'):
    plots.plot_curves(str(tmp_path / 'metrics.jsonl'), str(tmp_path))
  _write_jsonl(tmp_path / 'train_only.jsonl', [{'step': 1, 'time': 0.0, 'train/loss': 0.5}])
  written = plots.plot_curves(str(tmp_path / 'train_only.jsonl'), str(tmp_path / 'out'))
  assert [os.path.basename(p) for p in written] == ['loss.png']


def test_training_writes_viewable_plots_in_the_palette(tmp_path):
  config = quickstart.get_config('smoke')
  loop.train_and_evaluate(config, str(tmp_path))
  plot_dir = tmp_path / 'plots'
  assert sorted(os.listdir(plot_dir)) == ['loss.png', 'metrics.png', 'predictions.png']
  _open_png(plot_dir / 'loss.png')
  _open_png(plot_dir / 'metrics.png')
  grid = _open_png(plot_dir / 'predictions.png')
  # 2 validation examples of 64² → 2 rows of 4 panels of 1.8 inches, + 1.2 for titles and legend.
  assert grid.shape[:2] == (2 * 180 + 120, 4 * 180)
  # Label maps are drawn with nearest-neighbour resampling, so the exact palette colours appear:
  # membrane (class 1) red and interior (class 0) black over large areas.
  red = tuple(visualize.class_colour(1))
  assert _pixels_near(grid, red, tolerance=0) > 2000
  assert _pixels_near(grid, visualize.class_colour(0), tolerance=0) > 2000


def test_plot_predictions_shows_each_class_in_its_colour(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 40, 60, 1), dtype=np.uint8)
  truths = np.zeros((2, 40, 60), np.int64)
  truths[:, :, 20:40] = 2  # green band
  predictions = np.zeros((2, 40, 60), np.int64)
  predictions[:, 10:30] = 3  # blue band
  path = plots.plot_predictions(images, truths, predictions, str(tmp_path),
                                class_names=('a', 'b', 'c', 'd'))
  grid = _open_png(path)
  assert _pixels_near(grid, visualize.class_colour(2), tolerance=0) > 1000
  assert _pixels_near(grid, visualize.class_colour(3), tolerance=0) > 1000
  with pytest.raises(ValueError, match='as many images'):
    plots.plot_predictions(images, truths[:1], predictions, str(tmp_path), class_names=('a',))


def _finished_study(rates):
  """An in-memory study whose trials finished as a sweep's do, scored by a made-up rule."""
  study = optuna.create_study(direction='maximize')
  for lr in rates:
    scores = {'dice_membrane': 0.9 - abs(np.log10(lr) + 3) / 10, 'pixel_error': 0.1}
    study.add_trial(optuna.trial.create_trial(
        params={'optimizer.learning_rate': lr, 'model.name': 'unet'},
        distributions={'optimizer.learning_rate': optuna.distributions.FloatDistribution(
            1e-5, 1e-1, log=True), 'model.name': optuna.distributions.CategoricalDistribution(
                ['unet'])},
        value=scores['dice_membrane'], user_attrs={results.SCORES_ATTR: scores}))
  return study


def test_sweep_writes_sweep_png_next_to_its_table(tmp_path):
  rows = results.write(_finished_study([1e-4, 1e-3, 1e-2]), quickstart.get_config('smoke'),
                       str(tmp_path))
  assert rows[0]['optimizer.learning_rate'] == 1e-3
  assert (tmp_path / 'sweep_results.csv').exists()
  sweep = _open_png(tmp_path / 'sweep.png', min_size=(600, 300))
  assert sweep.shape[:2] == (360, 900)  # one 4.5 × 3.6 inch panel per hyperparameter
  assert plots.sweep_axis_scale('optimizer.learning_rate', [1e-4, 1e-3]) == 'log'
  assert plots.sweep_axis_scale('model.width', [8, 16, 32]) == 'linear'
  assert plots.sweep_axis_scale('model.width', [1, 1000]) == 'log'
  assert plots.sweep_axis_scale('model.name', ['unet', 'res_unet']) == 'category'
  assert plots.sweep_axis_scale('model.remat', [True, False]) == 'category'


def test_a_failing_plot_never_loses_the_result(tmp_path, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise RuntimeError('no display')

  monkeypatch.setattr(plots, 'plot_sweep', broken)
  with caplog.at_level(logging.WARNING, logger='unet_jax'):
    rows = results.write(_finished_study([1e-3]), quickstart.get_config('smoke'),
                         str(tmp_path))
  assert len(rows) == 1 and (tmp_path / 'sweep_results.csv').exists()
  assert 'sweep.png not written' in caplog.text and 'no display' in caplog.text
  caplog.clear()
  config = quickstart.get_config('smoke')
  config.num_overlays = 0
  with caplog.at_level(logging.WARNING, logger='unet_jax'):  # no metrics.jsonl in this workdir
    written = plots.write_run_plots(None, None, [], config, None, str(tmp_path / 'empty'), True)
  assert written == [] and 'curves not written' in caplog.text
