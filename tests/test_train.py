"""Train/eval steps: sharded = single device, checkpoints round-trip, runs resume exactly."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import quickstart
from unet_jax import checkpointing
from unet_jax.evaluation import distance_metrics
from unet_jax.evaluation import isbi_metrics
from unet_jax.evaluation import evaluator
from unet_jax.training import metric_writers
from unet_jax.evaluation import metrics as metrics_lib
from unet_jax import sharding
from unet_jax.config import validation
from unet_jax.training import loop
from unet_jax.training import train_step
from unet_jax.training import workdir
from unet_jax.datasets import dataset as dataset_lib


def _smoke_config(**overrides):
  config = quickstart.get_config('smoke')
  config.update(overrides)
  return config


def _setup(config, devices):
  config.mesh.data = devices
  setup = train_step.build(config, input_channels=1, spatial_rank=2)
  state = train_step.initial_state(setup, 0)
  return setup, state, train_step.make_step_fn(config, setup)


def _batch(n=8, size=32, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n, size, size, 1)).astype(np.float32)
  return {'image': image, 'label': (image[..., 0] > 0.3).astype(np.int32)}


def test_the_fast_compiled_initial_state_equals_the_default_compile_bit_for_bit():
  config = _smoke_config()
  config.model.width, config.model.depth, config.mesh.data = 2, 1, 8
  setup = train_step.build(config, input_channels=1, spatial_rank=2)
  fast = jax.device_get(train_step.initial_state(setup, 3))
  default = jax.device_get(jax.jit(setup.init_fn, out_shardings=setup.state_sharding)(
      jax.random.key(3)))
  assert jax.tree.structure(fast) == jax.tree.structure(default)
  jax.tree.map(np.testing.assert_array_equal, fast, default)


@functools.cache  # the one-device reference of a norm serves every mesh it is compared with
def _three_steps(norm, data, fsdp):
  config = _smoke_config()
  config.model.norm = norm
  config.model.width = 16  # big enough that fsdp splits some kernels (≥ 2**14 elements)
  config.model.dropout_rate = 0.0
  config.mesh.fsdp = fsdp
  setup, state, step = _setup(config, data)
  for i in range(3):
    state, metrics = step(state, sharding.to_global(_batch(seed=i), setup.mesh), jax.random.key(1))
  return state, float(metrics['loss'])


@pytest.mark.parametrize('norm,data,fsdp', [('none', 8, 1), ('batch', 8, 1), ('none', 4, 2),
                                            ('batch', 1, 8)])
def test_sharded_train_step_equals_1_device(norm, data, fsdp):
  assert jax.device_count() == 8
  reference, loss1 = _three_steps(norm, 1, 1)
  state, loss8 = _three_steps(norm, data, fsdp)
  kernels = [x for x in jax.tree.leaves(state.params) if x.ndim == 4]
  assert all(len(x.sharding.device_set) == 8 for x in kernels)
  split = [x for x in kernels if not x.sharding.is_fully_replicated]
  assert bool(split) == (fsdp > 1)  # fsdp really splits the large kernels
  if fsdp > 1:
    mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, 'ndim', 0) == 4]
    assert any(not x.sharding.is_fully_replicated for x in mu)  # and the Adam moments
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, jax.device_get(reference.params), jax.device_get(state.params))
  jax.tree.map(close, jax.device_get(reference.batch_stats), jax.device_get(state.batch_stats))


def test_training_lowers_the_loss_on_a_fixed_batch():
  config = _smoke_config()
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = 'constant'
  config.batch_size = 2
  setup, state, step = _setup(config, 1)
  batch = sharding.to_global(_batch(n=2), setup.mesh)
  losses_seen = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    losses_seen.append(float(metrics['loss']))
  assert losses_seen[-1] < 0.7 * losses_seen[0]
  assert int(state.step) == 15


def test_checkpoint_round_trip_restores_identical_state(tmp_path):
  config = _smoke_config()
  setup, state, step = _setup(config, 8)
  mesh = setup.mesh
  state, _ = step(state, sharding.to_global(_batch(), mesh), jax.random.key(0))
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1, best_metric='dice_membrane')
  checkpointing.save(manager, 1, state, {'next_index': 5}, metrics={'dice_membrane': 0.5})
  checkpointing.wait(manager)
  expected = jax.device_get(state)
  fresh = checkpointing.make_manager(str(tmp_path), keep_best=1, best_metric='dice_membrane')
  restored, data_state = checkpointing.restore_latest(fresh, setup.abstract_state)
  assert data_state == {'next_index': 5}
  assert type(restored.opt_state) is type(expected.opt_state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
  assert restored.params['head']['Conv_0']['kernel'].sharding == sharding.replicated(mesh)


def test_manager_keeps_latest_and_best(tmp_path):
  _, state, _ = _setup(_smoke_config(), 1)
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1, best_metric='dice_membrane',
                                       keep_latest=1)
  for step, dice in [(1, 0.2), (2, 0.9), (3, 0.4), (4, 0.3)]:
    checkpointing.save(manager, step, state, {'next_index': step}, metrics={'dice_membrane': dice})
  checkpointing.wait(manager)
  assert manager.all_steps() == [2, 4]
  assert manager.best_step() == 2


def test_eval_step_confusion_matches_numpy():
  config = _smoke_config()
  setup, state, _ = _setup(config, 8)
  model, mesh = setup.model, setup.mesh
  data = dataset_lib.Dataset(
      np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8),
      np.random.default_rng(1).integers(0, 2, (5, 32, 32), dtype=np.uint8))
  config.eval_batch_size = 8
  eval_fn = evaluator.make_eval_fn(model, mesh, 2)
  scores = evaluator.evaluate(eval_fn, state, data, config, model, mesh)
  images = (data.images / 255.0 - config.data.mean) / config.data.std
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       jnp.asarray(images, jnp.float32))
  pred = np.asarray(jnp.argmax(logits, -1))
  truth = data.labels.astype(bool)
  inter = np.sum(pred.astype(bool) & truth)
  expected_dice = 2 * inter / (pred.astype(bool).sum() + truth.sum())
  np.testing.assert_allclose(scores['dice_membrane'], expected_dice, rtol=1e-9)
  np.testing.assert_allclose(scores['pixel_accuracy'], np.mean(pred == data.labels), rtol=1e-9)
  # Host-side metrics see every example once, in full, whatever the sharding and padding.
  config.eval.hausdorff_classes = (1,)
  extras = evaluator.extra_metrics(config)
  scores = evaluator.evaluate(eval_fn, state, data, config, model, mesh, extra_metrics=extras)
  reference = isbi_metrics.ISBIAccumulator()
  reference.update(np.asarray(jax.nn.softmax(logits, -1))[..., 1], data.labels.astype(np.int64))
  for key, value in reference.result().items():
    np.testing.assert_allclose(scores[key], value, rtol=1e-6)
  hd = distance_metrics.HausdorffAccumulator(('interior', 'membrane'), classes=(1,))
  hd.update(pred, data.labels)
  np.testing.assert_allclose(scores['hd95_membrane'], hd.result()['hd95_membrane'], rtol=1e-9)


def test_run_resumes_exactly_where_it_stopped(tmp_path):
  def config(num_steps):
    c = _smoke_config(num_steps=num_steps)
    c.optimizer.schedule = 'constant'  # a schedule that does not depend on num_steps
    return c

  loop.train_and_evaluate(config(4), str(tmp_path / 'reference'))
  loop.train_and_evaluate(config(2), str(tmp_path / 'resumed'))  # stops after step 2
  scores = loop.train_and_evaluate(config(4), str(tmp_path / 'resumed'))
  ref = json.load(open(tmp_path / 'reference' / 'final_metrics.json'))
  got = json.load(open(tmp_path / 'resumed' / 'final_metrics.json'))
  assert got['step'] == ref['step'] == 4
  assert got == ref and scores['dice_membrane'] == ref['dice_membrane']
  loss = lambda d: [(r['step'], r['train/loss'])
                    for r in metric_writers.read_jsonl(str(d / 'metrics.jsonl'))
                    if 'train/loss' in r]
  assert loss(tmp_path / 'resumed') == loss(tmp_path / 'reference')
  assert len(loss(tmp_path / 'reference')) == 2


def test_finished_run_reevaluates_instead_of_training(tmp_path):
  config = _smoke_config()
  first = loop.train_and_evaluate(config, str(tmp_path))
  again = loop.train_and_evaluate(_smoke_config(), str(tmp_path))
  assert again == first


def test_outputs_written_to_workdir(tmp_path):
  loop.train_and_evaluate(_smoke_config(), str(tmp_path))
  final = json.load(open(tmp_path / 'final_metrics.json'))
  assert final['step'] == 4 and 0 <= final['dice_membrane'] <= 1
  records = metric_writers.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert any('train/images_per_second' in r for r in records)
  assert any('val/pixel_error' in r for r in records)
  assert os.listdir(tmp_path / 'tensorboard')
  pngs = sorted(os.listdir(tmp_path / 'predictions'))
  assert pngs == ['val_000.png', 'val_001.png']
  from PIL import Image
  panel = np.asarray(Image.open(tmp_path / 'predictions' / pngs[0]))
  assert panel.shape == (64, 3 * 64 + 8, 3) and panel.std() > 0
  assert json.load(open(tmp_path / 'config.json'))['model']['width'] == 4


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 3, 'config.batch_size=3 must be a positive multiple'),
    ('num_steps', 0, 'config.num_steps=0'),
])
def test_bad_config_fails_before_compiling(tmp_path, field, value, message):
  config = _smoke_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):  # as launch.py and runs.py validate first
    validation.validate(config)


def test_bad_crop_size_names_the_field(tmp_path):
  config = _smoke_config()
  config.model.padding = 'VALID'
  config.data.crop_size = 45
  with pytest.raises(ValueError, match='config.data.crop_size=45: input size 45 is invalid'):
    validation.validate(config)


def test_nan_loss_halts_with_the_step(tmp_path):
  config = _smoke_config()
  # A NaN learning rate is refused by the config validator; this one overflows the parameters in
  # the first update, so the loss of step 2 is not finite.
  config.optimizer.learning_rate = 1e30
  config.optimizer.warmup_steps = 0
  with pytest.raises(FloatingPointError, match='at step 2'):
    loop.train_and_evaluate(config, str(tmp_path))


def test_valid_padding_run_trains_and_evaluates(tmp_path):
  config = _smoke_config()
  config.model.padding = 'VALID'
  config.model.depth = 1
  config.data.crop_size = 36  # output 20: labels are center-cropped to match
  scores = loop.train_and_evaluate(config, str(tmp_path))
  assert 0 <= scores['pixel_error'] <= 1


def test_confusion_accumulator_sees_every_validation_pixel():
  acc = metrics_lib.ConfusionAccumulator()
  acc.update(np.array([[3, 1], [2, 4]]))
  acc.update(np.array([[1, 0], [0, 1]]))
  assert acc.result(('a', 'b'))['pixel_accuracy'] == pytest.approx(9 / 12)


def test_workdir_with_another_config_is_refused_unless_allowed(tmp_path):
  loop.train_and_evaluate(_smoke_config(), str(tmp_path))
  changed = _smoke_config()
  changed.model.width = 2
  with pytest.raises(ValueError, match=r"model.width: 4 → 2.*--allow_config_change"):
    loop.train_and_evaluate(changed, str(tmp_path))
  longer = _smoke_config(num_steps=6)  # extending a run is a resumable change
  assert json.load(open(tmp_path / 'config.json'))['num_steps'] == 4
  loop.train_and_evaluate(longer, str(tmp_path))
  assert json.load(open(tmp_path / 'final_metrics.json'))['step'] == 6
  reweighted = _smoke_config(num_steps=8)
  reweighted.loss.terms.dice = 0.5
  with pytest.raises(ValueError, match='loss.terms.dice: 1.0 → 0.5'):
    loop.train_and_evaluate(reweighted, str(tmp_path))
  loop.train_and_evaluate(reweighted, str(tmp_path), allow_config_change=True)
  assert json.load(open(tmp_path / 'final_metrics.json'))['step'] == 8


def test_a_saved_config_that_does_not_list_a_loss_term_weighs_it_zero(tmp_path):
  saved = json.loads(_smoke_config().to_json_best_effort())
  saved['loss']['terms'] = {'cross_entropy': 1.0, 'dice': 1.0}  # a config of before
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert workdir.config_differences(_smoke_config(), str(tmp_path)) == []
  on = _smoke_config()
  on.loss.terms.skeleton_recall = 1.0
  assert workdir.config_differences(on, str(tmp_path)) == ['loss.terms.skeleton_recall: 0.0 → 1.0']


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocked = tmp_path / 'file'
  blocked.write_text('not a directory')
  with pytest.raises(OSError, match='is not writable.*choose another --workdir'):
    loop.train_and_evaluate(_smoke_config(), str(blocked / 'run'))
