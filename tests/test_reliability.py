"""Reliability: the workdir lock, metrics that are never dropped, configs recorded in
checkpoints, disk faults. Each class is tested by bringing its fault about; the rows of
docs/errors.md these tests stand for are in DOC_ROWS."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from bigbatch import checkpoint
from bigbatch import config_lib
from bigbatch import lock as lock_lib
from bigbatch import loop
from bigbatch import main
from bigbatch import metrics
from bigbatch import workdir as workdir_lib

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402

# The rows of docs/errors.md tested here.
DOC_ROWS = ('workdir-locked', 'workdir-lock-stale', 'workdir-config-json-missing',
            'workdir-config-json-corrupt', 'metrics-damaged', 'disk-full-tensorstore',
            'checkpoints-is-a-file')


def _cli(workdir, *overrides, steps=4, timeout=300):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', f'--config=configs/quickstart.py:steps={steps}',
       f'--workdir={workdir}', '--config.model.width=8', '--config.eval_every_epochs=1000',
       *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr):
  """The lines a user reads: bigbatch's own, without absl's log prefix."""
  return [l for l in stderr.splitlines() if l.startswith('bigbatch:')]


def _assert_one_line(e, capsys, code, words):
  assert e.value.code == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  for w in words:
    assert w in err[0], err[0]
  return err[0]


def _short(**overrides):
  c = quickstart.get_config('steps=4')
  c.model.width = 8
  c.checkpoint_every_steps = 2
  c.eval_every_epochs = None
  c.lr.warmup_steps = None
  c.lr.decay = 'constant'
  return config_lib.override(c, **overrides)


def _snapshot(workdir):
  return sorted((os.path.relpath(os.path.join(d, f), workdir), os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(workdir) for f in fs)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 4-step run (checkpoints at 2 and 4); tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp('trained') / 'wd'
  loop.train_and_evaluate(_short(), str(workdir))
  return workdir


@pytest.fixture
def copy(trained, tmp_path):
  target = tmp_path / 'wd'
  shutil.copytree(trained, target)
  return target


# ----------------------------------------------------------------------------- 1. the lock


def _live_process():
  """A process that exists (not this one), and its holder record."""
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  for _ in range(100):  # its start time is readable once it runs
    if lock_lib.process_start_time(proc.pid) is not None:
      break
    time.sleep(0.05)
  holder = dataclasses.replace(lock_lib.Holder.current(), pid=proc.pid,
                               start_time=lock_lib.process_start_time(proc.pid))
  return proc, holder


def _dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def _write_lock(workdir, text, age=0.0):
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(path, 'w') as f:
    f.write(text)
  if age:
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
  return path


# (name, how the existing lock's holder differs from a live process here, age of the lock in s,
#  taken over?). The holder is another process on this machine unless the row changes it.
LOCK_CASES = [
    ('live process', {}, 0, False),
    ('live process, old lock (a stopped heartbeat proves nothing here)', {}, 3600, False),
    ('dead PID', {'pid': 'dead'}, 0, True),
    ('PID reused by another process', {'start_time': 1}, 0, True),
    ('machine rebooted', {'boot_id': 'another-boot'}, 0, True),
    ('other host, heartbeat fresh', {'host': 'elsewhere', 'pid': 'dead'}, 10, False),
    ('other host, heartbeat stopped', {'host': 'elsewhere'},
     lock_lib.STALE_AFTER_S + 60, True),
    ('other container (PID namespace), fresh', {'pid_namespace': 'pid:[1]', 'pid': 'dead'}, 10,
     False),
    ('other container (PID namespace), stopped', {'pid_namespace': 'pid:[1]'},
     lock_lib.STALE_AFTER_S + 60, True),
    ('damaged lock file, old', 'damaged', 60, True),
]


@pytest.mark.parametrize('name,change,age,taken', LOCK_CASES, ids=[c[0] for c in LOCK_CASES])
def test_lock_judges_its_holder(name, change, age, taken, tmp_path, caplog):
  del name
  proc, holder = _live_process()
  try:
    if change == 'damaged':
      text = '{"host": "vm", "pi'
    else:
      change = {k: (_dead_pid() if v == 'dead' else v) for k, v in change.items()}
      text = dataclasses.replace(holder, **change).to_json()
    path = _write_lock(tmp_path, text, age)
    if taken:
      with caplog.at_level(logging.WARNING):
        lock = lock_lib.WorkdirLock.acquire(tmp_path)
      assert json.load(open(path))['pid'] == os.getpid()
      assert 'Took over the lock' in caplog.text
      lock.release()
      assert not os.path.exists(path)
    else:
      with pytest.raises(workdir_lib.WorkdirError, match='in use by another trainer') as e:
        lock_lib.WorkdirLock.acquire(tmp_path)
      assert f'PID {json.loads(text)["pid"]} on ' in str(e.value) and path in str(e.value)
      assert open(path).read() == text  # untouched
    assert sorted(os.listdir(tmp_path)) == ([] if taken else [workdir_lib.LOCK_FILE])
  finally:
    proc.kill()
    proc.wait()


@pytest.mark.parametrize('stale', [False, True], ids=['no lock', 'stale lock'])
def test_lock_has_one_winner_among_racing_trainers(stale, tmp_path):
  """Eight threads take the lock at once (threads of one process: each sees the winner as alive),
  from nothing or by taking over a dead process's lock: exactly one holds it."""
  if stale:
    dead = dataclasses.replace(lock_lib.Holder.current(), pid=_dead_pid())
    _write_lock(tmp_path, dead.to_json())
  barrier = threading.Barrier(8)
  won, refused = [], []

  def take():
    barrier.wait()
    try:
      won.append(lock_lib.WorkdirLock.acquire(tmp_path))
    except workdir_lib.WorkdirError:
      refused.append(1)

  threads = [threading.Thread(target=take) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and len(refused) == 7
  held = open(tmp_path / workdir_lib.LOCK_FILE).read()
  assert held == won[0]._text  # pylint: disable=protected-access
  won[0].release()
  assert os.listdir(tmp_path) == []  # no claim or temporary file left behind


def test_lock_of_a_killed_trainer_is_taken_over(tmp_path, caplog):
  code = ('import os, signal, sys; from bigbatch import lock; '
          'lock.WorkdirLock.acquire(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)')
  proc = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=ROOT)
  assert proc.wait(timeout=120) == -signal.SIGKILL
  assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))['pid'] == proc.pid  # left behind
  with caplog.at_level(logging.WARNING):
    lock = lock_lib.WorkdirLock.acquire(tmp_path)
  assert 'is not running' in caplog.text
  lock.release()


