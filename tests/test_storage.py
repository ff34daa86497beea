"""Storage failures outside a checkpoint save: every file bigbatch writes in a workdir (metrics,
TensorBoard, config.json, derived.json, an evaluation's json, the lock, a plot, a study's
results and report) fails as workdir.StorageError naming the path and the reason, which
bigbatch.main turns into one line and exit 5; files are replaced whole, so what was written
before is intact. A full disk is injected (OSError ENOSPC where the file is written) in the
default suite; the `slow` test fills a real small tmpfs. The rows of docs/errors.md these tests
stand for are in DOC_ROWS."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
import types

import pytest

from bigbatch import config_lib
from bigbatch import lock as lock_lib
from bigbatch import main
from bigbatch import metrics
from bigbatch import workdir as workdir_lib

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402

DOC_ROWS = ('disk-full-metrics', 'disk-full-tensorboard', 'disk-full-workdir-files',
            'object-store-unreachable', 'workdir-empty', 'workdir-relative', 'seed-range')

_FULL = OSError(errno.ENOSPC, 'No space left on device')


def _short(**overrides):
  c = quickstart.get_config('steps=4')
  c.model.width = 8
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.eval_every_epochs = None
  c.lr.warmup_steps = None
  c.lr.decay = 'constant'
  return config_lib.override(c, **overrides)


def _one_line(e, capsys, words):
  assert e.value.code == 5
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  line = err[0]
  assert line.startswith('bigbatch: storage error: '), line
  for w in words + ['No space left on device', 'free space or fix permissions',
                    'rerun the same command']:
    assert w in line, (w, line)
  return line


# ----------------------------------------------------------------------------- through main.train


class _FillsAt:
  """metrics.jsonl's file object; the disk is full from the row of step `step` on."""

  def __init__(self, file, step):
    self._file, self._step = file, step

  def write(self, line):
    if json.loads(line)['step'] >= self._step:
      self._file.write(line[:7])  # a torn part of the row reaches the disk
      raise _FULL
    return self._file.write(line)

  def __getattr__(self, name):
    return getattr(self._file, name)


def test_metrics_row_on_a_full_disk_exits_5(tmp_path, capsys, monkeypatch):
  real_init = metrics.JsonlWriter.__init__

  def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    self._file = _FillsAt(self._file, step=3)  # pylint: disable=protected-access

  monkeypatch.setattr(metrics.JsonlWriter, '__init__', init)
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(workdir))
  _one_line(e, capsys, [f'{workdir}/metrics.jsonl'])
  # The rows written before are intact; the torn row is what a resume sets aside.
  rows = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(r)['step'] for r in rows[:-1]] == [1, 2] and rows[-1] == '{"step"'
  assert json.loads((workdir / 'config.json').read_text())['global_batch'] == 128
  assert not (workdir / workdir_lib.LOCK_FILE).exists()  # released on the way out


def test_tensorboard_on_a_full_disk_at_start_exits_5(tmp_path, capsys, monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def full(logdir):
    raise tf.errors.ResourceExhaustedError(None, None, f'{logdir}: No space left on device')

  monkeypatch.setattr(metrics.metric_writers, 'SummaryWriter', full)
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(workdir))
  line = _one_line(e, capsys, [f'{workdir}/tensorboard', 'ResourceExhaustedError'])
  assert 'Traceback' not in line


def test_config_json_on_a_full_disk_exits_5_and_keeps_the_old_one(tmp_path, capsys,
                                                                  monkeypatch):
  workdir = tmp_path / 'wd'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"old": 1}')  # the same experiment's, say
  monkeypatch.setattr(workdir_lib, 'check_compatible', lambda *a, **k: None)
  real_replace = os.replace

  def replace(src, dst):
    if str(dst).endswith('config.json'):
      raise _FULL
    return real_replace(src, dst)

  monkeypatch.setattr(workdir_lib.os, 'replace', replace)
  with pytest.raises(SystemExit) as e:
    main.train(_short(), str(workdir))
  _one_line(e, capsys, [f'{workdir}/config.json'])
  assert (workdir / 'config.json').read_text() == '{"old": 1}'
  assert not [n for n in os.listdir(workdir) if n.endswith('.tmp')]


