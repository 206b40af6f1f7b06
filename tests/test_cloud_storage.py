"""gs:// workdirs, data and outputs against a real GCS emulator (tests/gcs_emulator.py).

Each run goes through the launcher as a user would start it; the emulator is the only storage
the bucket runs touch. Which client reads which endpoint variable is in gcs_emulator.py.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

import gcs_emulator as emulator_lib
from experiments import quickstart
from unet_jax import checkpointing
from unet_jax import storage
from unet_jax.datasets import loaders
from unet_jax.inference import export
from unet_jax.training import loop
from unet_jax.training import metric_writers
from unet_jax.training import train_step
from unet_jax.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'experiments/quickstart.py') + ':smoke'


def _launch(*flags, env=None, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={SMOKE}',
                         *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env)


def _scalar_tags(event_file: bytes) -> set[str]:
  """The scalar tags of a TensorBoard event file, read record by record (TFRecord framing:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags, offset = set(), 0
  while offset < len(event_file):
    (length,) = struct.unpack('<Q', event_file[offset:offset + 8])
    event = event_pb2.Event.FromString(event_file[offset + 12:offset + 12 + length])
    tags |= {value.tag for value in event.summary.value}
    offset += 12 + length + 4
  return tags


def test_train_then_eval_predict_and_export_in_one_place(storage_root, tmp_path):
  """Every file of a run lands where --workdir points, local or gs://, and is read back from
  there by eval, predict and export."""
  workdir = storage.join(storage_root, 'run')
  trained = _launch(f'--workdir={workdir}', '--config.num_steps=4', '--config.eval_every=2',
                    '--config.log_every=1', '--config.num_overlays=1')
  assert trained.returncode == 0, trained.stderr
  for name in ('config.json', 'metrics.jsonl', 'final_metrics.json', 'intensity_scaling.json',
               'plots/loss.png', 'plots/predictions.png', 'predictions/val_000.png'):
    assert storage.is_file(storage.join(workdir, name)), name
  assert not storage.exists(storage.join(workdir, 'run.lock'))  # released at the end
  records = metric_writers.read_jsonl(storage.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3, 4]
  assert checkpointing.complete_steps(storage.join(workdir, 'checkpoints')) == [2, 4]
  events = [n for n in storage.list_names(storage.join(workdir, 'tensorboard'))
            if n.startswith('events.out.tfevents')]
  assert len(events) == 1
  tags = _scalar_tags(storage.read_bytes(storage.join(workdir, 'tensorboard', events[0])))
  assert {'train/loss', 'val/dice_membrane'} <= tags

  evaluated = _launch(f'--workdir={workdir}', '--mode=eval', '--checkpoint=latest')
  assert evaluated.returncode == 0, evaluated.stderr
  scores = json.loads(storage.read_text(storage.join(workdir, 'eval_val_step4.json')))
  final = json.loads(storage.read_text(storage.join(workdir, 'final_metrics.json')))
  assert scores['dice_membrane'] == pytest.approx(final['dice_membrane'], abs=1e-6)

  inputs = storage.join(storage_root, 'inputs')
  images = loaders.load_procedural(quickstart.get_config('smoke').data.procedural).images
  for i in range(2):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, images[i, ..., 0])
    storage.write_atomic(storage.join(inputs, f'image_{i}.tif'), buffer.getvalue())
  outputs = storage.join(storage_root, 'predicted')
  predicted = _launch(f'--workdir={workdir}', '--mode=predict', f'--input={inputs}',
                      f'--output={outputs}')
  assert predicted.returncode == 0, predicted.stderr
  mask = tifffile.imread(io.BytesIO(storage.read_bytes(storage.join(outputs, 'image_0_mask.tif'))))
  assert mask.shape == images.shape[1:3] and set(np.unique(mask)) <= {0, 1}
  assert storage.is_file(storage.join(outputs, 'image_1_overlay.png'))

  exported_path = storage.join(storage_root, 'export', 'predictor.stablehlo')
  exported = _launch(f'--workdir={workdir}', '--mode=export', f'--output={exported_path}')
  assert exported.returncode == 0, exported.stderr
  signature = export.read_signature(exported_path)
  tile = signature['metadata']['tile_shape']
  logits = export.load(exported_path).call(np.zeros((1, *tile, 1), np.float32))
  assert logits.shape == (1, *signature['metadata']['output_shape'], 2)


