r"""The one entry point: train (default), evaluate or predict with a config and a workdir.

  python launch.py --config=experiments/quickstart.py --workdir=runs/quickstart
  python launch.py --config=experiments/isbi.py:cpu --workdir=runs/isbi_cpu \
      --config.data.directory=../shared/data/isbi2012 --config.num_steps=2000
  python launch.py --mode=eval --config=... --workdir=... --split=val --checkpoint=best
  python launch.py --mode=predict --config=... --workdir=... --input=IMAGES --output=DIR --tta=dihedral
  python launch.py --mode=export --config=... --workdir=... --output=predictor.stablehlo
  python launch.py --config=experiments/isbi.py:cpu --workdir=runs/sweep --sweep
  python launch.py --config=experiments/isbi.py:cpu --workdir=/mnt/shared/sweep --sweep \
      --study=isbi --storage=postgresql://USER:PASSWORD@HOST:5432/DB   (one worker per command)
  python launch.py --config=experiments/isbi.py:cpu --workdir=runs/cv --config.data.folds=5
  python launch.py --mode=compile --config=experiments/isbi.py --topology=v5e:4x4 \
      --config.batch_size=128 --config.model.dtype=bfloat16

Compile mode builds the train, eval and tiled-prediction programs of a run for a TPU slice or
NVIDIA GPUs (--topology=h100:8) on this machine (pip install -r requirements-aot.txt), reads no
data, and prints per-chip memory, FLOPs, a roofline bound and the compile time; a program that
does not fit ends with one line naming the change that makes it fit.

Several hosts: run the same command on every host with --distributed (Cloud TPU and SLURM are
detected by jax.distributed), or name the coordinator explicitly:
  python launch.py ... --coordinator_address=10.0.0.2:1234 --num_processes=2 --process_id=0

Rerunning with the same workdir resumes from its latest checkpoint; SIGTERM and Ctrl-C save one
first. A config or flag mistake (a bad --config.* override included) ends with one line
`launch.py: error: ...` and exit status 2, before anything is built. Bad data, an unusable
workdir, a workdir another launcher holds, unreadable checkpoints, a full disk and a diverged
run end with one line and status 1.
"""

import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

MODES = ('train', 'eval', 'predict', 'export', 'compile')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and predictions (compile '
                    'mode: optional, gets compile_<topology>.json).')
flags.DEFINE_enum('mode', 'train', MODES, 'train (resumes automatically), eval a checkpoint, '
                  'predict images with it, export it as StableHLO, or compile the programs of a '
                  'run for --topology ahead of time.')
flags.DEFINE_bool('sweep', False, "Work on an Optuna study of the config file's sweep() points "
                  'or search_space(trial): trains its trials in WORKDIR/trial_NNN.')
flags.DEFINE_string('study', None, '--sweep: the study\'s name (default: the name of --workdir).')
flags.DEFINE_string('storage', None, '--sweep: where the study lives, e.g. '
                    'postgresql://USER:PASSWORD@HOST:5432/DB or journal:///SHARED/study.log '
                    '(default: sqlite:///WORKDIR/study.db).')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir although its saved config differs from this one.')
flags.DEFINE_bool('restart', False, 'Train from step 0 when the workdir has checkpoints but none '
                  'is readable (they stay in checkpoints_quarantine/).')
