"""Every model variant trains through the same loop; the 3D config trains on the ISBI volume."""

import json

import numpy as np
import pytest

from experiments import isbi3d, quickstart
from unet_jax.config import validation
from unet_jax.training import loop
from unet_jax.models import MODELS


def _variant_config(name):
  config = quickstart.get_config('smoke')
  config.model.name = name
  config.num_steps, config.eval_every, config.num_overlays = 2, 2, 0
  config.eval.isbi_metrics = False
  config.model.unetr.update(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  return config


@pytest.mark.parametrize('name', sorted(MODELS))
def test_each_variant_trains_and_evaluates(name, tmp_path):
  scores = loop.train_and_evaluate(_variant_config(name), str(tmp_path))
  assert 0 <= scores['dice_membrane'] <= 1
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)


def test_unet_plus_plus_with_deep_supervision_trains(tmp_path):
  config = _variant_config('unet_plus_plus')
  config.model.unet_plus_plus.deep_supervision = True
  config.loss.deep_supervision_weights = (0.25, 0.75)
  scores = loop.train_and_evaluate(config, str(tmp_path))
  assert 0 <= scores['dice_membrane'] <= 1


def test_unetr_rejects_a_crop_that_is_not_a_patch_multiple(tmp_path):
  config = _variant_config('unetr')
  config.data.crop_size = 30
  with pytest.raises(ValueError, match='config.data.crop_size=30'):
    validation.validate(config)


def test_3d_unet_trains_on_the_isbi_stack_as_a_volume(tmp_path, isbi_dir):
  config = isbi3d.get_config('smoke')
  config.data.directory = isbi_dir
  scores = loop.train_and_evaluate(config, str(tmp_path))
  assert 0 <= scores['dice_membrane'] <= 1
  assert (tmp_path / 'predictions' / 'val_000.png').exists()
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['data']['crop_size'] == [8, 32, 32]