def test_a_sweep_and_k_fold_write_everything_into_the_bucket(bucket, tmp_path):
  """Trials and folds train in the bucket; the study itself lives where --storage says (SQLite
  and journal files cannot be objects)."""
  sweep_dir = f'{bucket}/sweep'
  swept = _launch(f'--workdir={sweep_dir}', '--sweep', f'--storage=journal://{tmp_path}/s.log',
                  '--config.num_steps=2', '--config.eval_every=2', '--config.num_overlays=0')
  assert swept.returncode == 0, swept.stderr
  table = storage.read_text(f'{sweep_dir}/sweep_results.csv')
  assert table.count('COMPLETE') == 2, table
  assert storage.is_file(f'{sweep_dir}/sweep.png')
  for trial in ('trial_000', 'trial_001'):
    assert storage.is_file(f'{sweep_dir}/{trial}/final_metrics.json')
  no_storage = _launch(f'--workdir={sweep_dir}', '--sweep', timeout=120)
  assert 'pass --storage=URL' in _one_line_error(no_storage)

  folds = _launch(f'--workdir={bucket}/cv', '--config.data.folds=2', '--config.num_steps=2',
                  '--config.eval_every=2', '--config.num_overlays=0')
  assert folds.returncode == 0, folds.stderr
  summary = json.loads(storage.read_text(f'{bucket}/cv/kfold.json'))
  assert len(summary['folds']) == 2 and 'dice_membrane' in summary['summary']
  assert storage.is_file(f'{bucket}/cv/fold_1/final_metrics.json')


def _one_line_error(result) -> str:
  lines = [line for line in result.stderr.splitlines() if line.startswith('launch.py: error:')]
  assert result.returncode == 1, result.stderr
  assert len(lines) == 1, result.stderr
  return lines[0]


def test_a_missing_bucket_is_one_line_before_anything_compiles(gcs_emulator):
  result = _launch('--workdir=gs://no-such-bucket-anywhere/run', timeout=120)
  line = _one_line_error(result)
  assert 'bucket gs://no-such-bucket-anywhere does not exist' in line
  assert '--workdir=gs://no-such-bucket-anywhere/run' in line
  assert 'Traceback' not in result.stderr and 'step' not in result.stderr


@pytest.mark.parametrize('refuse, expected', [
    (emulator_lib.read_only, 'no permission to write to gs://'),
    (emulator_lib.needs_credentials, 'no credentials to write to gs://'),
])
def test_an_unwritable_bucket_is_one_line_before_anything_compiles(gcs_emulator, bucket,
                                                                   refuse, expected):
  proxy = emulator_lib.Proxy(gcs_emulator.url, refuse)
  try:
    env = dict(os.environ, **emulator_lib.client_environment(proxy.url))
    result = _launch(f'--workdir={bucket}/run', env=env, timeout=120)
  finally:
    proxy.stop()
  line = _one_line_error(result)
  assert expected in line and f'{bucket}/run' in line
  assert 'Traceback' not in result.stderr
  assert gcs_emulator.object_names(bucket.removeprefix('gs://')) == []


def test_transient_errors_are_retried(gcs_emulator, bucket):
  """Every 20th request to the bucket fails with 503; the run still completes, all of it."""
  flaky = emulator_lib.FailEvery(20)
  proxy = emulator_lib.Proxy(gcs_emulator.url, flaky)
  try:
    env = dict(os.environ, **emulator_lib.client_environment(proxy.url))
    result = _launch(f'--workdir={bucket}/run', '--config.num_steps=2', '--config.eval_every=2',
                     '--config.num_overlays=0', env=env)
  finally:
    proxy.stop()
  assert result.returncode == 0, result.stderr
  assert flaky.failed >= 3
  final = json.loads(storage.read_text(f'{bucket}/run/final_metrics.json'))
  assert final['step'] == 2


