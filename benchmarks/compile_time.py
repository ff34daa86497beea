"""How long XLA takes to compile the trainer's step, and what the step's finite check costs it.

  python benchmarks/compile_time.py [--configs=r50_32k_lamb,r50_8k_goyal] [--full_depth]

For each config's CPU smoke form (config_lib.runlocal: stage depths of 1, width 8, 16x16), or
with --full_depth its real depth at width 64, 32x32 and batch 32, the train step is lowered from abstract
inputs and compiled twice, each time in a fresh process (no compilation cache): once as it is,
and once with the finite check made as it used to be, one reduction per leaf of the parameters,
optimizer state and BN statistics. The check's result is the same exact count either way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

_CONFIGS = flags.DEFINE_list('configs', ['r50_32k_lamb', 'r50_8k_goyal', 'face_64k_lamb',
                                         'cifar10_large_batch'], 'Configs (configs/NAME.py).')
_FULL_DEPTH = flags.DEFINE_bool('full_depth', False, 'The real depth at width 64, 32x32, batch 32.')
_WRITE = flags.DEFINE_bool('write', True, 'Update docs/performance.md.')

# One measurement, run in a fresh interpreter: argv = config name, 'per_leaf' or 'one', depth.
_CHILD = r'''
import json, os, sys, time
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
sys.path.insert(0, os.getcwd())
import importlib
import jax, jax.numpy as jnp
from bigbatch import config_lib, data, sharding, step, trainer
name, check, full = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
if check == 'per_leaf':
  def per_leaf(tree, axes):
    common, local = [], []
    for x in jax.tree.leaves(tree):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        bad = jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
        (local if any(step.varying(x, a) for a in axes) else common).append(bad)
    total = sum(common, jnp.zeros((), jnp.int32))
    if local:
      spread = sum(local, jnp.zeros((), jnp.int32))
      total = total + jax.lax.psum(spread, tuple(a for a in axes if step.varying(spread, a)))
    return total == 0
  step.all_finite = per_leaf
c = importlib.import_module(f'configs.{name}').get_config()
if full:
  depths = c.model.stage_depths
  c = config_lib.runlocal(c)
  c.model.stage_depths, c.model.width = depths, 64
  c.data.image_size, c.global_batch = 32, 32
else:
  c = config_lib.runlocal(c)
config_lib.validate(c, jax.device_count())
ds = data.create(c)
t = trainer.build(c, sharding.make_mesh(c), num_train=ds.num_train, image_shape=ds.image_shape,
                  num_classes=ds.num_classes, initialize=False)
k = c.accumulation_steps
shape = lambda *s, dtype: jax.ShapeDtypeStruct(s, dtype, sharding=t.batch_sharding)
batch = {'image': shape(k, c.global_batch // k, *ds.image_shape, dtype=jnp.float32),
         'label': shape(k, c.global_batch // k, dtype=jnp.int32)}
t0 = time.perf_counter()
lowered = t.train_step.lower(t.state, batch)
t1 = time.perf_counter()
lowered.compile()
t2 = time.perf_counter()
leaves = len(jax.tree.leaves((t.state.params, t.state.opt_state, t.state.batch_stats)))
print(json.dumps({'lower_s': t1 - t0, 'compile_s': t2 - t1, 'leaves': leaves}))
'''


def _measure(name: str, check: str, full: bool) -> dict:
  root = os.path.join(os.path.dirname(__file__), '..')
  out = subprocess.run([sys.executable, '-c', _CHILD, name, check, '1' if full else '0'],
                       cwd=root, capture_output=True, text=True, check=False, timeout=3600)
  if out.returncode:
    raise RuntimeError(f'{name} {check}: {out.stderr.strip().splitlines()[-1:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  rows = []
  for name in _CONFIGS.value:
    one = _measure(name, 'one', _FULL_DEPTH.value)
    per_leaf = _measure(name, 'per_leaf', _FULL_DEPTH.value)
    rows.append([name, str(one['leaves']), f'{per_leaf["compile_s"]:.1f}',
                 f'{one["compile_s"]:.1f}', f'{per_leaf["compile_s"] / one["compile_s"]:.2f}x',
                 f'{one["lower_s"]:.1f}'])
    print(rows[-1], flush=True)
  form = ('real stage depths, width 64, 32x32, batch 32' if _FULL_DEPTH.value else
          'runlocal: stage depths 1, width 8, 16x16, batch 64')
  body = (f'The train step of each config ({form}) on 8 emulated CPU devices, lowered from '
          'abstract inputs and compiled in a fresh process without the compilation cache '
          '(`python benchmarks/compile_time.py' + (' --full_depth' if _FULL_DEPTH.value else '')
          + '`). "Per leaf": the finite check as one reduction per leaf of parameters, optimizer '
          'state and BN statistics (as before); "one": one reduction per dtype over their '
          'concatenation (the trainer now). Both give the same exact count.\n\n'
          + report.table(['config', 'float leaves checked', 'compile s, per leaf',
                          'compile s, one', 'ratio', 'lower s'], rows))
  if _WRITE.value:
    key = 'compile-time-full' if _FULL_DEPTH.value else 'compile-time'
    report.update_section(key, 'Compile time of the train step' + (
        ' (full depth)' if _FULL_DEPTH.value else ''), body)


if __name__ == '__main__':
  app.run(main)
