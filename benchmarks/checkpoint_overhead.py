"""What an asynchronous checkpoint costs the training loop: the time `Checkpointer.save` blocks
the caller (the copy of the state off the devices; orbax writes the files in a background thread)
against the time the write then takes, for train states of a few sizes sharded over the devices.

  python benchmarks/checkpoint_overhead.py [--sizes_mb=100,400] [--repeats=3]

The blocking time is the loop's whole cost per checkpoint: spread over the updates between two
checkpoints (config.checkpoint_every_minutes), it is the overhead per update. Runs on whatever
devices jax has (XLA_FLAGS=--xla_force_host_platform_device_count=8 for 8 CPU devices).
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from bigbatch import checkpoint  # noqa: E402

_SIZES = flags.DEFINE_list('sizes_mb', ['100', '400'], 'Train state sizes, MiB of float32.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Saves per size (the median is reported).')


def _state(mib: int):
  """A params + two optimizer moments tree of `mib` MiB in all, sharded over the devices."""
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ('d',))
  shard = jax.sharding.NamedSharding(mesh, jax.P('d'))
  per_leaf = mib * 2**20 // 4 // 3
  n = per_leaf // len(devices) * len(devices)
  make = jax.jit(lambda k: jax.random.normal(k, (n,), jnp.float32), out_shardings=shard)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return {'params': make(keys[0]), 'mu': make(keys[1]), 'nu': make(keys[2])}


def main(argv):
  del argv
  print(f'{len(jax.devices())} x {jax.devices()[0].device_kind}, jax {jax.__version__}, '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores')
  print('| state | save() blocks (median) | background write (median) | blocking / write |')
  print('|---|---|---|---|')
  for mib in map(int, _SIZES.value):
    state = jax.block_until_ready(_state(mib))
    blocking, background = [], []
    with tempfile.TemporaryDirectory() as d:
      ckpt = checkpoint.Checkpointer(os.path.join(d, 'checkpoints'), keep=2)
      try:
        for step in range(1, _REPEATS.value + 1):
          t0 = time.perf_counter()
          ckpt.save(step, state)
          t1 = time.perf_counter()
          ckpt.wait()
          t2 = time.perf_counter()
          blocking.append(t1 - t0)
          background.append(t2 - t1)
      finally:
        ckpt.close()
    b, w = float(np.median(blocking)), float(np.median(background))
    print(f'| {mib} MiB | {b * 1e3:.0f} ms | {w * 1e3:.0f} ms | {b / max(w, 1e-9):.2f} |')


if __name__ == '__main__':
  app.run(main)
