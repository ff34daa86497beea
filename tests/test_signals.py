"""SIGTERM, SIGHUP and SIGINT to the real command at many moments: always exit 75 (130 for
SIGINT) with one line, and the exit within 0.5 s of that line.

Each case starts `python -m bigbatch.main` on the quickstart digits (16 steps of a width-8 CNN on
2 devices, a checkpoint every 4 steps, an evaluation at steps 8 and 16), waits for a line of its
log that marks a phase (the anchor; none: the process start), waits a further delay, and sends
the signal. The phases: startup (imports), setup (data set, model, restore), the first update's
compilation, training, the evaluation at step 8, and the end (the last evaluation and
checkpoint). The sweep (slow set: ~25 runs of up to 35 s on 2 cores) covers them all; the
default suite runs three representative cases. A failure prints the table of every case.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), '..')

# docs/errors.md rows these tests stand for.
DOC_ROWS = ('sighup', 'sigterm-any-moment')

ARGS = ['--config=configs/quickstart.py:steps=16', '--config.model.width=8',
        '--config.log_every_steps=1', '--config.checkpoint_every_steps=4',
        '--config.eval_every_steps=8', '--config.eval_every_epochs=None']
# The process exits within a millisecond of its line (os._exit); what this test sees adds the
# kernel's teardown of a large process and, on a loaded machine (CI runs two test workers on two
# cores), the scheduling of this process's reader and waiter: a case must stay under the hard
# bound, and the cases' median under the goal.
MAX_EXIT_AFTER_LINE_S = 0.5  # the goal, for the median over the cases of a sweep
HARD_EXIT_AFTER_LINE_S = 2.0  # any single case

# Anchors: log lines that mark the start of a phase.
SETUP = 'Topology:'  # logged before the data set is read and the model built
COMPILE = 'Model FLOPs per step'  # logged just before the first update is compiled
TRAINING = 'step 1/16'  # the first update ran
EVAL = 'step 8/16'  # logged just before the evaluation at step 8
END = 'eval at step 16'  # the last evaluation; the last checkpoint follows


def _run(workdir, signum, anchor, delay, extra=()):
  """Starts the command, signals it `delay` s after `anchor` (None: after the start); returns
  what happened."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  # No persistent compilation cache (tests/conftest.py shares one): the first update must
  # really compile for the sweep to signal it there, and a process stopped at once while jax
  # writes a cache entry (not atomically) would leave a torn entry for the other tests.
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  lines: list[tuple[float, str]] = []
  seen = threading.Event()
  t0 = time.monotonic()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'bigbatch.main', f'--workdir={workdir}', *ARGS, *extra], cwd=ROOT,
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  def read():
    for line in proc.stderr:
      lines.append((time.monotonic(), line))
      if anchor is not None and anchor in line:
        seen.set()
    seen.set()  # the process ended: the anchor will not come

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  if anchor is not None:
    seen.wait(timeout=300)
  time.sleep(delay)
  sent = time.monotonic()
  before = [l for _, l in lines]
  proc.send_signal(signum)
  try:
    proc.wait(timeout=180)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  exited = time.monotonic()
  reader.join(timeout=10)
  stderr = ''.join(l for _, l in lines)
  stop = [(t, l) for t, l in lines if l.startswith('bigbatch:')]
  return {
      'signal': signal.Signals(signum).name, 'anchor': anchor or 'start', 'delay': delay,
      'sent_s': sent - t0, 'anchor_seen': anchor is None or any(anchor in l for l in before),
      'phase': _phase(before), 'code': proc.returncode,
      'lines': len(stop), 'line': stop[0][1].strip() if stop else '',
      'latency': exited - stop[0][0] if stop else None,
      'traceback': 'Traceback' in stderr or 'exception ignored' in stderr.lower(),
      'stderr': stderr, 'workdir': str(workdir)}


def _phase(before: list[str]) -> str:
  """The phase the signal was sent in, from the last marker logged before it."""
  text = ''.join(before)
  for marker, name in ((END, 'end'), (EVAL, 'evaluation'), (TRAINING, 'training'),
                       (COMPILE, 'compilation'), (SETUP, 'setup')):
    if marker in text:
      return name
  return 'startup'