def test_a_checkpoint_cut_short_in_a_bucket_is_never_taken_as_complete(bucket):
  """Orbax marks a step uploaded to a bucket complete with commit_success.txt, written last; a
  step without it is moved aside and the run resumes from the one before."""
  config = quickstart.get_config('smoke')
  config.update(dict(num_steps=4, eval_every=4, num_overlays=0))
  config.checkpoint.every = 2
  workdir = f'{bucket}/run'
  loop.train_and_evaluate(config, workdir)
  directory = storage.join(workdir, 'checkpoints')
  assert checkpointing.complete_steps(directory) == [2, 4]
  storage.remove(storage.join(directory, '4', checkpointing.COMMIT_MARKER))
  assert checkpointing.damaged_steps(directory) == [4]

  setup = train_step.build(config, input_channels=1, spatial_rank=2)
  state, _ = checkpointing.restore_latest(checkpointing.run_manager(config, workdir),
                                          setup.abstract_state)
  assert int(state.step) == 2
  assert checkpointing.complete_steps(directory) == [2]
  moved = storage.join(checkpointing.quarantine_directory(directory), '4')
  assert storage.is_file(storage.join(moved, '_CHECKPOINT_METADATA'))


def test_isbi_stacks_and_image_folders_read_from_a_bucket_like_from_disk(bucket, isbi_dir,
                                                                          tmp_path):
  for name in loaders.ISBI_FILES.values():
    with open(os.path.join(isbi_dir, name), 'rb') as f:
      storage.write_atomic(f'{bucket}/isbi/{name}', f.read())
  local, remote = loaders.load_isbi(isbi_dir), loaders.load_isbi(f'{bucket}/isbi')
  np.testing.assert_array_equal(remote.images, local.images)
  np.testing.assert_array_equal(remote.labels, local.labels)

  rng = np.random.default_rng(0)
  for folder in ('images', 'masks'):
    os.makedirs(tmp_path / folder)
  for i in range(3):
    image = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    mask = (image > 128).astype(np.uint8)
    for root in (str(tmp_path), f'{bucket}/folder'):
      for folder, array in (('images', image), ('masks', mask)):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array)
        storage.write_atomic(storage.join(root, folder, f'cell_{i}.tif'), buffer.getvalue())
  load = lambda root: loaders.load_folder(storage.join(root, 'images'),
                                          storage.join(root, 'masks'), num_classes=2,
                                          mask_mode='binary')
  local, remote = load(str(tmp_path)), load(f'{bucket}/folder')
  np.testing.assert_array_equal(remote.images, local.images)
  np.testing.assert_array_equal(remote.labels, local.labels)


def test_a_lock_from_another_host_is_taken_over_only_when_its_heartbeat_stopped(storage_root):
  """A preempted VM never removes its lock; another host cannot check its pid, so the age of
  the lock's heartbeat decides."""
  workdir = storage.join(storage_root, 'run')
  lock_path = storage.join(workdir, workdir_lib.LOCK_FILE)
  owner = {'pid': 1234, 'host': 'another-host', 'started': 'earlier'}
  storage.write_atomic(lock_path, json.dumps({**owner, 'heartbeat': time.time() - 30}))
  with pytest.raises(workdir_lib.WorkdirBusyError, match='in use by pid 1234 on another-host'):
    workdir_lib.WorkdirLock(workdir).acquire()
  stale = time.time() - workdir_lib.LOCK_STALE_SECONDS - 1
  storage.write_atomic(lock_path, json.dumps({**owner, 'heartbeat': stale}))
  with workdir_lib.WorkdirLock(workdir):
    assert json.loads(storage.read_text(lock_path))['pid'] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirBusyError):  # and now it is held again
      workdir_lib.WorkdirLock(workdir).acquire()
  assert not storage.exists(lock_path)


def test_growing_files_in_a_bucket_append_across_reopenings_and_batch_uploads(bucket):
  path = f'{bucket}/run/metrics.jsonl'
  first = storage.GrowingFile(path)
  first.write('a\n')
  first.flush()  # the first flush uploads
  first.write('b\n')
  first.flush()  # within MIN_REWRITE_SECONDS of the last upload: kept back
  assert storage.read_text(path) == 'a\n'
  first.close()  # always uploads
  assert storage.read_text(path) == 'a\nb\n'
  second = storage.GrowingFile(path)  # a resumed run appends to what is there
  second.write('c\n')
  second.flush(force=True)
  assert storage.read_text(path) == 'a\nb\nc\n'