# ----------------------------------------------------------------------------- each writer


def _replace_fails(monkeypatch):
  def replace(src, dst):
    raise _FULL
  monkeypatch.setattr(workdir_lib.os, 'replace', replace)


def test_write_json_keeps_the_previous_file(tmp_path, monkeypatch):
  path = tmp_path / 'derived.json'
  workdir_lib.write_json(path, {'a': 1})
  _replace_fails(monkeypatch)
  with pytest.raises(workdir_lib.StorageError, match=f'{path}: No space left on device; free '):
    workdir_lib.write_json(path, {'a': 2})
  assert json.loads(path.read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['derived.json']  # no temporary file left behind


def test_metrics_resume_on_a_full_disk_keeps_every_row(tmp_path, monkeypatch):
  path = tmp_path / 'metrics.jsonl'
  text = ''.join(json.dumps({'step': s}) + '\n' for s in range(1, 6))
  path.write_text(text)
  _replace_fails(monkeypatch)
  with pytest.raises(workdir_lib.StorageError, match='metrics.jsonl: No space left on device'):
    metrics.JsonlWriter(str(path), resume_step=3)
  assert path.read_text() == text  # the cut back to step 3 would have been a rewrite in place


def test_lock_on_a_full_disk(tmp_path, monkeypatch):
  def full(path, text):
    raise _FULL
  monkeypatch.setattr(lock_lib, '_create_exclusive', full)
  with pytest.raises(workdir_lib.StorageError,
                     match=f'{tmp_path}/bigbatch.lock: No space left on device'):
    lock_lib.WorkdirLock.acquire(tmp_path)


def test_workdir_on_a_full_disk(tmp_path, monkeypatch):
  def full(self, text, *args, **kwargs):
    raise _FULL
  monkeypatch.setattr(type(workdir_lib.epath.Path(tmp_path)), 'write_text', full)
  with pytest.raises(workdir_lib.StorageError, match=f'{tmp_path}/wd: No space left on device'):
    workdir_lib.ensure_writable(tmp_path / 'wd')


def test_tensorboard_writes_on_a_full_disk(tmp_path, monkeypatch):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  writer = metrics.create_writer(tmp_path, is_main=True)

  def full(*args, **kwargs):
    raise tf.errors.ResourceExhaustedError(None, None, 'No space left on device')

  tensorboard = writer._writers[0]  # pylint: disable=protected-access
  inner = tensorboard._writer  # pylint: disable=protected-access
  monkeypatch.setattr(inner, 'write_scalars', full)
  with pytest.raises(workdir_lib.StorageError,
                     match=f'{tmp_path}/tensorboard: No space left on device '
                           r'\(ResourceExhaustedError\)'):
    writer.write_scalars(1, {'train/loss': 1.0})
  writer.close()


def test_plot_on_a_full_disk_exits_5(tmp_path, capsys, monkeypatch):
  from bigbatch import plot  # pylint: disable=g-import-not-at-top
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'train/loss': 1.0 / s}) + '\n' for s in range(1, 5)))
  out = tmp_path / 'plots'
  out.mkdir()
  (out / 'metrics_vs_steps.png').write_bytes(b'old figure')
  _replace_fails(monkeypatch)
  for name, value in (('_OUT_DIR', str(out)), ('_X', ['steps']), ('_LABELS', []),
                      ('_SMOOTH', 0.0), ('_TITLE', '')):  # the flags, as parsed
    monkeypatch.setattr(plot, name, types.SimpleNamespace(value=value))
  with pytest.raises(SystemExit) as e:
    plot.main(['plot', str(run)])
  assert e.value.code == 5
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f'bigbatch.plot: storage error: {out}/metrics_vs_steps.png: No space '
                         f'left on device; free space'), line
  assert (out / 'metrics_vs_steps.png').read_bytes() == b'old figure'


