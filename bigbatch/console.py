"""What the trainer's console shows: bigbatch's own lines in a short format, other libraries'
warnings and errors only (orbax's repeated error tracebacks cut to one held-back line), and
Python's unraisable-exception hook as one warning. `--verbosity=1` shows everything as logged.
"""
from __future__ import annotations

import logging as std_logging
import os
import sys
import time

from absl import logging

_OWN_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # bigbatch/


class QuietLibraries(std_logging.Filter):
  """At the default verbosity, bigbatch's own lines and the warnings of other libraries: orbax
  writes a dozen INFO lines per checkpoint, TFDS and jax a few at start-up. orbax's errors are
  cut to their first line and held back until the next line is logged: when a checkpoint write
  fails, orbax logs the same exception with its traceback from four threads (~300 lines) just
  before the run reports the failure in one line of its own, which then replaces them
  (`discard`). `--verbosity=1` (absl's -v 1) shows everything as it was logged, at once."""

  def __init__(self):
    super().__init__()
    self.held: list[std_logging.LogRecord] = []
    self.target = None  # the handler that held records are released to

  def filter(self, record) -> bool:
    if logging.get_verbosity() >= logging.DEBUG:
      return True
    if record.pathname.startswith(_OWN_CODE):
      self.release()
      return True
    if record.levelno < std_logging.WARNING:
      return False
    if record.levelno >= std_logging.ERROR and (
        '/orbax/' in record.pathname or record.name == 'asyncio'):
      message = record.getMessage()
      if record.name == 'asyncio' and 'orbax' not in message:
        self.release()
        return True
      if 'Task exception was never retrieved' in message:
        return False  # orbax's failed write, which its own error record reports
      first = message.strip().splitlines()[0] if message.strip() else message
      record.msg, record.args = first[:300], ()
      record.exc_info = record.exc_text = record.stack_info = None
      if self.target is None:
        return True
      self.held.append(record)
      return False
    self.release()
    return True

  def release(self) -> None:
    """Logs the held library errors (the failure they describe was not reported otherwise)."""
    held, self.held = self.held, []
    for record in held:
      self.target.handle(record)

  def discard(self) -> None:
    """The run's own line reports what the held errors describe."""
    self.held = []


_QUIET = QuietLibraries()


class _ConsoleFormat(std_logging.Formatter):
  """`HH:MM:SS message` (`HH:MM:SS WARNING: message` for warnings and errors) instead of absl's
  prefix of level, date, microseconds, thread id and file: the progress lines stay readable.
  `--verbosity=1` keeps absl's prefix."""

  def format(self, record) -> str:
    text = super().format(record)
    stamp = time.strftime('%H:%M:%S', time.localtime(record.created))
    level = f'{record.levelname}: ' if record.levelno >= std_logging.WARNING else ''
    return f'{stamp} {level}{text}'


def unraisable(hook_args) -> None:
  """sys.unraisablehook at the default verbosity. Python's own hook writes a traceback to stderr
  piece by piece from whichever thread hit it, so while a run ends its text can split the run's
  one error line. orbax's asyncio callbacks that fire after their event loop closed (at the end
  of a failed save) are dropped: nothing is lost, the save's failure is reported; anything else
  becomes one logged warning. `--verbosity=1` keeps Python's hook."""
  e = hook_args.exc_value
  if isinstance(e, RuntimeError) and 'Event loop is closed' in str(e):
    return
  logging.warning('exception ignored in %r: %s: %s', hook_args.object,
                  type(e).__name__ if e is not None else hook_args.exc_type, e)


def install() -> None:
  """Quiets other libraries' logs and formats the console's lines (at the default verbosity)."""
  if logging.get_verbosity() < logging.DEBUG:
    sys.unraisablehook = unraisable
  handler = logging.get_absl_handler()
  _QUIET.target = handler.python_handler  # held records go out past this filter
  handler.addFilter(_QUIET)
  if logging.get_verbosity() < logging.DEBUG:
    handler.setFormatter(_ConsoleFormat())


def release() -> None:
  """Logs the held library errors (their failure was not reported otherwise)."""
  _QUIET.release()


def discard() -> None:
  """Drops the held library errors: the run's own line reports what they describe."""
  _QUIET.discard()


def flush() -> None:
  """Everything logged or printed so far, out: before a process's last line and exit."""
  _QUIET.release()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
