"""The loop's hooks: the one "is it time" rule, MFU from the device peak, and a hook a user
writes in a file of their own and passes to the loop, which does not change for it."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import pytest

from bigbatch import checkpoint
from bigbatch import config_lib
from bigbatch import hooks
from bigbatch import loop
from bigbatch import schedule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import quickstart  # noqa: E402


@dataclasses.dataclass
class _Run:
  total: int = 100
  should_stop: bool = False
  derived: schedule.Resolved = None


def _derived(steps_per_epoch=10, phases=()):
  return schedule.Resolved(num_train_examples=1000, global_batch=100,
                           steps_per_epoch=steps_per_epoch, total_steps=100, warmup_steps=0,
                           peak_lr=0.1, boundaries_steps=(), phases=phases, schedule_steps=0)


def test_every_steps_epochs_and_end():
  run = _Run(derived=_derived())
  assert [d for d in range(1, 101) if hooks.Every(steps=30)(run, d)] == [30, 60, 90, 100]
  assert [d for d in range(1, 101) if hooks.Every(steps=30, at_end=False)(run, d)] == [30, 60, 90]
  assert [d for d in range(1, 101) if hooks.Every(epochs=2.5)(run, d)] == [25, 50, 75, 100]
  assert [d for d in range(1, 101) if hooks.Every()(run, d)] == [100]
  run.should_stop = True  # a hook stopped the run: its last update counts as the end
  assert hooks.Every(steps=30)(run, 7) and not hooks.Every(steps=30, at_end=False)(run, 7)


def test_every_epochs_under_a_batch_schedule_fires_where_an_epoch_is_crossed():
  # 10 updates per epoch for epochs 0-1, then 5 (batch x2): epochs end at 10, 20, 25, 30.
  phases = (schedule.Phase(0, 100, 1, 10, 0, 20), schedule.Phase(2, 200, 2, 5, 20, 30))
  run = _Run(total=30, derived=_derived(phases=phases))
  assert [d for d in range(1, 31) if hooks.Every(epochs=1.0, at_end=False)(run, d)] == [
      10, 20, 25, 30]


def test_throughput_reports_mfu_only_where_the_peak_is_known():
  waited = iter([0.0, 0.5])
  t = hooks.Throughput(1e12, lambda: next(waited), now=0.0, peak_flops=4e12)
  out = t.rates(steps_per_sec=2.0, now=1.0)
  assert out['perf/flops_per_sec'] == 2e12 and out['perf/mfu'] == pytest.approx(0.5)
  assert out['perf/input_wait_fraction'] == pytest.approx(0.5)
  cpu = hooks.Throughput(1e12, lambda: 0.0, now=0.0).rates(steps_per_sec=2.0, now=1.0)
  assert 'perf/mfu' not in cpu


class _GradNormHistory(hooks.Hook):
  """What a user adds in a file of their own: every 3 updates, the gradient norm, written to
  the run's metrics, and a stop once it has seen enough."""
  order = 25  # after evaluation

  def __init__(self):
    self.seen = []

  def start(self, run):
    self.seen.append(('start', run.start))

  def after_step(self, run, done):
    if hooks.Every(steps=3, at_end=False)(run, done):
      run.writer.write_scalars(done, {'user/grad_norm': float(run.metrics['grad_norm'])})
      self.seen.append(('step', done))
    if done == 7:
      run.should_stop = True

  def end(self, run):
    self.seen.append(('end', None))


@pytest.mark.slow
def test_a_user_hook_runs_in_the_loop_and_can_stop_it(tmp_path):
  config = quickstart.get_config('steps=20')
  config.model.width = 8
  hook = _GradNormHistory()
  loop.train_and_evaluate(config, str(tmp_path), hooks=[hook])
  assert hook.seen == [('start', 0), ('step', 3), ('step', 6), ('end', None)]
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'user/grad_norm' in r] == [3, 6]
  # The stop is the run's end: the checkpoint hook saved update 7.
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 7


