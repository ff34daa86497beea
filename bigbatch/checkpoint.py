"""Checkpoints through orbax, verified on restore.

A checkpoint holds the train state and a JSON record (the config, every array's shape and dtype,
a fingerprint of its bytes computed on device); saves are asynchronous and only finalized
checkpoints are listed. `restore_newest` is the one restore path, for one process or several.
What is guaranteed, and why the fingerprint: docs/design.md, "Checkpoints and resume".
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bigbatch import lock as lock_lib
from bigbatch import sharding
from bigbatch import workdir as workdir_lib


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not fit the model. The message says what to do."""


class CorruptCheckpoint(RuntimeError):
  """A checkpoint that cannot be read or fails verification; the caller falls back."""


class SaveError(RuntimeError):
  """A checkpoint could not be written (disk full, no permission, ...)."""


# tensorstore (orbax's array writer) reports a failed write as ValueError('<STATUS>: ...'),
# ending with "[os_error_code='28']" when the OS refused it. These statuses mean the storage
# refused the write; others are bugs and stay exceptions.
_STORAGE_STATUSES = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'UNAUTHENTICATED')
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")


def _storage_error(e: BaseException) -> str | None:
  """Why storage refused a write, from anywhere in `e`'s cause chain: an OSError, or a
  tensorstore status error; None if the chain holds neither."""
  while e is not None:
    if isinstance(e, OSError):
      return str(e.strerror or e)
    status = str(e).split(':', 1)[0].strip()
    if isinstance(e, ValueError) and status in _STORAGE_STATUSES:
      code = _OS_ERROR_CODE.search(str(e))
      return f'{os.strerror(int(code.group(1))) if code else str(e)[:300]} ({status})'
    e = e.__cause__ or e.__context__
  return None


def _saving(what: str, directory: str, fn, *args, **kwargs):
  """Runs an orbax call that writes; a storage error anywhere in its cause chain (orbax wraps
  errors of its background threads) becomes a SaveError naming the directory."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    reason = _storage_error(e)
    if reason is None:
      raise
    raise SaveError(f'{what} in {directory} failed: {reason}') from e


def _words(x) -> jax.Array:
  """The array's bytes as uint32 words (smaller dtypes widened element by element)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 8:
    return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  raise TypeError(f'no fingerprint for dtype {x.dtype}')


@jax.jit
def _fingerprints(tree):
  def one(x):
    w = _words(x)
    position = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * position, dtype=jnp.uint32)])
  return jax.tree.map(one, tree)


def fingerprints(tree) -> dict[str, str]:
  """{leaf path: 'xxxxxxxx-xxxxxxxx'} for every array of `tree`."""
  sums = jax.device_get(_fingerprints(tree))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {sharding.path_str(p): '%08x-%08x' % tuple(int(v) for v in np.asarray(s))
          for p, s in flat}


