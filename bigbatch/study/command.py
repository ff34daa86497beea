"""What the study layer's commands (`python -m bigbatch.study`, `python -m bigbatch.advise`)
share: the study config and workdir from the flags, one line `PREFIX: KIND: MESSAGE` with the
trainer's exit code on an error (bigbatch/exits.py), and the prompt exit after a signal."""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags
from absl import logging

from bigbatch import exits
from bigbatch import signals


def fail(prefix: str, kind: str, message: str, code: int):
  """The one line and the exit code."""
  logging.flush()
  if not signals.write_line(f'{prefix}: {kind}: {message}\n'):
    signals.wait_for_exit()  # the signal watcher wrote the line and is ending the process
  sys.exit(code)


def parse_flags(argv, *, prefix: str, config_flag, workdir_flag, workdir_what: str,
                require_study: bool = False):
  """absl's parser with the study config loaded here, so that a bad flag, a missing or failing
  config file or a bad `:ARG` is one line and exit 1 (as the trainer's, bigbatch/main.py).
  `require_study`: also refuse a config that is not a study config (no `base`)."""
  config_arg = next((a for a in argv if a.startswith('--config=')), '--config')
  original, sys.argv = sys.argv, list(argv)  # config_flags finds --config.* overrides there
  try:
    rest = flags.FLAGS(argv)
    study = config_flag.value  # config_flags defers a load failure to the first use
    if study is None:
      fail(prefix, 'flag error', '--config is required: a study config, e.g. '
           'configs/study_digits.py', exits.FLAG_ERROR)
    study.get('base')
    if require_study and 'base' not in study:
      fail(prefix, 'flag error', f'{config_arg[len("--config="):] or "--config"} is not a study '
           'config (it has no `base`); give a study config, e.g. configs/study_digits.py',
           exits.FLAG_ERROR)
  except Exception as e:  # pylint: disable=broad-except
    fail(prefix, 'flag error', exits.flag_error_message(e, config_arg), exits.FLAG_ERROR)
  finally:
    sys.argv = original
  if not (workdir_flag.value or '').strip():
    fail(prefix, 'flag error', f'--workdir is required: {workdir_what}', exits.FLAG_ERROR)
  return rest


def _flush_logs() -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()


def run(prefix: str, body: Callable[[], None]) -> None:
  """Runs `body` under the trainer's signal contract (bigbatch/signals.py): an error the user can
  fix (exits.classify) or a signal is one line and its exit code; after a signal the process
  exits at once, not after the interpreter's and jax's teardown (seconds; a grace period before
  SIGKILL may be shorter)."""
  signals.add_at_exit(_flush_logs)
  try:
    with signals.watching(hard_exit=True, where=signals.BETWEEN_TRIALS, prefix=prefix):
      try:
        body()
      except (Exception, signals.Interrupted) as e:  # pylint: disable=broad-except
        failure = exits.classify(e)
        if failure is None:
          raise
        fail(prefix, *failure)
  except SystemExit as e:
    if signals.last_received():
      _flush_logs()
      os._exit(e.code if isinstance(e.code, int) else 1)  # pylint: disable=protected-access
    raise
