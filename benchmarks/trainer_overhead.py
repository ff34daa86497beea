"""The trainer's loop against a bare loop of the same jitted step on the same pipeline.

    python benchmarks/trainer_overhead.py [--steps=60] [--repeats=2]

Both read batches through the same Prefetcher and call the same compiled step (the trainer
reuses it from its step cache). The trainer adds what a real run does: metrics fetched one
step late, progress lines, TensorBoard/metrics.jsonl writes, the periodic checkpoint, the
final eval. Steady-state steps/s excludes the first logging interval (compilation).
The ratio of the two, measured alternately in one process, goes to docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402

from benchmarks import report  # noqa: E402
from bigbatch import config_lib  # noqa: E402
from bigbatch import data as data_lib  # noqa: E402
from bigbatch import input_pipeline  # noqa: E402
from bigbatch import loop  # noqa: E402
from bigbatch import sharding  # noqa: E402
from bigbatch import trainer as trainer_lib  # noqa: E402


def benchmark_config(steps: int):
  c = config_lib.base_config()
  c.data.name = 'synthetic'
  c.data.image_size = 16
  c.data.channels = 3
  c.model.name = 'cnn'
  c.model.width = 32
  c.global_batch = 256
  c.num_steps = steps
  c.log_every_steps = 10
  c.checkpoint_every_steps = steps // 2  # one periodic checkpoint inside the measured span
  c.eval_every_steps = None
  c.data.num_eval = 512
  return c


def bare_loop(config, warmup: int = 10) -> float:
  """Steps/s of `for batch in pipeline: state = step(state, batch)` after `warmup` steps."""
  mesh = sharding.make_mesh(config)
  dataset = data_lib.create(config)
  trainer = trainer_lib.build(config, mesh, num_train=dataset.num_train,
                              image_shape=dataset.image_shape, num_classes=dataset.num_classes)
  state = trainer.state
  batches = input_pipeline.Prefetcher(
      lambda s: input_pipeline.make_global_batches(dataset, s, trainer.batch_sharding),
      0, config.num_steps, dataset.prefetch)
  start = None
  for step, batch in batches:
    if step == warmup:
      jax.block_until_ready(state)
      start = time.perf_counter()
    state, _ = trainer.train_step(state, batch)
  jax.block_until_ready(state)
  batches.close()
  return (config.num_steps - warmup) / (time.perf_counter() - start)


def trainer_loop(config) -> float:
  """Steady-state steps/s of loop.train_and_evaluate, from its own metrics.jsonl."""
  with tempfile.TemporaryDirectory() as workdir:
    loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [r['train/steps_per_sec'] for r in map(json.loads, f) if 'train/steps_per_sec' in r]
  every = config.log_every_steps
  rates = rates[1:]  # the first interval holds the compilation
  return len(rates) * every / sum(every / r for r in rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  config = benchmark_config(args.steps)
  config_lib.validate(config, jax.device_count())
  bare, trained = [], []
  for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
    bare.append(bare_loop(config))
    trained.append(trainer_loop(config))
  b, t = statistics.median(bare), statistics.median(trained)
  rows = [
      ('bare loop steps/s', f'{b:.2f}', ''),
      ('trainer steps/s', f'{t:.2f}', ''),
      ('step time (bare)', f'{1000 / b:.0f} ms', '>= 50 ms'),
      ('trainer / bare', f'{t / b:.3f}', '>= 0.97'),
  ]
  text = report.table(('measure', 'value', 'target'), rows)
  print(text)
  report.update_section(
      'trainer-overhead', 'Trainer loop vs a bare loop of the same step',
      f'Config: synthetic 16x16x3, CNN width 32, global batch 256, {args.steps} steps, '
      f'{args.repeats} alternating repeats (median); {jax.device_count()} device(s).\n\n' + text)


if __name__ == '__main__':
  main()
