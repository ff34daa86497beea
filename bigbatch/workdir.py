"""Workdir protection: a workdir belongs to one experiment.

A workdir records the config it was started with (config.json). Restarting in it with a config
that changes the experiment is refused, listing the fields; changes that only observe or extend
the run are allowed: logging/eval/checkpoint intervals, and a longer (or shorter) run as long as
every step already taken would have had the same learning rate.

A workdir may be a local directory or an object-store URL (gs://bucket/run, s3://...): every file
operation on it goes through etils.epath, and the helpers here (exists, isdir, read_json,
write_json, move) are what the rest of bigbatch uses for the workdir's small files. Object stores
have no append and no atomic rename of a directory; `is_object_store` says which kind a path is,
and `move` (used by set_aside) copies, then deletes, where it cannot rename.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

from etils import epath
import ml_collections
import numpy as np

from bigbatch import optim

CONFIG_FILE = 'config.json'

# Fields that observe the run (or say where to find data) without changing any update.
OBSERVING = frozenset({
    'log_every_steps', 'eval_every_epochs', 'eval_every_steps', 'checkpoint_every_steps',
    'keep_checkpoints', 'data.prefetch', 'data.data_dir', 'eval_batch', 'profile_steps',
    'compilation_cache_dir', 'mode', 'precise_bn_batches',
})
# Fields that set the run's length; allowed to change if past learning rates do not.
LENGTH = frozenset({'num_steps', 'num_epochs'})


class WorkdirError(RuntimeError):
  """The workdir holds another experiment. The message lists the differences and the way out."""


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def is_object_store(path: epath.PathLike) -> bool:
  """True for a URL with a scheme (gs://, s3://, az://, hf://...): an object store, where a file
  cannot be appended to and a directory is only a name prefix (no atomic rename). False for a
  local (or mounted) path, including file:// ones."""
  scheme = re.match(r'([a-zA-Z][a-zA-Z0-9+.-]*)://', str(path))
  return scheme is not None and scheme.group(1).lower() != 'file'


def exists(path: epath.PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: epath.PathLike) -> bool:
  return epath.Path(path).is_dir()


def read_json(path: epath.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_json(path: epath.PathLike, obj: Any, *, indent: int | None = 2) -> None:
  """Writes `obj` as JSON, replacing the file (on an object store the new object appears whole,
  never half-written)."""
  with epath.Path(path).open('w') as f:
    json.dump(obj, f, indent=indent)


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
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  return read_json(path)


def check_compatible(workdir: str, config, *, num_train: int, resume_step: int) -> None:
  """Raises WorkdirError if `config` would change the experiment recorded in `workdir`."""
  old = recorded_config(workdir)
  if old is None:
    return
  new = json.loads(config.to_json_best_effort())
  a, b = _flatten(old), _flatten(new)
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
        f'{workdir} holds another experiment; the config changes {shown}{more}'
        f'{" and the lr of steps already run" if refused[-1].startswith("(") else ""}. '
        f'Use a new --workdir, or pass --restart_from_scratch to set the old run aside')


def _same_past_lr(old_config, new_config, num_train: int, resume_step: int) -> bool:
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
  """
  path = epath.Path(workdir)
  if not path.exists():
    return None
  target = stem = f'{path}.old-{time.strftime("%Y%m%d-%H%M%S")}'
  n = 0
  while epath.Path(target).exists():  # a second set_aside within the second, or a partial copy
    n += 1
    target = f'{stem}-{n}'
  move(path, target)
  return target


def ensure_writable(workdir: epath.PathLike) -> None:
  """Creates the workdir, or raises WorkdirError saying why it cannot be written."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / '.bigbatch-write-test'
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    # Locally an OSError; tf.io.gfile's errors for gs:// (PermissionDenied...) are not OSErrors.
    reason = ((e.strerror or e) if isinstance(e, OSError) else f'{type(e).__name__}: {e}')
    raise WorkdirError(f'cannot write to the workdir {workdir}: {reason}; choose a '
                       f'writable --workdir') from None


def record(workdir: epath.PathLike, config) -> None:
  (epath.Path(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
