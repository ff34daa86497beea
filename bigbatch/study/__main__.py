"""python -m bigbatch.study --config=configs/study_digits.py --workdir=DIR

Runs a batch-size study (bigbatch/study/run.py): every trial of the sweep through the trainer,
then DIR/report.md with figures and DIR/results.jsonl. Rerunning the command resumes: trials
with results are not rerun.

  --print_commands   print one command per unfinished trial (a SLURM array, several slices)
  --trial=ID         run only that trial (writes DIR/trials/ID/result.json), repeatable
  --merge            gather the trials' result.json files into results.jsonl and write the report
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bigbatch import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A study config (configs/study_*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The study directory: trials, results, report.')
_PRINT = flags.DEFINE_bool('print_commands', False,
                           'Print one command per unfinished trial instead of running them.')
_TRIAL = flags.DEFINE_multi_string('trial', [], 'Run only this trial id (repeatable).')
_MERGE = flags.DEFINE_bool('merge', False, 'Merge trials run separately and write the report.')
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the trainer's INFO log of every trial.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from bigbatch.study import run  # pylint: disable=g-import-not-at-top
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  study, workdir = _CONFIG.value, _WORKDIR.value
  try:
    if _PRINT.value:
      config_arg = next(a for a in sys.argv if a.startswith('--config='))[len('--config='):]
      for command in run.commands(study, workdir, config_arg):
        print(command)
    elif _MERGE.value:
      run.merge(study, workdir)
    else:
      run.run(study, workdir, only=_TRIAL.value)
  except config_lib.ConfigError as e:
    print(f'bigbatch.study: config error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
