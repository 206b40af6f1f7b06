"""Figures of a run as PNGs: loss and metric curves, validation predictions, sweep results.

At the end of training `write_run_plots` (called by train_and_evaluate) writes, on the chief
process:

  <workdir>/plots/loss.png         train/loss (and val/loss when logged) against the step
  <workdir>/plots/metrics.png      every val/ metric against the step, one panel per group
                                   (dice_*, iou_*, pixel_error, isbi_*_error, hd_*, …)
  <workdir>/plots/predictions.png  rows: validation examples; columns: image | ground truth |
                                   prediction | overlay of the prediction on the image

and a sweep (unet_jax/tuning/results.py) writes `<workdir>/sweep.png`: the monitored metric
against every swept hyperparameter, one panel each (log x for learning rates and other ranges
over two decades).

Class colours are `unet_jax.visualize.PALETTE` (documented there): label maps, overlays, the
legend and the per-class curves all use it. Figures are drawn on matplotlib's Agg canvas
directly, without pyplot, so neither the global backend nor the figures of a notebook that
imports this module are touched.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unet_jax.evaluation import evaluator
from unet_jax.datasets import pipeline
from unet_jax.datasets.dataset import Dataset
from unet_jax.models import whole_image
from unet_jax.training import metric_writers
from unet_jax import sharding
from unet_jax import storage
from unet_jax import visualize

log = logging.getLogger('unet_jax')
DPI = 100
STEP_LABEL = 'step (optimizer updates)'
MAX_PREDICTION_ROWS = 6
# Curves that belong to no class (means, ISBI errors) cycle through colours far from every
# palette colour, so no such curve can be read as a class.
OTHER_COLOURS = ('tab:orange', 'tab:purple', 'tab:brown', 'tab:olive', 'tab:gray')
GROUP_TITLES = {'dice': 'Dice', 'iou': 'IoU (Jaccard)', 'precision': 'precision',
                'recall': 'recall', 'pixel_error': 'pixel error',
                'pixel_accuracy': 'pixel accuracy', 'isbi_error': 'ISBI 2012 errors',
                'isbi_threshold': 'ISBI 2012 best thresholds', 'hd': 'Hausdorff distance',
                'hd95': 'HD95 (95th percentile Hausdorff)'}


def _figure(width: float, height: float):
  """A matplotlib Figure on its own Agg canvas (matplotlib is imported only when plotting)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(width, height), dpi=DPI, layout='constrained')
  FigureCanvasAgg(figure)
  return figure


def _save(figure: Any, out_dir: str, filename: str) -> str:
  path = storage.join(out_dir, filename)
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=DPI, facecolor='white')
  storage.write_atomic(path, buffer.getvalue())
  return path


def metric_label(name: str) -> str:
  """Axis label with its unit for a logged key such as 'val/dice_membrane' or 'train/loss'."""
  base = name.split('/')[-1]
  if base.startswith(('hd_', 'hd95_')) or base in ('hd', 'hd95'):
    return f'{base} (pixels)'
  if 'threshold' in base:
    return f'{base} (probability, 0–1)'
  if 'loss' in base:
    return f'{base} (unitless)'
  if base.startswith(('dice', 'iou', 'precision', 'recall')) or 'accuracy' in base:
    return f'{base} (0–1, higher is better)'
  if 'error' in base:
    return f'{base} (0–1, lower is better)'
  if base.endswith('per_second'):
    return f'{base} (images/s)'
  if base.endswith('learning_rate'):
    return f'{base} (peak, after warmup)'
  return base


def _class_colour(key: str, class_names: Sequence[str]) -> tuple[float, ...] | None:
  """Palette colour (RGB in 0..1) when `key` ends in _<class name>, else None."""
  for index, name in enumerate(class_names):
    if key.endswith(f'_{name}'):
      return tuple(float(c) for c in visualize.class_colour(index) / 255.0)
  return None


def metric_group(key: str, class_names: Sequence[str]) -> str:
  """The panel of a val/ key in metrics.png: per-class scores share one ('dice_membrane',
  'dice_mean' → 'dice'), the ISBI errors one and their thresholds another, the rest their own."""
  base = key.split('/')[-1]
  if base.startswith('isbi_'):
    return 'isbi_error' if base.endswith('_error') else 'isbi_threshold'
  for suffix in (*class_names, 'mean'):
    if base.endswith(f'_{suffix}'):
      return base[:-len(suffix) - 1]
  return base


