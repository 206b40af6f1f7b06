r"""ISBI 2012 ablation: the paper's ingredients added to a plain CPU U-Net one at a time, then
together, each row trained for the same wall-clock budget on this machine over several seeds.

  python benchmarks/isbi_ablation.py --isbi_dir=../shared/data/isbi2012 \
      --workdir=runs/isbi_ablation --budget_minutes=5 --seeds=0,1

Every row is a config of this file, so one run of the study can be repeated by itself:

  python launch.py --config=benchmarks/isbi_ablation.py:elastic --workdir=runs/elastic \
      --config.data.directory=../shared/data/isbi2012 --config.num_steps=700

Rows (ROWS): `plain` is the plain U-Net of the comparison (width 16, same padding, batch norm,
CE + soft Dice, Adam with cosine decay, flips and 90° rotations, batch 4 of 128² crops); the
others change only what their name says. `recipe` is experiments/isbi.py:cpu as it stands;
`recipe_skeleton_recall` and `recipe_cldice` add a topology term to its loss.

Same budget: before a row trains, its step time (input pipeline included) and its fixed costs
(compile, the final evaluation) are measured here, and the row gets as many steps as fit the
budget; the table reports the wall time each run really took, launch to final metrics. `tta`
trains nothing: it evaluates the `plain` runs' checkpoints with dihedral test-time augmentation.
Scores are on the held-out slices 25–29: mean ± half the spread over seeds. Runs already
finished in --workdir are read back, not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unet_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import sharding
from unet_jax import storage
from unet_jax.config import overrides
from unet_jax.datasets import pipeline
from unet_jax.datasets import sources
from unet_jax.evaluation import evaluator
from unet_jax.models import UNet
from unet_jax.training import metric_writers
from unet_jax.training import train_step

ISBI_CPU = os.path.join(ROOT, 'experiments', 'isbi.py') + ':cpu'
THIS = os.path.abspath(__file__)

# The plain U-Net, spelled out so that the baseline stays put when isbi.py:cpu changes.
PLAIN = {
    'batch_size': 4, 'eval_batch_size': 5, 'data.crop_size': 128, 'data.crop': 'random',
    'data.augment': 'flip|rot90', 'data.weight_map.enabled': False, 'model.width': 16,
    'model.depth': 4, 'model.padding': 'SAME', 'model.norm': 'batch', 'model.dropout_rate': 0.0,
    'optimizer.learning_rate': 2e-3, 'optimizer.warmup_steps': 50, 'optimizer.ema_decay': 0.0,
    'eval.tta': 'none',
}
ELASTIC = {'data.augment': 'elastic(p=0.9, sigma=10, grid=3)|flip|rot90'}
WEIGHT_MAP = {'data.weight_map.enabled': True, 'data.weight_map.w0': 10.0,
              'data.weight_map.sigma': 5.0}
FOREGROUND = {'data.crop': 'foreground', 'data.foreground_class': 1, 'data.foreground_p': 0.5}


def _valid(output: int) -> dict[str, object]:
  """Valid convolutions, the crop sized so that the output covers `output`² labels."""
  return {'model.padding': 'VALID',
          'data.crop_size': UNet(depth=PLAIN['model.depth'], padding='VALID'
                                 ).valid_input_size(output)}


def _plain(*changes: dict[str, object]) -> dict[str, object]:
  """PLAIN with `changes` applied in order."""
  merged = dict(PLAIN)
  for change in changes:
    merged.update(change)
  return merged


TTA = {'eval.tta': 'dihedral'}

# Row name → overrides of experiments/isbi.py:cpu.
ROWS: dict[str, dict[str, object]] = {
    'plain': _plain(),
    'elastic': _plain(ELASTIC),
    'weight_map': _plain(WEIGHT_MAP),
    'valid_overlap_tile': _plain(_valid(128)),
    'crop_256': _plain({'data.crop_size': 256}),
    'tta': _plain(TTA),
    'foreground_crops': _plain(FOREGROUND),
    'width_32': _plain({'model.width': 32}),
    'paper_all': _plain(ELASTIC, WEIGHT_MAP, _valid(256), FOREGROUND, TTA),
    # Combinations of the rows that helped.
    'crop_256_tta': _plain({'data.crop_size': 256}, TTA),
    'crop_256_tta_elastic': _plain(ELASTIC, {'data.crop_size': 256}, TTA),
    'width_32_tta': _plain({'model.width': 32}, TTA),
    'elastic_tta': _plain(ELASTIC, TTA),
    'depth_5_tta': _plain({'model.depth': 5}, TTA),
    'recipe': {},
    # The recipe with a topology term (unet_jax/training/topology_losses.py) added to its loss.
    'recipe_skeleton_recall': {'loss.terms.skeleton_recall': 1.0},
    'recipe_cldice': {'loss.terms.cldice': 1.0},
}
# Rows that only change evaluation: they score the checkpoints of another row.
EVAL_ONLY = {'tta': 'plain'}
METRICS = ('pixel_error', 'dice_membrane', 'isbi_rand_error', 'isbi_warping_error', 'isbi_vrand',
           'isbi_vinfo')
# Seconds of a launch beyond compiling, training and evaluating (imports, loading the stack,
# checkpoints, plots), so that the steps a row gets fit its budget launch to final metrics.
LAUNCH_SECONDS = 25.0


def get_config(row: str = 'plain'):
  if row not in ROWS:
    raise ValueError(f'benchmarks/isbi_ablation.py takes a row of {sorted(ROWS)}, got {row!r}')
  config = overrides.apply_overrides(overrides.load_config_file(ISBI_CPU), ROWS[row])
  config.log_every = 50
  config.num_overlays = 2
  return config


def calibrate(config, *, min_seconds: float = 20.0, min_steps: int = 8) -> tuple[float, float]:
  """(seconds per training step, fixed seconds: the first steps' compile + one evaluation)."""
  dataset = sources.load_dataset(config.data)
  train_set, val_set = sources.split_dataset(dataset, config.data)
  setup = train_step.build(config, input_channels=dataset.images.shape[-1],
                           spatial_rank=dataset.labels.ndim - 1)
  state = train_step.initial_state(setup, 0)
  batches = pipeline.train_iterator(train_set, config.data, batch_size=config.batch_size,
                                    border=setup.border, seed=0)
  step_fn = train_step.make_step_fn(config, setup)
  rng = jax.random.key(1)
  start = time.perf_counter()
  for _ in range(2):
    state, metrics = step_fn(state, sharding.to_global(next(batches), setup.mesh), rng)
  jax.block_until_ready(metrics)
  fixed = time.perf_counter() - start
  start, steps = time.perf_counter(), 0
  while steps < min_steps or time.perf_counter() - start < min_seconds:
    state, metrics = step_fn(state, sharding.to_global(next(batches), setup.mesh), rng)
    steps += 1
    if steps % config.log_every == 0:  # as the training loop reads its metrics
      jax.block_until_ready(metrics)
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - start) / steps
  start = time.perf_counter()
  eval_fn = evaluator.make_eval_fn(setup.model, setup.mesh, len(config.data.class_names),
                                   tta=config.eval.tta)
  evaluator.evaluate(eval_fn, state, val_set, config, setup.model, setup.mesh,
                     extra_metrics=evaluator.extra_metrics(config))
  return per_step, fixed + time.perf_counter() - start


