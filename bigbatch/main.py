"""Entry point: python -m bigbatch.main --config=configs/X.py[:arg] --workdir=DIR

Intentionally short: parse flags, validate the config, hand over to train.train_and_evaluate.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bigbatch import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/quickstart.py or configs/x.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_RESTART = flags.DEFINE_bool(
    'restart_from_scratch', False,
    'Move an existing workdir aside (to DIR.old-<time>) and start a new run in DIR.')
flags.mark_flags_as_required(['config', 'workdir'])

# Exit codes (documented in README "Resuming and preemption" and docs/errors.md).
EXIT_CONFIG_ERROR = 2  # invalid config, or a workdir holding another experiment
EXIT_NONFINITE = 3  # loss/gradients non-finite for too many consecutive steps
EXIT_CHECKPOINT_ERROR = 4  # no readable checkpoint, or one that does not fit the model
EXIT_PREEMPTED = 75  # SIGTERM: checkpoint written; rerun the same command (EX_TEMPFAIL)


def _fail(kind: str, error: Exception, code: int):
  print(f'bigbatch: {kind}: {error}', file=sys.stderr)
  sys.exit(code)


def run(config, workdir: str, *, restart_from_scratch: bool = False) -> dict:
  """Validates, then trains. Errors a user can fix become one line on stderr and an exit code."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    # Before TensorFlow is imported or anything is written.
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    _fail('config error', e, EXIT_CONFIG_ERROR)
  # pylint: disable=g-import-not-at-top  (these import TensorFlow)
  from bigbatch import checkpoint
  from bigbatch import train
  from bigbatch import workdir as workdir_lib
  try:
    return train.train_and_evaluate(config, workdir, restart_from_scratch=restart_from_scratch)
  except config_lib.ConfigError as e:  # those that need the data set's size
    _fail('config error', e, EXIT_CONFIG_ERROR)
  except workdir_lib.WorkdirError as e:
    _fail('workdir error', e, EXIT_CONFIG_ERROR)
  except checkpoint.CheckpointError as e:
    _fail('checkpoint error', e, EXIT_CHECKPOINT_ERROR)
  except train.NonFiniteError as e:
    _fail('non-finite values', e, EXIT_NONFINITE)
  except train.Preempted as e:
    _fail('stopped', e, EXIT_PREEMPTED)


class _QuietLibraries:
  """Drops INFO lines from orbax (a dozen per checkpoint), keeping its warnings and errors."""

  def filter(self, record) -> bool:
    return record.levelno > logging.INFO or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  result = run(_CONFIG.value, _WORKDIR.value, restart_from_scratch=_RESTART.value)
  logging.info('Final evaluation: %s', result)


if __name__ == '__main__':
  app.run(main)