def test_heartbeat_touches_the_lock_and_notices_a_takeover(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_S', 0.05)
  lock = lock_lib.WorkdirLock.acquire(tmp_path)
  path = str(tmp_path / workdir_lib.LOCK_FILE)
  os.utime(path, (0, 0))
  time.sleep(0.5)
  assert time.time() - os.path.getmtime(path) < 5
  with caplog.at_level(logging.ERROR):
    _write_lock(tmp_path, 'someone else\n')
    time.sleep(0.5)
  assert 'no longer this trainer' in caplog.text
  lock.release()
  assert open(path).read() == 'someone else\n'  # not ours: not deleted


def test_restart_from_scratch_keeps_the_lock(tmp_path):
  workdir = tmp_path / 'wd'
  os.makedirs(workdir)
  (workdir / 'metrics.jsonl').write_text('{"step": 1}\n')
  lock = lock_lib.WorkdirLock.acquire(workdir)
  moved = lock_lib.restart(lock)
  assert sorted(os.listdir(moved)) == ['metrics.jsonl']  # the old run, without the lock
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]
  with pytest.raises(workdir_lib.WorkdirError, match='in use'):
    lock_lib.WorkdirLock.acquire(workdir)
  lock.release()
  assert os.listdir(workdir) == []


def test_lock_on_an_object_store(tmp_path, monkeypatch):
  from tests import test_workdir_paths  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  fake = test_workdir_paths._FakeBucket(tmp_path / 'gcs')  # pylint: disable=protected-access
  os.makedirs(os.path.join(fake.root, 'bucket', 'run'))
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'gs', fake)  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  monkeypatch.setattr(lock_lib, '_SETTLE_S', 0.01)
  lock = lock_lib.WorkdirLock.acquire('gs://bucket/run')
  local = os.path.join(fake.root, 'bucket', 'run', workdir_lib.LOCK_FILE)
  assert json.load(open(local))['pid'] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirError, match='in use by another trainer'):
    lock_lib.WorkdirLock.acquire('gs://bucket/run')
  lock.release()
  assert not os.path.exists(local)
  assert all('a' not in m for _, m in fake.modes)  # never an append


