"""The workdir lock: one trainer at a time in a workdir.

A running trainer holds the workdir's lock (`WorkdirLock`, the file bigbatch.lock: host, PID and
process start time), taken before anything is written; a second trainer is refused, naming the
holder. A lock whose holder is gone is taken over: see `WorkdirLock` for how that is decided and
what is guaranteed on shared and object-store filesystems.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from bigbatch import workdir as workdir_lib

HEARTBEAT_S = 30.0  # how often a holder touches its lock
STALE_AFTER_S = 300.0  # a lock untouched this long is stale, whatever host holds it
_SETTLE_S = 1.0  # object stores: wait before reading a new lock back (see WorkdirLock)


def _boot_id() -> str | None:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return None


def _pid_namespace() -> str | None:
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def process_start_time(pid: int) -> int | None:
  """When process `pid` started, in clock ticks since boot (/proc/PID/stat, field 22); None if
  no such process is running (a zombie counts as gone) or there is no /proc. With the PID it
  names one process: a PID reused later has another start time."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()  # the command name may hold spaces and ')'
  except (OSError, IndexError):
    return None
  return None if fields[0] in ('Z', 'X') else int(fields[19])


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock: enough to tell, from the same machine, whether that process still runs."""
  host: str
  pid: int
  start_time: int | None  # clock ticks since boot; None without /proc
  boot_id: str | None
  pid_namespace: str | None  # containers on one host (same hostname) see different PIDs
  started: str  # wall-clock time of taking the lock, for people

  @classmethod
  def current(cls) -> 'Holder':
    """This process as a lock holder."""
    return cls(host=socket.gethostname(), pid=os.getpid(),
               start_time=process_start_time(os.getpid()), boot_id=_boot_id(),
               pid_namespace=_pid_namespace(),
               started=time.strftime('%Y-%m-%d %H:%M:%S %Z') + f' ({time.time():.3f})')

  @classmethod
  def parse(cls, text: str) -> 'Holder | None':
    """The holder a lock file's text describes, or None if it is not one."""
    try:
      return cls(**json.loads(text))
    except (ValueError, TypeError):
      return None

  def to_json(self) -> str:
    """The lock file's text for this holder."""
    return json.dumps(dataclasses.asdict(self), indent=2) + '\n'

  def describe(self) -> str:
    """'PID p on host, since t': the holder in an error message."""
    return f'PID {self.pid} on {self.host}, since {self.started.split(" (")[0]}'

  def gone(self, age: float) -> str | None:
    """Why this holder is certainly gone, or None if it may still run. `age`: seconds since the
    lock was last touched (its holder touches it every HEARTBEAT_S)."""
    me = Holder.current()
    if self.host == me.host and self.boot_id and self.boot_id == me.boot_id:
      if self.pid_namespace == me.pid_namespace:
        start = process_start_time(self.pid)
        if start is None:
          return f'PID {self.pid} is not running'
        if self.start_time is not None and start != self.start_time:
          return f'PID {self.pid} is now another process'
        return None
    elif self.host == me.host and self.boot_id and me.boot_id:
      return f'{self.host} has restarted since'
    elif self.host == me.host and me.boot_id is None:  # no /proc (macOS): a plain PID check
      try:
        os.kill(self.pid, 0)
      except ProcessLookupError:
        return f'PID {self.pid} is not running'
      except PermissionError:
        pass  # the PID runs, as another user's process: only the heartbeat below can tell
    if age > STALE_AFTER_S:  # another host, or another container: only the heartbeat tells
      return f'its lock was last touched {age:.0f} s ago (a live holder touches it every ' \
             f'{HEARTBEAT_S:.0f} s)'
    return None