def layout(tree) -> dict[str, list]:
  """{path: [shape, dtype]} of every array of `tree`: what a checkpoint records, and what
  restore compares the current state with."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sharding.path_str(p): [list(x.shape), str(x.dtype)] for p, x in flat}


# How many times restore_latest lists the checkpoints again after one was rotated away under it.
ROTATION_ROUNDS = 5


def none_readable(directory: str, steps: list[int], where: str = '') -> CheckpointError:
  """The error for checkpoints of which none reads (`where`: e.g. ' on every process'). Its
  advice depends on whether a live trainer holds the workdir above `directory`: a directory in
  use is never to be moved away."""
  workdir = os.path.dirname(os.path.normpath(directory)) if '://' not in directory else (
      directory.rstrip('/').rsplit('/', 1)[0])
  holder = lock_lib.live_holder(workdir)
  if holder is None:
    advice = 'Move the directory away to start over'
  else:
    advice = (f'A trainer holds {workdir} ({holder.describe()}; lock file '
              f'{os.path.join(workdir, workdir_lib.LOCK_FILE)}): leave the directory to it, do '
              'not move or delete it; rerun after its next checkpoint')
  return CheckpointError(f'none of the checkpoints in {directory} (steps {steps}) is readable'
                         f'{where}; see the warnings above. {advice}')


class Checkpointer:

  """The checkpoints in one directory, through an orbax CheckpointManager: saves (asynchronous
  unless `asynchronous=False`) keeping the newest `keep`, each with its JSON record, and restores
  that verify the record's fingerprints."""
  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=asynchronous),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    """The step of the newest finalized checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of the finalized checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, config=None, extra: dict | None = None) -> None:
    """Starts writing `state` as the checkpoint of `step`, with its record: layout, fingerprints,
    `config` (if given) and `extra`. SaveError when storage refuses the write."""
    meta = {'step': int(step), 'layout': layout(state), 'fingerprints': fingerprints(state),
            **(extra or {})}
    if config is not None:
      meta['config'] = json.loads(config.to_json_best_effort())
    _saving(f'writing the checkpoint of step {step}', self.directory, self._manager.save, step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)))

  def metadata(self, step: int) -> dict:
    """The JSON record saved with the checkpoint of `step`."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def recorded_config(self, steps: list[int] | None = None) -> tuple[int, dict] | None:
    """(step, config) of the newest checkpoint (of `steps`, default all) whose record reads and
    holds the config it was written under; None if none does (none written, or all written
    before checkpoints recorded their config). What resume is checked against
    (workdir.check_compatible).

    Reads the record's JSON file itself (orbax's JsonSave writes <step>/meta/metadata), not
    through orbax, whose restore ends in a barrier of all processes: this runs on process 0 alone.
    """
    for step in reversed(self.all_steps() if steps is None else steps):
      try:
        config = workdir_lib.read_json(
            os.path.join(self.directory, str(step), 'meta', 'metadata')).get('config')
      except Exception:  # pylint: disable=broad-except  (unreadable: restore reports it)
        continue
      if isinstance(config, dict):
        return step, config
    return None

  def restore(self, step: int, like: Any) -> Any:
    """The verified state at `step`, placed like `like` (a state or its shapes + shardings).

    Raises CorruptCheckpoint when it cannot be read or fails verification, CheckpointError
    when it does not fit `like` (the model or optimizer changed).
    """
    try:
      meta = self.metadata(step)
    except Exception as e:  # pylint: disable=broad-except  (any read failure means unusable)
      raise CorruptCheckpoint(f'its metadata cannot be read ({type(e).__name__}: {e})') from e
    expected = layout(like)
    if meta.get('layout') != expected:
      saved = meta.get('layout') or {}
      diff = sorted((k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k)),
                    key=lambda k: (not k.startswith('params/'), k))  # parameters say most
      first = diff[0] if diff else '?'
      raise CheckpointError(
          f'the checkpoint at step {step} in {self.directory} does not fit the model: '
          f'{len(diff)} arrays differ, e.g. {first}: saved {saved.get(first)}, expected '
          f'{expected.get(first)}. The config changed the model or optimizer; use a new workdir '
          f'(or --restart_from_scratch)')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))['state']
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpoint(f'its arrays cannot be read ({type(e).__name__}: {e})') from e
    actual = fingerprints(state)
    wrong = [k for k, v in meta['fingerprints'].items() if actual.get(k) != v]
    if wrong:
      raise CorruptCheckpoint(f'{len(wrong)} arrays do not match their recorded fingerprint, '
                              f'e.g. {wrong[0]}')
    return state

  def present(self, step: int) -> bool:
    """Whether the directory of checkpoint `step` is still there (a trainer rotates old ones
    away: orbax deletes all but the newest `keep`)."""
    return workdir_lib.isdir(os.path.join(self.directory, str(step)))

  def restore_latest(self, like: Any, *, rounds: int = ROTATION_ROUNDS) -> tuple[Any, int | None]:
    """(state, step) of the newest checkpoint that reads and verifies; (like, None) if there
    are none. See `restore_newest` (this process alone)."""
    return restore_newest(self, like, rounds=rounds)

  def set_aside(self, steps) -> list[str]:
    """Renames the checkpoints of `steps` to 'unusable-<step>-<time>' (kept for inspection, never
    listed again), so the steps can be saved anew: orbax skips a save whose step exists."""
    moved = []
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for step in steps:
      source = os.path.join(self.directory, str(step))
      if workdir_lib.isdir(source):
        target = os.path.join(self.directory, f'unusable-{step}-{stamp}')
        workdir_lib.move(source, target)  # a rename locally; copy + delete on object stores
        moved.append(target)
    self._manager.reload()
    return moved

  def reload(self) -> None:
    """Lists the directory again (another process may have added or removed checkpoints)."""
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until a pending asynchronous save is finished; SaveError if it failed."""
    _saving('finishing a checkpoint', self.directory, self._manager.wait_until_finished)

  def close(self) -> None:
    """Waits for a pending save, then closes the manager; its failure is raised once."""
    try:
      self.wait()
    except SaveError:
      try:  # orbax's close waits again and re-raises the same failure: report it once
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass
      raise
    _saving('closing the checkpoints', self.directory, self._manager.close)


def _local(value):
  return value


def _alone(ok: bool) -> list[bool]:
  return [ok]


def restore_newest(ckpt, like: Any, *, rounds: int = ROTATION_ROUNDS,
                   from_process_0: Callable[[Any], Any] = _local,
                   all_processes: Callable[[bool], list[bool]] = _alone
                   ) -> tuple[Any, int | None]:
  """(state, step) of the newest checkpoint of `ckpt` (a Checkpointer) that reads and verifies;
  (like, None) if there are none. Unusable ones are reported and skipped; if all are unusable,
  CheckpointError. The one restore path, for one process or several.

  The list is read afresh (it may be minutes old: an evaluation beside a running trainer lists
  the checkpoints, then loads data and compiles). A checkpoint that fails because its directory
  is gone was rotated away while being read, not damaged: the list is read again and the newest
  tried, up to `rounds` times.

  Several processes (bigbatch/distributed.py passes its collectives): every process tries process
  0's candidates in the same order and all agree on each outcome (`all_processes`) before moving
  on, so they never run different collectives; a read error may hit only the process whose shard
  is damaged.
  """
  unusable: set[int] = set()
  steps: list[int] = []
  several = False  # more than one process answered
  for _ in range(rounds):
    ckpt.reload()
    steps = from_process_0(ckpt.all_steps())
    rotated = False
    for step in reversed(steps):
      if step in unusable:
        continue
      state, error = None, None
      try:
        state = ckpt.restore(step, like)
      except CorruptCheckpoint as e:
        error = e
      outcomes = all_processes(error is None)
      several = len(outcomes) > 1
      if all(outcomes):
        return state, step
      if from_process_0(not ckpt.present(step)):
        logging.warning('The checkpoint at step %d in %s was deleted while it was read (a '
                        'trainer beside this process keeps only its newest checkpoints); '
                        'looking for the newest again.', step, ckpt.directory)
        rotated = True
        break
      unusable.add(step)
      failed = [i for i, ok in enumerate(outcomes) if not ok]
      where = f' on process(es) {failed}' if several else ''
      logging.warning('The checkpoint at step %d in %s is unusable%s%s. Falling back to the '
                      'previous one.', step, ckpt.directory, where, f': {error}' if error else '')
    if not rotated:
      break
  else:
    raise CheckpointError(
        f'the checkpoints in {ckpt.directory} were deleted while they were read, {rounds} times '
        f'in a row (last listed: steps {steps}): a trainer there rotates them faster than this '
        'process reads one; rerun the same command, or give that trainer a larger '
        'config.keep_checkpoints')
  if steps:
    raise none_readable(ckpt.directory, steps, ' on every process' if several else '')
  return like, None