def test_second_trainer_exits_2_naming_the_holder(tmp_path):
  """The command line, with the lock held by a live process: refused before anything is
  written, and before the data set is loaded."""
  workdir = tmp_path / 'wd'
  os.makedirs(workdir)
  proc, holder = _live_process()
  try:
    _write_lock(workdir, holder.to_json())
    before = _snapshot(workdir)
    result = _cli(workdir)
  finally:
    proc.kill()
    proc.wait()
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  (line,) = _error_lines(result.stderr)
  assert f'in use by another trainer (PID {holder.pid} on {holder.host}' in line
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_two_real_trainers_on_one_workdir(tmp_path):
  """The worst case: a second trainer started while the first runs. It is refused
  (exit 2, naming the first), and the first's metrics hold each step once."""
  workdir = tmp_path / 'wd'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  first = subprocess.Popen(
      [sys.executable, '-m', 'bigbatch.main', '--config=configs/quickstart.py:steps=100000',
       f'--workdir={workdir}', '--config.model.width=8', '--config.log_every_steps=1',
       '--config.eval_every_epochs=1000'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    metrics_file = workdir / 'metrics.jsonl'
    while not metrics_file.exists() or not metrics_file.stat().st_size:
      assert first.poll() is None and time.monotonic() < deadline
      time.sleep(1)
    second = _cli(workdir, '--config.log_every_steps=1', steps=100000)
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = _error_lines(second.stderr)
    assert f'in use by another trainer (PID {first.pid} on ' in line
  finally:
    first.kill()
    first.wait()
  steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
           if l.endswith('}')]
  assert steps == sorted(set(steps))


# ----------------------------------------------------------------------------- 2. metrics


def _rows(*steps):
  return [json.dumps({'step': s, 'train/loss': s / 10}) for s in steps]


# (name, lines of metrics.jsonl, resume step, steps kept, number of damaged lines)
CUT_CASES = [
    ('clean', _rows(1, 2, 3, 4), 4, [1, 2, 3, 4], 0),
    ('past the checkpoint', _rows(1, 2, 3, 4, 5, 6), 4, [1, 2, 3, 4], 0),
    ('torn last line', _rows(1, 2, 3) + ['{"step": 4, "train/lo'], 3, [1, 2, 3], 1),
    ('damaged line in the middle', _rows(1, 2) + ['{"step": 3, "tr\x00\x00'] + _rows(4, 5), 4,
     [1, 2, 4], 1),
    ('not an object, no step, bad steps',
     _rows(1) + ['[1, 2]', '{"train/loss": 1}', '{"step": "2"}', '{"step": true}', '7'] +
     _rows(2), 2, [1, 2], 5),
    ('blank lines', _rows(1) + ['', '  '] + _rows(2), 2, [1, 2], 0),
    ('out of order and repeated (train and eval rows of one step)',
     _rows(2, 1) + [json.dumps({'step': 2, 'eval/top1': 0.5})] + _rows(3), 2, [2, 1, 2], 0),
    ('no checkpoint yet', _rows(1, 2), 0, [], 0),
]


@pytest.mark.parametrize('name,lines,resume,kept,damaged', CUT_CASES,
                         ids=[c[0] for c in CUT_CASES])
def test_metrics_cut_back_by_step_number(name, lines, resume, kept, damaged, tmp_path, caplog):
  del name
  path = tmp_path / 'metrics.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  with caplog.at_level(logging.WARNING):
    writer = metrics.JsonlWriter(str(path), resume_step=resume)
  writer.write_scalars(resume + 1, {'train/loss': 9.0})
  writer.close()
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert [r['step'] for r in rows] == kept + [resume + 1]
  good = {l for l in lines if metrics._row_step(l) is not None}  # pylint: disable=protected-access
  assert all(json.dumps(r) in good for r in rows[:-1])  # rows kept verbatim
  aside = [p for p in os.listdir(tmp_path) if p.startswith('metrics.jsonl.damaged-')]
  if damaged:
    assert len(aside) == 1 and f'{damaged} damaged line(s)' in caplog.text
    assert len((tmp_path / aside[0]).read_text().splitlines()) == damaged
  else:
    assert not aside and 'damaged' not in caplog.text
  later = sum(1 for l in lines
              if (metrics._row_step(l) or 0) > resume)  # pylint: disable=protected-access
  assert (f'dropped {later} row(s)' in caplog.text) == bool(later)


def test_invalid_bytes_damage_one_line_only(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xff\xfe"}\n\xc3{"step\n{"step": 3}\n')
  metrics.JsonlWriter(str(path), resume_step=3).close()
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3]


# ----------------------------------------------------------------------------- 3. configs


def test_checkpoint_record_protects_a_workdir_without_config_json(copy, capsys):
  os.remove(copy / 'config.json')
  before = _snapshot(copy)
  with pytest.raises(SystemExit) as e:
    main.train(_short(global_batch=64), str(copy))
  _assert_one_line(e, capsys, 2, ['holds another experiment (recorded in the checkpoint of '
                                  'step 4)', 'global_batch: 128 -> 64'])
  assert _snapshot(copy) == before


def test_checkpoint_record_wins_over_a_rewritten_config_json(copy, capsys):
  """config.json edited to the new experiment's batch size: the checkpoint still says 128."""
  recorded = json.load(open(copy / 'config.json'))
  recorded['global_batch'] = 64
  json.dump(recorded, open(copy / 'config.json', 'w'))
  with pytest.raises(SystemExit) as e:
    main.train(_short(global_batch=64), str(copy))
  _assert_one_line(e, capsys, 2, ['global_batch: 128 -> 64'])


@pytest.mark.parametrize('text,reason', [('{"seed": 0, "glob', 'JSONDecodeError'),
                                         ('[1, 2]', 'a JSON list, not an object'),
                                         ('', 'JSONDecodeError')])
def test_corrupt_config_json_is_one_line(copy, capsys, text, reason):
  (copy / 'config.json').write_text(text)
  before = _snapshot(copy)
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(copy))
  _assert_one_line(e, capsys, 2, ['config.json is damaged', reason, 'delete it'])
  assert _snapshot(copy) == before


