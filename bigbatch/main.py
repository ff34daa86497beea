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
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_CONFIG_ERROR = 2


def run(config, workdir: str) -> dict:
  """Validates, then trains. A ConfigError becomes one line on stderr and exit code 2."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    # Before TensorFlow is imported or anything is written.
    config_lib.validate(config, jax.device_count())
    from bigbatch import train  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    return train.train_and_evaluate(config, workdir)
  except config_lib.ConfigError as e:
    print(f'bigbatch: config error: {e}', file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


class _QuietLibraries:
  """Drops INFO lines from orbax (a dozen per checkpoint), keeping its warnings and errors."""

  def filter(self, record) -> bool:
    return record.levelno > logging.INFO or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  result = run(_CONFIG.value, _WORKDIR.value)
  logging.info('Final evaluation: %s', result)


if __name__ == '__main__':
  app.run(main)
