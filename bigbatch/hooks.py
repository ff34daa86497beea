"""Periodic work of the training loop, as hooks: logging, evaluation, checkpoints, preemption,
profiling (here), the study's target and sharpness (bigbatch/study/), and the tests' fault
injection (tests/faults.py). Each is scheduled by one "is it time" rule, `Every`, over steps or
epochs (batch-size phases included), in the spirit of big_vision's `itstime`.

A hook is an object with any of `start(run)`, `before_step(run, done, batch) -> batch`,
`after_step(run, done)` and `end(run)`; `order` places it among the others after each step
(lower first). `run` is the loop's state (bigbatch/loop.py: RunState). A new periodic measurement is
a new Hook passed to `loop.train_and_evaluate(..., hooks=[...])`; the loop does not change.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import jax

from bigbatch import distributed
from bigbatch import flops
from bigbatch import metrics as metrics_lib
from bigbatch import optim
from bigbatch import schedule
from bigbatch import signals


class Hook:
  """Does nothing; subclasses override what they need."""
  order = 100

  def start(self, run) -> None:
    """Before the first step (after restore)."""

  def before_step(self, run, done: int, batch: dict) -> dict:
    """Before update `done` (1-based) is dispatched; may replace its batch."""
    del run, done
    return batch

  def after_step(self, run, done: int) -> None:
    """After update `done` was dispatched (its results may still be computing)."""

  def end(self, run) -> None:
    """After the last step of a run that was not interrupted."""


def epochs_at(step: int, phases) -> float:
  """Epochs seen after `step` updates under a batch-size schedule."""
  p = schedule.phase_at(max(step - 1, 0), phases) if step else phases[0]
  return p.start_epoch + (step - p.start_step) / p.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Every:
  """Is it time, after update `done`? Every `steps` updates, or every `epochs` epochs (whole
  updates, or the update that crosses a multiple of `epochs` under a batch-size schedule), and,
  with at_end, at the run's last update: the total, or the one at which a hook stopped the run.
  Neither steps nor epochs: only at the end."""
  steps: int | None = None
  epochs: float | None = None
  at_end: bool = True

  def __call__(self, run, done: int) -> bool:
    if self.at_end and (done == run.total or run.should_stop):
      return True
    if self.steps:
      return done % self.steps == 0
    if self.epochs:
      phases = run.derived.phases
      if phases:
        now, before = epochs_at(done, phases), epochs_at(done - 1, phases)
        return math.floor(now / self.epochs + 1e-9) > math.floor(before / self.epochs + 1e-9)
      return done % max(1, round(self.epochs * run.derived.steps_per_epoch)) == 0
    return False


class Throughput:
  """FLOP/s, model FLOP utilization (where the device's peak is known) and the fraction of wall
  time the loop waited for input, between logged steps."""

  def __init__(self, flops_per_step: float, waited: Callable[[], float], now: float,
               peak_flops: float | None = None):
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops  # summed dense peak of all devices; None: unknown (CPU)
    self._waited = waited
    self._last = (now, waited())

  def restart_clock(self, now: float) -> None:
    """Starts the next interval at `now` (the Log hook: after the first update compiled)."""
    self._last = (now, self._waited())

  def rates(self, steps_per_sec: float | None, now: float) -> dict[str, float]:
    """perf/* metrics of the interval since the last call: model FLOPs per step, the fraction of
    wall time spent waiting for input, and with `steps_per_sec` FLOP/s and MFU (peak known)."""
    waited = self._waited()
    (then, waited_then), self._last = self._last, (now, waited)
    out = {'perf/model_flops_per_step': self.flops_per_step,
           'perf/input_wait_fraction': (waited - waited_then) / max(now - then, 1e-9)}
    if steps_per_sec:
      out['perf/flops_per_sec'] = self.flops_per_step * steps_per_sec
      if self.peak_flops:
        out['perf/mfu'] = out['perf/flops_per_sec'] / self.peak_flops
    return out


class AdaScaleStop(Hook):
  """Ends an AdaScale run (config.optimizer.adascale) after the first update with tau / S >= T_B,
  the base schedule's length in steps of the global batch (derived.schedule_steps); the Log,
  Evaluate and Checkpoint hooks (later in order) then treat that update as the last.

  Reading tau waits for the device. Each gain is at most S, so tau / S grows by at most 1 per
  update: the tau of the update before (ready by now: the loop's finite check reads that update's
  metrics anyway) says whether this update can reach T_B, and only then is its own tau read,
  which waits for it (the last one or two updates of the run)."""
  order = 5  # before Log (10), Evaluate (20), Checkpoint (50)

  def __init__(self, scale: float, schedule_steps: int):
    self.scale, self.length = scale, schedule_steps
    self._before = None  # tau after the previous update (a device value after the first)

  def _reached(self, tau) -> bool:
    return float(tau) / self.scale >= self.length

  def start(self, run) -> None:
    # A host value: the state's buffers are donated to the first update.
    tau = float(optim.adascale_values(run.state.opt_state)[1])
    if self._reached(tau):  # resumed from the update that ended the run
      logging.info('AdaScale: tau / S = %.6g reached the schedule\'s %d steps before; nothing '
                   'to train.', tau / self.scale, self.length)
      run.should_stop = True
    self._before = tau

  def after_step(self, run, done: int) -> None:
    # 1e-3: the float32 sum of the gains may exceed a bound of S per update by rounding.
    near = float(self._before) / self.scale + 1 + 1e-3 >= self.length
    self._before = run.metrics['adascale/tau']
    if near and self._reached(self._before):
      logging.info('AdaScale: tau / S = %.6g >= %d after update %d; stopping.',
                   float(self._before) / self.scale, self.length, done)
      run.should_stop = True


class Log(Hook):
  """Training metrics of every config.log_every_steps-th update, read one step late (the device
  is busy with the next one by then), to metrics.jsonl, TensorBoard and a progress line."""
  order = 10

  def __init__(self, every: Every):
    self.every = every
    self.writer = self.progress = self.throughput = None

  def start(self, run) -> None:
    self.writer = run.writer
    phases, per_epoch = run.derived.phases, run.derived.steps_per_epoch
    self.progress = metrics_lib.Progress(
        total_steps=run.total, global_batch=run.config.global_batch, start_step=run.start,
        now=time.monotonic(),
        epoch_of=(lambda s: epochs_at(s, phases)) if phases else (lambda s: s / per_epoch))
    self.first = run.start + 1
    devices = list(run.trainer.mesh.devices.flat)
    peak = flops.peak_flops_per_device(devices[0], run.config.model.dtype)
    self.throughput = Throughput(run.flops_per_step, lambda: run.batches.wait_seconds,
                                 time.monotonic(), peak * len(devices) if peak else None)
    run.write_logs = self.write

  def write(self, step: int, device_metrics) -> None:
    """Writes the metrics of `step` (device values, fetched here) with the progress and
    throughput rates to the writer, and logs the progress line."""
    values = {f'train/{k}': float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.monotonic()
    values.update(self.progress.rates(step, now))
    values.update(self.throughput.rates(values.get('train/steps_per_sec'), now))
    self.writer.write_scalars(step, values)
    logging.info('%s', self.progress.line(step, values))

  def after_step(self, run, done: int) -> None:
    run.flush_logs()  # the previous logged step's metrics are ready by now
    if done == self.first and not self.every(run, done):
      # The first update of this process is dispatched: its compilation (seconds to minutes)
      # is over and is left out of the first interval's rates and the ETA. (A run that logs
      # this update keeps the interval: it is all it has.)
      now = time.monotonic()
      self.progress.restart_clock(done, now)
      self.throughput.restart_clock(now)
    if self.every(run, done):
      run.pending = (done, run.metrics)

  def end(self, run) -> None:
    run.flush_logs()


class Evaluate(Hook):
  """The task's evaluation (and precise BN, EMA) at the rule's steps and at the end."""
  order = 20

  def __init__(self, every: Every):
    self.every = every

  def after_step(self, run, done: int) -> None:
    if self.every(run, done):
      run.check_finite()
      run.flush_logs()
      run.evaluate(done)


class Checkpoint(Hook):
  """An asynchronous checkpoint at the rule's steps, at the end, and where the run stops; with
  `minutes`, also once that much wall time has passed since the last checkpoint (of any hook).

  The time rule must pick the same step on every process (a checkpoint is a collective write):
  process 0 counts the periods its clock saw pass, `agree` (distributed.AgreedMax) gives every
  process the largest count, and a new count means a checkpoint at this step. `clock` (seconds)
  is passed in for the tests.
  """
  order = 50

  def __init__(self, every: Every, minutes: float | None = None,
               agree: Callable[[int], int] | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.every, self.minutes, self.agree, self.clock = every, minutes, agree, clock
    self._requested = self._done = 0  # periods process 0 counted; those checkpointed
    self._since = self._saved = None  # clock and step of the last checkpoint seen

  def start(self, run) -> None:
    self._since, self._saved = self.clock(), run.last_good

  def after_step(self, run, done: int) -> None:
    due = False
    if self.minutes is not None:
      if run.last_good != self._saved:  # another hook wrote one (the preemption's)
        self._since, self._saved = self.clock(), run.last_good
      if run.is_main and self.clock() - self._since >= 60.0 * self.minutes:
        self._requested += 1
        self._since = self.clock()
      agreed = self.agree(self._requested) if self.agree else self._requested
      due, self._done = agreed > self._done, max(agreed, self._done)
    if self.every(run, done) or due:
      run.check_finite()
      run.save(done)
      self._since, self._saved = self.clock(), done


class Preemption(Hook):
  """SIGTERM (Cloud TPU and SLURM send it before preemption), SIGHUP or SIGINT to any process
  (recorded by bigbatch/signals.py, never raised from a handler) stops all of them at the same
  update, with a checkpoint of it; the run then raises loop.Preempted, with
  the signal this process received (SIGTERM where only another process got one)."""
  order = 60

  def __init__(self, sync, received: Callable[[], int], preempted: type[Exception]):
    """received(): the signal number this process received, 0 if none."""
    self.sync, self.received, self.preempted = sync, received, preempted

  def after_step(self, run, done: int) -> None:
    signals.check()  # ^C twice: stop at once, without this update's checkpoint
    signum = int(self.received())
    if self.sync(bool(signum)):
      signum = signum or signal.SIGTERM
      run.flush_logs()
      if run.last_good != done:
        run.save(done)
      run.ckpt.wait()
      # No process leaves before every process has written its part: srun's --kill-on-bad-exit
      # ends the others as soon as one exits non-zero (75 included).
      distributed.sync(f'checkpoint of step {done} written after {signal.Signals(signum).name}')
      logging.warning('%s: checkpoint written at step %d in %s; exiting.',
                      signal.Signals(signum).name, done, run.ckpt_dir)
      raise self.preempted(done, signum)


class Profile(Hook):
  """A profiler trace of updates [first, last] into workdir/profile (process 0)."""
  order = 0

  def __init__(self, first: int, last: int, directory: str):
    self.first, self.last, self.directory = first, last, directory

  def before_step(self, run, done: int, batch: dict) -> dict:
    if done == self.first:
      jax.profiler.start_trace(self.directory)
    return batch

  def after_step(self, run, done: int) -> None:
    if done == self.last:
      jax.block_until_ready(run.metrics)
      jax.profiler.stop_trace()
      logging.info('Profile of updates %d-%d written to %s.', self.first, self.last,
                   self.directory)


def standard(run, *, sigterm_received: Callable[[], int], preempt_sync,
             preempted: type[Exception]) -> list[Hook]:
  """The hooks every run has, scheduled from its config: Log, Evaluate, Checkpoint, Preemption,
  AdaScaleStop with config.optimizer.adascale, and Profile on process 0 when
  config.profile_steps is set.

  Args:
    run: the loop's RunState.
    sigterm_received: returns the signal number this process received, 0 if none.
    preempt_sync: agrees across processes whether any received one (bool -> bool).
    preempted: the exception the Preemption hook raises after its checkpoint (loop.Preempted).
  """
  c = run.config
  eval_every = Every(steps=c.eval_every_steps, epochs=c.eval_every_epochs)
  hooks: list[Any] = [
      Log(Every(steps=c.log_every_steps)),
      Evaluate(eval_every),
      Checkpoint(Every(steps=c.checkpoint_every_steps), minutes=c.checkpoint_every_minutes,
                 agree=distributed.AgreedMax() if c.checkpoint_every_minutes else None),
      Preemption(preempt_sync, sigterm_received, preempted),
  ]
  if run.derived.adascale_scale:
    hooks.append(AdaScaleStop(run.derived.adascale_scale, run.derived.schedule_steps))
  if c.profile_steps and run.is_main:
    hooks.append(Profile(*c.profile_steps, os.path.join(run.workdir, 'profile')))
  return hooks
