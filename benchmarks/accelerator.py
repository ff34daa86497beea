"""ResNet-50 training throughput on an accelerator: bigbatch vs flax's examples/imagenet step,
same device, same run.

    python benchmarks/accelerator.py [--batch=256] [--steps=20] [--warmup=3] [--rows=all]

Each row compiles one training step for synthetic 224x224x3 inputs already on the device(s) (it
measures the step, not the input pipeline), runs `--warmup` steps, then times `--steps` steps one
by one (each waited for) and reports the median. --batch is examples per device per step.

  reference        flax's examples/imagenet ResNet-50 and train_step (benchmarks/flax_reference.py):
                   bf16, nn.BatchNorm with sync statistics, over every local device
  reference-fp16   the same in float16 with dynamic loss scaling, flax's GPU default (GPU only)
  ours-flax-step   bigbatch's ResNet-50 (sync BN) in that same step: only the network differs
  ours-plain-jit   bigbatch's ResNet-50 in the flax-style step under plain jit, one device, no
                   collectives
  trainer-sgd      bigbatch's trainer step (shard_map, microbatch scan, metrics), SGD, sync BN
  trainer-lars     the same with LARS (as configs/r50_64k.py)
  trainer-ghost32  SGD with ghost BN of 32 examples
  trainer-k2       SGD, 2 accumulated microbatches of batch/2
  trainer-2x       SGD at twice the batch per step (512 at the default)

img/s are per device. MFU = model FLOPs (bigbatch/flops.py: 3x the forward's convolutions and
matrix products, counted from the network's shapes) x img/s / the device's dense bf16 peak.
Writes the 'accelerator-run' section of docs/performance.md. Needs no TensorFlow: nothing here
imports clu's metric writers or tf.data. Not run in CI: it needs a GPU or TPU (`--smoke` runs a
tiny network on any backend, for the tests).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bytes_accessed  # noqa: E402
from benchmarks import flax_reference as ref  # noqa: E402
from benchmarks import report  # noqa: E402
from bigbatch import config_lib  # noqa: E402
from bigbatch import flops  # noqa: E402
from bigbatch import sharding  # noqa: E402
from bigbatch import trainer as trainer_lib  # noqa: E402
from bigbatch.data import images  # noqa: E402

ROWS = ('reference', 'reference-fp16', 'ours-flax-step', 'ours-plain-jit', 'trainer-sgd',
        'trainer-lars', 'trainer-ghost32', 'trainer-k2', 'trainer-2x')
LABELS = {
    'reference': 'flax examples/imagenet `train_step` (bf16, nn.BatchNorm, sync)',
    'reference-fp16': 'same, its GPU default (float16 + dynamic loss scale)',
    'ours-flax-step': "bigbatch's ResNet in that same step (sync BN)",
    'ours-plain-jit': "bigbatch's ResNet module in a plain `jax.jit` step (one device)",
    'trainer-sgd': 'bigbatch trainer step, SGD, sync BN',
    'trainer-lars': 'bigbatch trainer step, LARS',
    'trainer-ghost32': 'bigbatch trainer step, ghost BN of 32',
    'trainer-k2': 'bigbatch trainer step, accumulation k=2',
    'trainer-2x': 'bigbatch trainer step, 2x batch per step',
}


class Setup:
  """What one row needs: a network size, an image shape and examples per device."""

  def __init__(self, smoke: bool, batch: int):
    self.smoke = smoke
    self.batch = batch
    self.depth, self.width, self.stage_depths = (18, 8, (1, 1, 1, 1)) if smoke else (50, 64, None)
    self.image_shape = (32, 32, 3) if smoke else (224, 224, 3)
    self.num_classes = 10 if smoke else 1000
    self.devices = jax.local_devices()


def _batch(setup: Setup, leading: tuple[int, ...], sharding_) -> dict:
  rng = np.random.default_rng(0)
  n = int(np.prod(leading))
  image = rng.normal(size=(n, *setup.image_shape)).astype(np.float32)
  label = rng.integers(0, setup.num_classes, size=(n,)).astype(np.int32)
  return jax.device_put({'image': image.reshape(*leading, *setup.image_shape),
                         'label': label.reshape(leading)}, sharding_)


def _ours(setup: Setup, axis_name: str | None):
  return bytes_accessed.ours(setup.depth, setup.num_classes, width=setup.width,
                             axis_name=axis_name, stage_depths=setup.stage_depths)


def _reference(setup: Setup, dtype):
  return bytes_accessed.reference(setup.depth, setup.num_classes, width=setup.width, dtype=dtype,
                                  stage_depths=setup.stage_depths)


def flax_step_row(setup: Setup, model, *, dynamic_scale: bool = False):
  """(step, state, batch, examples per device) of the flax-style step over every local device."""
  mesh = ref.make_mesh(setup.devices)
  state = ref.create_state(model, setup.image_shape, dynamic_scale=dynamic_scale)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = _batch(setup, (setup.batch * len(setup.devices),), ref.batch_sharding(mesh))
  return ref.make_step(mesh), state, batch, setup.batch


def plain_jit_row(setup: Setup):
  """bigbatch's network in the flax-style step under plain jit on one device (no collectives)."""
  device = setup.devices[0]
  state = jax.device_put(ref.create_state(_ours(setup, axis_name=None), setup.image_shape),
                         device)
  step = jax.jit(functools.partial(ref.train_step, axis_name=None), donate_argnums=0)
  return step, state, _batch(setup, (setup.batch,), device), setup.batch