def test_study_results_on_a_full_disk(tmp_path, monkeypatch):
  from bigbatch.study import run  # pylint: disable=g-import-not-at-top
  row = {'trial_id': 't0', 'batch_size': 8}
  run._append_result(str(tmp_path), row)  # pylint: disable=protected-access
  before = (tmp_path / 'results.jsonl').read_text()
  local = type(workdir_lib.epath.Path(tmp_path))  # epath's class for local paths
  real_open = local.open

  def full_open(self, mode='r', *args, **kwargs):
    if 'a' in mode:
      raise _FULL
    return real_open(self, mode, *args, **kwargs)

  monkeypatch.setattr(local, 'open', full_open)
  with pytest.raises(workdir_lib.StorageError, match='results.jsonl: No space left on device'):
    run._append_result(str(tmp_path), row)  # pylint: disable=protected-access
  assert (tmp_path / 'results.jsonl').read_text() == before
  _replace_fails(monkeypatch)
  with pytest.raises(workdir_lib.StorageError, match='result.json: No space left on device'):
    run._write_json(str(tmp_path / 'result.json'), row)  # pylint: disable=protected-access


def test_a_bug_is_not_a_storage_error(tmp_path):
  with pytest.raises(TypeError):
    workdir_lib.write_json(tmp_path / 'x.json', {'a': object()})


# ----------------------------------------------------------------------------- object stores


def _network() -> bool:
  try:
    socket.getaddrinfo('www.googleapis.com', 443)
    return True
  except OSError:
    return False


