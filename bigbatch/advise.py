"""python -m bigbatch.advise --config=configs/study_digits.py --workdir=DIR [--target=0.97]

Predicts before a sweep: trains one probe at a small batch (DIR/probe, resumable, bounded by
--budget_examples and --budget_minutes), measures its gradient noise scale, and prints the
predicted critical batch, steps and examples to the target per power-of-two batch, a batch with
its lr and warmup, and a noise-driven batch schedule; DIR/advice.json and DIR/advice.png hold
them (bigbatch/study/advisor.py; docs/advisor.md has the method and its validation). Errors and
signals keep the trainer's contract (docs/errors.md).
"""
from __future__ import annotations

if __name__ == '__main__':
  from bigbatch import signals as _signals
  _signals.start(hard_exit=True, prefix='bigbatch.advise')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bigbatch import exits
from bigbatch.study import command

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A study config (configs/study_*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the probe and the advice go.')
_VARIANT = flags.DEFINE_string('variant', None, "A study variant's settings for the probe "
                               '(default: the base config).')
_BATCH = flags.DEFINE_integer('batch', None, "The probe's batch (default: the study's smallest).")
_LR = flags.DEFINE_float('lr', None, "The probe's peak lr (default: the config's rule).")
_TARGET = flags.DEFINE_float('target', None, "The target value of the study's metric.")
_BUDGET = flags.DEFINE_integer('budget_examples', None,
                               'At most this many training examples for the probe.')
_MINUTES = flags.DEFINE_float('budget_minutes', None, 'At most this much wall time (a rerun '
                              'resumes).')
_HESSIAN = flags.DEFINE_bool('hessian', True, 'Also measure the Hessian-weighted B_noise at the '
                             "probe's end.")
_VERBOSE = flags.DEFINE_bool('verbose', False, "Show the trainer's INFO log.")

PREFIX = 'bigbatch.advise'


def _parse_flags(argv):
  return command.parse_flags(argv, prefix=PREFIX, config_flag=_CONFIG, workdir_flag=_WORKDIR,
                             workdir_what='where the probe and the advice go',
                             require_study=True)


def main(argv):
  if len(argv) > 1:
    command.fail(PREFIX, 'flag error', f'unexpected arguments: {" ".join(argv[1:])}',
                 exits.FLAG_ERROR)
  if not _VERBOSE.value:
    logging.set_verbosity(logging.WARNING)

  def body():
    from bigbatch.study import advisor  # pylint: disable=g-import-not-at-top
    opts = advisor.Options(variant=_VARIANT.value, batch=_BATCH.value, lr=_LR.value,
                           budget_examples=_BUDGET.value, budget_minutes=_MINUTES.value,
                           target=_TARGET.value, hessian=_HESSIAN.value)
    try:
      advisor.advise(_CONFIG.value, _WORKDIR.value, opts)
    except advisor.ProbeError as e:
      command.fail(PREFIX, 'probe error', str(e), e.code)

  command.run(PREFIX, body)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
