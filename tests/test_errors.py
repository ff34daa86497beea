"""docs/errors.md as tests: each bad input gets a non-zero exit, one line naming what is wrong
and how to fix it, no traceback, and nothing overwritten.

Rows run in-process (main.train, catching SystemExit), so the table costs seconds; the flag rows
and one config row run the real command line to confirm exit codes and the absence of a
traceback.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys

import pytest

from bigbatch import checkpoint
from bigbatch import config_lib
from bigbatch import loop
from bigbatch import main

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402


_set = config_lib.override


# id: (config overrides, exit code, words the one line must contain)
CONFIG_ROWS = {
    'batch-not-divisible': ({'global_batch': 100}, 2, ['config.global_batch=100', 'multiple']),
    'batch-zero': ({'global_batch': 0}, 2, ['config.global_batch=0', 'positive']),
    'batch-vs-accumulation': ({'global_batch': 104, 'accumulation_steps': 4}, 2,
                              ['accumulation_steps (4)', 'multiple of 32']),
    'mesh-mismatch': ({'mesh.data': 3}, 2, ['config.mesh', 'devices']),
    'unknown-model': ({'model.name': 'resnet9000'}, 2, ['config.model.name', 'choose one of']),
    'unknown-optimizer': ({'optimizer.name': 'adagrad'}, 2, ['config.optimizer.name', 'lars']),
    'unknown-dataset': ({'data.name': 'imagenet9000'}, 2, ['config.data.name', 'digits']),
    'unknown-schedule': ({'lr.decay': 'exponential'}, 2, ['config.lr.decay', 'cosine']),
    'unknown-scaling': ({'lr.scaling': 'cubic'}, 2, ['config.lr.scaling', 'sqrt']),
    'lr-negative': ({'lr.base_lr': -0.1}, 2, ['config.lr.base_lr=-0.1', 'positive']),
    'lr-zero': ({'lr.base_lr': 0.0}, 2, ['config.lr.base_lr=0.0', 'positive']),
    'ghost-bn-group': ({'model.bn_group_size': 3}, 2, ['bn_group_size=3', 'divisor of 16']),
    'accumulation-zero': ({'accumulation_steps': 0}, 2, ['accumulation_steps=0', 'positive']),
    'eval-batch': ({'eval_batch': 100}, 2, ['config.eval_batch=100', 'multiple of 8']),
    'length-twice': ({'num_steps': 10}, 2, ['num_epochs and config.num_steps', 'only one',
                                            '--config.num_epochs=None']),
    'batch-larger-than-data': ({'global_batch': 4096}, 2, ['4096', '1437 training examples']),
    'warmup-too-long': ({'lr.warmup_epochs': 50.0}, 2, ['warmup', 'train longer']),
    'step-decay-no-boundaries': ({'lr.decay': 'step'}, 2, ['boundaries']),
    'nonfinite-policy': ({'nonfinite': 'ignore'}, 2, ['config.nonfinite', 'skip']),
    'float16': ({'model.dtype': 'float16'}, 2, ["config.model.dtype='float16'", 'loss scaling',
                                                'bfloat16']),
    'noise-scale-one-batch': ({'noise_scale.enabled': True, 'mesh.data': 1, 'mesh.model': 8},
                              2, ['config.noise_scale.enabled', 'accumulation_steps=2']),
    'adascale-optimizer': ({'optimizer.adascale': True, 'optimizer.name': 'adamw',
                            'noise_scale.enabled': True, 'lr.scaling': 'none'}, 2,
                           ["config.optimizer.name='adamw'", 'optimizer.name=sgd']),
    'adascale-noise-scale': ({'optimizer.adascale': True, 'lr.scaling': 'none'}, 2,
                             ['config.noise_scale.enabled', '--config.noise_scale.enabled=True']),
    'adascale-scaling': ({'optimizer.adascale': True, 'noise_scale.enabled': True}, 2,
                         ["config.lr.scaling='linear'", '--config.lr.scaling=none']),
    'adascale-base-batch': ({'optimizer.adascale': True, 'noise_scale.enabled': True,
                             'lr.scaling': 'none', 'lr.base_batch': 256}, 2,
                            ['config.lr.base_batch=256', 'S < 1']),
    'target-not-eval-metric': ({'target.value': 0.5, 'target.metric': 'train/loss'}, 2,
                               ['config.target.metric', 'eval/top1']),
    'batch-schedule': ({'batch_schedule': ((50, 2),)}, 2,
                       ['config.batch_schedule', 'whole epochs']),
    'face-task-data': ({'task': 'face'}, 2, ['config.task=face', 'face_synthetic']),
    'face-data-task': ({'data.name': 'face_synthetic'}, 2, ['face data set', 'task=face']),
    'face-trust-ratio': ({'task': 'face', 'data.name': 'face_synthetic', 'optimizer.name': 'lars'},
                         2, ['task=face', 'trust_ratio_exclude']),
    # Non-finite numbers: refused before anything runs, not met as NaN parameters.
    'lr-inf': ({'lr.base_lr': math.inf}, 2, ['config.lr.base_lr=inf', 'finite']),
    'lr-nan': ({'lr.base_lr': math.nan}, 2, ['config.lr.base_lr=nan', 'finite']),
    'lr-overflow': ({'lr.base_lr': 1e38, 'lr.base_batch': 16}, 2,
                    ['peak lr 8e+38', 'float32', 'lower config.lr.base_lr']),
    'boundaries-nan': ({'lr.decay': 'step', 'lr.boundaries_epochs': (10.0, math.nan)}, 2,
                       ['config.lr.boundaries_epochs=(10.0, nan)', 'finite']),
    'lr-table-inf': ({'lr.scaling': 'table', 'lr.table': ((1024, math.inf, None),)}, 2,
                     ['config.lr.table row (1024, inf, None)', 'finite']),
    'batch-schedule-inf': ({'batch_schedule': ((math.inf, 2),)}, 2,
                           ['config.batch_schedule=((inf, 2),)', 'whole epochs']),
    'dropout-nan': ({'model.dropout': math.nan}, 2, ['config.model.dropout=nan', 'finite']),
    'adam-b2-one': ({'optimizer.name': 'adamw', 'optimizer.b2': 1.0}, 2,
                    ['config.optimizer.b2=1.0', 'in [0.0, 1.0)']),
    'width-zero': ({'model.width': 0}, 2, ['config.model.width=0', 'positive']),
}


@pytest.mark.parametrize('row', sorted(CONFIG_ROWS))
def test_config_rows(row, tmp_path, capsys):
  overrides, code, words = CONFIG_ROWS[row]
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as e:
    main.train(_set(quickstart.get_config(), **overrides), str(workdir))
  _assert_one_line(e, capsys, code, words)
  assert not workdir.exists()


def _assert_one_line(e, capsys, code, words):
  assert e.value.code == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert 'Traceback' not in err[0]
  for w in words:
    assert w in err[0], (w, err[0])


def _short():
  return _set(quickstart.get_config('steps=4'), **{
      'model.width': 8, 'checkpoint_every_steps': 2, 'log_every_steps': 2,
      'eval_every_epochs': None, 'lr.decay': 'constant'})


@pytest.fixture
def trained(tmp_path):
  workdir = tmp_path / 'wd'
  loop.train_and_evaluate(_short(), str(workdir))
  return workdir


def _snapshot(workdir):
  return sorted((os.path.relpath(os.path.join(d, f), workdir), os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(workdir) for f in fs)


def test_workdir_of_another_experiment(trained, capsys):
  before = _snapshot(trained)
  with pytest.raises(SystemExit) as e:
    main.train(_set(_short(), global_batch=64), str(trained))
  _assert_one_line(e, capsys, 2, ['holds another experiment', 'global_batch: 128 -> 64',
                                  '--restart_from_scratch'])
  assert _snapshot(trained) == before


def test_workdir_not_writable(tmp_path, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(blocker / 'wd'))
  _assert_one_line(e, capsys, 2, ['cannot write to the workdir', 'writable --workdir'])
  assert blocker.read_text() == 'not a directory'


def test_checkpoint_of_another_model(trained, capsys):
  # Past the workdir guards, as for checkpoints written before they recorded their config and a
  # config.json removed by hand: the restore itself must still refuse a model that does not fit.
  os.remove(trained / 'config.json')
  for step in os.listdir(trained / 'checkpoints'):
    meta = trained / 'checkpoints' / step / 'meta' / 'metadata'
    if meta.exists():
      record = json.loads(meta.read_text())
      record.pop('config', None)
      meta.write_text(json.dumps(record))
  before = _snapshot(trained)
  with pytest.raises(SystemExit) as e:
    main.train(_set(_short(), **{'model.width': 16}), str(trained))
  _assert_one_line(e, capsys, 4, ['does not fit the model', 'conv0/kernel', 'new workdir'])
  assert _snapshot(trained) == before


def test_no_readable_checkpoint(trained, capsys):
  for step in ('2', '4'):
    os.remove(trained / 'checkpoints' / step / 'meta' / 'metadata')
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(trained))
  _assert_one_line(e, capsys, 4, ['none of the checkpoints', str(trained / 'checkpoints')])


@pytest.mark.slow
def test_disk_full_on_save(tmp_path, capsys, monkeypatch):
  real_save = checkpoint.ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    if step >= 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, 'save', full)
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(tmp_path / 'wd'))
  _assert_one_line(e, capsys, 5, ['step 4', 'No space left on device', 'rerun the same command'])
  assert checkpoint.Checkpointer(str(tmp_path / 'wd' / 'checkpoints')).all_steps() == [2]


def test_corrupt_data_files(tmp_path, capsys):
  from bigbatch.data import digits  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'tfds'
  digits.prepare(str(data_dir))
  shards = [os.path.join(d, f) for d, _, fs in os.walk(data_dir) for f in fs
            if 'train' in f and not f.endswith('.json')]
  for shard in shards:
    with open(shard, 'r+b') as f:
      f.truncate(os.path.getsize(shard) // 3)
  capsys.readouterr()  # the preparation's progress bars
  with pytest.raises(SystemExit) as e:
    main.train(_set(_short(), **{'data.data_dir': str(data_dir)}), str(tmp_path / 'wd'))
  _assert_one_line(e, capsys, 6, ['cannot be read', str(data_dir)])
  assert not (tmp_path / 'wd').exists()


CLI_ROWS = {
    'unknown-override': (['--config=configs/quickstart.py', '--workdir={wd}',
                          '--config.global_bach=256'], 1, 'global_bach'),
    'missing-workdir': (['--config=configs/quickstart.py'], 1, 'workdir'),
    'missing-config-file': (['--config=configs/nope.py', '--workdir={wd}'], 1, 'nope.py'),
    'config-error-cli': (['--config=configs/quickstart.py', '--workdir={wd}',
                          '--config.global_batch=100'], 2, 'config.global_batch=100'),
    # get_config's own error, not only "Error whilst parsing config file:".
    'config-arg-unknown': (['--config=configs/quickstart.py:stepz=5', '--workdir={wd}'], 1,
                           "get_config failed: config argument 'stepz' is unknown"),
    'config-arg-type': (['--config=configs/quickstart.py:steps=abc', '--workdir={wd}'], 1,
                        "get_config failed: invalid literal for int() with base 10: 'abc"),
    'config-no-get-config': (['--config={no_get_config}', '--workdir={wd}'], 1,
                             'defines no get_config(arg=None) function'),
    'unset-with-none': (['--config=configs/quickstart.py', '--workdir={wd}',
                         '--config.num_epochs=None'], 2, 'num_steps are both unset'),
    'unset-unknown-field': (['--config=configs/quickstart.py', '--workdir={wd}',
                             '--config.num_epochz=None'], 1,
                            'names no config field: --config.num_epochz=None'),
    'nonfinite-cli': (['--config=configs/quickstart.py', '--workdir={wd}',
                       '--config.lr.base_lr=inf'], 2, 'config.lr.base_lr=inf'),
}


@pytest.mark.parametrize('row', sorted(CLI_ROWS))
def test_command_line_rows(row, tmp_path):
  args, code, word = CLI_ROWS[row]
  workdir = tmp_path / 'wd'
  no_get_config = tmp_path / 'no_get_config.py'
  no_get_config.write_text('def get_confg():\n  return None\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'bigbatch.main',
                         *[a.format(wd=workdir, no_get_config=no_get_config) for a in args]],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == code, proc.stderr
  assert 'Traceback' not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if word in l]
  assert errors, proc.stderr
  if row.startswith(('config-arg', 'config-no', 'unset', 'nonfinite')):
    assert len([l for l in proc.stderr.splitlines() if l.startswith('bigbatch:')]) == 1
  assert not workdir.exists()


def _rows_of_other_test_files() -> set[str]:
  """The rows other test files stand for: their module-level DOC_ROWS."""
  import importlib  # pylint: disable=g-import-not-at-top
  rows = set()
  for name in sorted(os.listdir(os.path.dirname(__file__))):
    if name.startswith('test_') and name.endswith('.py') and name != 'test_errors.py':
      with open(os.path.join(os.path.dirname(__file__), name)) as f:
        if not re.search(r'^DOC_ROWS\b', f.read(), re.M):
          continue
      rows |= set(importlib.import_module(name[:-3]).DOC_ROWS)
  return rows


def test_docs_table_lists_every_row():
  with open(os.path.join(ROOT, 'docs', 'errors.md')) as f:
    documented = set(re.findall(r'^\| `([a-z0-9-]+)` \|', f.read(), re.M))
  tested = set(CONFIG_ROWS) | set(CLI_ROWS) | {
      'workdir-other-experiment', 'workdir-not-writable', 'checkpoint-other-model',
      'checkpoint-none-readable', 'disk-full', 'corrupt-data', 'nonfinite-stop',
      'checkpoint-corrupt-latest', 'preempted', *_rows_of_other_test_files()}
  assert documented == tested
  assert len(documented) >= 20