@pytest.mark.slow
def test_same_experiment_resumes_without_config_json(copy):
  os.remove(copy / 'config.json')
  loop.train_and_evaluate(_short(num_steps=6), str(copy))  # constant lr: extending is allowed
  assert checkpoint.Checkpointer(str(copy / 'checkpoints')).all_steps()[-1] == 6
  assert json.load(open(copy / 'config.json'))['num_steps'] == 6


def test_recorded_config_skips_checkpoints_without_a_record(copy):
  ckpt = checkpoint.Checkpointer(str(copy / 'checkpoints'))
  path = copy / 'checkpoints' / '4' / 'meta' / 'metadata'
  meta = json.load(open(path))
  del meta['config']
  json.dump(meta, open(path, 'w'))
  step, config = ckpt.recorded_config()
  assert step == 2 and config['global_batch'] == 128
  ckpt.close()


# ----------------------------------------------------------------------------- 6. disk faults

_ENOSPC = ("RESOURCE_EXHAUSTED: Error writing \"params.conv0.kernel/0\" in OCDBT database at local "
           "file \"/w/checkpoints/4.orbax-checkpoint-tmp/state/ocdbt.process_0/\": Failed to "
           "write 797560 bytes to file 6: No space left on device [os_error_code='28']")

def _wrapped():
  """What orbax raises from its background thread: its own error, caused by tensorstore's."""
  try:
    raise ValueError(_ENOSPC)
  except ValueError as inner:
    try:
      raise RuntimeError('background save failed') from inner
    except RuntimeError as e:
      return e


# (name, a function giving the exception orbax raises, the reason in the SaveError; None: not a
# storage error, raised as it is)
STORAGE_CASES = [
    ('tensorstore disk full', lambda: ValueError(_ENOSPC),
     'No space left on device (RESOURCE_EXHAUSTED)'),
    ('tensorstore permission', lambda: ValueError('PERMISSION_DENIED: 403 storage.objects.create'),
     'PERMISSION_DENIED: 403 storage.objects.create (PERMISSION_DENIED)'),
    ('OSError', lambda: OSError(errno.ENOSPC, 'No space left on device'),
     'No space left on device'),
    ('wrapped by orbax\'s thread', _wrapped, 'No space left on device (RESOURCE_EXHAUSTED)'),
    ('a bug, not storage', lambda: ValueError('INVALID_ARGUMENT: bad shape'), None),
    ('a plain ValueError', lambda: ValueError('RESOURCE_EXHAUSTED is a word here'), None),
]


