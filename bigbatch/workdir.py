"""Workdir paths, storage errors and small files: a workdir belongs to one experiment.

`check_compatible` refuses a restart whose config changes the experiment (against the newest
checkpoint's record, then config.json); `write_json` replaces every JSON file bigbatch writes
whole; the helpers work on local paths and object-store URLs alike through etils.epath. What is
allowed to change, and how object stores are handled: docs/design.md, "Checkpoints and resume".
The lock (one trainer at a time) is bigbatch/lock.py.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from typing import Any
import uuid

from etils import epath
import ml_collections
import numpy as np

from bigbatch import fields

CONFIG_FILE = 'config.json'
LOCK_FILE = 'bigbatch.lock'

# Fields that observe the run (or say where to find data) without changing any update.
OBSERVING = frozenset({
    'log_every_steps', 'eval_every_epochs', 'eval_every_steps', 'checkpoint_every_steps',
    'checkpoint_every_minutes',
    'keep_checkpoints', 'data.prefetch', 'data.data_dir', 'eval_batch', 'profile_steps',
    'compilation_cache_dir', 'mode', 'precise_bn_batches',
})
# Fields that set the run's length; allowed to change if past learning rates do not.
LENGTH = frozenset({'num_steps', 'num_epochs'})
# Fields added after runs were recorded, with the value that reproduces those runs: a recorded
# config without one compares as if it held that value, so those runs still resume.
ADDED = {'optimizer.adascale': False}


class WorkdirError(RuntimeError):
  """The workdir holds another experiment. The message lists the differences and the way out."""


STORAGE_FIX = 'free space or fix permissions, then rerun the same command'


class StorageError(RuntimeError):
  """One of bigbatch's own files (metrics, TensorBoard events, config.json, derived.json, an
  evaluation's or a study's results, the lock, a plot) could not be written or read: a full
  disk, a quota, permissions, an object store that cannot be reached. `str()` is the whole
  line: the path, the reason and the fix (bigbatch/main.py: exit 5). Files are replaced whole
  (`write_json`), so what was written before stays intact."""

  def __init__(self, path, reason: str, fix: str = STORAGE_FIX):
    self.path, self.reason, self.fix = str(path), reason, fix
    super().__init__(f'{self.path}: {reason}; {fix}')


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def is_storage_failure(e: BaseException) -> bool:
  """An OSError, or what an object-store client raises instead (tf.io.gfile's OpErrors, google
  and fsspec exceptions are not OSErrors); not a bug such as a TypeError in our own code."""
  if isinstance(e, OSError):
    return True
  if type(e).__name__ in ('InvalidArgumentError', 'UnimplementedError', 'InternalError'):
    return False  # TensorFlow saying our own call is wrong: a bug, with its traceback
  return any(c.__module__.split('.')[0] in ('tensorflow', 'google', 'gcsfs', 'fsspec', 'botocore',
                                            's3fs')
             for c in type(e).__mro__[:-2])


def storage_reason(e: BaseException) -> str:
  """The reason of a storage failure, in one line: 'No space left on device', or the object
  store client's first line with its exception type."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = getattr(e, 'message', None) or str(e)
  first = ' '.join(text.strip().splitlines()[0].split()) if text.strip() else ''
  if isinstance(e, OSError):
    return first or type(e).__name__
  return f'{first} ({type(e).__name__})' if first else type(e).__name__


class storage:  # pylint: disable=invalid-name  (a context manager, used as `with storage(p):`)
  """Turns a storage failure inside the block into StorageError naming `path`."""

  def __init__(self, path, fix: str = STORAGE_FIX):
    self.path, self.fix = path, fix

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if e is None or isinstance(e, StorageError) or not is_storage_failure(e):
      return False
    fix = self.fix
    if is_object_store(self.path) and not isinstance(e, OSError):
      fix = ('check the URL, the network and the credentials (gcloud auth application-default '
             'login), then rerun the same command')
    raise StorageError(self.path, storage_reason(e), fix) from e


def is_object_store(path: epath.PathLike) -> bool:
  """True for a URL with a scheme (gs://, s3://, az://, hf://...): an object store, where a file
  cannot be appended to and a directory is only a name prefix (no atomic rename). False for a
  local (or mounted) path, including file:// ones."""
  scheme = re.match(r'([a-zA-Z][a-zA-Z0-9+.-]*)://', str(path))
  return scheme is not None and scheme.group(1).lower() != 'file'


def absolute(path: str) -> str:
  """`path` made absolute against the current directory, once, where the command line gives it,
  so every later use agrees (the schedule line, the lock, orbax, which refuses a relative
  checkpoint path); a URL (gs://, file://...) is returned as it is."""
  if re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*://', path):
    return path
  return os.path.abspath(path)


