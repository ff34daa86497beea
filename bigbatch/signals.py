"""SIGTERM and SIGINT outside the training steps: data loading, compilation, evaluation.

Inside the step loop the loop's own handlers (bigbatch/loop.py: _SigtermFlag) record a signal and
the Preemption hook (bigbatch/hooks.py) checkpoints the next update and stops. Elsewhere there is
no step to checkpoint and nothing to finish, so the handlers installed here stop the run at once
by raising `Interrupted` in the main thread; bigbatch/main.py turns it into one line and the exit
code (75 for SIGTERM, so that launch/slurm.sbatch requeues; 130 for SIGINT). Python runs a
handler between bytecodes, and a jit compilation waits in Python for its compiling thread, so
the raise lands within a fraction of a second even during a compilation of minutes.
"""
from __future__ import annotations

import contextlib
import signal
import threading

NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT'}

# The signal that raised Interrupted in this process (None: none did). main reads it to skip the
# interpreter's teardown, which a compilation still running in its background thread can crash.
raised: int | None = None


class Interrupted(BaseException):
  """A signal stopped the run where no checkpoint could be written. A BaseException, as
  KeyboardInterrupt is, so that no `except Exception` (the data loaders' error wrapping) turns it
  into another error."""

  def __init__(self, signum: int, where: str):
    super().__init__(
        f'{NAMES.get(signum, signum)} {where}; checkpoints written before it are kept; rerun the '
        f'same command to resume')
    self.signum = signum


def raise_interrupted(signum, frame, where: str = 'outside the training steps (data loading, '
                      'compilation or evaluation)'):
  """A signal handler: raises Interrupted in the main thread."""
  del frame
  global raised
  raised = signum
  raise Interrupted(signum, where)


@contextlib.contextmanager
def raising():
  """Within: SIGTERM and SIGINT raise Interrupted (main thread only; elsewhere no handler can be
  installed and the context does nothing). The previous handlers are restored on exit."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, raise_interrupted) for s in NAMES}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