def trainer_row(setup: Setup, *, optimizer: str = 'sgd', ghost: int | None = None, k: int = 1,
                batch_multiple: int = 1):
  """bigbatch's trainer step: global batch = batch x multiple x devices, k microbatches."""
  c = config_lib.imagenet_resnet50(config_lib.base_config())
  per_device = setup.batch * batch_multiple
  c.global_batch = per_device * len(setup.devices)
  c.accumulation_steps = k
  c.num_steps = 1000
  c.model.depth = setup.depth
  c.model.width = setup.width
  c.model.stage_depths = setup.stage_depths
  c.model.dtype = 'bfloat16'
  c.model.bn_group_size = ghost
  c.optimizer.name = optimizer
  c.lr.scaling = 'none'
  c.lr.base_lr = 1.0 if optimizer == 'lars' else 0.1
  config_lib.validate(c, len(setup.devices))
  trainer = trainer_lib.build(c, sharding.make_mesh(c, setup.devices),
                              num_train=images.IMAGENET_TRAIN_EXAMPLES,
                              image_shape=setup.image_shape, num_classes=setup.num_classes)
  batch = _batch(setup, (k, c.global_batch // k), trainer.batch_sharding)
  return trainer.train_step, trainer.state, batch, per_device


def build_row(name: str, setup: Setup):
  return {
      'reference': lambda: flax_step_row(setup, _reference(setup, jnp.bfloat16)),
      'reference-fp16': lambda: flax_step_row(setup, _reference(setup, jnp.float16),
                                              dynamic_scale=True),
      'ours-flax-step': lambda: flax_step_row(setup, _ours(setup, axis_name=ref.AXIS)),
      'ours-plain-jit': lambda: plain_jit_row(setup),
      'trainer-sgd': lambda: trainer_row(setup),
      'trainer-lars': lambda: trainer_row(setup, optimizer='lars'),
      'trainer-ghost32': lambda: trainer_row(setup, ghost=min(32, setup.batch)),
      'trainer-k2': lambda: trainer_row(setup, k=2),
      'trainer-2x': lambda: trainer_row(setup, batch_multiple=2),
  }[name]()


def time_row(step: Callable, state, batch, steps: int, warmup: int) -> dict:
  """Compile (first call), warm up, then the median of `steps` steps, each waited for."""
  t = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  return {'compile_s': compile_s, 'step_s': statistics.median(times)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=256, help='examples per device per step')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--rows', default='all', help=f'comma-separated subset of {ROWS}')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='dense bf16 peak per device; default: bigbatch.flops table')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny ResNet-18 on 32x32 (any backend), nothing written')
  args = parser.parse_args(argv)
  rows = ROWS if args.rows == 'all' else tuple(r.strip() for r in args.rows.split(','))
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f'unknown rows {unknown}; choose from {ROWS}')
  setup = Setup(args.smoke, args.batch)
  device = setup.devices[0]
  if device.platform != 'gpu':
    rows = tuple(r for r in rows if r != 'reference-fp16')  # flax uses float16 on GPUs only

  model = _ours(setup, axis_name=None)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, *setup.image_shape)), train=False))
  flops_per_example = flops.training_flops_per_example(model, variables, setup.image_shape)
  peak = (args.peak_tflops * 1e12 if args.peak_tflops
          else flops.peak_flops_per_device(device, jnp.bfloat16))

  results = {}
  for name in rows:
    step, state, batch, per_device = build_row(name, setup)
    r = time_row(step, state, batch, args.steps, args.warmup)
    del state, batch
    r['img_s'] = per_device / r['step_s']
    results[name] = r
    print(f'{name}: {r["img_s"]:,.0f} img/s per device, step {1000 * r["step_s"]:.1f} ms, '
          f'compile {r["compile_s"]:.0f} s', flush=True)

  base = results.get('reference', {}).get('img_s')
  table_rows = []
  for name, r in results.items():
    mfu = flops_per_example * r['img_s'] / peak if peak else None
    table_rows.append((LABELS[name], f'{r["img_s"]:,.0f}',
                       f'{r["img_s"] / base:.2f}' if base else '',
                       f'{1000 * r["step_s"]:.1f} ms', f'{mfu:.1%}' if mfu else 'n/a'))
  net = (f'ResNet-{setup.depth}' + (' (1 block per stage, width 8)' if setup.smoke else '') +
         f' v1.5, bfloat16, {"x".join(map(str, setup.image_shape[:2]))}')
  text = report.table(('step', 'img/s per device', 'vs flax example', 'step time',
                       'MFU (bf16 dense peak)'), table_rows)
  print(text)
  if args.smoke:
    return results
  report.update_section(
      'accelerator-run', 'ResNet-50 on an accelerator: bigbatch vs the flax example',
      f'`python benchmarks/accelerator.py --batch={args.batch} --steps={args.steps}`: {net}, '
      f'{args.batch} examples per device per step, synthetic batch on the device, median of '
      f'{args.steps} steps after {args.warmup} warm-up steps, all on the same device(s) in one '
      f'run. Model FLOPs {flops_per_example / 1e9:.1f} GFLOP per example (bigbatch/flops.py); '
      f'peak {peak / 1e12 if peak else float("nan"):.0f} TFLOP/s per device.\n\n' + text)
  return results


if __name__ == '__main__':
  main()
