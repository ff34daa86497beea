"""ResNet-50 training throughput and MFU in bf16 on one accelerator (the lent GPU check).

    python benchmarks/accelerator.py [--batch=256] [--steps=30] [--peak_tflops=auto]

Runs the trainer's own step (shard_map, one gradient all-reduce, LARS as in r50_64k) on
synthetic 224x224x3 inputs already on the device, so it measures the step, not the input
pipeline. Model FLOPs are 3x the forward from XLA's cost analysis; MFU is against the card's
dense bf16 peak (H100 SXM 989 TFLOP/s, H200 the same; override with --peak_tflops).
Writes the 'accelerator' section of docs/performance.md. Not run in CI: it needs a GPU or TPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from bigbatch import config_lib  # noqa: E402
from bigbatch import sharding  # noqa: E402
from bigbatch import train  # noqa: E402

PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0,
                    'TPU v5 lite': 197.0}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=256, help='examples per device')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--peak_tflops', default='auto')
  args = parser.parse_args()

  c = config_lib.imagenet_resnet50(config_lib.base_config())
  c.global_batch = args.batch * jax.device_count()
  c.num_steps = 1000
  c.model.dtype = 'bfloat16'
  c.model.bn_group_size = None
  c.optimizer.name = 'lars'
  c.lr.scaling = 'none'
  c.lr.base_lr = 1.0
  config_lib.validate(c, jax.device_count())
  mesh = sharding.make_mesh(c)
  trainer = train.build(c, mesh, num_train=config_lib.IMAGENET_TRAIN_EXAMPLES,
                        image_shape=(224, 224, 3), num_classes=1000)
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {'image': rng.normal(size=(1, c.global_batch, 224, 224, 3)).astype(np.float32),
       'label': rng.integers(0, 1000, size=(1, c.global_batch)).astype(np.int32)},
      trainer.batch_sharding)
  state = trainer.state
  t0 = time.perf_counter()
  state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(3):
    state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = trainer.train_step(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / args.steps

  kind = jax.devices()[0].device_kind
  if args.peak_tflops == 'auto':
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), float('nan'))
  else:
    peak = float(args.peak_tflops)
  flops = train.model_flops_per_example(trainer, (224, 224, 3)) * c.global_batch
  achieved = flops / step_s / jax.device_count()
  rows = [('device', kind, ''), ('examples per device', str(args.batch), ''),
          ('compile', f'{compile_s:.1f} s', ''),
          ('step', f'{1000 * step_s:.1f} ms', ''),
          ('examples/s per device', f'{args.batch / step_s:,.0f}', '~3,000 (REFERENCES.md)'),
          ('model TFLOP/s per device', f'{achieved / 1e12:.1f}', ''),
          ('MFU (bf16 dense peak)', f'{achieved / 1e12 / peak:.1%}', f'peak {peak} TFLOP/s')]
  text = report.table(('measure', 'value', 'note'), rows)
  print(text)
  report.update_section('accelerator', 'ResNet-50 bf16 training step on an accelerator',
                        f'`python benchmarks/accelerator.py --batch={args.batch}`: the trainer '
                        f'step with LARS, synthetic inputs on device.\n\n' + text)


if __name__ == '__main__':
  main()
