"""mode=eval beside a running trainer, and starts that fail: docs/errors.md's `eval-*` and
`start-*` rows.

A trainer rotates its checkpoints (orbax keeps the newest config.keep_checkpoints), so an
evaluation that listed them minutes ago (before loading data and compiling) may find them gone:
it lists again and evaluates the newest readable one. Its errors never advise moving a directory
that a live trainer holds. A start that fails leaves no empty directory it created.

The rotation is faked (checkpoint directories copied and deleted between listing and restore),
not timed against a real concurrent trainer; the checkpointer tests use small states and take a
second, the main.train rows a tiny digits run trained once per module (about 15 s).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import checkpoint
from bigbatch import config_lib
from bigbatch import lock as lock_lib
from bigbatch import loop
from bigbatch import main
from bigbatch import workdir as workdir_lib

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402

DOC_ROWS = ('eval-checkpoint-rotated', 'eval-beside-trainer-none-readable', 'eval-no-checkpoint',
            'eval-restart-from-scratch', 'eval-other-experiment',
            'start-failed-leaves-no-directory')


def _state(value):
  return {'w': jnp.full((16, 16), float(value)), 'step': jnp.int32(value)}


def _save(directory, steps, keep=3):
  ckpt = checkpoint.Checkpointer(directory, keep=keep, asynchronous=False)
  for step in steps:
    ckpt.save(step, _state(step))
  ckpt.close()


def test_a_stale_list_is_read_again(tmp_path, caplog):
  """Listed at start; meanwhile the trainer saved 4..6 and deleted 1..3 (keep=3)."""
  directory = str(tmp_path / 'checkpoints')
  _save(directory, [1, 2, 3])
  evaluation = checkpoint.Checkpointer(directory)
  assert evaluation.all_steps() == [1, 2, 3]
  _save(directory, [4, 5, 6])
  assert sorted(os.listdir(directory)) == ['4', '5', '6']
  state, step = evaluation.restore_latest(_state(0))
  assert step == 6 and int(state['step']) == 6
  assert 'unusable' not in caplog.text


def test_a_checkpoint_rotated_away_while_read_is_retried(tmp_path, monkeypatch, caplog):
  """Deleted between listing and restore (the trainer wrote two newer ones meanwhile): listed
  again, and the newest evaluated; nothing is reported unusable."""
  directory = str(tmp_path / 'checkpoints')
  _save(directory, [1, 2, 3])
  evaluation = checkpoint.Checkpointer(directory)
  real = checkpoint.Checkpointer.restore
  calls = []

  def rotating(self, step, like):
    calls.append(step)
    if len(calls) == 1:
      _save(directory, [4, 5])  # keep=3: 1 and 2 go
      shutil.rmtree(os.path.join(directory, '3'))  # and 3, as a third save would
    return real(self, step, like)

  monkeypatch.setattr(checkpoint.Checkpointer, 'restore', rotating)
  _, step = evaluation.restore_latest(_state(0))
  assert step == 5 and calls == [3, 5]
  assert 'step 3' in caplog.text and 'deleted while it was read' in caplog.text
  assert 'unusable' not in caplog.text


def test_rotation_that_never_settles_is_one_clear_error(tmp_path, monkeypatch):
  directory = str(tmp_path / 'checkpoints')
  _save(directory, [1])
  real = checkpoint.Checkpointer.restore
  step_of = iter(range(2, 100))

  def always_rotated(self, step, like):
    _save(directory, [next(step_of)], keep=1)
    return real(self, step, like)

  monkeypatch.setattr(checkpoint.Checkpointer, 'restore', always_rotated)
  with pytest.raises(checkpoint.CheckpointError, match='deleted while they were read, 5 times '
                     'in a row .*larger config.keep_checkpoints'):
    checkpoint.Checkpointer(directory).restore_latest(_state(0))


@pytest.fixture
def live_trainer():
  """A lock held by a live process that is not this one (a `sleep`), as a trainer's."""
  proc = subprocess.Popen(['sleep', '120'])
  try:
    yield lock_lib.Holder(**{**lock_lib.Holder.current().__dict__, 'pid': proc.pid,
                             'start_time': lock_lib.process_start_time(proc.pid)})
  finally:
    proc.kill()
    proc.wait()