@pytest.mark.parametrize('name,make,reason', STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_storage_errors_become_save_errors(name, make, reason):
  del name
  error = make()

  def save():
    raise error

  if reason is None:
    with pytest.raises(type(error)):
      checkpoint._saving('writing', '/w', save)  # pylint: disable=protected-access
  else:
    with pytest.raises(checkpoint.SaveError, match='writing in /w failed: ') as e:
      checkpoint._saving('writing', '/w', save)  # pylint: disable=protected-access
    assert reason in str(e.value)


@pytest.mark.slow
def test_tensorstore_disk_full_exits_5(tmp_path, capsys, monkeypatch):
  """The error as tensorstore raises it, from the background write that orbax re-raises when the
  run waits for it (the save call itself goes through the same _saving)."""
  name = 'wait_until_finished'
  real = getattr(checkpoint.ocp.CheckpointManager, name)
  calls = []

  def full(self, *args, **kwargs):
    calls.append(args)
    if len(calls) >= 2:  # the first checkpoint (step 2) goes through
      raise ValueError(_ENOSPC)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, name, full)
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(tmp_path / 'wd'))
  _assert_one_line(e, capsys, 5, ['No space left on device (RESOURCE_EXHAUSTED)',
                                  'rerun the same command'])
  assert not (tmp_path / 'wd' / workdir_lib.LOCK_FILE).exists()  # released on the way out


def _mount_tmpfs(path, size):
  os.makedirs(path)
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                   check=True, capture_output=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    pytest.skip('cannot mount a small tmpfs here (needs root)')


@pytest.mark.slow
def test_real_full_disk_exits_5(tmp_path):
  """A 2 MB filesystem: the checkpoints of a width-64 CNN fill it at the second save."""
  disk = tmp_path / 'disk'
  _mount_tmpfs(disk, '2M')
  try:
    result = _cli(disk / 'wd', '--config.model.width=64', '--config.checkpoint_every_steps=4',
                  steps=8)
    assert result.returncode == 5, result.stderr[-3000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-5000:]
    line = lines[0]
    # The asynchronous save of step 8 fails while it is finished: the line names the checkpoint
    # directory and tensorstore's status. orbax's own error records about the save are
    # replaced by that line (they and their tracebacks are shown with --verbosity=1).
    assert 'Traceback' not in result.stderr and 'ERROR' not in result.stderr, result.stderr[-5000:]
    assert 'checkpoint not written' in line and (
        'No space left on device' in line or 'RESOURCE_EXHAUSTED' in line), line
    steps = checkpoint.Checkpointer(str(disk / 'wd' / 'checkpoints')).all_steps()
    assert steps == [4]
  finally:
    subprocess.run(['umount', str(disk)], check=False, timeout=30)


def test_checkpoints_path_that_is_a_file_is_found_at_startup(tmp_path):
  workdir = tmp_path / 'wd'
  os.makedirs(workdir)
  (workdir / 'checkpoints').write_text('not a directory')
  start = time.monotonic()
  result = _cli(workdir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  (line,) = _error_lines(result.stderr)
  assert f'{workdir}/checkpoints is a file, not a directory' in line and 'Move it' in line
  assert sorted(os.listdir(workdir)) == ['checkpoints']  # nothing written, lock released
  assert time.monotonic() - start < 120  # no wait in a barrier


@pytest.mark.parametrize('name,kind', [('metrics.jsonl', 'dir'), ('tensorboard', 'file'),
                                       ('checkpoints', 'file')])
def test_layout_check(tmp_path, name, kind):
  path = tmp_path / name
  if kind == 'dir':
    os.makedirs(path)
  else:
    path.write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match=f'{name} is a'):
    workdir_lib.check_layout(tmp_path)


@pytest.mark.slow
def test_restart_from_scratch_clears_a_bad_layout(tmp_path):
  workdir = tmp_path / 'wd'
  os.makedirs(workdir)
  (workdir / 'checkpoints').write_text('not a directory')
  loop.train_and_evaluate(_short(num_steps=2), str(workdir), restart_from_scratch=True)
  assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).all_steps() == [2]
  assert not (workdir / workdir_lib.LOCK_FILE).exists()