def exists(path: epath.PathLike) -> bool:
  """Whether `path` exists; StorageError if that cannot be told (an object store that cannot be
  reached: the first existence check of a run says so in one line)."""
  with storage(path):
    return epath.Path(path).exists()


def isdir(path: epath.PathLike) -> bool:
  """Whether `path` is a directory; StorageError if that cannot be told."""
  with storage(path):
    return epath.Path(path).is_dir()


def read_json(path: epath.PathLike) -> Any:
  """The JSON value in the file at `path`; StorageError if it cannot be read."""
  with storage(path):
    text = epath.Path(path).read_text()
  return json.loads(text)


def write_text(path: epath.PathLike, text: str | bytes) -> None:
  """Replaces the file at `path` with `text` (str or bytes) whole: locally a temporary file
  beside it, flushed to disk, then os.replace, so a full disk, a kill or a crash leaves the
  previous file intact (never a torn one); on an object store one whole-object write, which
  appears whole or not at all. StorageError when it cannot be written."""
  path = epath.Path(path)
  mode = 'wb' if isinstance(text, bytes) else 'w'
  with storage(path):
    if is_object_store(path):
      with path.open(mode) as f:
        f.write(text)
      return
    temporary = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
      with open(temporary, mode) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the data before the name: a crash never leaves an empty file
      os.replace(temporary, path)
    finally:
      temporary.unlink(missing_ok=True)


def write_json(path: epath.PathLike, obj: Any, *, indent: int | None = 2) -> None:
  """Writes `obj` as JSON to `path`, replacing the file whole (`write_text`): the one writer of
  bigbatch's JSON files. `indent`: as json.dumps (None: one line). StorageError when it cannot
  be written."""
  write_text(path, json.dumps(obj, indent=indent))


def move(source: epath.PathLike, target: epath.PathLike) -> None:
  """Moves the file or directory `source` to `target` (which must not exist).

  Locally: one os.rename, atomic. On an object store a rename is a copy and a delete of each
  object, so a move stopped half-way could leave objects in both places with neither complete.
  Here every object is copied first and the sources are deleted only after all copies succeeded:
  stopped while copying, `source` is intact (and a partial `target` is left to delete); stopped
  while deleting, `target` is complete. A workdir's config.json is deleted last, so a half-deleted
  workdir still names its experiment and check_compatible keeps guarding it.
  """
  source, target = epath.Path(source), epath.Path(target)
  if not (is_object_store(source) or is_object_store(target)):
    source.rename(target)
    return
  if target.exists():
    raise FileExistsError(f'cannot move {source} to {target}: the target exists')
  if not source.is_dir():
    source.copy(target)
    source.unlink()
    return
  files = []
  for root, _, names in source.walk():
    target_root = target / root.relative_to(source)
    target_root.mkdir(parents=True, exist_ok=True)
    files += [(root / n, target_root / n) for n in names]
  for src, dst in files:
    src.copy(dst)
  config = source / CONFIG_FILE
  for src, _ in sorted(files, key=lambda f: f[0] == config):
    src.unlink()
  source.rmtree()  # what remains: directory markers


