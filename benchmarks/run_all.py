"""Runs every benchmark, one after another, each in its own process, and writes their sections of
docs/performance.md.

    python benchmarks/run_all.py [--only=memory,mfu] [--skip=conv_grad] [--timeout=600]

One process per benchmark: collectives.py needs 8 emulated devices (set before jax is
imported), the others one; and a benchmark that fails or hangs does not take the rest down.
They run one at a time, never side by side, so that none times another's load. Each writes its
own section (conv_grad.py, which only prints, gets its output written into a 'conv-grad' section
here); a full run (no --only/--skip) also writes a 'run-all' section listing each benchmark, its
exit status and its wall time. The arguments in BENCHMARKS size each one so that the whole run
stays under 15 minutes on 2 CPU cores.
Exit status 1 if any benchmark failed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..'))

from benchmarks import report  # noqa: E402

# (name, arguments, what it measures). Arguments keep each within a few minutes on 2 cores.
BENCHMARKS = [
    ('memory', [], 'peak memory of a step at k = 1, 4, 16 accumulated microbatches'),
    ('collectives', [], 'all-reduce bytes per update, k = 1 vs 16, sync vs ghost BN, 8 devices'),
    ('mfu', ['--repeats=3'], 'matmul peak, step time xla vs matmul conv backward, MFU'),
    ('trainer_overhead', ['--steps=30', '--repeats=1'], 'trainer loop vs a bare loop'),
    ('conv_grad', ['--layers=1', '--repeats=3', '--stack_repeats=2'],
     'convolution gradients, XLA vs matrix products'),
    ('input_pipeline', ['--seconds=5'], 'input pipeline examples/s per core'),  # if present
    ('partial_fc', ['--repeats=2'],
     'face classifier step and memory: Partial FC at rates 1.0 / 0.3 / 0.1 vs the full softmax'),
]


def run(name: str, args: list[str], timeout: float) -> tuple[int, float, str]:
  """(exit status, wall seconds, stdout) of `python benchmarks/<name>.py args`; the output is
  echoed as it comes. Exit status -1: timed out."""
  cmd = [sys.executable, os.path.join(HERE, f'{name}.py'), *args]
  print(f'\n=== {" ".join(cmd[1:])}', flush=True)
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=os.path.join(HERE, '..'))
  timer = threading.Timer(timeout, proc.kill)  # a hung benchmark prints nothing: kill it
  timer.start()
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if 'oneDNN custom operations' not in line and 'absl::InitializeLog' not in line:
      print(line, end='', flush=True)
  status = proc.wait()
  timed_out = not timer.is_alive()
  timer.cancel()
  if timed_out:
    status = -1
  return status, time.perf_counter() - start, ''.join(lines)


def error_line(output: str) -> str:
  """The last 'SomeError: message' line of a traceback, else the last non-empty line."""
  lines = [l.strip() for l in output.strip().splitlines() if l.strip()]
  errors = [l for l in lines if re.match(r'^([\w.]+\.)?\w*(Error|Exception|Exit)\b:?', l)]
  line = (errors or lines or [''])[-1]
  return line[:200].replace('|', '/')


def conv_grad_section(output: str) -> None:
  """Writes conv_grad.py's printed tables into its section (it does not write one itself)."""
  keep = [l for l in output.splitlines()
          if not l.startswith(('Machine:', '  done:', 'WARNING:', 'I0000', 'W0000', 'E0000'))]
  body = '\n'.join(keep).strip()
  report.update_section(
      'conv-grad', 'Convolution gradients: XLA vs matrix products',
      '`python benchmarks/conv_grad.py` (output as printed; run by `benchmarks/run_all.py` with '
      'the arguments in its BENCHMARKS list). Times: median wall s (median CPU s), the two '
      'impls interleaved.\n\n' + body)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', default='', help='comma-separated names to run')
  parser.add_argument('--skip', default='', help='comma-separated names not to run')
  parser.add_argument('--timeout', type=float, default=600, help='seconds per benchmark')
  args = parser.parse_args()
  only = set(filter(None, args.only.split(',')))
  skip = set(filter(None, args.skip.split(',')))
  rows, failed = [], []
  total = time.perf_counter()
  for name, bench_args, what in BENCHMARKS:
    path = os.path.join(HERE, f'{name}.py')
    if (only and name not in only) or name in skip:
      continue
    if not os.path.exists(path):
      rows.append([f'`{name}.py`', what, 'not present', ''])
      continue
    status, seconds, output = run(name, bench_args, args.timeout)
    with open(path) as f:
      writes_own_section = 'update_section' in f.read()
    if status == 0 and name == 'conv_grad' and not writes_own_section:
      conv_grad_section(output)
    if status == 0:
      result = 'ok'
    else:
      result = ('timed out' if status == -1 else f'failed (exit {status})') + (
          f': {error_line(output)}' if error_line(output) else '')
      failed.append(name)
    rows.append([f'`{name}.py {" ".join(bench_args)}`'.replace(' `', '`'), what, result,
                 f'{seconds:.0f} s'])
  total = time.perf_counter() - total
  text = report.table(['benchmark', 'measures', 'result', 'wall'], rows)
  print('\n' + text + f'\n\nTotal: {total / 60:.1f} min (target < 15 min)')
  if only or skip:  # a partial run leaves the summary of the last full run as it was
    sys.exit(1 if failed else 0)
  report.update_section(
      'run-all', 'All benchmarks (`python benchmarks/run_all.py`)',
      f'Each benchmark in its own process, one after another; each writes its own section '
      f'in this file (a failed one leaves its previous section as it was). Total '
      f'{total / 60:.1f} min (target < 15 min).\n\n' + text)
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
