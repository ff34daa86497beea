"""The entry point: a bad config gets one line naming the field, exit code 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bigbatch import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import quickstart  # noqa: E402

BAD = [
    ('global_batch', 100, 'global_batch'),  # not divisible by 8 devices
    ('global_batch', 0, 'global_batch'),
    ('global_batch', 104, 'accumulation_steps'),  # divisible by 8, not by 8 x 4 (below)
    ('mesh.data', 3, 'mesh'),
    ('model.name', 'resnet9000', 'model.name'),
    ('optimizer.name', 'adagrad', 'optimizer.name'),
    ('data.name', 'imagenet9000', 'data.name'),
    ('lr.decay', 'exponential', 'lr.decay'),
    ('lr.scaling', 'cubic', 'lr.scaling'),
    ('lr.base_lr', -0.1, 'lr.base_lr'),
    ('lr.base_lr', 0.0, 'lr.base_lr'),
    ('model.bn_group_size', 3, 'bn_group_size'),  # per-device microbatch is 16
    ('accumulation_steps', 0, 'accumulation_steps'),
    ('eval_batch', 100, 'eval_batch'),
]


@pytest.mark.parametrize('field,value,named', BAD, ids=[f'{f}={v}' for f, v, _ in BAD])
def test_bad_config_exits_with_one_line_naming_the_field(field, value, named, tmp_path, capsys):
  config = quickstart.get_config()
  if value == 104:
    config.accumulation_steps = 4
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as e:
    main.run(config, str(workdir))
  assert e.value.code == main.EXIT_CONFIG_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0], err
  assert not workdir.exists()


def test_cli_config_error_exit_code_and_no_traceback(tmp_path):
  workdir = tmp_path / 'wd'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', '--config=configs/quickstart.py',
       f'--workdir={workdir}', '--config.global_batch=100'],
      cwd=os.path.join(os.path.dirname(__file__), '..'), env=env, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  assert 'config.global_batch=100' in proc.stderr
  assert not workdir.exists()