def _problems(r, code) -> list[str]:
  out = []
  if r['code'] != code:
    out.append(f'exit {r["code"]}, expected {code}')
  if r['lines'] != 1:
    out.append(f'{r["lines"]} bigbatch: lines')
  if r['traceback']:
    out.append('a traceback or an ignored exception')
  if r['latency'] is not None and r['latency'] > HARD_EXIT_AFTER_LINE_S:
    out.append(f'exit {r["latency"]:.2f} s after the line')
  if r['line'] and 'rerun the same command' not in r['line']:
    out.append('the line does not say to rerun')
  m = re.search(r'checkpoint written at step (\d+)', r['line'])
  if m and not os.path.isdir(os.path.join(r['workdir'], 'checkpoints', m.group(1))):
    out.append(f'no checkpoint of step {m.group(1)}')
  return out


def _table(results) -> str:
  rows = ['signal  anchor                delay  sent_s  phase        exit  lines  line->exit  line']
  for r in results:
    latency = f'{r["latency"]:.3f}' if r['latency'] is not None else '-'
    rows.append(f'{r["signal"]:7} {r["anchor"]:21} {r["delay"]:5.2f}  {r["sent_s"]:6.2f}  '
                f'{r["phase"]:12} {r["code"]!s:5} {r["lines"]:5}  {latency:10}  '
                f'{r["line"][9:110]}')
  return '\n'.join(rows)


def _sweep(tmp_path, cases, report=None):
  results, failures = [], []
  for i, (signum, anchor, delay) in enumerate(cases):
    r = _run(tmp_path / f'wd{i}', signum, anchor, delay)
    results.append(r)
    expected = 130 if signum == signal.SIGINT else 75
    problems = _problems(r, expected)
    if problems:
      failures.append((r, problems))
  table = _table(results)
  if report:
    with open(report, 'w') as f:
      f.write(table + '\n')
  detail = '\n\n'.join(f'{r["signal"]} at {r["anchor"]}+{r["delay"]}: {", ".join(p)}\n'
                       f'{r["stderr"][-2500:]}' for r, p in failures[:3])
  assert not failures, f'{len(failures)} of {len(results)} cases failed\n{table}\n\n{detail}'
  latencies = [r['latency'] for r in results if r['latency'] is not None]
  assert float(np.median(latencies)) <= MAX_EXIT_AFTER_LINE_S, table
  return results


def test_signals_at_representative_moments(tmp_path):
  """Default suite (~40 s): SIGHUP during startup (a closed terminal: 75, as SIGTERM), SIGINT
  while the data set is read (130), SIGTERM during training (75, the current update
  checkpointed)."""
  results = _sweep(tmp_path, [
      (signal.SIGHUP, None, 1.0),
      (signal.SIGINT, SETUP, 0.2),
      (signal.SIGTERM, 'step 2/16', 0.0),
  ])
  assert 'checkpoint written at step' in results[-1]['line'], _table(results)


# Every phase with a few delays into it (the startup, setup and compilation delays were thinned
# from 17 to 10 to keep CI under its time: each case is a ~11 s process).
SWEEP = (
    [(signal.SIGTERM, None, d) for d in (0.2, 1.0, 2.0, 4.0)]
    + [(signal.SIGTERM, SETUP, d) for d in (0.0, 1.0, 4.0)]
    + [(signal.SIGTERM, COMPILE, d) for d in (0.0, 1.0, 3.0)]
    + [(signal.SIGTERM, TRAINING, d) for d in (0.0, 0.1, 0.3)]
    + [(signal.SIGTERM, EVAL, d) for d in (0.0, 0.2, 0.5)]
    + [(signal.SIGTERM, END, d) for d in (0.0, 0.05)]
    + [(signal.SIGINT, None, 1.0), (signal.SIGINT, SETUP, 1.0), (signal.SIGINT, COMPILE, 0.5),
       (signal.SIGINT, TRAINING, 0.1), (signal.SIGHUP, COMPILE, 1.0)])


@pytest.mark.slow
def test_signal_sweep(tmp_path):
  """SIGTERM at 18 moments from the start to the last checkpoint, SIGINT at 4, SIGHUP at 1:
  every time the one line, 75 (130), no traceback, and the exit within 0.5 s of the line."""
  results = _sweep(tmp_path, SWEEP, report=os.environ.get('BIGBATCH_SIGNAL_SWEEP_REPORT'))
  phases = {r['phase'] for r in results}
  assert {'startup', 'setup', 'compilation', 'training', 'evaluation'} <= phases, _table(results)
