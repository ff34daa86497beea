"""Commands bigbatch prints for a person to paste run as printed, whatever the paths hold: every
argument is quoted for the shell (shlex), so a workdir with spaces or quotes is one argument.
docs/errors.md row `printed-command-quoting`."""
from __future__ import annotations

import json
import os
import shlex
import sys

from bigbatch import metrics
from bigbatch.study import grid
from bigbatch.study import run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import study_digits  # noqa: E402

DOC_ROWS = ('printed-command-quoting',)

AWKWARD = "runs/batch 4096 (Bob's)"  # a space, parentheses and a quote


def test_summary_plot_command_is_shell_quoted(tmp_path):
  workdir = tmp_path / AWKWARD
  workdir.mkdir(parents=True)
  (workdir / 'metrics.jsonl').write_text(json.dumps({'step': 4, 'eval/top1': 0.5}) + '\n')
  line = metrics.summary(str(workdir), {'eval/top1': 0.5}, 3.0).splitlines()[-1]
  assert line.startswith('Plot: ')
  assert shlex.split(line[len('Plot: '):]) == ['python', '-m', 'bigbatch.plot', str(workdir)]
  # A plain path prints as before, unquoted.
  plain = tmp_path / 'plain'
  plain.mkdir()
  (plain / 'metrics.jsonl').write_text(json.dumps({'step': 4, 'eval/top1': 0.5}) + '\n')
  assert metrics.summary(str(plain), {'eval/top1': 0.5}, 3.0).splitlines()[-1] == (
      f'Plot: python -m bigbatch.plot {plain}')


def test_study_print_commands_are_shell_quoted(tmp_path):
  study = study_digits.get_config('quick')
  workdir = str(tmp_path / AWKWARD)
  config_arg = "configs/study_digits.py:quick"
  commands = run.commands(study, workdir, config_arg)
  assert commands
  for command, trial in zip(commands, grid.trials(study)):
    assert shlex.split(command) == ['python', '-m', 'bigbatch.study', f'--config={config_arg}',
                                    f'--workdir={workdir}', f'--trial={trial.trial_id}']
