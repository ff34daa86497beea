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
from bigbatch.study import command

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A study config (configs/study_*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The study directory: trials, results, report.')
_PRINT = flags.DEFINE_bool('print_commands', False,
                           'Print one command per unfinished trial instead of running them.')
_TRIAL = flags.DEFINE_multi_string('trial', [], 'Run only this trial id (repeatable).')
_MERGE = flags.DEFINE_bool('merge', False, 'Merge trials run separately and write the report.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the trainer's INFO log of every trial.")

PREFIX = 'bigbatch.study'


def _fail(kind: str, message: str, code: int):
  command.fail(PREFIX, kind, message, code)


def _parse_flags(argv):
  return command.parse_flags(argv, prefix=PREFIX, config_flag=_CONFIG, workdir_flag=_WORKDIR,
                             workdir_what='the study directory (trials, results, report)')


def main(argv):
  if len(argv) > 1:
    _fail('flag error', f'unexpected arguments: {" ".join(argv[1:])}', exits.FLAG_ERROR)
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  study, workdir = _CONFIG.value, _WORKDIR.value

  def body():
    # Signals: the trainer's (bigbatch/signals.py); a trial stopped by one raises loop.Preempted
    # after checkpointing, or signals.Interrupted where it had nothing to checkpoint.
    from bigbatch.study import run  # pylint: disable=g-import-not-at-top
    if _PRINT.value:
      config_arg = next(a for a in sys.argv if a.startswith('--config='))[len('--config='):]
      for line in run.commands(study, workdir, config_arg):
        print(line)
    elif _MERGE.value:
      run.merge(study, workdir)
    else:
      run.run_study(study, workdir, only=_TRIAL.value)

  command.run(PREFIX, body)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
