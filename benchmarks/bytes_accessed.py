"""Bytes the compiled ResNet training step touches: bigbatch's ResNet vs flax's example network.

    python benchmarks/bytes_accessed.py [--depth=50] [--image=224] [--batch=32] [--ghost=16]

The CPU stand-in for benchmarks/accelerator.py: a ResNet step on a GPU is memory-bound outside the
convolutions (BatchNorm, relu, residual adds), so the bytes it moves are what BN's passes cost.
Each step is jit-compiled for XLA:CPU from abstract inputs (`.lower(...).compile()`, nothing is
run) and its `cost_analysis()` read: 'bytes accessed' (operand + output bytes of every HLO op
after fusion) and 'flops'. One device; bf16 compute, float32 parameters; conv_impl='xla' (XLA's
own convolution gradients, what runs on GPU/TPU; 'auto' would pick the CPU-only matmul backward).

Rows, all in the same flax-style step (benchmarks/flax_reference.py: loss + L2, pmean of the
gradients and BN statistics, metrics, SGD Nesterov) over a mesh axis 'batch', so that only the
network differs:
  reference   flax's examples/imagenet ResNet, nn.BatchNorm(axis_name='batch')
  ours        bigbatch.models.resnet, sync BN over 'batch'
  ours ghost  the same with ghost BN (groups of --ghost examples)
plus, with --trainer, bigbatch's own trainer step (bigbatch.trainer.build: shard_map, scan over
microbatches, label smoothing, metrics) with SGD, which is what a run executes.

Prints a markdown table; docs/performance.md quotes it (section 'accelerator-bn').
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import flax_reference as ref  # noqa: E402
from bigbatch.models import layers  # noqa: E402
from bigbatch.models import resnet  # noqa: E402


def ours(depth: int, num_classes: int, *, ghost: int | None = None, width: int = 64,
         dtype=jnp.bfloat16, axis_name: str | None = ref.AXIS,
         stage_depths: tuple[int, ...] | None = None) -> resnet.Model:
  """bigbatch's ResNet with sync BN over axis_name, or ghost BN of `ghost` examples."""
  norm = layers.Norm('batch', group_size=ghost, axis_name=axis_name, dtype=dtype)
  return resnet.Model(num_classes=num_classes, norm=norm, width=width, dtype=dtype, depth=depth,
                      stage_depths=stage_depths, conv_impl='xla')


def reference(depth: int, num_classes: int, *, width: int = 64, dtype=jnp.bfloat16,
              axis_name: str | None = ref.AXIS,
              stage_depths: tuple[int, ...] | None = None) -> ref.ResNet:
  """flax's example ResNet of the same depth (or blocks per stage) and width."""
  model = ref.resnet(depth, num_classes, dtype=dtype, axis_name=axis_name, num_filters=width)
  return model if stage_depths is None else model.clone(stage_sizes=tuple(stage_depths))


def step_cost(model, image_shape, batch: int) -> dict:
  """XLA:CPU cost analysis of the flax-style train step of `model` on one device:
  {'bytes accessed', 'flops', 'compile_s'}."""
  mesh = ref.make_mesh(jax.devices()[:1])
  state = jax.eval_shape(lambda: ref.create_state(model, image_shape))
  abstract_batch = {'image': jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
                    'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  return _cost(ref.make_step(mesh), state, abstract_batch)


def _cost(step, *args) -> dict:
  t = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'bytes accessed': float(cost['bytes accessed']), 'flops': float(cost['flops']),
          'compile_s': compile_s}


def trainer_step_cost(depth: int, image_shape, batch: int) -> dict:
  """bigbatch's trainer step (SGD, sync BN, k=1) on one device, bf16, conv_impl='xla'."""
  # Imported here: the rows above need only the models.
  from bigbatch import config_lib  # pylint: disable=g-import-not-at-top
  from bigbatch import sharding  # pylint: disable=g-import-not-at-top
  from bigbatch import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from bigbatch.data import images  # pylint: disable=g-import-not-at-top
  c = config_lib.imagenet_resnet50(config_lib.base_config())
  c.model.depth = depth
  c.model.dtype = 'bfloat16'
  c.model.conv_impl = 'xla'
  c.model.bn_group_size = None
  c.optimizer.name = 'sgd'
  c.global_batch = batch
  c.num_steps = 1000
  devices = jax.devices()[:1]
  config_lib.validate(c, len(devices))
  # initialize=False: an abstract state (shapes and shardings) is all that lowering needs.
  trainer = trainer_lib.build(c, sharding.make_mesh(c, devices),
                              num_train=images.IMAGENET_TRAIN_EXAMPLES,
                              image_shape=tuple(image_shape), num_classes=1000, initialize=False)
  s = trainer.batch_sharding
  abstract_batch = {'image': jax.ShapeDtypeStruct((1, batch, *image_shape), jnp.float32,
                                                  sharding=s),
                    'label': jax.ShapeDtypeStruct((1, batch), jnp.int32, sharding=s)}
  return _cost(trainer.train_step, trainer.state, abstract_batch)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--ghost', type=int, default=16)
  parser.add_argument('--trainer', action='store_true', help='also the bigbatch trainer step')
  args = parser.parse_args()
  shape = (args.image, args.image, 3)
  rows = {'reference (flax nn.BatchNorm, sync)': reference(args.depth, 1000),
          'ours (sync BN)': ours(args.depth, 1000),
          f'ours (ghost BN {args.ghost})': ours(args.depth, 1000, ghost=args.ghost)}
  costs = {name: step_cost(model, shape, args.batch) for name, model in rows.items()}
  if args.trainer:
    costs['ours, bigbatch trainer step (SGD, sync BN)'] = trainer_step_cost(
        args.depth, shape, args.batch)
  base = costs['reference (flax nn.BatchNorm, sync)']
  print(f'ResNet-{args.depth}, {args.image}x{args.image}, batch {args.batch}, bfloat16, one '
        f'{jax.devices()[0].device_kind} device; jax {jax.__version__}')
  print('| step | bytes accessed | vs reference | GFLOP | vs reference | compile s |')
  print('|---|---|---|---|---|---|')
  for name, c in costs.items():
    print(f'| {name} | {c["bytes accessed"] / 2**30:,.3f} GiB | '
          f'{c["bytes accessed"] / base["bytes accessed"]:.3f} | {c["flops"] / 1e9:,.1f} | '
          f'{c["flops"] / base["flops"]:.3f} | {c["compile_s"]:.0f} |')


if __name__ == '__main__':
  main()
