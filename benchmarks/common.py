"""Shared pieces of the benchmarks: configs of the benchmarked models, abstract batches, a compiled
train step, and interleaved timing."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from bigbatch import config_lib
from bigbatch import sharding
from bigbatch import trainer as trainer_lib

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
NUM_TRAIN = 50_000

# name -> config.model overrides.
MODELS = {
    'cifar_resnet20': {'name': 'cifar_resnet', 'depth': 20, 'width': 16},
    'resnet18': {'name': 'resnet', 'depth': 18, 'width': 64},
    'cnn': {'name': 'cnn', 'width': 32},
}
LABELS = {
    'cifar_resnet20': 'CIFAR ResNet-20 (32x32)',
    'resnet18': 'ResNet-18, ImageNet stem, on 32x32',
    'cnn': 'CNN width 32 (32x32)',
}


def config(model: str, *, k: int = 1, microbatch: int = 128, conv_impl: str = 'xla',
           bn_group_size: int | None = None):
  """A synthetic-data config whose global batch is k x microbatch."""
  c = config_lib.base_config()
  c.data.name = 'synthetic'
  c.data.image_size = IMAGE_SHAPE[0]
  c.data.channels = IMAGE_SHAPE[2]
  c.data.num_classes = NUM_CLASSES
  for key, value in MODELS[model].items():
    c.model[key] = value
  c.model.conv_impl = conv_impl
  c.model.bn_group_size = bn_group_size
  c.accumulation_steps = k
  c.global_batch = k * microbatch
  c.num_steps = 100
  return c


def build(cfg, devices=None) -> trainer_lib.Setup:
  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(cfg, len(devices))
  mesh = sharding.make_mesh(cfg, devices)
  return trainer_lib.build(cfg, mesh, num_train=NUM_TRAIN, image_shape=IMAGE_SHAPE,
                     num_classes=NUM_CLASSES)


def abstract_batch(trainer: trainer_lib.Setup, k: int, microbatch: int) -> dict:
  s = trainer.batch_sharding
  return {'image': jax.ShapeDtypeStruct((k, microbatch, *IMAGE_SHAPE), jnp.float32, sharding=s),
          'label': jax.ShapeDtypeStruct((k, microbatch), jnp.int32, sharding=s)}


def random_batch(trainer: trainer_lib.Setup, k: int, microbatch: int,
                 seed: int = 0) -> dict:
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  batch = {'image': jax.random.normal(kx, (k, microbatch, *IMAGE_SHAPE), jnp.float32),
           'label': jax.random.randint(ky, (k, microbatch), 0, NUM_CLASSES, jnp.int32)}
  return jax.device_put(batch, trainer.batch_sharding)


def compile_step(trainer: trainer_lib.Setup, k: int, microbatch: int):
  """The trainer's jitted step, lowered and compiled for a [k, microbatch, 32, 32, 3] batch."""
  return trainer.train_step.lower(trainer.state, abstract_batch(trainer, k, microbatch)).compile()


def first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  return f'{type(e).__name__}: {lines[0] if lines else ""}'[:300]


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """({name: [wall s]}, {name: [process CPU s]}): each fn called `warmup` times, then once per
  round, round-robin, so that drifting load from other processes hits every entry alike. Each fn
  must block until its result is ready. CPU time (all threads of this process) counts the work
  done, not the time other processes held the cores: the steadier figure on a shared machine."""
  for f in fns.values():
    for _ in range(warmup):
      f()
  walls = {name: [] for name in fns}
  cpus = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      c, t = time.process_time(), time.perf_counter()
      f()
      walls[name].append(time.perf_counter() - t)
      cpus[name].append(time.process_time() - c)
  return walls, cpus


def median(xs) -> float:
  return statistics.median(xs)


def mib(n: float) -> str:
  return f'{n / 2**20:,.1f} MiB'
