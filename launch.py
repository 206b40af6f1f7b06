r"""The one entry point: trains and evaluates a config into a workdir.

  python launch.py --config=experiments/quickstart.py --workdir=runs/quickstart
  python launch.py --config=experiments/isbi.py:cpu --workdir=runs/isbi_cpu \
      --config.data.directory=../shared/data/isbi2012 --config.num_steps=2000

Rerunning with the same workdir resumes from its latest checkpoint.
"""

import logging
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and predictions.',
                    required=True)
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. experiments/isbi.py:cpu.',
                                lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from unet_jax import train  # pylint: disable=g-import-not-at-top  (after flags: jax config)
  # Library INFO chatter (orbax, grain) stays hidden; this project's own progress is shown.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
  project_log = logging.getLogger('unet_jax')
  project_log.addHandler(handler)
  project_log.setLevel(logging.INFO)
  project_log.propagate = False
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
