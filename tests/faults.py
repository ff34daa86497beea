"""Deterministic fault injection for the fault-tolerance tests, as a loop hook
(bigbatch/hooks.py) that the tests install; production runs carry none of it.

Spec 'KIND:N': 'kill_after_step:N' (SIGKILL once update N is dispatched, after earlier async
saves finished, so which checkpoint survives is fixed), 'kill_during_save:N' (SIGKILL right after
the asynchronous save of update N starts), 'term_after_step:N' (SIGTERM to itself),
'nan_from_step:N' (the images of update N and later become NaN), 'data_error_after_step:N'
(the data set fails to read once update N is dispatched: a data error on this process alone).
"""
from __future__ import annotations

import os
import signal
import time

from absl import logging
import jax.numpy as jnp

from bigbatch import hooks
from bigbatch import signals

KINDS = ('kill_after_step', 'kill_during_save', 'term_after_step', 'nan_from_step',
         'data_error_after_step')


class Fault(hooks.Hook):

  def __init__(self, spec: str):
    self.kind, _, at = spec.partition(':')
    if self.kind not in KINDS or not at.isdigit():
      raise ValueError(f'fault {spec!r}: use KIND:STEP with KIND one of {", ".join(KINDS)}')
    self.at = int(at)
    # Right after the checkpoint hook (order 50) for a kill during its save; before any hook
    # otherwise, so the update's own evaluation and checkpoint never happen.
    self.order = 55 if self.kind == 'kill_during_save' else 5

  def before_step(self, run, done: int, batch: dict) -> dict:
    if self.kind == 'nan_from_step' and done >= self.at:
      return dict(batch, image=batch['image'] * jnp.nan)
    return batch

  def after_step(self, run, done: int) -> None:
    if self.kind == 'nan_from_step' or done != self.at:
      return
    if self.kind == 'kill_after_step':
      run.ckpt.wait()
    logging.warning('fault injected: %s at step %d', self.kind, done)
    logging.flush()
    if self.kind == 'data_error_after_step':
      from bigbatch.data import common  # pylint: disable=g-import-not-at-top
      raise common.DataError(f'injected: the record of step {done + 1} cannot be read')
    os.kill(os.getpid(), signal.SIGTERM if self.kind.startswith('term') else signal.SIGKILL)
    if self.kind.startswith('term'):
      # Under the command line a watcher thread records the signal (bigbatch/signals.py), a few
      # ms later: wait for it, so that this update's preemption check sees it and the step the
      # run stops at is fixed (the update after this one, on every process).
      deadline = time.monotonic() + 5.0
      while not signals.received() and time.monotonic() < deadline:
        time.sleep(0.005)


def from_env() -> list[Fault]:
  """The fault named by $BIGBATCH_FAULT, for tests that start trainers as processes."""
  spec = os.environ.get('BIGBATCH_FAULT')
  return [Fault(spec)] if spec else []
