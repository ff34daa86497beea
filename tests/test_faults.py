"""Fault tolerance, each property tested by injecting the fault: SIGKILL at chosen points,
SIGTERM, corrupt checkpoints, non-finite batches, a workdir reused by another experiment."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import checkpoint
from bigbatch import config_lib
from bigbatch import hooks as hooks_lib
from bigbatch import loop
from bigbatch import main
from bigbatch import optim
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch import workdir as workdir_lib

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402
import faults  # noqa: E402  (tests/faults.py)

# docs/errors.md rows these tests stand for (besides the first ones listed in test_errors.py).
DOC_ROWS = ('sigterm-at-startup', 'sigterm-during-setup', 'sigterm-before-first-update',
            'sigint', 'sigint-twice', 'nonfinite-update', 'nonfinite-state')

# 1437 digits / 128 = 11 steps per epoch; accumulation on; checkpoints every 4 steps.
STEPS = 16
OVERRIDES = ['--config.accumulation_steps=2', '--config.model.width=8',
             '--config.log_every_steps=1', '--config.checkpoint_every_steps=4',
             '--config.eval_every_epochs=1000']


def _config(**overrides):
  c = quickstart.get_config(f'steps={STEPS}')
  c.accumulation_steps = 2
  c.model.width = 8
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.eval_every_epochs = None
  c.lr.warmup_steps = None
  return config_lib.override(c, **overrides)


def _cli(workdir, fault=None, devices=2):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('BIGBATCH_FAULT', None)
  if fault:
    env['BIGBATCH_FAULT'] = fault
  return subprocess.run(
      [sys.executable, *(['tests/fault_main.py'] if fault else ['-m', 'bigbatch.main']),
       f'--config=configs/quickstart.py:steps={STEPS}',
       f'--workdir={workdir}', *OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items()
             if 'per_sec' not in k and not k.startswith('perf/')} for line in f]


def _final_state(workdir, config):
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                        image_shape=(8, 8, 1), num_classes=10)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  return jax.device_get(ckpt.restore(ckpt.latest_step(), trainer.state))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  proc = _cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _killed_then_resumed(uninterrupted, tmp_path, fault):
  workdir = str(tmp_path / 'wd')
  proc = _cli(workdir, fault)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # A torn last line, as a kill in the middle of a write leaves.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 99, "train/lo')
  proc = _cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resumed from the checkpoint' in proc.stderr
  assert _records(workdir) == _records(uninterrupted)  # each step once, same values
  config = _config()
  a, b = _final_state(uninterrupted, config), _final_state(workdir, config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  return proc


@pytest.mark.slow
def test_sigkill_during_async_save_resumes_bitwise(uninterrupted, tmp_path):
  proc = _killed_then_resumed(uninterrupted, tmp_path, 'kill_during_save:8')
  assert 'at step 4 ' in proc.stderr or 'step 4 in' in proc.stderr  # the save of 8 never finished


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bitwise(uninterrupted, tmp_path):
  _killed_then_resumed(uninterrupted, tmp_path, 'kill_after_step:6')


@pytest.mark.slow
def test_sigkill_right_after_epoch_boundary_resumes_bitwise(uninterrupted, tmp_path):
  _killed_then_resumed(uninterrupted, tmp_path, 'kill_after_step:12')  # epoch 1 starts at 11


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(tmp_path):
  for name in ('a', 'b'):
    loop.train_and_evaluate(_config(num_steps=6), str(tmp_path / name))
  assert _records(tmp_path / 'a') == _records(tmp_path / 'b')


def test_sigterm_writes_checkpoint_and_exits_75(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as e:
    main.train(_config(), str(workdir), hooks=[faults.Fault('term_after_step:3')])
  assert e.value.code == main.EXIT_PREEMPTED == 75
  assert 'checkpoint written at step 3' in capsys.readouterr().err
  assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).latest_step() == 3
  assert signal.getsignal(signal.SIGTERM) is not None  # handler restored, not left installed


# ----------------------------------------------------------------------------- signals


class _Send(hooks_lib.Hook):
  """Sends `signum` to this process `times` times: at the loop's start ('start', before the
  first step), before update `at` is dispatched ('before') or after it ('after')."""
  order = 5  # before the evaluation and checkpoint hooks

  def __init__(self, signum, where, at=0, times=1):
    self.signum, self.where, self.at, self.times = signum, where, at, times

  def _send(self):
    for _ in range(self.times):
      os.kill(os.getpid(), self.signum)

  def start(self, run):
    if self.where == 'start':
      self._send()

  def before_step(self, run, done, batch):
    if self.where == 'before' and done == self.at:
      self._send()
    return batch

  def after_step(self, run, done):
    if self.where == 'after' and done == self.at:
      self._send()


# id: (signal, where, update, times, exit code, words of the one line, checkpoints after)
SIGNAL_ROWS = {
    # Outside the step loop (data loading, restore, the hooks' start): main's handlers.
    'sigterm-during-setup': (signal.SIGTERM, 'start', 0, 1, 75,
                             ['SIGTERM outside the training steps', 'rerun the same command'], []),
    # In the loop before the first update was dispatched (its compilation): nothing to save.
    'sigterm-before-first-update': (signal.SIGTERM, 'before', 1, 1, 75,
                                    ['SIGTERM before the first update'], []),
    # ^C: the next update is checkpointed, exit 130 (launch/slurm.sbatch requeues only 75).
    'sigint': (signal.SIGINT, 'after', 3, 1, 130,
               ['interrupted (SIGINT): checkpoint written at step 3'], [3]),
    # ^C ^C: stop at once; checkpoints already written stay.
    'sigint-twice': (signal.SIGINT, 'after', 6, 2, 130, ['SIGINT twice'], [4]),
}


@pytest.mark.parametrize('row', [
    pytest.param(r, marks=pytest.mark.slow) if r.startswith('sigint') else r
    for r in sorted(SIGNAL_ROWS)])
def test_signal_rows(row, tmp_path, capsys):
  signum, where, at, times, code, words, steps = SIGNAL_ROWS[row]
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with pytest.raises(SystemExit) as e:
    main.train(_config(num_steps=8), str(tmp_path), hooks=[_Send(signum, where, at, times)])
  assert e.value.code == code
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = [l for l in err.splitlines() if l.startswith('bigbatch:')]
  assert len(lines) == 1, err[-3000:]
  for w in words:
    assert w in lines[0], (w, lines[0])
  ckpt_dir = str(tmp_path / 'checkpoints')
  assert (checkpoint.Checkpointer(ckpt_dir).all_steps() if os.path.isdir(ckpt_dir) else []) == steps
  # The handlers of the run are gone again (pytest's ^C still works).
  assert {s: signal.getsignal(s) for s in handlers} == handlers


def _start(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, '-m', 'bigbatch.main', f'--config=configs/quickstart.py:steps={STEPS}',
       f'--workdir={workdir}', *OVERRIDES, *extra], cwd=ROOT, env=env,
      stderr=subprocess.PIPE, text=True)


def _one_stop_line(stderr: str, words):
  assert 'Traceback' not in stderr
  lines = [l for l in stderr.splitlines() if l.startswith('bigbatch:')]
  assert len(lines) == 1 and all(w in lines[0] for w in words), stderr[-3000:]


def test_sigterm_at_startup_exits_75(tmp_path):
  """During the imports, before main runs: one line, 75, nothing written."""
  proc = _start(tmp_path / 'wd')
  time.sleep(3)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == main.EXIT_PREEMPTED, stderr[-3000:]
  _one_stop_line(stderr, ['stopped', 'SIGTERM', 'rerun the same command'])


@pytest.mark.slow
def test_sigterm_during_data_loading_and_compilation_exits_75(tmp_path):
  """The real command, signalled from outside once setup has begun (the mesh is logged before
  the data set is read and the step compiled); the interpreter's teardown is skipped, so an
  interrupted compilation cannot turn 75 into a crash."""
  proc = _start(tmp_path / 'wd')
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if 'Topology:' in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.stderr.read()
  proc.wait(timeout=120)
  assert proc.returncode == main.EXIT_PREEMPTED, (''.join(seen) + rest)[-3000:]
  _one_stop_line(''.join(seen) + rest, ['stopped: SIGTERM', 'rerun the same command'])
  assert not os.path.isdir(tmp_path / 'wd' / 'checkpoints') or not os.listdir(
      tmp_path / 'wd' / 'checkpoints')


# ----------------------------------------------------------------------------- checkpoints


def _small_state(value):
  noise = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)  # incompressible
  return {'w': jnp.asarray(noise + value), 'step': jnp.int32(value),
          'flag': jnp.array([True, False])}


@pytest.fixture
def three_checkpoints(tmp_path):
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoint.Checkpointer(directory, asynchronous=False)
  for step in (1, 2, 3):
    ckpt.save(step, _small_state(step))
  ckpt.close()
  return directory


def _array_files(directory, step):
  """The data files of a checkpoint's arrays (orbax's merged OCDBT store, state/d/)."""
  root = os.path.join(directory, str(step), 'state', 'd')
  files = sorted(os.path.join(root, f) for f in os.listdir(root))
  assert files
  return files


def _corrupt(directory, step, how):
  for target in _array_files(directory, step):
    if how == 'missing':
      os.remove(target)
    elif how == 'truncated':
      with open(target, 'r+b') as f:
        f.truncate(os.path.getsize(target) // 2)
    elif how == 'flipped':
      with open(target, 'r+b') as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0x01
        f.seek(0)
        f.write(data)


@pytest.mark.parametrize('how', ['missing', 'truncated', 'flipped'])
def test_corrupt_latest_checkpoint_falls_back_to_previous(three_checkpoints, how, caplog):
  _corrupt(three_checkpoints, 3, how)
  ckpt = checkpoint.Checkpointer(three_checkpoints)
  state, step = ckpt.restore_latest(_small_state(0))
  assert step == 2
  np.testing.assert_array_equal(state['w'], _small_state(2)['w'])
  assert 'step 3' in caplog.text and 'unusable' in caplog.text


def test_flipped_byte_in_raw_array_data_is_caught_by_fingerprint(tmp_path):
  """Uncompressed bytes: the flip decodes to a valid but wrong value, which only the
  fingerprint can catch."""
  state = _small_state(5)
  good = checkpoint.fingerprints(state)
  bad = dict(state, w=state['w'].at[7, 9].set(np.float32(5.0000005)))
  assert checkpoint.fingerprints(bad)['w'] != good['w']
  assert checkpoint.fingerprints(bad)['step'] == good['step']
  # Sharding does not change the fingerprint.
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(state['w'], jax.sharding.NamedSharding(mesh, jax.P('data')))
  assert checkpoint.fingerprints({'w': sharded})['w'] == good['w']


def test_no_readable_checkpoint_stops_naming_the_directory(three_checkpoints):
  for step in (1, 2, 3):
    _corrupt(three_checkpoints, step, 'missing')
  with pytest.raises(checkpoint.CheckpointError, match=three_checkpoints):
    checkpoint.Checkpointer(three_checkpoints).restore_latest(_small_state(0))


def test_unfinalized_checkpoint_is_ignored(three_checkpoints):
  shutil.copytree(os.path.join(three_checkpoints, '3'),
                  os.path.join(three_checkpoints, '4.orbax-checkpoint-tmp'))
  _, step = checkpoint.Checkpointer(three_checkpoints).restore_latest(_small_state(0))
  assert step == 3


def test_checkpoint_of_another_model_is_a_clear_error(three_checkpoints):
  other = dict(_small_state(0), w=jnp.zeros((32, 64)))
  with pytest.raises(checkpoint.CheckpointError, match='does not fit the model.*w: saved'):
    checkpoint.Checkpointer(three_checkpoints).restore_latest(other)


@pytest.mark.slow
def test_checkpoint_records_its_config(tmp_path):
  config = _config(num_steps=2, checkpoint_every_steps=2)
  loop.train_and_evaluate(config, str(tmp_path))
  meta = checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).metadata(2)
  assert meta['config']['global_batch'] == 128 and meta['step'] == 2


# ----------------------------------------------------------------------------- non-finite


def _nan_batch(k, m):
  return {'image': np.full((k, m, 8, 8, 1), np.nan, np.float32),
          'label': np.zeros((k, m), np.int32)}


@pytest.mark.slow
def test_nonfinite_batch_is_skipped_and_counted():
  config = _config(global_batch=64, accumulation_steps=1)
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                        image_shape=(8, 8, 1), num_classes=10)
  before = jax.device_get(trainer.state)
  state, metrics = trainer.train_step(
      trainer.state, jax.device_put(_nan_batch(1, 64), trainer.batch_sharding))
  after = jax.device_get(state)
  assert int(metrics['nonfinite_total']) == 1 and int(metrics['nonfinite_streak']) == 1
  assert int(after.step) == 1
  for x, y in zip(jax.tree.leaves((before.params, before.opt_state, before.batch_stats)),
                  jax.tree.leaves((after.params, after.opt_state, after.batch_stats))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_update_that_overflows_the_parameters_is_not_applied():
  """Finite loss and gradients, but lr x gradient overflows float32: the guard sees the new
  parameters, not only the loss and the gradient norm. (One label for the whole batch makes the
  output bias's gradient about -0.9, so float32's largest lr overflows it.)"""
  config = _config(global_batch=64, accumulation_steps=1)
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                              image_shape=(8, 8, 1), num_classes=10)
  state = trainer.state.replace(opt_state=optim.set_peak_lr(
      trainer.state.opt_state, float(np.finfo(np.float32).max)))
  state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, trainer.state))
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(1, 64, 8, 8, 1)).astype(np.float32),
           'label': np.zeros((1, 64), np.int32)}
  new, metrics = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert int(metrics['nonfinite_streak']) == 1
  after = jax.device_get(new)
  for x, y in zip(jax.tree.leaves((before.params, before.opt_state, before.batch_stats)),
                  jax.tree.leaves((after.params, after.opt_state, after.batch_stats))):
    np.testing.assert_array_equal(x, y)


class _PoisonState(hooks_lib.Hook):
  """Makes the parameters NaN after update `at`, past the step's guard (as a bug or a bad
  fine-tuning start would)."""
  order = 5

  def __init__(self, at):
    self.at = at

  def after_step(self, run, done):
    if done == self.at:
      run.state = run.state.replace(params=jax.tree.map(lambda p: p * jnp.nan, run.state.params))


@pytest.mark.slow
def test_nonfinite_state_is_never_checkpointed_nor_a_success(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    main.train(_config(num_steps=8), str(tmp_path), hooks=[_PoisonState(8)])
  assert e.value.code == main.EXIT_NONFINITE
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('bigbatch:')]
  assert len(lines) == 1 and 'step 8: the state holds non-finite values (params/' in lines[0]
  assert 'not checkpointed' in lines[0] and 'Last good checkpoint: step 4' in lines[0]
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).all_steps() == [4]


@pytest.mark.slow
@pytest.mark.parametrize('policy,expected_streak', [('skip', 3), ('stop', 1)])
def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch, capsys, policy,
                                                  expected_streak):
  config = _config(nonfinite=policy, max_nonfinite_steps=3)
  with pytest.raises(SystemExit) as e:
    main.train(config, str(tmp_path), hooks=[faults.Fault('nan_from_step:6')])
  assert e.value.code == main.EXIT_NONFINITE
  err = capsys.readouterr().err.strip()
  assert f'step {5 + expected_streak}:' in err and f'{expected_streak} consecutive' in err
  assert 'Last good checkpoint: step 4' in err and 'lr ' in err
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  assert ckpt.all_steps() == [4]  # nothing written after the bad steps


# ----------------------------------------------------------------------------- workdir


def _short(**overrides):
  return _config(**{'num_steps': 4, 'checkpoint_every_steps': 2, 'lr.decay': 'constant',
                     **overrides})


@pytest.mark.slow
def test_restart_with_a_different_experiment_is_refused(tmp_path, capsys):
  loop.train_and_evaluate(_short(), str(tmp_path))
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  with pytest.raises(SystemExit) as e:
    main.train(_short(global_batch=64, **{'optimizer.name': 'lars'}), str(tmp_path))
  assert e.value.code == main.EXIT_CONFIG_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'global_batch: 128 -> 64' in err[0] and 'optimizer.name' in err[0]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before


@pytest.mark.slow
def test_observing_and_extending_changes_are_allowed(tmp_path):
  loop.train_and_evaluate(_short(), str(tmp_path))
  # Constant lr: 8 steps give the first 4 the same lr, so extending is allowed.
  loop.train_and_evaluate(_short(num_steps=8, log_every_steps=2), str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 8


@pytest.mark.slow
def test_extending_a_decaying_schedule_is_refused(tmp_path):
  loop.train_and_evaluate(_short(**{'lr.decay': 'cosine'}), str(tmp_path))
  with pytest.raises(workdir_lib.WorkdirError, match='lr of steps already run'):
    loop.train_and_evaluate(_short(num_steps=8, **{'lr.decay': 'cosine'}), str(tmp_path))


@pytest.mark.slow
def test_restart_from_scratch_sets_the_old_run_aside(tmp_path):
  workdir = tmp_path / 'wd'
  loop.train_and_evaluate(_short(), str(workdir))
  loop.train_and_evaluate(_short(global_batch=64), str(workdir), restart_from_scratch=True)
  aside = [p for p in os.listdir(tmp_path) if p.startswith('wd.old-')]
  assert len(aside) == 1
  assert json.load(open(tmp_path / aside[0] / 'config.json'))['global_batch'] == 128
  assert json.load(open(workdir / 'config.json'))['global_batch'] == 64


@pytest.mark.slow
def test_run_resumed_past_a_corrupt_checkpoint_saves_that_step_again(tmp_path):
  """The corrupt latest checkpoint is set aside; the retrained step is checkpointed anew (orbax
  would otherwise skip a save whose step directory exists) and verifies."""
  config = _short(checkpoint_every_steps=2)
  loop.train_and_evaluate(config, str(tmp_path))
  ckpt_dir = str(tmp_path / 'checkpoints')
  _corrupt(ckpt_dir, 4, 'flipped')
  loop.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  assert ckpt.all_steps()[-1] == 4
  _, step = ckpt.restore_latest(trainer_lib.build(
      config, sharding.make_mesh(config), num_train=1437, image_shape=(8, 8, 1),
      num_classes=10).state)
  assert step == 4
  assert any(name.startswith('unusable-4-') for name in os.listdir(ckpt_dir))