# ----------------------------------------------------------------------------- time checkpoints


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@dataclasses.dataclass
class _SavingRun:
  """What the checkpoint hook reads and does: a run that records its saves."""
  is_main: bool = True
  total: int = 1000
  should_stop: bool = False
  last_good: int | None = None
  saved: list = dataclasses.field(default_factory=list)

  def check_finite(self):
    pass

  def save(self, step):
    self.saved.append(step)
    self.last_good = step


def test_checkpoint_every_minutes_by_a_fake_clock():
  clock, run = _Clock(), _SavingRun()
  hook = hooks.Checkpoint(hooks.Every(steps=1000, at_end=False), minutes=10, clock=clock)
  hook.start(run)
  # (step, seconds since start): due once 600 s have passed since the last checkpoint.
  for step, t in [(1, 100), (2, 599), (3, 601), (4, 700), (5, 1200), (6, 1202)]:
    clock.now = t
    hook.after_step(run, step)
  assert run.saved == [3, 6]
  # A checkpoint of another hook (the preemption's) restarts the period.
  run.last_good = 7
  clock.now = 1700
  hook.after_step(run, 7)
  for step, t in [(8, 2299), (9, 2301)]:
    clock.now = t
    hook.after_step(run, step)
  assert run.saved == [3, 6, 9]


def test_checkpoint_every_minutes_is_the_same_step_on_every_process():
  """Two processes: only process 0's clock counts; the agreed count (max over processes, one
  step late as the all-reduce gives it) makes both checkpoint the same step."""
  clocks = [_Clock(), _Clock()]
  runs = [_SavingRun(is_main=True), _SavingRun(is_main=False)]
  sent, agreed = [[0, 0]], [0]

  def agree_for(p):
    def agree(value):
      sent[-1][p] = value
      return agreed[0]  # the previous step's max
    return agree

  procs = [hooks.Checkpoint(hooks.Every(steps=1000, at_end=False), minutes=1, clock=clocks[p],
                            agree=agree_for(p)) for p in (0, 1)]
  for p in (0, 1):
    procs[p].start(runs[p])
  # Process 0's clock passes a minute at step 2 (61 s) and again at step 5 (131 s: a minute after
  # the checkpoint of step 3 at 70 s); process 1's clock is off and does not count.
  times = {0: [10, 61, 70, 80, 131, 140], 1: [999, 999, 999, 999, 999, 999]}
  for i, step in enumerate(range(1, 7)):
    for p in (0, 1):
      clocks[p].now = times[p][i]
      procs[p].after_step(runs[p], step)
    agreed[0] = max(sent[-1])  # the all-reduce of this step, read at the next
    sent.append([0, 0])
  assert runs[0].saved == runs[1].saved == [3, 6]  # one step after each


@pytest.mark.slow
def test_time_checkpoints_through_the_trainer_resume_bitwise(tmp_path):
  """config.checkpoint_every_minutes wired through the loop: a period shorter than a step puts a
  checkpoint at every update; resuming from one of them ends bitwise equal (the fingerprints of
  every array of the final state) to a run without time checkpoints."""
  def config(minutes):
    c = quickstart.get_config('steps=6')
    return config_lib.override(c, **{
        'model.width': 4, 'eval_every_epochs': 1000.0, 'checkpoint_every_steps': 1000,
        'keep_checkpoints': 10, 'checkpoint_every_minutes': minutes})

  reference, timed = str(tmp_path / 'reference'), str(tmp_path / 'timed')
  loop.train_and_evaluate(config(None), reference)
  loop.train_and_evaluate(config(1e-9), timed)
  assert sorted(map(int, os.listdir(os.path.join(timed, 'checkpoints')))) == [1, 2, 3, 4, 5, 6]
  assert os.listdir(os.path.join(reference, 'checkpoints')) == ['6']
  for step in ('5', '6'):  # as if killed after step 4's checkpoint
    shutil.rmtree(os.path.join(timed, 'checkpoints', step))
  loop.train_and_evaluate(config(1e-9), timed)

  def final(workdir):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
    try:
      return ckpt.metadata(6)['fingerprints']
    finally:
      ckpt.close()
  assert final(timed) == final(reference)