flags.DEFINE_string('split', 'val', 'eval mode: val, train or all.')
flags.DEFINE_string('checkpoint', 'best', 'eval mode: best, latest or a step number.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() with auto-detection (Cloud TPU, SLURM).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.DEFINE_string('input', None, 'predict mode: a PNG/TIFF file or a folder of them.')
flags.DEFINE_string('output', None, 'predict mode: output folder; export mode: output file.')
flags.DEFINE_enum('tta', None, ('none', 'flips', 'dihedral'),
                  'predict mode: test-time augmentation (dihedral = the 8 flips/rotations); '
                  'default: config.eval.tta, what the run was evaluated with.')
flags.DEFINE_string('tile_size', None, 'predict/export: tile input size (default: crop_size).')
flags.DEFINE_float('overlap', 0.25, 'predict mode: tile overlap fraction for SAME-padding nets.')
flags.DEFINE_integer('min_size', 0, 'predict mode: remove components smaller than this.')
flags.DEFINE_integer('hole_size', 0, 'predict mode: fill holes smaller than this.')
flags.DEFINE_bool('crf', False, 'predict mode: refine 2D probabilities with a dense CRF.')
flags.DEFINE_integer('max_pixels', 1 << 28, 'predict mode: refuse image files that claim more '
                     'pixels than this, before decoding them.')
flags.DEFINE_string('topology', None, 'compile mode: a TPU slice, GENERATION:AxB[xC], e.g. '
                    'v5e:4x4, v5p:2x2x2, v6e:2x4; or NVIDIA GPUs, GPU:N or GPU:HOSTSxN, e.g. '
                    'h100:8, a100:2x8.')
flags.DEFINE_integer('num_slices', 1, 'compile mode: slices of --topology (multislice).')
flags.DEFINE_string('image_size', None, 'compile mode: spatial size of evaluation images, e.g. '
                    '512,512 (default: what config.data.source fixes, else the crop size).')
flags.DEFINE_float('memory_limit_gib', None, 'compile mode: memory a program may use per chip '
                   '(default: a TPU\'s HBM, as its compiler enforces it; the 75% of a GPU\'s '
                   'that JAX preallocates).')
flags.DEFINE_integer('channels', None, 'compile mode: image channels (default: what '
                     'config.data.source fixes, else 1).')
flags.DEFINE_bool('keep_host_memory', True, 'Keep freed host memory in the process for reuse '
                  '(glibc; unet_jax/host_memory.py): XLA:CPU otherwise maps and faults in each '
                  'step\'s temporary buffer anew. Costs resident memory near the peak.')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. experiments/isbi.py:cpu.',
                                lock_config=True)
FLAGS = flags.FLAGS


def _sweep_space():
  from unet_jax.tuning import space  # pylint: disable=g-import-not-at-top  (after parsing)
  # The file of --config=file.py:arg, without the argument get_config() takes.
  path = config_flags.get_config_filename(FLAGS['config']).partition(':')[0]
  try:
    return space.load(path)
  except space.SpaceError as e:
    raise _FlagError(str(e)) from None


def _show_project_logs():
  # Library INFO chatter (orbax, grain) stays hidden; this project's own progress is shown.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  project_log = logging.getLogger('unet_jax')
  project_log.addHandler(handler)
  project_log.setLevel(logging.INFO)
  project_log.propagate = False


