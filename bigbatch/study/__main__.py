"""python -m bigbatch.study --config=configs/study_digits.py --workdir=DIR

Runs a batch-size study (bigbatch/study/run.py): every trial of the sweep through the trainer,
then DIR/report.md with figures and DIR/results.jsonl; rerunning resumes. --print_commands,
--trial=ID and --merge split it over a cluster. Errors and signals keep the trainer's contract
(docs/errors.md); the flags and signals are described in docs/design.md, "Batch-size studies".
"""
from __future__ import annotations

if __name__ == '__main__':
  # A signal during the imports (seconds): one line and 75 or 130 (bigbatch/signals.py).
  from bigbatch import signals as _signals
  _signals.start(hard_exit=True, prefix='bigbatch.study')

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bigbatch import exits
from bigbatch import signals

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A study config (configs/study_*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The study directory: trials, results, report.')
_PRINT = flags.DEFINE_bool('print_commands', False,
                           'Print one command per unfinished trial instead of running them.')
_TRIAL = flags.DEFINE_multi_string('trial', [], 'Run only this trial id (repeatable).')
_MERGE = flags.DEFINE_bool('merge', False, 'Merge trials run separately and write the report.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the trainer's INFO log of every trial.")

PREFIX = 'bigbatch.study'


def _fail(kind: str, message: str, code: int):
  """The one line and the exit code (exits.py: the trainer's codes)."""
  logging.flush()
  if not signals.write_line(f'{PREFIX}: {kind}: {message}\n'):
    signals.wait_for_exit()  # the signal watcher wrote the line and is ending the process
  sys.exit(code)


def _parse_flags(argv):
  """absl's parser with the study config loaded here, so that a bad flag, a missing or failing
  config file or a bad `:ARG` is one line and exit 1 (as the trainer's, bigbatch/main.py)."""
  config_arg = next((a for a in argv if a.startswith('--config=')), '--config')
  original, sys.argv = sys.argv, list(argv)  # config_flags finds --config.* overrides there
  try:
    rest = flags.FLAGS(argv)
    study = _CONFIG.value  # config_flags defers a load failure to the first use
    if study is None:
      _fail('flag error', '--config is required: a study config, e.g. '
            'configs/study_digits.py', exits.FLAG_ERROR)
    study.get('base')
  except Exception as e:  # pylint: disable=broad-except
    _fail('flag error', exits.flag_error_message(e, config_arg), exits.FLAG_ERROR)
  finally:
    sys.argv = original
  if not (_WORKDIR.value or '').strip():
    _fail('flag error', '--workdir is required: the study directory (trials, results, report)',
          exits.FLAG_ERROR)
  return rest


def _flush_logs() -> None:
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()


def main(argv):
  if len(argv) > 1:
    _fail('flag error', f'unexpected arguments: {" ".join(argv[1:])}', exits.FLAG_ERROR)
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  signals.add_at_exit(_flush_logs)
  study, workdir = _CONFIG.value, _WORKDIR.value
  try:
    # Signals: the trainer's (bigbatch/signals.py); a trial stopped by one raises loop.Preempted
    # after checkpointing, or signals.Interrupted where it had nothing to checkpoint.
    with signals.watching(hard_exit=True, where=signals.BETWEEN_TRIALS, prefix=PREFIX):
      try:
        from bigbatch.study import run  # pylint: disable=g-import-not-at-top
        if _PRINT.value:
          config_arg = next(a for a in sys.argv if a.startswith('--config='))[len('--config='):]
          for command in run.commands(study, workdir, config_arg):
            print(command)
        elif _MERGE.value:
          run.merge(study, workdir)
        else:
          run.run_study(study, workdir, only=_TRIAL.value)
      except (Exception, signals.Interrupted) as e:  # pylint: disable=broad-except
        failure = exits.classify(e)
        if failure is None:
          raise
        _fail(*failure)
  except SystemExit as e:
    if signals.last_received():
      # The line is out, every checkpoint finished: exit now, not after the interpreter's and
      # jax's teardown (seconds; a grace period before SIGKILL may be shorter).
      _flush_logs()
      import os  # pylint: disable=g-import-not-at-top
      os._exit(e.code if isinstance(e.code, int) else 1)  # pylint: disable=protected-access
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