def _hold(workdir, holder):
  (workdir / workdir_lib.LOCK_FILE).write_text(holder.to_json())


def test_none_readable_beside_a_live_trainer_never_advises_moving(tmp_path, live_trainer):
  directory = tmp_path / 'checkpoints'
  _save(str(directory), [1, 2])
  for step in ('1', '2'):
    os.remove(directory / step / 'meta' / 'metadata')
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.Checkpointer(str(directory)).restore_latest(_state(0))
  assert 'Move the directory away' in str(e.value)  # nobody holds it
  _hold(tmp_path, live_trainer)
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.Checkpointer(str(directory)).restore_latest(_state(0))
  message = str(e.value)
  assert 'Move the directory away' not in message and 'move' not in message.replace(
      'do not move', '')
  assert f'A trainer holds {tmp_path} (PID {live_trainer.pid} on ' in message
  assert 'do not move or delete it; rerun after its next checkpoint' in message
  # A lock whose holder is gone does not count.
  gone = lock_lib.Holder(**{**live_trainer.__dict__, 'pid': 2**22 + 7})
  _hold(tmp_path, gone)
  with pytest.raises(checkpoint.CheckpointError, match='Move the directory away'):
    checkpoint.Checkpointer(str(directory)).restore_latest(_state(0))


# ---------------------------------------------------------------------------------------------
# Through main.train, as the command line.

def _short(**overrides):
  return config_lib.override(quickstart.get_config('steps=4'), **{
      'model.width': 8, 'checkpoint_every_steps': 2, 'log_every_steps': 2,
      'eval_every_epochs': None, 'lr.decay': 'constant', **overrides})


