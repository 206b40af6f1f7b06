"""Up-front config validation: every bad-config class fails in one line, before data or compiling.

In-process tests run `validation.validate` under a guard that fails the test if anything is
compiled (a listener on JAX's backend-compile event) or if any data loader is called. One
subprocess test shows launch.py's one-line stderr and exit status 2.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from absl import flags

from experiments import isbi
from experiments import isbi3d
from experiments import quickstart
from unet_jax.config import validation
from unet_jax.datasets import procedural
from unet_jax.datasets import images as image_files
from unet_jax.datasets import loaders
from unet_jax.datasets import sources
from unet_jax.models import build_model
from unet_jax.models import whole_image
from unet_jax.config.validation import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@pytest.fixture(autouse=True)
def nothing_compiled_or_loaded(monkeypatch):
  """Fails a test whose validation compiles anything or reads any data."""
  compiled = []

  def listener(event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      compiled.append(kwargs.get('fun_name'))

  def refuse(original):
    @functools.wraps(original)  # keeps the signature, which validation inspects
    def refused(*args, **kwargs):
      raise AssertionError(f'validation called {original.__name__}')
    return refused

  for module, name in [(sources, 'load_dataset'), (loaders, 'load_isbi'),
                       (image_files, 'read_image'), (loaders, 'load_folder'),
                       (loaders, 'load_volumes'), (procedural, 'make_em_like')]:
    monkeypatch.setattr(module, name, refuse(getattr(module, name)))
  monkeypatch.setattr(jax, 'jit', refuse(jax.jit))
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield
  jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiled, f'validation compiled {compiled}'


def _smoke() -> ml_collections.ConfigDict:
  return quickstart.get_config('smoke')


def _with(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  """A copy with dotted-path fields set to any value (a config file is not type-checked the way
  a --config override is, so wrong types must be representable)."""
  tree = config.to_dict()
  for path, value in changes.items():
    *parents, leaf = path.split('.')
    node = tree
    for part in parents:
      node = node[part]
    node[leaf] = value
  return ml_collections.ConfigDict(tree)


def _error(config: ml_collections.ConfigDict, **kwargs) -> ConfigError:
  with pytest.raises(ConfigError) as info:
    validation.validate(config, **kwargs)
  message = str(info.value)
  assert '\n' not in message and message == message.strip()
  return info.value


def test_the_shipped_configs_are_valid():
  validation.validate(_smoke())
  for config in (quickstart.get_config(''), isbi.get_config(''), isbi.get_config('cpu'),
                 isbi3d.get_config(''), isbi3d.get_config('smoke')):
    validation.validate(config, mode='predict')  # no data directory, any batch size


def test_the_isbi_configs_are_valid_for_training_on_the_real_data(isbi_dir):
  for config in (isbi.get_config(''), isbi.get_config('cpu'), isbi3d.get_config('smoke')):
    config.data.directory = isbi_dir
    config.batch_size = config.eval_batch_size = 8  # the 8 simulated devices of the tests
    validation.validate(config)


@pytest.mark.parametrize('path,value,closest', [
    ('model.name', 'unett', 'unet'),
    ('model.norm', 'batchnorm', 'batch'),
    ('model.padding', 'same', 'SAME'),
    ('model.upsample', 'transposed', 'transpose'),
    ('model.activation', 'reLU', 'relu'),
    ('model.dtype', 'bfloat', 'bfloat16'),
    ('model.remat', 'ful', 'full'),
    ('model.conv_impl', 'fastest', 'fast'),
    ('optimizer.name', 'adamm', 'adam'),
    ('optimizer.schedule', 'cosin', 'cosine'),
    ('data.source', 'folders', 'folder'),
    ('data.mask_mode', 'binar', 'binary'),
    ('data.label_mode', 'isb', 'isbi'),
    ('data.augment_on', 'devices', 'device'),
    ('data.crop', 'foregrund', 'foreground'),
    ('nonfinite', 'skp', 'skip'),
    ('checkpoint.best_mode', 'maximum', 'max'),
    ('eval.tta', 'dihedral8', 'dihedral'),
])
def test_unknown_names_are_named_with_the_closest_and_every_valid_choice(path, value, closest):
  error = _error(_with(_smoke(), **{path: value}))
  assert error.field == f'config.{path}'
  assert str(error).startswith(f'config.{path}={value!r} is not one of')
  assert f'(did you mean {closest!r}?)' in str(error)
  assert '; expected one of ' in str(error) and closest in str(error).split('expected')[1]


@pytest.mark.parametrize('changes,field,message', [
    ({'loss.terms': {'dic': 1.0}}, 'config.loss.terms.dic', "did you mean 'dice'"),
    ({'loss.options': {'cross_entropy': {'gamma': 2.0}}}, 'config.loss.options.cross_entropy.gamma',
     "of 'cross_entropy'; expected none"),
    ({'loss.terms': {'cross_entropy': 1.0, 'focal': 1.0}, 'loss.options': {'focal': {'gama': 2.0}}},
     'config.loss.options.focal.gama', "did you mean 'gamma'"),
    ({'loss.options': {'focall': {'gamma': 1.0}}}, 'config.loss.options.focall',
     "is not one of the terms of config.loss.terms (did you mean 'focal'?)"),
    ({'data.augment': 'flip|elastc(p=0.5)'}, 'config.data.augment',
     "unknown op 'elastc' (did you mean 'elastic'?); expected ops from blur,"),
    ({'data.augment': 'flip(q=0.5)'}, 'config.data.augment', "op 'flip' has no keyword 'q'"),
    ({'data.augment': 'rotate(p=1.5)'}, 'config.data.augment', 'must be a probability in [0, 1]'),
    ({'model.unetr.hidden_sise': 8}, 'config.model.unetr.hidden_sise',
     "did you mean 'hidden_size'"),
    ({'model.widht': 8}, 'config.model.widht', "did you mean 'width'"),
    ({'data.procedural.num_image': 8}, 'config.data.procedural.num_image',
     "did you mean 'num_images'"),
])
def test_unknown_loss_augment_and_option_names(changes, field, message):
  error = _error(_with(_smoke(), **changes))
  assert error.field == field and message in str(error), str(error)


@pytest.mark.parametrize('path,value,expected', [
    ('num_steps', 1e4, 'has type float; expected an int'),
    ('optimizer.learning_rate', '3e-4', 'has type str; expected a number'),
    ('data.crop_size', '64', 'has type str; expected an int or a tuple of ints'),
    ('data.class_names', 'ab', 'has type str; expected a tuple of strings'),
    ('data.val_indices', 5, 'has type int; expected a tuple of ints'),
    ('eval.isbi_metrics', 'yes', 'has type str; expected a bool'),
    ('data.ignore_label', 1.5, 'has type float; expected None or an int'),
    ('batch_size', True, 'has type bool; expected an int'),
    ('model.remat', 1, 'has type int; expected a bool or one of'),
])
def test_wrong_types_from_a_config_file(path, value, expected):
  error = _error(_with(_smoke(), **{path: value}))
  assert error.field == f'config.{path}' and expected in str(error), str(error)


def test_a_missing_field_is_named():
  config = _smoke()
  del config.optimizer['warmup_steps']
  error = _error(config)
  assert str(error).startswith('config.optimizer.warmup_steps=None is missing; expected an int')


@pytest.mark.parametrize('path,value,expected', [
    ('num_steps', 0, '≥ 1'), ('eval_every', 0, '≥ 1'),
    ('optimizer.learning_rate', -1e-3, '≥ 0'), ('optimizer.learning_rate', float('nan'), '≥ 0'),
    ('data.foreground_p', 1.5, 'in [0, 1]'),
    ('model.dropout_rate', 1.0, 'in [0, 1)'), ('optimizer.b2', 1.0, 'in [0, 1)'),
    ('optimizer.ema_decay', 1.0, 'in [0, 1)'), ('optimizer.momentum', 1.5, 'in [0, 1]'),
    ('checkpoint.keep_latest', 0, '≥ 1'), ('data.interpolation_order', 7, 'in [0, 5]'),
    ('data.std', 0.0, '> 0'), ('optimizer.warmup_steps', -1, '≥ 0'),
    ('optimizer.step_boundaries', (0.5, 1.5), 'every entry in (0, 1]'),
    ('data.folds', 1, '0 (no cross-validation) or ≥ 2 folds'),
    ('mesh.data', 0, '-1 (every device left after fsdp) or ≥ 1'),
])
def test_numbers_out_of_range(path, value, expected):
  error = _error(_with(_smoke(), **{path: value}))
  assert error.field == f'config.{path}' and 'is out of range' in str(error)
  assert str(error).endswith(f'expected {expected}'), str(error)


def test_a_crop_the_valid_convolution_net_cannot_take_suggests_the_nearest_sizes():
  config = isbi.get_config('')  # the paper net: width 64, depth 4, VALID convolutions
  config.data.crop_size = 570
  error = _error(config, mode='predict')
  assert str(error).startswith('config.data.crop_size=570: input size 570 is invalid')
  assert 'expected one of the nearby valid sizes [540, 556, 572, 588, 604]' in str(error)
  config.data.crop_size = 572
  validation.validate(config, mode='predict')
  model = build_model(config.model, num_classes=2)
  assert whole_image.mirror_border(model, (572, 572)) == (92, 92)  # (572 − 388) / 2, the paper's


@pytest.mark.parametrize('changes,field,message', [
    ({'batch_size': 12}, 'config.batch_size',
     'must be a positive multiple of the 8 devices the batch is split over'),
    ({'eval_batch_size': 4}, 'config.eval_batch_size', 'expected a multiple of 8, e.g. 8'),
    ({'mesh.data': 4, 'batch_size': 6}, 'config.batch_size', 'e.g. 4 or 8'),
    ({'optimizer.grad_accum_steps': 3}, 'config.optimizer.grad_accum_steps',
     'must be ≥ 1 and divide config.batch_size=8; expected one of [1, 2, 4, 8]'),
    ({'mesh.fsdp': 3}, 'config.mesh.fsdp', 'does not divide the 8 devices'),
    ({'mesh.data': 16}, 'config.mesh.data', 'needs 16 devices but 8 are available'),
    ({'data.crop_size': (32, 32, 32)}, 'config.data.crop_size', 'gives 2D examples'),
    ({'checkpoint.best_metric': 'dice_membrnae'}, 'config.checkpoint.best_metric',
     "(did you mean 'dice_membrane'?); expected one of pixel_accuracy, pixel_error,"),
    ({'checkpoint.best_metric': 'hd95_membrane'}, 'config.checkpoint.best_metric',
     'is not one of the metrics evaluation produces'),
    ({'checkpoint.best_metric': 'pixel_error'}, 'config.checkpoint.best_mode',
     "keeps the worst checkpoints by config.checkpoint.best_metric='pixel_error'"),
    ({'loss.terms': {'binary_cross_entropy': 1.0}}, 'config.loss.terms.binary_cross_entropy',
     'cannot be used with the 2-class logits of the model'),
    ({'loss.terms': {'focal': 1.0}, 'loss.options': {'focal': {'gamma': -2.0}}},
     'config.loss.options.focal', 'gamma must be a finite number ≥ 0.0; got -2.0'),
    ({'loss.terms': {'cross_entropy': 0.0}}, 'config.loss.terms', 'weighs every term 0'),
    ({'loss.deep_supervision_weights': (0.5, 0.5)}, 'config.loss.deep_supervision_weights',
     'does not fit the 1 output head(s)'),
    ({'data.foreground_class': 2}, 'config.data.foreground_class', 'class ids in [0, 2)'),
    ({'eval.hausdorff_classes': (3,)}, 'config.eval.hausdorff_classes', 'names no class'),
    ({'data.class_names': ('cell', 'cell')}, 'config.data.class_names', '2 to 254 distinct'),
    ({'data.source': 'folder', 'data.mask_mode': 'binary',
      'data.class_names': ('a', 'b', 'c')}, 'config.data.mask_mode', 'gives 2 classes'),
    ({'data.val_indices': (4, 9)}, 'config.data.val_indices',
     'does not leave training examples among the config.data.procedural.num_images=6'),
    ({'data.weight_map.class_weights': 'equal'}, 'config.data.weight_map.class_weights',
     "expected 'balanced' or a pair"),
    ({'model.name': 'unetr'}, 'config.model.name',
     'cannot be built from config.model: model.depth=2 does not match model.patch_size=16'),
])
def test_impossible_combinations(changes, field, message):
  error = _error(_with(_smoke(), **changes))
  assert error.field == field and message in str(error), str(error)


def test_deep_supervision_weights_must_match_the_heads_of_unet_plus_plus():
  config = _with(_smoke(), **{'model.name': 'unet_plus_plus',
                              'model.unet_plus_plus.deep_supervision': True,
                              'loss.deep_supervision_weights': (1.0, 1.0, 1.0)})
  assert 'does not fit the 2 output head(s)' in str(_error(config))
  validation.validate(_with(config, **{'loss.deep_supervision_weights': (0.3, 0.7)}))


def test_hausdorff_metrics_count_when_evaluation_produces_them():
  config = _with(_smoke(), **{'eval.hausdorff_classes': (1,),
                              'checkpoint.best_metric': 'hd95_membrane',
                              'checkpoint.best_mode': 'min'})
  validation.validate(config)


@pytest.mark.parametrize('changes,field,message', [
    ({'data.source': 'isbi'}, 'config.data.directory', "config.data.directory='' is not set"),
    ({'data.source': 'folder'}, 'config.data.images_dir', 'is not a directory'),
    ({'data.source': 'volumes', 'data.image_paths': ('a.tif',)}, 'config.data.label_paths',
     'does not pair with config.data.image_paths (1)'),
])
def test_source_fields_are_required(changes, field, message):
  error = _error(_with(_smoke(), **changes))
  assert error.field == field and message in str(error), str(error)
  validation.validate(_with(_smoke(), **changes), mode='predict')  # predict reads no data


def test_source_paths_must_exist(tmp_path):
  error = _error(_with(_smoke(), **{'data.source': 'isbi', 'data.directory': str(tmp_path)}))
  assert 'holding train-volume.tif and train-labels.tif' in str(error)
  missing = str(tmp_path / 'missing.tif')
  error = _error(_with(_smoke(), **{'data.source': 'volumes', 'data.image_paths': (missing,),
                                    'data.label_paths': (missing,)}))
  assert f'names {missing}, which does not exist' in str(error)


def test_predict_and_export_skip_the_training_batch_sizes():
  config = _with(_smoke(), batch_size=3)
  assert _error(config, mode='eval').field == 'config.batch_size'
  validation.validate(config, mode='predict')
  validation.validate(config, mode='export')


def test_validation_names_the_field_and_same_nets_keep_no_border():
  config = _smoke()
  validation.validate(config)
  model = build_model(config.model, num_classes=len(config.data.class_names))
  assert whole_image.mirror_border(model, (64, 64)) == (0, 0)  # SAME padding trims nothing
  with pytest.raises(ConfigError, match="config.nonfinite='ignore' is not one of"):
    validation.validate(_with(_smoke(), nonfinite='ignore'))


def test_sweep_points_are_validated_with_the_point_named():
  config = _smoke()
  with pytest.raises(ConfigError) as info:
    validation.validate_points(config, [{'optimizer.learning_rate': 1e-3},
                                               {'optimizer.learnig_rate': 1e-3}])
  assert str(info.value).startswith("config.optimizer.learnig_rate=0.001 is not a config field")
  assert '(closest: learning_rate)' in str(info.value)
  assert str(info.value).endswith("(sweep point 2 of 2: {'optimizer.learnig_rate': 0.001})")
  with pytest.raises(ConfigError, match=r'config.model.width=0 is out of range.*sweep point 1'):
    validation.validate_points(config, [{'model.width': 0}])
  validation.validate_points(config, quickstart.sweep())


def test_flag_errors_become_one_line_naming_the_field():
  argv = ['launch.py', f'--config={ROOT}/experiments/quickstart.py:smoke', '--workdir=w']
  unknown = KeyError('\'nme\'\nDid you mean "name" instead of "nme"?')
  message = validation.flag_error(unknown, argv + ['--config.model.nme=unet'])
  assert message == ("config.model.nme='unet' is not a config field (config.model has no field "
                     "'nme'); expected a field of config.model (closest: name)")
  wrong = flags.IllegalFlagValueError(
      "flag --config.num_steps=abc: invalid literal for int() with base 10: 'abc'")
  message = validation.flag_error(wrong, argv + ['--config.num_steps=abc'])
  assert message.startswith("config.num_steps='abc' cannot be read as int")
  assert message.endswith("expected int like the config file's value 4")
  message = validation.flag_error(ValueError('x'), ['launch.py', '--config=nope.py'])
  assert message.startswith('--config=nope.py cannot be loaded: FileNotFoundError')


def test_an_entry_of_a_mapping_field_points_to_the_whole_mapping_as_one_value():
  argv = ['launch.py', '--config=' + os.path.join(ROOT, 'experiments', 'quickstart.py') + ':smoke']
  message = validation.flag_error(KeyError('focal'), argv + ['--config.loss.options.focal.gamma=2'])
  assert message == (
      "config.loss.options.focal.gamma='2' cannot be set entry by entry (config.loss.options "
      "holds its own entries, none named 'focal'); expected the whole mapping as one value, e.g. "
      """--config.loss.options='{"focal": ...}'""")
  # A near miss in a mapping that lists its entries is still a typo with a suggestion.
  message = validation.flag_error(KeyError('dic'), argv + ['--config.loss.terms.dic=1'])
  assert "closest: dice" in message


def test_launch_prints_one_line_and_exits_2_before_building_anything(tmp_path):
  config = os.path.join(ROOT, 'experiments', 'quickstart.py') + ':smoke'
  for override, expected in [
      ('--config.model.name=unett', "launch.py: error: config.model.name='unett' is not one of "
       "the valid choices (did you mean 'unet'?); expected one of attention_unet,"),
      ('--config.model.nme=unet', "launch.py: error: config.model.nme='unet' is not a config "
       "field (config.model has no field 'nme'); expected a field of config.model (closest: "
       'name)')]:
    workdir = tmp_path / 'run'
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={config}',
         f'--workdir={workdir}', override], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), process.stderr
    assert not workdir.exists()  # failed before anything was built or written


def test_every_row_of_the_isbi_ablation_is_a_valid_config():
  path = os.path.join(ROOT, 'benchmarks', 'isbi_ablation.py')
  spec = importlib.util.spec_from_file_location('isbi_ablation', path)
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  for row in ablation.ROWS:
    validation.validate(ablation.get_config(row), spatial_rank=2, data_paths=False,
                        devices=jax.devices()[:1])  # the study runs on one CPU device
  with_topology = ablation.get_config('recipe_skeleton_recall')
  assert with_topology.loss.terms.skeleton_recall == 1.0 and with_topology.loss.terms.dice == 1.0