def _create_exclusive(path: epath.Path, text: str) -> bool:
  """Creates `path` holding `text` if it does not exist; False if it does.

  Locally atomic: the text goes into a temporary file first, then os.link gives it the name, which
  fails if the name exists, so a reader never sees a half-written lock. Where hard links are not
  supported, os.open with O_CREAT | O_EXCL. Object stores (through epath) have no create-if-
  absent: check, write, wait _SETTLE_S and read back; of two trainers that wrote at once, only
  the last writer sees its own text. Best effort: see WorkdirLock.
  """
  if workdir_lib.is_object_store(path):
    if path.exists():
      return False
    path.write_text(text)
    time.sleep(_SETTLE_S)
    try:
      return path.read_text() == text
    except FileNotFoundError:
      return False
  temporary = path.with_name(f'.{path.name}.{uuid.uuid4().hex}')
  try:
    with open(temporary, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(temporary, path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
        raise
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  finally:
    temporary.unlink(missing_ok=True)


class WorkdirLock:
  """The lock of one workdir: the file bigbatch.lock, held by one trainer (on multi-host runs,
  by process 0 for all, as it is process 0 that writes the workdir's own files).

  Taking it: create the file if absent (atomically, `_create_exclusive`). If present, its holder
  (host, PID, process start time) is judged. Still running, or not known to be gone: refused,
  naming the holder. Certainly gone: on the same machine, no process has that PID, or the PID
  belongs to a process with another start time (reused), or the machine rebooted; from any
  machine, a lock not touched for STALE_AFTER_S (a holder touches it every HEARTBEAT_S from a
  thread; that is how a trainer on another host, or in another container, is judged). A stale
  lock is taken over by exactly one trainer: each claims it by creating bigbatch.lock.takeover-
  <hash of the stale lock's text> exclusively, checks that the lock still holds that text, and
  then replaces it whole; the claim is removed afterwards. The lock file never disappears in a
  takeover, so a trainer starting meanwhile cannot create a fresh one beside it.

  Guarantees: on a local or POSIX shared filesystem (NFSv3+ has exclusive create and atomic
  rename and link), at most one trainer holds the lock. On an object store (gs://, s3://) epath
  has no create-if-absent, so taking the lock is check, write, wait a second, read back: two
  trainers starting within that second are told apart in practice, but it is not guaranteed. On
  every filesystem a holder judged gone by the heartbeat alone (another host) is really gone only
  if the clocks of the hosts (or the object store's) agree to within a minute or so.
  """

  def __init__(self, workdir: epath.PathLike):
    self.workdir, self.path = workdir, epath.Path(workdir) / workdir_lib.LOCK_FILE
    self.holder, self._text = None, ''
    self._stop = threading.Event()
    self._thread = None

  @classmethod
  def acquire(cls, workdir: epath.PathLike) -> 'WorkdirLock':
    """Takes the lock of `workdir` (which exists); WorkdirError naming the holder if held."""
    lock = cls(workdir)
    lock._take()
    return lock

  def _take(self) -> None:
    try:
      self._take_or_raise()
    except IsADirectoryError:
      raise workdir_lib.WorkdirError(
          f'{self.path} is a directory; bigbatch writes its {workdir_lib.LOCK_FILE} there. '
          f'Move it out of the way, or use a new --workdir') from None
    except Exception as e:  # pylint: disable=broad-except  (the disk is full, ...)
      if not workdir_lib.is_storage_failure(e):
        raise
      raise workdir_lib.StorageError(self.path, workdir_lib.storage_reason(e)) from None

  def _take_or_raise(self) -> None:
    path, workdir = self.path, self.workdir
    self.holder = Holder.current()
    self._text = self.holder.to_json()
    for _ in range(20):
      if _create_exclusive(path, self._text):
        break
      try:
        seen, age = path.read_text(), time.time() - path.stat().mtime
      except FileNotFoundError:
        continue  # released meanwhile: try again
      holder = Holder.parse(seen)
      if holder is None:
        if age < 5:  # the O_EXCL fallback is writing it: look again
          time.sleep(0.5)
          continue
        reason, who = 'the file is damaged', 'an unknown holder'
      else:
        reason, who = holder.gone(age), holder.describe()
        if reason is None:
          raise workdir_lib.WorkdirError(
              f'{workdir} is in use by another trainer ({who}; lock file {path}). Two trainers '
              f'in one workdir would mix their checkpoints and metrics: wait for it to finish, '
              f'stop it, or use another --workdir. If that process no longer exists, delete '
              f'{path}')
      if _take_over(path, seen, self._text):
        logging.warning('Took over the lock %s from %s: %s.', path, who, reason)
        break
    else:
      raise workdir_lib.WorkdirError(f'could not take the lock {path}: other trainers keep '
                                     f'taking it over; start one trainer per workdir')
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._heartbeat, name='bigbatch-lock', daemon=True)
    self._thread.start()

  def _heartbeat(self) -> None:
    lost = False
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if self.path.read_text() != self._text:
          if not lost:
            logging.error('The lock %s is no longer this trainer\'s; another trainer took it '
                          'over and may be writing the same workdir.', self.path)
          lost = True
          continue
        if workdir_lib.is_object_store(self.path):
          self.path.write_text(self._text)
        else:
          os.utime(self.path)
      except Exception as e:  # pylint: disable=broad-except  (a lost beat must not end the run)
        logging.warning('Could not touch the lock %s: %s', self.path, e)

  def stop_heartbeat(self) -> None:
    """Stops touching the lock file (and waits for the heartbeat thread, unless called on it)."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock file if it is still this trainer's."""
    self.stop_heartbeat()
    try:
      if self.path.read_text() == self._text:
        self.path.unlink()
    except FileNotFoundError:
      pass


def live_holder(workdir: epath.PathLike) -> Holder | None:
  """The trainer holding `workdir`'s lock, if another process holds it and is not known to be
  gone (as a trainer starting there would judge it); None otherwise. Advice about a workdir
  checks this first: a directory a live trainer holds is never to be moved or deleted."""
  path = epath.Path(workdir) / workdir_lib.LOCK_FILE
  try:
    text, age = path.read_text(), time.time() - path.stat().mtime
  except Exception:  # pylint: disable=broad-except  (no lock, or none readable: none known)
    return None
  holder = Holder.parse(text)
  if holder is None:
    return None
  if holder.host == socket.gethostname() and holder.pid == os.getpid():
    return None  # this process: released when it stops
  return holder if holder.gone(age) is None else None


def _take_over(path: epath.Path, seen: str, text: str) -> bool:
  """Replaces the stale lock whose text was `seen` with `text`; False if another trainer got
  there first (or the lock changed since it was judged), and the caller looks again."""
  claim = path.with_name(f'{path.name}.takeover-{hashlib.sha256(seen.encode()).hexdigest()[:16]}')
  if not _create_exclusive(claim, text):
    try:  # a claim lives milliseconds; one left by a trainer killed in between is removed
      if time.time() - claim.stat().mtime > 60:
        claim.unlink(missing_ok=True)
    except FileNotFoundError:
      pass
    return False
  try:
    try:
      if path.read_text() != seen:
        return False
    except FileNotFoundError:
      return False
    workdir_lib.write_text(path, text)  # replaced whole
    return True
  finally:
    claim.unlink(missing_ok=True)


def restart(lock: WorkdirLock) -> str | None:
  """--restart_from_scratch while holding `lock`: the workdir is set aside with its lock, so no
  other trainer can start in it meanwhile; the copy of the lock there is deleted and `lock` takes
  the lock of the new, empty workdir (WorkdirError if another trainer got there first). Returns
  where the old run went."""
  lock.stop_heartbeat()
  moved = workdir_lib.set_aside(lock.workdir)
  if moved:
    (epath.Path(moved) / workdir_lib.LOCK_FILE).unlink(missing_ok=True)
  workdir_lib.ensure_writable(lock.workdir)
  lock._take()  # pylint: disable=protected-access
  return moved