def _launch(args: list[str], log_path: str) -> float:
  start = time.perf_counter()
  with open(log_path, 'a', encoding='utf-8') as log:
    code = subprocess.call([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT,
                           stdout=log, stderr=subprocess.STDOUT)
  if code:
    raise SystemExit(f'{" ".join(args[:3])} failed with status {code}; see {log_path}')
  return time.perf_counter() - start


def run_row(row: str, seeds: list[int], args: argparse.Namespace, results: dict) -> None:
  source = EVAL_ONLY.get(row, row)
  common = [f'--config={THIS}:{row}', f'--config.data.directory={args.isbi_dir}']
  if row not in EVAL_ONLY and all(f'{row}/{s}' in results for s in seeds):
    return
  if row not in EVAL_ONLY:
    config = get_config(row)
    config.data.directory = args.isbi_dir
    per_step, fixed = calibrate(config)
    steps = max(1, int((args.budget_minutes * 60 - fixed - LAUNCH_SECONDS) / per_step))
    print(f'{row}: {per_step:.3f} s/step, {fixed:.0f} s fixed → {steps} steps', flush=True)
  for seed in seeds:
    key = f'{row}/{seed}'
    if key in results:
      continue
    workdir = os.path.join(args.workdir, f'{source}_seed{seed}')
    log_path = os.path.join(args.workdir, f'{row}_seed{seed}.log')
    if row in EVAL_ONLY:
      steps = results[f'{source}/{seed}']['steps']
      seconds = _launch(['--mode=eval', f'--workdir={workdir}', '--checkpoint=latest', *common,
                         f'--config.seed={seed}', f'--config.num_steps={steps}',
                         f'--config.eval_every={steps}'], log_path)
      scores = json.loads(storage.read_text(os.path.join(workdir, f'eval_val_step{steps}.json')))
      seconds += results[f'{source}/{seed}']['seconds']  # its training, then this evaluation
    else:
      seconds = _launch([f'--workdir={workdir}', *common, f'--config.seed={seed}',
                         f'--config.num_steps={steps}', f'--config.eval_every={steps}'], log_path)
      scores = json.loads(storage.read_text(os.path.join(workdir, 'final_metrics.json')))
    results[key] = {'steps': steps, 'seconds': seconds, **{m: scores[m] for m in METRICS}}
    print(f'{key}: {steps} steps, {seconds / 60:.1f} min, ' +
          ', '.join(f'{m}={scores[m]:.4f}' for m in METRICS), flush=True)
    _save(results, args.workdir)


def _save(results: dict, workdir: str) -> None:
  storage.write_atomic(os.path.join(workdir, 'results.json'),
                       json.dumps(results, indent=2, sort_keys=True))


def table(results: dict, rows: list[str], seeds: list[int]) -> list[dict[str, str]]:
  """One line per row: steps, minutes and every metric as mean ± half the spread over seeds."""
  lines = []
  for row in rows:
    runs = [results[f'{row}/{s}'] for s in seeds if f'{row}/{s}' in results]
    if not runs:
      continue
    line = {'row': row, 'seeds': str(len(runs)), 'steps': str(runs[0]['steps']),
            'minutes': f'{np.mean([r["seconds"] for r in runs]) / 60:.1f}'}
    for m in METRICS:
      values = np.array([r[m] for r in runs])
      line[m] = f'{values.mean():.4f} ± {np.ptp(values) / 2:.4f}'
    lines.append(line)
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--isbi_dir', default=os.path.join(ROOT, '..', 'shared', 'data', 'isbi2012'))
  parser.add_argument('--workdir', default='runs/isbi_ablation')
  parser.add_argument('--budget_minutes', type=float, default=5.0)
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--rows', default=','.join(ROWS), help=f'a subset of {",".join(ROWS)}')
  args = parser.parse_args()
  # As launch.py does by default, so that the calibrated step time is the launched runs' own.
  host_memory.keep_freed_memory()
  rows = args.rows.split(',')
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f'--rows: {unknown} are not rows of {sorted(ROWS)}')
  missing = [r for r in rows if r in EVAL_ONLY and EVAL_ONLY[r] not in rows]
  if missing:
    parser.error(f'--rows: {missing} evaluate the checkpoints of {[EVAL_ONLY[r] for r in missing]}')
  if not os.path.isfile(os.path.join(args.isbi_dir, 'train-volume.tif')):
    parser.error(f'--isbi_dir={args.isbi_dir} holds no train-volume.tif')
  seeds = [int(s) for s in args.seeds.split(',')]
  args.workdir = os.path.abspath(args.workdir)
  args.isbi_dir = os.path.abspath(args.isbi_dir)
  os.makedirs(args.workdir, exist_ok=True)
  path = os.path.join(args.workdir, 'results.json')
  results = json.loads(storage.read_text(path)) if os.path.exists(path) else {}
  for row in rows:
    run_row(row, seeds, args, results)
  lines = table(results, rows, seeds)
  columns = ['row', 'seeds', 'steps', 'minutes', *METRICS]
  metric_writers.write_table(lines, os.path.join(args.workdir, 'ablation'), columns=columns)
  print(f'\nISBI 2012, held-out slices 25–29, {args.budget_minutes:g} min per run on '
        f'{os.cpu_count()} cores:\n')
  print(storage.read_text(os.path.join(args.workdir, 'ablation.md')))


if __name__ == '__main__':
  main()