def _drop_closed_event_loop_reports() -> None:
  # When a checkpoint write fails, orbax closes its save thread's event loop while tensorstore
  # is still finishing that save's other writes; each one then calls back into the closed loop,
  # and tensorstore reports the RuntimeError as unraisable: dozens of identical tracebacks after
  # the real error, which orbax logs and _fail states in one line. Nothing else is dropped.
  report = sys.unraisablehook

  def hook(unraisable):
    if not (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      report(unraisable)

  sys.unraisablehook = hook


PLUGIN_ERROR = 'Jax plugin configuration error'
# The logger of jax._src.xla_bridge, which starts the plugins.
PLUGIN_LOGGER = 'jax._src.xla_bridge'


class _PluginErrorInOneLine(logging.Filter):
  """A JAX plugin that fails to start is logged with two chained tracebacks: on a machine
  without a GPU, the CUDA plugin of requirements-aot.txt (there to compile for GPUs) finds no
  cuDNN at every launch. The record keeps JAX's message and the error's; JAX goes on without
  the plugin as before."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and record.getMessage().startswith(PLUGIN_ERROR):
      message = f'{record.getMessage()}: {record.exc_info[1]}'
      record.msg, record.args, record.exc_info, record.exc_text = message, (), None, None
    return True


def _fail(message: str, status: int) -> None:
  # One write, so that a traceback another thread prints at the same moment (orbax and
  # tensorstore report a failed save from their own threads, piece by piece) cannot split the
  # line; the newline before it ends any line such a thread left unfinished.
  sys.stderr.write(f'\nlaunch.py: error: {message}\n')
  sys.stderr.flush()
  sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises only when first used
    return remaining
  except Exception as e:  # pylint: disable=broad-except  (absl flag errors, and ml_collections'
    # KeyError/AttributeError for an unknown --config.* key)
    from unet_jax.config import validation  # pylint: disable=g-import-not-at-top  (after parsing)
    _fail(validation.flag_error(e, argv), 2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger(PLUGIN_LOGGER).addFilter(_PluginErrorInOneLine())  # before JAX starts
  if FLAGS.keep_host_memory:
    from unet_jax import host_memory  # pylint: disable=g-import-not-at-top  (before jax starts)
    host_memory.keep_freed_memory()
  if FLAGS.mode == 'compile':
    # The programs are built for the target's abstract devices; this host computes nothing, so
    # its own backend is the CPU, and libtpu must not look for a TPU or a metadata server.
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
    # Compile times are part of the report, so nothing may come from a compilation cache.
    os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  elif not FLAGS.workdir:
    _fail(f'--mode={FLAGS.mode} needs --workdir', 2)
  if FLAGS.distributed or FLAGS.coordinator_address:
    import jax  # pylint: disable=g-import-not-at-top
    # Before anything touches a device: every process must join first.
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  # pylint: disable-next=g-import-not-at-top  (after flag parsing and distributed setup)
  from unet_jax.config import validation
  _show_project_logs()
  _drop_closed_event_loop_reports()
  try:
    _run(FLAGS.config, FLAGS.workdir)
  except (validation.ConfigError, _FlagError) as e:
    _fail(str(e), 2)
  except KeyboardInterrupt:  # inside the training loop Ctrl-C saves and returns instead
    _fail('interrupted (Ctrl-C) before training started or after it ended; rerun to go on', 130)
  except (ValueError, OSError, FloatingPointError) as e:
    # Data, workdir, checkpoint and divergence errors carry their own one-line message, which
    # names the file, field or step; UNET_JAX_TRACEBACK=1 shows where it was raised.
    if os.environ.get('UNET_JAX_TRACEBACK'):
      raise
    _fail(' '.join(str(e).split()) or type(e).__name__, 1)


class _FlagError(ValueError):
  """A launch.py flag with an unusable value."""


def _ints(flag: str, example: str) -> tuple[int, ...]:
  """The comma-separated ints of --flag, or a _FlagError naming it."""
  try:
    return tuple(int(n) for n in FLAGS[flag].value.split(','))
  except ValueError:
    raise _FlagError(f'--{flag}={FLAGS[flag].value!r} is not an int or ints separated by commas '
                     f'(e.g. {example})') from None


def _tile_size():
  if FLAGS.tile_size is None:
    return None
  tile = _ints('tile_size', '572 or 64,572,572')
  return tile[0] if len(tile) == 1 else tile


def _run(config, workdir: str) -> None:
  """Runs the mode the flags ask for; each config is validated once before anything is built
  (here for a run, predict and export; by sweeps.py for sweeps, by runs.py for folds and eval)."""
  # pylint: disable-next=g-import-not-at-top  (after flag parsing and distributed setup)
  from unet_jax import runs, sweeps
  from unet_jax.config import validation  # pylint: disable=g-import-not-at-top
  from unet_jax.inference import export, predict  # pylint: disable=g-import-not-at-top
  from unet_jax.training import loop  # pylint: disable=g-import-not-at-top
  tile = _tile_size()
  if (FLAGS.study or FLAGS.storage) and not FLAGS.sweep:
    raise _FlagError('--study and --storage name the study of a sweep; add --sweep')
  if FLAGS.mode in ('predict', 'export') and not FLAGS.output:
    raise _FlagError(f'--mode={FLAGS.mode} needs --output (a folder for predict, a file for '
                     'export)')
  if FLAGS.mode == 'compile':
    _compile(config, workdir)
  elif FLAGS.mode == 'eval':
    runs.evaluate_checkpoint(config, workdir, split=FLAGS.split, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'predict':
    if not FLAGS.input:
      raise _FlagError('--mode=predict needs --input (a PNG/TIFF file or a folder of them)')
    validation.validate(config, mode='predict')
    predict.run(config, workdir, FLAGS.input, FLAGS.output, tta=FLAGS.tta or config.eval.tta,
                checkpoint=FLAGS.checkpoint, tile_size=tile, overlap=FLAGS.overlap,
                min_size=FLAGS.min_size, hole_size=FLAGS.hole_size, crf=FLAGS.crf,
                max_pixels=FLAGS.max_pixels)
  elif FLAGS.mode == 'export':
    validation.validate(config, mode='export')
    export.run(config, workdir, FLAGS.output, checkpoint=FLAGS.checkpoint, tile_size=tile)
  elif FLAGS.sweep:
    sweeps.run(config, workdir, _sweep_space(), study_name=FLAGS.study,
               storage_url=FLAGS.storage)
  elif config.data.folds:
    runs.run_kfold(config, workdir)
  else:
    validation.validate(config)
    loop.train_and_evaluate(config, workdir, allow_config_change=FLAGS.allow_config_change,
                            restart=FLAGS.restart)


def _compile(config, workdir: str | None) -> None:
  """--mode=compile: the run's programs compiled for --topology, a per-chip table on stdout."""
  # pylint: disable=g-import-not-at-top  (after flag parsing and the platform choice)
  from unet_jax import storage
  from unet_jax.aot import programs, report, targets
  from unet_jax.config import validation
  from unet_jax.datasets import sources
  from unet_jax.models import whole_image
  # pylint: enable=g-import-not-at-top
  if not FLAGS.topology:
    raise _FlagError('--mode=compile needs --topology, e.g. v5e:4x4 (TPU generations: '
                     f'{", ".join(targets.TPU_GENERATIONS)}) or h100:8 (GPUs: '
                     f'{", ".join(targets.GPUS)})')
  try:
    target = targets.target(FLAGS.topology, num_slices=FLAGS.num_slices)
  except targets.TargetError as e:
    raise _FlagError(str(e)) from None
  rank = sources.spatial_rank(config.data)
  validation.validate(config, mode='compile', devices=target.devices)
  fixed = sources.example_shape(config.data)
  if FLAGS.image_size:
    image = _ints('image_size', '512,512')
    if len(image) != rank:
      raise _FlagError(f'--image_size={FLAGS.image_size!r} has {len(image)} dims; '
                       f'config.data.source={config.data.source!r} has {rank}')
  elif fixed:
    image = fixed[0]
  else:
    image = whole_image.crop_shape(config.data.crop_size, rank)
    print(f'evaluation images taken as {image} (config.data.source={config.data.source!r} does '
          'not fix their size; --image_size sets it)')
  channels = FLAGS.channels or (fixed[1] if fixed else 1)
  if FLAGS.memory_limit_gib is not None and FLAGS.memory_limit_gib <= 0:
    raise _FlagError(f'--memory_limit_gib={FLAGS.memory_limit_gib} must be > 0')
  rows = report.compile_for_target(
      config, target, shapes=programs.Shapes(image, channels), spatial_rank=rank,
      memory_limit=None if FLAGS.memory_limit_gib is None else FLAGS.memory_limit_gib * 2**30)
  print(report.table(rows, target))
  if workdir:
    name = target.name.replace(':', '_').replace('×', 'slices_')  # 2×v5e:2x2 → 2slices_v5e_2x2
    path = storage.join(workdir, f'compile_{name}.json')
    storage.write_atomic(path, report.to_json(rows, target))
    print(f'saved {path}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=_parse_flags)
