r"""ISBI 2012 scores of a trained run with and without TTA and the dense CRF, next to the paper.

Predicts the held-out slices (config.data.val_indices) of the real stack with overlap-tile
inference and prints pixel error (1 − accuracy), membrane Dice and IoU, and the challenge's
pixel, Rand and warping errors for: plain, dihedral TTA (8 flips/rotations, as the paper
averaged), the dense CRF, and both. Ours are on held-out training slices; the paper's figures are
on the hidden test set.

  python launch.py --config=experiments/isbi.py:cpu --workdir=runs/isbi_cpu \
      --config.data.directory=../shared/data/isbi2012
  python benchmarks/isbi_eval.py --config=cpu --workdir=runs/isbi_cpu \
      --isbi_dir=../shared/data/isbi2012
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from unet_jax import checkpointing
from unet_jax.config import overrides
from unet_jax.datasets import sources
from unet_jax.evaluation import evaluator
from unet_jax.evaluation import isbi_metrics
from unet_jax.evaluation import metrics
from unet_jax.inference import crf
from unet_jax.inference import tiled

ISBI_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'experiments', 'isbi.py')
VARIANTS = (('plain', 'none', False), ('TTA ×8', 'dihedral', False), ('CRF', 'none', True),
            ('TTA ×8 + CRF', 'dihedral', True))


def score(probabilities: np.ndarray, labels: np.ndarray, class_names) -> dict[str, float]:
  accumulator = isbi_metrics.ISBIAccumulator()
  accumulator.update(probabilities[..., 1], labels.astype(np.int64))
  confusion = np.asarray(metrics.confusion_matrix(np.argmax(probabilities, -1),
                                                  labels.astype(np.int32), num_classes=2))
  return {**metrics.segmentation_scores(confusion, class_names=class_names),
          **accumulator.result()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='cpu', help="experiments/isbi.py argument: '' or cpu")
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--isbi_dir', default='../shared/data/isbi2012')
  parser.add_argument('--checkpoint', default='best')
  args = parser.parse_args()

  config = overrides.load_config_file(ISBI_CONFIG + (f':{args.config}' if args.config else ''))
  config.data.directory = args.isbi_dir
  dataset = sources.load_dataset(config.data)
  _, val = sources.split_dataset(dataset, config.data)
  restored = checkpointing.restore_for_inference(config, args.workdir,
                                                 checkpoint=args.checkpoint)
  predictor = tiled.TiledPredictor.for_model(
      restored.model, restored.variables, tile_size=config.data.crop_size,
      batch_size=config.eval_batch_size)
  images = (val.images.astype(np.float32) / 255.0 - config.data.mean) / config.data.std

  rows = []
  for name, tta, use_crf in VARIANTS:
    start = time.perf_counter()
    probabilities = np.stack([predictor(image, tta=tta) for image in images])
    if use_crf:
      probabilities = np.stack([np.asarray(crf.crf_refine(p, raw.astype(np.float32)))
                                for p, raw in zip(probabilities, val.images)])
    scores = score(probabilities, val.labels, config.data.class_names)
    rows.append((name, scores, time.perf_counter() - start))

  print(f'\nstep {restored.step} of {args.workdir}; held-out slices {tuple(config.data.val_indices)}'
        f' of {args.isbi_dir}\n')
  keys = ('pixel_error', 'dice_membrane', 'iou_membrane', 'isbi_pixel_error', 'isbi_rand_error',
          'isbi_warping_error')
  print('| variant | ' + ' | '.join(keys) + ' | seconds |')
  print('|---|' + '---|' * (len(keys) + 1))
  for name, scores, seconds in rows:
    print(f'| {name} | ' + ' | '.join(f'{scores[k]:.4f}' if k != 'isbi_warping_error'
                                      else f'{scores[k]:.6f}' for k in keys) + f' | {seconds:.1f} |')
  paper = evaluator.PAPER_ISBI
  print('| paper (hidden test set) | – | – | – | ' + f'{paper["isbi_pixel_error"]} | '
        f'{paper["isbi_rand_error"]} | {paper["isbi_warping_error"]} | – |')


if __name__ == '__main__':
  main()