@pytest.fixture(scope='module')
def trained_once(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained') / 'wd'
  loop.train_and_evaluate(_short(), str(workdir))
  return workdir


@pytest.fixture
def trained(trained_once, tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(trained_once, workdir)
  return workdir


def _one_line(e, capsys, code):
  assert e.value.code == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'Traceback' not in err[0], err
  return err[0]


def test_eval_evaluates_the_newest_after_a_rotation(trained, monkeypatch, capsys):
  """eval-checkpoint-rotated: the trainer wrote step 6 and rotated 2 and 4 away while the
  evaluation read step 4; it evaluates step 6 and exits 0."""
  ckpts = trained / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['2', '4']
  real = checkpoint.Checkpointer.restore

  def rotating(self, step, like):
    if (ckpts / '4').exists():
      shutil.copytree(ckpts / '4', ckpts / '6')  # the trainer's next checkpoint (same arrays)
      shutil.rmtree(ckpts / '4')
      shutil.rmtree(ckpts / '2')
    return real(self, step, like)

  monkeypatch.setattr(checkpoint.Checkpointer, 'restore', rotating)
  result = main.train(_short(mode='eval'), str(trained))
  assert 0.0 <= result['eval/top1'] <= 1.0
  assert (trained / 'eval-6.json').exists() and not (trained / 'eval-4.json').exists()
  assert 'error' not in capsys.readouterr().err


def test_eval_beside_a_live_trainer_none_readable(trained, live_trainer, capsys):
  """eval-beside-trainer-none-readable: exit 4, and the line tells to leave the directory."""
  _hold(trained, live_trainer)
  for step in ('2', '4'):
    os.remove(trained / 'checkpoints' / step / 'meta' / 'metadata')
  before = sorted(os.listdir(trained))
  with pytest.raises(SystemExit) as e:
    main.train(_short(mode='eval'), str(trained))
  line = _one_line(e, capsys, main.EXIT_CHECKPOINT_ERROR)
  assert 'none of the checkpoints' in line and f'A trainer holds {trained}' in line, line
  assert 'Move the directory away' not in line, line
  assert sorted(os.listdir(trained)) == before


def test_eval_without_checkpoints_creates_nothing(tmp_path, capsys):
  """eval-no-checkpoint: refused before the data set is loaded; no workdir, no checkpoints/."""
  for workdir in (tmp_path / 'absent', tmp_path / 'empty'):
    if workdir.name == 'empty':
      workdir.mkdir()
    with pytest.raises(SystemExit) as e:
      main.train(_short(mode='eval'), str(workdir))
    line = _one_line(e, capsys, main.EXIT_CHECKPOINT_ERROR)
    assert f'no checkpoint in {workdir}/checkpoints to evaluate; train first' in line, line
  assert not (tmp_path / 'absent').exists()
  assert os.listdir(tmp_path / 'empty') == []


def test_eval_refuses_restart_from_scratch(trained, capsys):
  """eval-restart-from-scratch: it would move a workdir that a trainer may be using."""
  before = sorted(os.listdir(trained))
  with pytest.raises(SystemExit) as e:
    main.train(_short(mode='eval'), str(trained), restart_from_scratch=True)
  line = _one_line(e, capsys, main.EXIT_CONFIG_ERROR)
  assert '--restart_from_scratch with config.mode=eval' in line, line
  assert sorted(os.listdir(trained)) == before
  assert not [p for p in os.listdir(trained.parent) if '.old-' in p]


def test_eval_with_another_config_is_told_to_use_the_runs(trained, live_trainer, capsys):
  """eval-other-experiment: the advice is the run's config, never --restart_from_scratch (which
  would set aside the live trainer's workdir)."""
  _hold(trained, live_trainer)
  before = sorted(os.listdir(trained))
  with pytest.raises(SystemExit) as e:
    main.train(_short(mode='eval', global_batch=64), str(trained))
  line = _one_line(e, capsys, main.EXIT_CONFIG_ERROR)
  assert 'holds another experiment' in line and 'global_batch: 128 -> 64' in line, line
  assert 'Evaluate with the config the run was trained with' in line, line
  assert 'restart_from_scratch' not in line, line
  assert sorted(os.listdir(trained)) == before


@pytest.mark.parametrize('existed', [False, True])
def test_init_from_error_leaves_no_empty_directory(existed, tmp_path, capsys):
  """start-failed-leaves-no-directory: an init_from that is no workdir fails after the lock and
  the checkpointer were made; neither the workdir (when this start made it) nor an empty
  checkpoints/ stays."""
  workdir = tmp_path / 'wd'
  if existed:
    workdir.mkdir()
    (workdir / 'notes.txt').write_text('mine')
  with pytest.raises(SystemExit) as e:
    main.train(_short(init_from=str(tmp_path / 'nothing')), str(workdir))
  line = _one_line(e, capsys, main.EXIT_CHECKPOINT_ERROR)
  assert 'config.init_from=' in line and 'not a bigbatch workdir' in line, line
  if existed:
    assert sorted(os.listdir(workdir)) == ['notes.txt']
  else:
    assert not workdir.exists()


@pytest.mark.slow  # ~1-2 min on 2 loaded cores: a real trainer and a real evaluation
def test_eval_beside_a_real_trainer_that_rotates_every_step(tmp_path):
  """The reported case with real processes: a trainer checkpointing every step and keeping two,
  so every checkpoint the evaluation listed at its start is gone by the time it has compiled.
  The evaluation exits 0 with the eval-<step>.json of a checkpoint that was current then."""
  workdir = tmp_path / 'wd'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  args = [sys.executable, '-m', 'bigbatch.main', '--config=configs/quickstart.py:steps=100000',
          f'--workdir={workdir}', '--config.model.width=8', '--config.eval_every_epochs=1000',
          '--config.log_every_steps=1000', '--config.checkpoint_every_steps=1',
          '--config.keep_checkpoints=2']
  trainer = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    while not [p for p in (os.listdir(workdir / 'checkpoints')
                           if (workdir / 'checkpoints').is_dir() else []) if p.isdigit()]:
      assert trainer.poll() is None and time.monotonic() < deadline
      time.sleep(1)
    evaluation = subprocess.run(args + ['--config.mode=eval'], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
    assert trainer.poll() is None  # the trainer ran all along
  finally:
    trainer.kill()
    trainer.wait()
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  (result,) = [p for p in os.listdir(workdir) if p.startswith('eval-')]
  assert int(result[len('eval-'):-len('.json')]) >= 1
