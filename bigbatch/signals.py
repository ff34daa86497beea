"""SIGTERM, SIGHUP and SIGINT: recorded by flag, acted on where that is safe.

Handlers only record the signal; the main thread acts at step boundaries (the Preemption hook)
and `check()` calls, and a watcher thread (commands only) stops setup and compilation at once.
Exit codes: 75 for SIGTERM and SIGHUP (requeued by SLURM), 130 for SIGINT. Why a handler never
raises, and what each phase does with a signal: docs/design.md, "Signals". Imports only the
standard library, so `python -m bigbatch.main` installs it before its seconds of imports.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable

NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT', signal.SIGHUP: 'SIGHUP'}
EXIT_PREEMPTED = 75  # SIGTERM, SIGHUP: rerun the same command (launch/slurm.sbatch requeues)
EXIT_INTERRUPTED = 130  # SIGINT (^C): 128 + SIGINT, as shells say; not requeued

# Where a signal arrived; the text follows the signal's name in the line.
STARTUP = 'during startup'
SETUP = 'outside the training steps (data loading, compilation or evaluation)'
FIRST_UPDATE = 'before the first update of this run was dispatched (while it compiled)'
AFTER_TRAINING = 'after the last update (its checkpoint is written)'
BETWEEN_TRIALS = 'between trials'
TWICE = 'twice: stopped without waiting for the checkpoint of the current update'


def exit_code(signum: int) -> int:
  """The exit code of a run stopped by `signum`: 130 for SIGINT, 75 otherwise."""
  return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


def name(signum: int) -> str:
  """'SIGTERM' etc. for `signum`."""
  return NAMES.get(signum, str(signum))


class Interrupted(BaseException):
  """A signal stopped the run where no checkpoint could be written. A BaseException, as
  KeyboardInterrupt is, so that no `except Exception` (the data loaders' error wrapping) turns it
  into another error."""

  def __init__(self, signum: int, where: str):
    if where == STARTUP:
      advice = 'nothing was written; rerun the same command'
    else:
      advice = 'checkpoints written before it are kept; rerun the same command to resume'
    super().__init__(f'{name(signum)} {where}{_state.context}; {advice}')
    self.signum = signum


class _State:
  """The process's signal state (one per process: signals are per process)."""

  def __init__(self):
    self.lock = threading.RLock()
    self.depth = 0  # nesting of watching(); handlers are installed at depth 1
    self.hard_exit = False  # a watcher thread stops hard phases at once
    self.where: str | None = STARTUP  # the current phase; None: the step loop acts
    self.counts: dict[int, int] = {}
    self.first = 0  # the first signal received; 0: none
    self.first_where: str | None = None  # the phase it arrived in (None: the step loop)
    self.acted = False  # the main thread raised for it
    self.printed = False  # the one line is out
    self.prefix = 'bigbatch'
    self.context = ''  # e.g. ' (trial X, 2 of 12)', appended to the where
    self.at_exit: list[Callable[[], None]] = []
    self.previous: dict[int, object] = {}
    self.previous_fd = -1
    self.pipe: tuple[int, int] | None = None


_state = _State()
# Held by the main thread around what a hard exit must not cut (critical()); the watcher takes it
# and never gives it back.
_critical = threading.RLock()


def received() -> int:
  """The first signal received since the command (or the outermost watching()) started; 0:
  none, and 0 outside any watching(): a signal that stopped an earlier run in this process (a
  test, a notebook) does not stop a later one. The Preemption hook reads it at every step
  boundary."""
  return _state.first if _state.depth else 0


def last_received() -> int:
  """The first signal of the latest command, also after its watching() ended: whether the
  command is ending because of a signal (main's and the study's fast exit)."""
  return _state.first


def _handle(signum, frame) -> None:
  """The Python-level handler: records, never raises. With a watcher, the watcher (woken by the
  wakeup fd) records instead, and this handler only keeps the signal from killing the process."""
  del frame
  if not _state.hard_exit:
    _record(signum)


def _record(signum: int) -> None:
  with _state.lock:
    _state.counts[signum] = _state.counts.get(signum, 0) + 1
    if not _state.first:
      _state.first, _state.first_where = signum, _state.where
    twice = signum == signal.SIGINT and _state.counts[signum] >= 2
    where = TWICE if twice else _state.where
  if _state.hard_exit and where is not None:
    _hard_exit(signum, where)


def _watch(read_fd: int) -> None:
  while True:
    try:
      data = os.read(read_fd, 64)
    except InterruptedError:
      continue
    except OSError:
      return
    if not data or 0 in data:  # 0: watching() ends
      os.close(read_fd)
      return
    for signum in data:
      if signum in NAMES:
        _record(signum)


def _hard_exit(signum: int, where: str) -> None:
  """The watcher: the one line and os._exit, once the main thread is out of critical()."""
  _critical.acquire()  # never released: the process ends here (or the main thread's line won)
  if _state.printed:  # the main thread's line is out: it exits with its own code
    _critical.release()
    return
  line = f'{_state.prefix}: stopped: {Interrupted(signum, where)}\n'
  for fn in list(_state.at_exit):
    _call_with_timeout(fn, 1.0)
  if write_line(line):
    os._exit(exit_code(signum))  # pylint: disable=protected-access
  _critical.release()  # the main thread wrote its own line first and exits with its code


def _call_with_timeout(fn: Callable[[], None], seconds: float) -> None:
  """fn() in a helper thread: a log flush blocked on a lock the main thread holds must not
  keep the process from exiting."""
  def call():
    try:
      fn()
    except Exception:  # pylint: disable=broad-except  (leaving anyway)
      pass
  t = threading.Thread(target=call, daemon=True)
  t.start()
  t.join(seconds)


def write_line(text: str) -> bool:
  """Writes the command's one final line to stderr, unless one was written already (by the
  watcher or the main thread, whichever came first). True if this call wrote it."""
  with _state.lock:
    if _state.printed:
      return False
    _state.printed = True
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    sys.stderr.flush()
    sys.stderr.write(text)
    sys.stderr.flush()
  except Exception:  # pylint: disable=broad-except  (a closed terminal: SIGHUP)
    pass
  return True


def wait_for_exit(seconds: float = 10.0) -> None:
  """The main thread lost the race for the line to the watcher, which is about to os._exit."""
  if _state.hard_exit:
    time.sleep(seconds)


def check() -> None:
  """Main thread: raises Interrupted if a signal arrived in a phase with nothing to checkpoint
  (or the current one is such a phase), or SIGINT came twice. A no-op inside the step loop for a
  single signal: the Preemption hook acts on that. Without a watcher (a run started in-process,
  the tests) this is where setup and compilation stop; with one, the watcher usually has."""
  with _state.lock:
    if not _state.first or _state.acted or _state.printed:
      return
    twice = _state.counts.get(signal.SIGINT, 0) >= 2
    where = TWICE if twice else (_state.first_where or _state.where)
    if where is None:
      return
    _state.acted = True
    signum = signal.SIGINT if twice else _state.first
  raise Interrupted(signum, where)


def set_phase(where: str | None) -> None:
  """Main thread: the phase from now on (None: inside the step loop, where the Preemption hook
  checkpoints the current update). Then check(): a signal that came in the step loop but was not
  acted on there (after the last step boundary) stops the run here."""
  with _state.lock:
    _state.where = where
  check()


def set_context(text: str) -> None:
  """Appended to the where of the line (the study: which trial)."""
  _state.context = text


def context() -> str:
  """The text set by `set_context`."""
  return _state.context


@contextlib.contextmanager
def phase(where: str | None):
  """Sets the phase (`set_phase`) for the body of the with-statement, then restores it."""
  with _state.lock:
    before = _state.where
  set_phase(where)
  try:
    yield
  finally:
    with _state.lock:
      _state.where = before


@contextlib.contextmanager
def critical():
  """What a hard exit must not cut: the watcher waits for the main thread to leave it."""
  with _critical:
    yield


def add_at_exit(fn: Callable[[], None]) -> None:
  """A hard exit calls fn() first (a command's log flush)."""
  _state.at_exit.append(fn)


def guard_jax_cache_writes() -> None:
  """A hard exit waits for jax's persistent compilation cache to finish writing an entry: it
  writes the file in place, and a torn entry is never rewritten (every later run would warn and
  recompile that step). jax's private class, so only where it is as expected."""
  try:
    from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
    put = lru_cache.LRUCache.put
  except (ImportError, AttributeError):
    return
  if getattr(put, '_bigbatch_critical', False):
    return

  def guarded(self, key, value):
    with _critical:
      return put(self, key, value)

  guarded._bigbatch_critical = True  # pylint: disable=protected-access
  lru_cache.LRUCache.put = guarded


@contextlib.contextmanager
def at_exit(fn: Callable[[], None]):
  """Within: a hard exit calls fn() first (e.g. releases the workdir lock)."""
  _state.at_exit.append(fn)
  try:
    yield
  finally:
    with contextlib.suppress(ValueError):
      _state.at_exit.remove(fn)


def start(*, hard_exit: bool = True, prefix: str = 'bigbatch') -> None:
  """A command's first act: the handlers (and the watcher) for the whole process, in the
  startup phase. watching() inside it nests."""
  _install(hard_exit, prefix)


def _install(hard_exit: bool, prefix: str | None) -> None:
  s = _state
  s.counts, s.first, s.first_where, s.acted, s.printed = {}, 0, None, False, False
  s.where, s.context = STARTUP, ''
  if prefix:
    s.prefix = prefix
  s.hard_exit = hard_exit
  if hard_exit:
    r, w = os.pipe()
    os.set_blocking(w, False)
    s.pipe = (r, w)
    s.previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(r,), name='bigbatch-signals', daemon=True).start()
  s.previous = {sig: signal.signal(sig, _handle) for sig in NAMES}
  s.depth = 1


def _uninstall() -> None:
  s = _state
  for sig, handler in s.previous.items():
    signal.signal(sig, handler)
  s.previous = {}
  if s.pipe is not None:
    signal.set_wakeup_fd(s.previous_fd)
    r, w = s.pipe
    os.write(w, b'\0')  # the watcher returns
    os.close(w)
    s.pipe = None
  s.hard_exit = False
  s.depth = 0


@contextlib.contextmanager
def watching(*, hard_exit: bool = False, where: str = SETUP, prefix: str | None = None):
  """Within: signals are recorded (and with hard_exit, acted on by the watcher thread in hard
  phases). Nested inside another watching() or start(), only the phase changes. The previous
  handlers are restored when the outermost one ends (main thread only: elsewhere no handler can
  be installed, and the context does nothing)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  outermost = _state.depth == 0
  if outermost:
    _install(hard_exit, prefix)
  else:
    _state.depth += 1
    if prefix:
      _state.prefix = prefix
  try:
    with phase(where):
      yield
  finally:
    if outermost:
      _uninstall()
    else:
      _state.depth -= 1
