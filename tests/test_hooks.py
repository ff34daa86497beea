"""The loop's hooks: the one "is it time" rule, MFU from the device peak, and a hook a user
writes in a file of their own and passes to the loop, which does not change for it."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from bigbatch import checkpoint
from bigbatch import hooks
from bigbatch import loop
from bigbatch import optim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import quickstart  # noqa: E402


@dataclasses.dataclass
class _Run:
  total: int = 100
  should_stop: bool = False
  derived: optim.Derived = None


def _derived(steps_per_epoch=10, phases=()):
  return optim.Derived(num_train_examples=1000, global_batch=100, steps_per_epoch=steps_per_epoch,
                       total_steps=100, warmup_steps=0, peak_lr=0.1, boundaries_steps=(),
                       phases=phases, schedule_steps=0)


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
  phases = (optim.Phase(0, 100, 1, 10, 0, 20), optim.Phase(2, 200, 2, 5, 20, 30))
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