def _integer_steps(axes: Any) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # step numbers are wide
  axes.ticklabel_format(axis='y', useOffset=False)  # absolute values, not '+1.187' offsets
  axes.grid(alpha=0.3)


def _series(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """key → (steps, values); non-finite values are logged as strings ('nan') and come back NaN."""
  points: dict[str, list[tuple[int, float]]] = {}
  for record in records:
    for key, value in record.items():
      if key not in ('step', 'time'):
        points.setdefault(key, []).append((int(record['step']), float(value)))
  return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for k, v in points.items()}


def plot_curves(metrics_jsonl_path: str, out_dir: str, *,
                class_names: Sequence[str] = ()) -> list[str]:
  """Writes `out_dir`/loss.png and, when val/ metrics were logged, `out_dir`/metrics.png.

  Args:
    metrics_jsonl_path: a run's metrics.jsonl (`{"step": s, "train/loss": …, "val/…": …}` lines).
    out_dir: folder for the PNGs (created).
    class_names: `config.data.class_names`; per-class curves are drawn in the class's palette
      colour (unet_jax.visualize.PALETTE), the others in OTHER_COLOURS.
  Returns:
    The paths written, loss.png first.
  """
  if not storage.exists(metrics_jsonl_path):
    raise FileNotFoundError(f'{metrics_jsonl_path} does not exist; it is written by training')
  series = _series(metric_writers.latest_per_step(metric_writers.read_jsonl(metrics_jsonl_path)))
  if 'train/loss' not in series:
    raise ValueError(f'{metrics_jsonl_path} has no "train/loss" values to plot; keys there: '
                     f'{sorted(series)}')
  figure = _figure(7.0, 4.0)
  axes = figure.add_subplot()
  for key, colour in (('train/loss', OTHER_COLOURS[0]), ('val/loss', OTHER_COLOURS[1])):
    if key in series:
      steps, values = series[key]
      axes.plot(steps, values, marker='o' if len(steps) < 30 else None, markersize=3, label=key,
                color=colour)
  axes.set(title='Loss', xlabel=STEP_LABEL, ylabel=metric_label('loss'))
  _integer_steps(axes)
  axes.legend()
  paths = [_save(figure, out_dir, 'loss.png')]

  groups: dict[str, list[str]] = {}
  for key in sorted(k for k in series if k.startswith('val/') and k != 'val/loss'):
    groups.setdefault(metric_group(key, class_names), []).append(key)
  if not groups:
    log.info('%s holds no val/ metrics: metrics.png is not written', metrics_jsonl_path)
    return paths
  cols = min(3, len(groups))
  rows = -(-len(groups) // cols)
  figure = _figure(4.2 * cols, 3.2 * rows)
  for panel, (group, keys) in enumerate(groups.items()):
    axes = figure.add_subplot(rows, cols, panel + 1)
    others = iter(OTHER_COLOURS * len(keys))
    for key in keys:
      steps, values = series[key]
      colour = _class_colour(key, class_names) or next(others)
      axes.plot(steps, values, marker='o', markersize=3, label=key[len('val/'):],
                color=colour, linestyle='--' if key.endswith('_mean') else '-')
    axes.set(title=f'validation: {GROUP_TITLES.get(group, group)}', xlabel=STEP_LABEL,
             ylabel=metric_label({'isbi_error': 'error', 'isbi_threshold': 'threshold'}.get(
                 group, group)))
    _integer_steps(axes)
    axes.legend(fontsize='small')
  paths.append(_save(figure, out_dir, 'metrics.png'))
  return paths


def plot_predictions(images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                     predictions: Sequence[np.ndarray], out_dir: str, *,
                     class_names: Sequence[str], filename: str = 'predictions.png') -> str:
  """A grid of examples: image | ground truth | prediction | overlay; returns the PNG's path.

  Args:
    images: N images (H, W), (H, W, 1) or RGB (H, W, 3); shown in gray, stretched per image.
    truths, predictions: N class-id maps (H, W), drawn in the palette colours
      (unet_jax.visualize.PALETTE; class 0 black). The overlay tints the image with the
      predicted classes (class 0 untinted). A legend names every class with its colour.
    out_dir: folder for the PNG (created).
    class_names: the name of class id k at position k.
  """
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  if not len(images) == len(truths) == len(predictions) > 0:
    raise ValueError(f'plot_predictions needs as many images ({len(images)}), ground truths '
                     f'({len(truths)}) and predictions ({len(predictions)}), at least one')
  height, width = np.shape(truths[0])[:2]
  panel = min(3.5, max(1.8, max(height, width) / DPI))  # inches: about 1 px per pixel, bounded
  figure = _figure(4 * panel, len(images) * panel * height / width + 1.2)  # + titles, legend
  titles = ('image', 'ground truth', 'prediction', 'prediction over image')
  for row, (image, truth, prediction) in enumerate(zip(images, truths, predictions)):
    gray = visualize.to_gray_uint8(image)
    shown = (np.repeat(gray[..., None], 3, -1), visualize.label_map(truth),
             visualize.label_map(prediction), visualize.overlay(image, prediction))
    for col, picture in enumerate(shown):
      axes = figure.add_subplot(len(images), 4, row * 4 + col + 1)
      axes.imshow(picture, interpolation='nearest')
      axes.set_xticks([])
      axes.set_yticks([])
      if row == 0:
        axes.set_title(f'{titles[col]}\n({width}×{height} px)', fontsize='medium')
      if col == 0:
        axes.set_ylabel(f'example {row}')
  handles = [Patch(facecolor=visualize.class_colour(k) / 255.0, edgecolor='gray',
                   label=f'{k}: {name}') for k, name in enumerate(class_names)]
  figure.legend(handles=handles, loc='outside lower center', ncol=len(handles),
                title='classes (colours: unet_jax.visualize.PALETTE)')
  return _save(figure, out_dir, filename)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def sweep_axis_scale(param: str, values: Sequence[Any]) -> str:
  """'log' for learning rates and positive ranges over two decades, 'linear' for other numbers,
  'category' when any value is not a number (model names, booleans)."""
  if not all(_is_number(v) for v in values):
    return 'category'
  xs = np.array(values, np.float64)
  if np.all(xs > 0) and ('learning_rate' in param or xs.max() / xs.min() >= 100):
    return 'log'
  return 'linear'


def plot_sweep(results: Sequence[Mapping[str, Any]], out_dir: str, metric: str, *,
               params: Sequence[str] | None = None, maximise: bool | None = None,
               filename: str = 'sweep.png') -> str:
  """`metric` against each swept hyperparameter, one panel each; returns the PNG's path.

  Args:
    results: rows as a sweep's table has them (tuning/results.py): {'run': '000',
      <override path>: value, …, <metric>: score, …}.
    metric: the score on the y axis, e.g. 'dice_membrane'; rows without a finite value are left
      out.
    params: the hyperparameters (row keys) to plot against; default: the dotted config paths
      among the row keys (a top-level field such as 'batch_size' must be named here).
    maximise: whether a higher `metric` is better (config.checkpoint.best_mode == 'max');
      default: lower is better for errors, losses and distances, higher for anything else.
  Numeric values get a numeric axis (logarithmic for learning rates and for positive ranges
  over two decades); others (model names, booleans) one tick per value. The best run is starred.
  """
  rows = [r for r in results if _is_number(r.get(metric)) and math.isfinite(r[metric])]
  if not rows:
    raise ValueError(f'no sweep result has a finite {metric!r}; keys of the first: '
                     f'{sorted(results[0]) if results else []}')
  params = list(params) if params is not None else [k for k in rows[0] if '.' in k]
  if not params:
    raise ValueError(f'plot_sweep: no hyperparameters to plot in {sorted(rows[0])}; pass params')
  scores = np.array([r[metric] for r in rows], np.float64)
  if maximise is None:
    maximise = not ('error' in metric or 'loss' in metric or metric.startswith('hd'))
  best = int(np.argmax(scores) if maximise else np.argmin(scores))
  figure = _figure(4.5 * len(params), 3.6)
  for panel, param in enumerate(params):
    axes = figure.add_subplot(1, len(params), panel + 1)
    values = [r.get(param) for r in rows]
    scale = sweep_axis_scale(param, values)
    if scale != 'category':
      xs = np.array(values, np.float64)
      axes.set_xscale(scale)
      if len(np.unique(xs)) == len(xs):  # repeated x values (a grid over several axes) zigzag
        order = np.argsort(xs)
        axes.plot(xs[order], scores[order], color='0.6', zorder=1)
    else:
      labels = sorted({str(v) for v in values})
      xs = np.array([labels.index(str(v)) for v in values], np.float64)
      axes.set_xticks(range(len(labels)), labels)
    axes.scatter(xs, scores, color=OTHER_COLOURS[4], zorder=2)
    axes.scatter(xs[best], scores[best], marker='*', s=200, color=OTHER_COLOURS[0],
                 edgecolor='black',
                 zorder=3, label=f'best: run {rows[best].get("run", best)}')
    for x, y, row in zip(xs, scores, rows):
      axes.annotate(str(row.get('run', '')), (x, y), textcoords='offset points', xytext=(4, 4),
                    fontsize='x-small')
    axes.set(title=f'{metric} vs {param}', xlabel=metric_label(param),
             ylabel=metric_label(metric))
    axes.ticklabel_format(axis='y', useOffset=False)
    axes.grid(alpha=0.3)
    axes.legend(fontsize='small')
  return _save(figure, out_dir, filename)


def predict_examples(state: Any, model: Any, dataset: Dataset,
                     config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, count: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, predicted classes) of the first `count` examples, whole-image predictions.

  Every process must call it (the input is replicated over the mesh, so all predict the same
  images). Volumes (N, D, H, W) come back as their middle section (N, H, W).
  """
  subset = dataset.subset(range(count))
  spatial = subset.labels.shape[1:]
  batch = next(pipeline.eval_batches(
      subset, batch_size=count, mean=config.data.mean, std=config.data.std,
      pads=whole_image.model_padding(model, spatial)))
  images = jax.make_array_from_process_local_data(sharding.replicated(mesh), batch['image'])
  predict = jax.jit(functools.partial(evaluator.predict_probabilities, model=model,
                                      spatial_shape=spatial),
                    out_shardings=sharding.replicated(mesh))
  classes = np.asarray(jnp.argmax(predict(state, images), -1))
  images, labels = subset.images, subset.labels
  if len(spatial) == 3:
    middle = spatial[0] // 2
    images, labels, classes = images[:, middle], labels[:, middle], classes[:, middle]
  return images, labels, classes


def write_run_plots(state: Any, model: Any, dataset: Dataset,
                    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str,
                    chief: bool) -> list[str]:
  """loss.png, metrics.png and predictions.png in `workdir`/plots, and one image | ground
  truth | prediction panel per example in `workdir`/predictions; returns the paths written.

  Called by every process at the end of training (the prediction runs on the whole mesh); only
  the chief writes. Never raises: a figure that fails is logged as a warning and skipped, since
  the run's checkpoints and scores are already saved and must not be lost to a plot.
  """
  out_dir = storage.join(workdir, 'plots')
  class_names = tuple(config.data.class_names)
  paths: list[str] = []
  if chief:
    try:
      paths += plot_curves(storage.join(workdir, 'metrics.jsonl'), out_dir,
                           class_names=class_names)
    except Exception as e:  # pylint: disable=broad-except  (a figure must not fail the run)
      log.warning('loss/metric curves not written to %s (%s: %s)', out_dir, type(e).__name__, e)
  count = min(config.num_overlays, len(dataset))
  if count:
    try:
      examples = predict_examples(state, model, dataset, config, mesh, count)
      if chief:
        paths += visualize.write_panels(storage.join(workdir, 'predictions'), *examples)
        paths.append(plot_predictions(*(e[:MAX_PREDICTION_ROWS] for e in examples), out_dir,
                                      class_names=class_names))
    except Exception as e:  # pylint: disable=broad-except
      log.warning('predictions.png not written to %s (%s: %s)', out_dir, type(e).__name__, e)
  return paths
