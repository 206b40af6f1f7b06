r"""3D U-Net (Çiçek et al. 2016) on the ISBI 2012 training stack treated as one volume.

The 30 sections form a (30, 512, 512) volume; sections 25–29 are held out as a validation
sub-volume and the contiguous sections 0–24 train. The voxels are strongly anisotropic (about
50 nm between sections, 4 nm in-plane), so crops are flat: 16 sections × 96 × 96 pixels.

  python launch.py --config=experiments/isbi3d.py --workdir=runs/isbi3d \
      --config.data.directory=../shared/data/isbi2012

A smoke variant (`:smoke`) runs a few steps with a tiny net for tests. This config shows the 3D
path end to end; with 25 sections it is a demonstration, not a benchmark (the 2D configs are).
"""

from __future__ import annotations

import ml_collections

from experiments import isbi


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """`arg`: '' (CPU-sized 3D U-Net) or 'smoke' (a few steps with a tiny net)."""
  if arg not in ('', 'smoke'):
    raise ValueError(f'experiments/isbi3d.py takes "" or "smoke", got {arg!r}')
  config = isbi.get_config('cpu')
  config.data.source = 'isbi_volume'
  config.data.val_indices = (25, 26, 27, 28, 29)  # z sections of the single volume
  # crop_size becomes a (z, y, x) tuple; ConfigDict fields keep their type, so rebuild `data`.
  data = config.data.to_dict(preserve_field_references=True)
  data['crop_size'] = (16, 96, 96)
  config.data = ml_collections.ConfigDict(data)
  config.data.augment = 'flip|rot90'  # rot90 turns the in-plane (H, W) axes only
  config.batch_size = 2
  config.eval_batch_size = 1
  config.num_steps = 600
  config.eval_every = 200
  config.num_overlays = 1
  config.model.width = 8
  config.model.depth = 3
  config.checkpoint.best_metric = 'dice_membrane'
  config.eval.isbi_metrics = False  # the challenge metrics are defined on 2D sections
  config.eval.tta = 'none'  # 8 passes over whole volumes at every evaluation cost too much here
  config.mesh.data = 1  # one volume per eval batch cannot be split over several devices
  if arg == 'smoke':
    config.num_steps = 2
    config.log_every = 1
    config.eval_every = 2
    config.data.crop_size = (8, 32, 32)
    config.model.width = 2
    config.model.depth = 2
  return config
