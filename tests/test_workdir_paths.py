"""Workdir files on an object store (gs://) and locally, through etils.epath.

No network: a fake 'gs' backend maps gs://<path> onto a temporary directory and, like GCS, has no
append mode and no rename of a directory. epath picks the backend per path by its scheme, so the
code under test runs its real object-store branch on real gs:// paths.
"""
import json
import os

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath
import ml_collections
import pytest

from bigbatch import lock as lock_lib
from bigbatch import metrics
from bigbatch import workdir as workdir_lib

DOC_ROWS = ('workdir-symlink-restart',)  # the rows of docs/errors.md tested here


class _FakeBucket(backend_lib.Backend):
  """gs://X -> <root>/X on local disk, without append or directory rename; logs open modes."""

  def __init__(self, root):
    self.root = str(root)
    self.modes = []  # (path, mode) of every open
    self.fail_copy_after = None  # raise on the copy after this many, to stop a move half-way
    self._os = backend_lib.os_backend

  def _local(self, path):
    path = os.fspath(path)
    assert path.startswith('gs://'), path
    return os.path.join(self.root, path[len('gs://'):])

  def _remote(self, local):
    return 'gs://' + os.path.relpath(os.fspath(local), self.root)

  def open(self, path, mode):
    self.modes.append((os.fspath(path), mode))
    if 'a' in mode or '+' in mode:
      raise OSError(f'object stores cannot append: open({path}, {mode!r})')
    return self._os.open(self._local(path), mode)

  def rename(self, path, dst):
    if os.path.isdir(self._local(path)):
      raise OSError(f'object stores cannot rename a directory: {path}')
    self._os.rename(self._local(path), self._local(dst))

  def replace(self, path, dst):
    if os.path.isdir(self._local(path)):
      raise OSError(f'object stores cannot rename a directory: {path}')
    self._os.replace(self._local(path), self._local(dst))

  def copy(self, path, dst, overwrite):
    if self.fail_copy_after is not None:
      if self.fail_copy_after == 0:
        raise OSError('connection reset')
      self.fail_copy_after -= 1
    self._os.copy(self._local(path), self._local(dst), overwrite=overwrite)

  def glob(self, path):
    return [self._remote(p) for p in self._os.glob(self._local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in self._os.walk(self._local(top), top_down=top_down,
                                           on_error=on_error):
      yield self._remote(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    self._os.makedirs(self._local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self._os.mkdir(self._local(path), exist_ok=exist_ok, mode=mode)

  def exists(self, path):
    return self._os.exists(self._local(path))

  def isdir(self, path):
    return self._os.isdir(self._local(path))

  def listdir(self, path):
    return self._os.listdir(self._local(path))

  def rmtree(self, path):
    self._os.rmtree(self._local(path))

  def remove(self, path):
    self._os.remove(self._local(path))

  def stat(self, path):
    return self._os.stat(self._local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A fake gs://bucket; returns the backend (its .root is the local directory behind it)."""
  fake = _FakeBucket(tmp_path / 'gcs')
  os.makedirs(os.path.join(fake.root, 'bucket'))
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'gs', fake)  # pylint: disable=protected-access
  # With TensorFlow installed epath sends gs:// to tf.io.gfile whatever the table says.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  return fake


def _lines(path):
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def test_is_object_store():
  for path in ('gs://b/run', 's3://b/run', 'GS://b', epath.Path('gs://b/run')):
    assert workdir_lib.is_object_store(path), path
  for path in ('/tmp/run', 'runs/x', '.', 'file:///tmp/run', epath.Path('/tmp/run')):
    assert not workdir_lib.is_object_store(path), path


def test_the_fake_bucket_refuses_what_gcs_cannot_do(bucket):
  (epath.Path('gs://bucket/d') / 'f').parent.mkdir(parents=True)
  with pytest.raises(OSError, match='append'):
    epath.Path('gs://bucket/d/f').open('a')
  with pytest.raises(OSError, match='rename a directory'):
    epath.Path('gs://bucket/d').rename('gs://bucket/e')
  assert os.path.isdir(os.path.join(bucket.root, 'bucket', 'd'))


def test_jsonl_on_an_object_store_rewrites_and_never_appends(bucket):
  path = 'gs://bucket/run/metrics.jsonl'
  epath.Path(path).parent.mkdir(parents=True)
  writer = metrics.JsonlWriter(path)
  writer.write_scalars(1, {'train/loss': 2.0})
  assert _lines(path) == [{'step': 1, 'train/loss': 2.0}]  # durable at once, no flush
  writer.write_scalars(2, {'train/loss': float('nan')})
  writer.flush()
  writer.close()
  assert _lines(path) == [{'step': 1, 'train/loss': 2.0}, {'step': 2, 'train/loss': 'nan'}]
  assert bucket.modes and all('a' not in m for _, m in bucket.modes)


def test_jsonl_on_an_object_store_truncates_to_the_resume_step(bucket):
  path = 'gs://bucket/run/metrics.jsonl'
  epath.Path(path).parent.mkdir(parents=True)
  epath.Path(path).write_text(
      ''.join(json.dumps({'step': s, 'x': s}) + '\n' for s in range(1, 9)) + '{"step": 9, "x"')
  writer = metrics.JsonlWriter(path, resume_step=4)
  assert [r['step'] for r in _lines(path)] == [1, 2, 3, 4]  # truncated before any write
  writer.write_scalars(5, {'x': 50})
  writer.write_scalars(6, {'x': 60})
  assert [(r['step'], r['x']) for r in _lines(path)] == [(1, 1), (2, 2), (3, 3), (4, 4),
                                                          (5, 50), (6, 60)]
  writer.close()
  assert all('a' not in m for _, m in bucket.modes)


def test_jsonl_locally_appends_and_truncates_as_before(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s}) + '\n' for s in range(1, 6)) + '{"ste')
  writer = metrics.JsonlWriter(str(path), resume_step=3)
  assert [r['step'] for r in _lines(path)] == [1, 2, 3]
  writer.write_scalars(4, {'train/loss': 1.5})
  # Locally each line is appended and flushed: another reader sees it before close.
  assert _lines(path)[-1] == {'step': 4, 'train/loss': 1.5}
  assert writer._file.mode == 'a'  # pylint: disable=protected-access
  writer.close()


def _config(**overrides):
  config = ml_collections.ConfigDict({'model': 'resnet50', 'global_batch': 1024,
                                      'log_every_steps': 100})
  config.update(overrides)
  return config


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_record_and_check_compatible(where, tmp_path, bucket):
  workdir = str(tmp_path / 'run') if where == 'local' else 'gs://bucket/run'
  workdir_lib.ensure_writable(workdir)
  assert workdir_lib.isdir(workdir)
  assert not workdir_lib.exists(f'{workdir}/.bigbatch-write-test')
  assert workdir_lib.recorded_config(workdir) is None
  workdir_lib.record(workdir, _config())
  assert workdir_lib.recorded_config(workdir) == _config().to_dict()
  workdir_lib.check_compatible(workdir, _config(log_every_steps=10), num_train=100,
                               resume_step=5)
  with pytest.raises(workdir_lib.WorkdirError, match=r'global_batch: 1024 -> 512'):
    workdir_lib.check_compatible(workdir, _config(global_batch=512), num_train=100,
                                 resume_step=5)
  workdir_lib.write_json(f'{workdir}/derived.json', {'peak_lr': 0.5})
  assert workdir_lib.read_json(f'{workdir}/derived.json') == {'peak_lr': 0.5}
  assert all('a' not in m for _, m in bucket.modes)
  assert bool(bucket.modes) == (where == 'gs')  # the gs:// case really went to the bucket


def _make_run(workdir):
  workdir_lib.ensure_writable(workdir)
  workdir_lib.record(workdir, _config())
  for name, text in (('metrics.jsonl', '{"step": 1}\n'), ('checkpoints/4/state/a', 'x' * 10),
                     ('checkpoints/4/_METADATA', '{}'), ('checkpoints/8/state/a', 'y')):
    path = epath.Path(workdir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _tree(local_dir):
  out = {}
  for root, _, files in os.walk(local_dir):
    for f in files:
      with open(os.path.join(root, f)) as fh:
        out[os.path.relpath(os.path.join(root, f), local_dir)] = fh.read()
  return out


def test_set_aside_on_an_object_store_copies_then_deletes(bucket):
  _make_run('gs://bucket/run')
  before = _tree(os.path.join(bucket.root, 'bucket', 'run'))
  moved = workdir_lib.set_aside('gs://bucket/run')
  assert moved.startswith('gs://bucket/run.old-')
  assert not workdir_lib.exists('gs://bucket/run')
  assert _tree(bucket._local(moved)) == before  # pylint: disable=protected-access
  assert workdir_lib.set_aside('gs://bucket/run') is None
  # The workdir starts anew.
  workdir_lib.ensure_writable('gs://bucket/run')
  assert workdir_lib.recorded_config('gs://bucket/run') is None


def test_set_aside_on_an_object_store_stopped_while_copying_loses_nothing(bucket):
  _make_run('gs://bucket/run')
  before = _tree(os.path.join(bucket.root, 'bucket', 'run'))
  bucket.fail_copy_after = 2
  with pytest.raises(OSError, match='connection reset'):
    workdir_lib.set_aside('gs://bucket/run')
  assert _tree(os.path.join(bucket.root, 'bucket', 'run')) == before
  bucket.fail_copy_after = None
  moved = workdir_lib.set_aside('gs://bucket/run')  # the rerun completes it
  assert _tree(bucket._local(moved)) == before  # pylint: disable=protected-access


def test_move_deletes_the_config_last(bucket, monkeypatch):
  _make_run('gs://bucket/run')
  removed = []
  original = _FakeBucket.remove
  monkeypatch.setattr(_FakeBucket, 'remove',
                      lambda self, path: (removed.append(os.fspath(path)), original(self, path)))
  workdir_lib.move('gs://bucket/run', 'gs://bucket/elsewhere')
  assert removed[-1] == 'gs://bucket/run/config.json' and len(removed) == 5


def test_set_aside_locally_is_one_rename(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  _make_run(workdir)
  before = _tree(workdir)
  renames = []
  original = os.rename
  monkeypatch.setattr(os, 'rename', lambda a, b: (renames.append((a, b)), original(a, b)))
  moved = workdir_lib.set_aside(workdir + '/')
  assert renames == [(workdir, moved)] and moved.startswith(workdir + '.old-')
  assert _tree(moved) == before and not os.path.exists(workdir)


@pytest.mark.parametrize('how', ['set_aside', 'restart'])
def test_set_aside_of_a_symlinked_workdir_keeps_the_link(how, tmp_path):
  """The link stays a link to the same path, now an empty directory; the old run is beside the
  link's target (on the target's filesystem), not a renamed link."""
  storage = tmp_path / 'big storage' / 'run'
  _make_run(str(storage))
  before = _tree(str(storage))
  link = tmp_path / 'wd'
  os.symlink(os.path.relpath(storage, tmp_path), link)
  if how == 'set_aside':
    moved = workdir_lib.set_aside(str(link) + '/')
  else:
    lock = lock_lib.WorkdirLock.acquire(link)
    moved = lock_lib.restart(lock)
  assert moved.startswith(f'{storage}.old-'), moved
  assert _tree(moved) == before
  assert os.path.islink(link) and os.path.realpath(link) == str(storage)
  if how == 'set_aside':
    assert os.listdir(storage) == []
  else:
    assert os.listdir(storage) == [workdir_lib.LOCK_FILE]
    lock.release()
    assert os.listdir(link) == []
  assert sorted(os.listdir(tmp_path)) == ['big storage', 'wd']


def test_ensure_writable_reports_an_object_store_error(bucket, monkeypatch):
  class PermissionDeniedError(Exception):  # what tf.io.gfile raises: not an OSError
    pass

  def refuse(self, path, mode):
    raise PermissionDeniedError('403 does not have storage.objects.create access')

  monkeypatch.setattr(_FakeBucket, 'open', refuse)
  with pytest.raises(workdir_lib.WorkdirError,
                     match='cannot write to the workdir gs://bucket/run: PermissionDeniedError: '
                           '403.*choose a writable --workdir'):
    workdir_lib.ensure_writable('gs://bucket/run')


def test_study_results_and_report_on_an_object_store(bucket):
  """The study tool's own files: results.jsonl rewritten (never appended), result.json files
  read back, report.md and its figures written through epath."""
  from bigbatch.study import render_steps  # pylint: disable=g-import-not-at-top
  from bigbatch.study import run  # pylint: disable=g-import-not-at-top
  workdir = 'gs://bucket/study'
  epath.Path(workdir).mkdir(parents=True)
  rows = [{'trial_id': f'v-b{b}-lr0-s0', 'variant': 'v', 'data': 'digits', 'batch_size': b,
           'lr': 0.1 * b / 32, 'lr_index': 0, 'seed': 0,
           'target': {'metric': 'eval/top1', 'value': 0.9, 'mode': 'max'}, 'reached': True,
           'steps_to_target': s, 'examples_to_target': s * b, 'wall_to_target_s': 1.0,
           'best_metric': 0.95, 'final_metric': 0.95, 'final_train_loss': 0.1, 'steps_run': s,
           'wall_s': 1.0, 'eval_curve': [[s, 0.95]], 'noise_scale': [[1, 50.0], [s, 90.0]],
           'sharpness': [[s, 10.0]], 'diverged': False}
          for b, s in ((32, 100), (64, 55), (128, 35))]
  for row in rows[:2]:
    run._append_result(workdir, row)
  trial_dir = f'{workdir}/trials/{rows[2]["trial_id"]}'  # a trial run separately (--trial)
  epath.Path(trial_dir).mkdir(parents=True)
  run._write_json(f'{trial_dir}/result.json', rows[2])
  assert sorted(run.read_results(workdir)) == sorted(r['trial_id'] for r in rows)
  assert len(epath.Path(f'{workdir}/results.jsonl').read_text().splitlines()) == 2
  assert bucket.modes and all('a' not in m for _, m in bucket.modes)
  path = render_steps.write(rows, workdir, title='t')
  text = epath.Path(path).read_text()
  for stem, _ in render_steps.FIGURES:
    assert f'figures/{stem}.png' in text
    assert epath.Path(f'{workdir}/figures/{stem}.png').read_bytes()[:4] == b'\x89PNG'