def recorded_config(workdir: epath.PathLike) -> dict | None:
  """The config in workdir/config.json, None without one; WorkdirError when it does not parse."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    config = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
  else:
    if isinstance(config, dict):
      return config
    reason = f'a JSON {type(config).__name__}, not an object'
  raise WorkdirError(
      f'{path} is damaged ({reason}). It records the config of the run in {workdir}: restore '
      f'it, or delete it to resume against the config recorded in the checkpoints, or use a new '
      f'--workdir (or --restart_from_scratch)')


def check_compatible(workdir: str, config, *, num_train: int, resume_step: int,
                     checkpoint_config: tuple[int, dict] | None = None) -> None:
  """Raises WorkdirError if `config` would change the experiment recorded in `workdir`.

  `checkpoint_config`: (step, config) recorded in the newest checkpoint that holds one; the
  experiment is what that checkpoint was written under. Without it, config.json says. config.json
  is read either way, so a damaged one is reported rather than silently overwritten.
  """
  from_json = recorded_config(workdir)
  if checkpoint_config is not None:
    where = f'the checkpoint of step {checkpoint_config[0]}'
    old = checkpoint_config[1]
  else:
    where, old = CONFIG_FILE, from_json
  if old is None:
    return
  new = json.loads(config.to_json_best_effort())
  a, b = fields.flatten(old), fields.flatten(new)
  a = {**{k: v for k, v in ADDED.items() if k in b}, **a}
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  refused = [k for k in changed if k not in OBSERVING and k not in LENGTH]
  if not refused and any(k in LENGTH for k in changed) and resume_step > 0:
    if not _same_past_lr(ml_collections.ConfigDict(old), config, num_train, resume_step):
      refused = [k for k in changed if k in LENGTH] + ['(the lr of steps already run)']
  if refused:
    shown = ', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in refused[:6]
                      if not k.startswith('('))
    more = f' (+{len(refused) - 6} more)' if len(refused) > 6 else ''
    raise WorkdirError(
        f'{workdir} holds another experiment (recorded in {where}); the config changes '
        f'{shown}{more}'
        f'{" and the lr of steps already run" if refused[-1].startswith("(") else ""}. '
        + (f'Evaluate with the config the run was trained with (config.json there); an '
           f'evaluation may change only what observes the run, such as eval_batch'
           if config.get('mode') == 'eval' else
           f'Use a new --workdir, or pass --restart_from_scratch to set the old run aside'))


# What bigbatch keeps in a workdir, by kind. A path of the wrong kind (a file named checkpoints)
# is reported at startup: found by a failed background save instead, it would cost the steps
# since the last checkpoint and, multi-host, a wait in orbax's barrier.
LAYOUT = {'checkpoints': 'directory', 'tensorboard': 'directory', CONFIG_FILE: 'file',
          'derived.json': 'file', 'metrics.jsonl': 'file', LOCK_FILE: 'file'}


def check_layout(workdir: epath.PathLike) -> None:
  """Raises WorkdirError when a path bigbatch writes in `workdir` exists as the wrong kind."""
  for name, kind in LAYOUT.items():
    path = epath.Path(workdir) / name
    if path.exists() and path.is_dir() != (kind == 'directory'):
      found = 'a directory' if kind == 'file' else 'a file, not a directory'
      raise WorkdirError(f'{path} is {found}; bigbatch writes its {name} there. Move it out of '
                         f'the way, or use a new --workdir')


def _same_past_lr(old_config, new_config, num_train: int, resume_step: int) -> bool:
  from bigbatch import optim  # pylint: disable=g-import-not-at-top  (jax: not for bigbatch.plot)
  old = optim.make(old_config, num_train)
  new = optim.make(new_config, num_train)
  steps = np.arange(resume_step)
  lr_old = np.asarray(old.lr_fn(steps, old.derived.peak_lr))
  lr_new = np.asarray(new.lr_fn(steps, new.derived.peak_lr))
  return bool(np.array_equal(lr_old, lr_new))


def set_aside(workdir: epath.PathLike) -> str | None:
  """Moves an existing workdir to '<workdir>.old-<time>' (nothing is deleted); returns it.

  On an object store this copies every object, then deletes the originals (see `move`): it takes
  time in proportion to the checkpoints held, and if stopped, rerunning with
  --restart_from_scratch finishes the job into another '.old-<time>' without losing anything.

  A workdir that is a symbolic link (to a directory on larger storage, say) keeps its link: the
  directory it points to is moved to '<that directory>.old-<time>', beside it (a rename on its own
  filesystem), and an empty directory is made in its place, so the link points at the fresh run.
  """
  path = epath.Path(workdir)
  if not path.exists():
    return None
  link = None
  if not is_object_store(path) and os.path.islink(str(path)):
    link, path = path, epath.Path(os.path.realpath(str(path)))
  target = stem = f'{path}.old-{time.strftime("%Y%m%d-%H%M%S")}'
  n = 0
  while epath.Path(target).exists():  # a second set_aside within the second, or a partial copy
    n += 1
    target = f'{stem}-{n}'
  move(path, target)
  if link is not None:
    os.mkdir(str(path), stat.S_IMODE(os.stat(target).st_mode))  # the link's target, empty
  return target


def ensure_writable(workdir: epath.PathLike) -> None:
  """Creates the workdir, or raises WorkdirError saying why it cannot be written."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.bigbatch-write-test-{uuid.uuid4().hex[:8]}'  # unique: trainers may race
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, OSError) and e.errno in _FULL:  # a full disk: no other workdir would help
      raise StorageError(workdir, storage_reason(e)) from None
    # Locally an OSError; tf.io.gfile's errors for gs:// (PermissionDenied...) are not OSErrors.
    reason = ((e.strerror or e) if isinstance(e, OSError) else f'{type(e).__name__}: {e}')
    raise WorkdirError(f'cannot write to the workdir {workdir}: {reason}; choose a '
                       f'writable --workdir') from None


def remove_if_empty(workdir: epath.PathLike) -> None:
  """Deletes the workdir if nothing is in it (a run that stopped before writing anything)."""
  path = epath.Path(workdir)
  try:
    if path.is_dir() and not any(path.iterdir()):
      path.rmdir()
  except OSError:
    pass  # another trainer wrote there meanwhile, or it is not ours to delete: leave it


def record(workdir: epath.PathLike, config) -> None:
  """Writes `config` to workdir/config.json (`write_json`)."""
  write_json(epath.Path(workdir) / CONFIG_FILE, json.loads(config.to_json_best_effort()))