def test_unreachable_object_store_is_one_line_at_startup(tmp_path):
  """gs:// with no network: the first existence check fails in seconds (TensorFlow's GCS client
  does not retry a host that does not resolve); one line, exit 5. NO_GCE_CHECK and an
  unresolvable metadata host keep the credential lookup from waiting, and the subprocess timeout
  bounds the test. With a network the bucket might answer: the next test covers that case."""
  if _network():
    pytest.skip('www.googleapis.com resolves here: GCS is reachable')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', NO_GCE_CHECK='true', GCE_METADATA_HOST='metadata.invalid',
             GCE_METADATA_ROOT='metadata.invalid', GOOGLE_APPLICATION_CREDENTIALS='',
             TF_CPP_MIN_LOG_LEVEL='3')
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', '--config=configs/quickstart.py:steps=2',
       '--workdir=gs://bigbatch-test-unreachable/run'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('bigbatch:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('bigbatch: storage error: gs://bigbatch-test-unreachable/run: ')
  assert 'check the URL, the network and the credentials' in lines[0], lines[0]
  assert proc.returncode == 5
  assert time.monotonic() - start < 200


def test_object_store_error_at_startup_in_process(tmp_path, capsys, monkeypatch):
  """Whatever the network: the object store's client raising at the first existence check (as
  tf.io.gfile does without a network) is one line and exit 5, before anything is written."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from etils.epath import backend as backend_lib  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  class Unreachable(type(backend_lib.os_backend)):
    def exists(self, path):
      raise tf.errors.FailedPreconditionError(
          None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve "
          f"hostname'\n\t when reading metadata of {path}")

  backends = gpath._PREFIX_TO_BACKEND  # pylint: disable=protected-access
  monkeypatch.setitem(backends, 'gs', Unreachable())
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  with pytest.raises(SystemExit) as e:
    main.train(_short(), 'gs://bucket/run')
  assert e.value.code == 5
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line == ("bigbatch: storage error: gs://bucket/run: Error executing an HTTP request: "
                  "libcurl code 6 meaning 'Could not resolve hostname' "
                  "(FailedPreconditionError); check the URL, the network and the credentials "
                  "(gcloud auth application-default login), then rerun the same command"), line


# ----------------------------------------------------------------------------- --workdir, seed


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=os.path.abspath(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'bigbatch.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('workdir', ['', '  '])
def test_empty_workdir_is_a_flag_error(workdir, tmp_path):
  proc = _cli(f'--config={os.path.abspath(ROOT)}/configs/quickstart.py:steps=2',
              f'--workdir={workdir}', cwd=tmp_path)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip() == (f'bigbatch: flag error: --workdir={workdir!r} is empty (an '
                                 f'unset shell variable?); give the directory for checkpoints, '
                                 f'metrics and logs')
  assert os.listdir(tmp_path) == []  # nothing written, least of all in the current directory


def test_relative_workdir_is_made_absolute_once(tmp_path):
  """Where the flags are parsed: everything after (the schedule line, the lock, orbax, which
  refuses a relative checkpoint path) sees the absolute path."""
  code = ('import sys; from bigbatch import main; main._parse_flags(sys.argv); '
          'print(main._WORKDIR.value)')
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
  proc = subprocess.run(
      [sys.executable, '-c', code, f'--config={os.path.abspath(ROOT)}/configs/quickstart.py',
       '--workdir=runs/a'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == str(tmp_path / 'runs' / 'a')
  assert os.listdir(tmp_path) == []
  for url in ('gs://bucket/run', 'file:///tmp/run'):
    assert workdir_lib.absolute(url) == url


@pytest.mark.parametrize('seed', [-1, 2**32, 2**64])
def test_seed_out_of_range_is_a_config_error(seed, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    main.train(_short(seed=seed), str(tmp_path / 'wd'))
  assert e.value.code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line == (f'bigbatch: config error: config.seed={seed!r}: must be an integer in '
                  f'[0, 2**32 - 1]; set --config.seed=...')
  assert not (tmp_path / 'wd').exists()


def test_seed_range_edges_are_valid():
  for seed in (0, 2**32 - 1):
    config_lib.validate(config_lib.override(_short(), seed=seed), 8)


# ----------------------------------------------------------------------------- a real full disk


@pytest.mark.slow
def test_real_full_disk_metrics_and_json(tmp_path):
  """A 64 KB tmpfs filled up: rows and files written before stay intact and readable."""
  disk = tmp_path / 'disk'
  os.makedirs(disk)
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(disk)], check=True,
                   capture_output=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  try:
    writer = metrics.JsonlWriter(str(disk / 'metrics.jsonl'))
    workdir_lib.write_json(disk / 'derived.json', {'a': 1})
    with open(disk / 'filler', 'wb', buffering=0) as f:  # the rest of the disk
      try:
        while True:
          f.write(b'\0' * 4096)
      except OSError:
        pass
    with pytest.raises(workdir_lib.StorageError, match='derived.json: No space left on device'):
      workdir_lib.write_json(disk / 'derived.json', {'a': 2, 'pad': 'x' * 8192})
    assert json.loads((disk / 'derived.json').read_text()) == {'a': 1}
    with pytest.raises(workdir_lib.StorageError, match='metrics.jsonl: No space left on device'):
      for step in range(1, 10_000):
        writer.write_scalars(step, {'train/loss': 1.0, 'pad': 1.0})
    rows = metrics.read_rows(disk / 'metrics.jsonl')
    assert [r['step'] for r in rows] == list(range(1, len(rows) + 1))
    assert not [n for n in os.listdir(disk) if n.endswith('.tmp')]
    (disk / 'filler').unlink()
    writer.close()
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False, timeout=30)


def test_study_workdir_is_made_absolute(tmp_path, monkeypatch):
  """The study's trials checkpoint under its workdir, and its printed commands may run in
  another directory (a SLURM array): a relative --workdir is made absolute."""
  from bigbatch.study import run  # pylint: disable=g-import-not-at-top
  from configs import study_digits  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  commands = run.commands(study_digits.get_config(), 'studies/a', 'configs/study_digits.py')
  assert commands and all(f' --workdir={tmp_path}/studies/a ' in c for c in commands), commands[0]
