"""Training-step time and model FLOP utilization (MFU) against this machine's matmul peak.

    python benchmarks/mfu.py [--models=cifar_resnet20,resnet18] [--batch=128] [--repeats=5]

Measured in one run, interleaved round by round so that load from other processes hits every
entry alike (medians over rounds):
Each entry is timed by wall clock and by this process's CPU time (all threads); the CPU-time
figures (FLOPs per CPU second, step vs matmul) do not depend on how much of the machine other
processes took, the wall figures do.
  peak    a 2048x2048 float32 matrix product, 2 * 2048^3 FLOPs per call (median of 3 calls per
          round): the FLOP/s this machine's XLA reaches on its best-shaped work right now.
  steps   one training update (forward, backward, SGD momentum) on one device, batch 128 of
          32x32x3, k=1, BN, for conv_impl='xla' (XLA's convolution gradients) and 'matmul'
          (bigbatch.models.conv's matrix-product backward; what 'auto' picks on CPU), for a CIFAR
          ResNet-20 and an ImageNet ResNet-18 (7x7/2 stem + max pool) on 32x32 inputs.
Model FLOPs per step come from XLA's cost analysis of the k=1 step compiled with conv_impl='xla'
(`compiled.cost_analysis()['flops']`; the matmul backward runs its kernel gradient in a loop that
cost analysis would count once, so its own count is not used); 3x the eval-mode forward's count
is shown beside it as a check. Achieved FLOP/s = model FLOPs / step time; MFU = achieved / peak,
for each impl (same model FLOPs: the work the model needs, not what an impl executes).

The step is the trainer's (train.build(...).train_step, a shard_map over a 1-device mesh). Where
that step does not compile for one of the impls, both impls are timed with a plain jitted step
instead (same model, loss, optimizer and update, no shard_map) and the table says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import report  # noqa: E402
from bigbatch import models  # noqa: E402
from bigbatch import train  # noqa: E402

PEAK_N = 2048
TARGET_SPEEDUP = 3.0  # matmul vs xla, ResNet-18 CIFAR at batch 128
TARGET_MFU = 0.25
IMPLS = ('xla', 'matmul')


def plain_step_fn(cfg, trainer: train.Trainer):
  """The trainer's update without shard_map: one device, k=1 (batch [1, M, H, W, C])."""
  model = models.build(cfg.model, common.NUM_CLASSES, axis_name=None)
  tx = trainer.optimizer.tx

  def step(state, batch):
    grad_fn = jax.value_and_grad(
        lambda p: train.loss_fn(p, state.batch_stats, batch['image'][0], batch['label'][0],
                                model=model, num_classes=common.NUM_CLASSES,
                                label_smoothing=cfg.label_smoothing), has_aux=True)
    (loss, (stats, _)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                         opt_state=opt_state), {'loss': loss}

  return jax.jit(step, donate_argnums=0)


def compile_steps(model: str, batch: int, plain: bool):
  """{impl: (trainer, compiled step)}; raises if a step does not compile."""
  out = {}
  # matmul first: where it fails, it fails while tracing, before any long compilation.
  for impl in reversed(IMPLS):
    cfg = common.config(model, k=1, microbatch=batch, conv_impl=impl)
    trainer = common.build(cfg, jax.devices()[:1])
    abstract = common.abstract_batch(trainer, 1, batch)
    fn = plain_step_fn(cfg, trainer) if plain else trainer.train_step
    out[impl] = (trainer, fn.lower(trainer.state, abstract).compile())
  return {impl: out[impl] for impl in IMPLS}


def forward_flops(model: str, trainer: train.Trainer, batch: int) -> float:
  cfg = common.config(model, conv_impl='xla')
  net = models.build(cfg.model, common.NUM_CLASSES, axis_name=None)
  variables = {'params': trainer.state.params, 'batch_stats': trainer.state.batch_stats}
  x = jax.ShapeDtypeStruct((batch, *common.IMAGE_SHAPE), jnp.float32)
  cost = jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(variables, x).cost_analysis()
  return float(cost['flops'])


def step_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


class Runner:
  """Calls a compiled step on its own state (donated each call) and a fixed batch."""

  def __init__(self, trainer, compiled, batch: int):
    self.state, self.compiled = trainer.state, compiled
    self.batch = common.random_batch(trainer, 1, batch)

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='cifar_resnet20,resnet18')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  names = args.models.split(',')

  a = jax.random.normal(jax.random.PRNGKey(0), (PEAK_N, PEAK_N), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (PEAK_N, PEAK_N), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  fns = {('peak', i): (lambda: matmul(a, b).block_until_ready()) for i in range(3)}

  info = {}
  for name in names:
    t = time.perf_counter()
    note = ''
    try:
      steps = compile_steps(name, args.batch, plain=False)
      wrapper = 'trainer step'
    except Exception as e:  # pylint: disable=broad-except
      note = (f'{common.LABELS[name]}: the trainer step does not compile for every impl '
              f'({common.first_line(e)}); both impls timed with the plain jitted step.')
      print(note, file=sys.stderr, flush=True)
      steps = compile_steps(name, args.batch, plain=True)
      wrapper = 'plain jit step'
    trainer_xla, compiled_xla = steps['xla']
    info[name] = {'wrapper': wrapper, 'note': note, 'flops': step_flops(compiled_xla),
                  'fwd3': 3 * forward_flops(name, trainer_xla, args.batch)}
    for impl, (trainer, compiled) in steps.items():
      fns[(name, impl)] = Runner(trainer, compiled, args.batch)
    print(f'  compiled: {name} ({time.perf_counter() - t:.0f} s)', file=sys.stderr, flush=True)

  walls, cpus = common.time_interleaved(fns, args.repeats, warmup=1)
  peak_wall = common.median([x for i in range(3) for x in walls[('peak', i)]])
  peak_cpu = common.median([x for i in range(3) for x in cpus[('peak', i)]])
  peak_flops = 2 * PEAK_N**3
  peak = peak_flops / peak_wall

  rows, verdicts = [], []
  rows.append([f'matmul {PEAK_N}x{PEAK_N} f32 (peak)', '', f'{peak_wall * 1e3:.0f} ms',
               f'{peak_cpu * 1e3:.0f} ms', f'{peak_flops / 1e9:.1f}', f'{peak / 1e9:.1f}',
               '100%', '100%', '', ''])
  for name in names:
    r = info[name]
    t = {impl: common.median(walls[(name, impl)]) for impl in IMPLS}
    c = {impl: common.median(cpus[(name, impl)]) for impl in IMPLS}
    speedup, speedup_cpu = t['xla'] / t['matmul'], c['xla'] / c['matmul']
    for impl in IMPLS:
      achieved = r['flops'] / t[impl]
      mfu_cpu = (r['flops'] / c[impl]) / (peak_flops / peak_cpu)
      rows.append([f'{common.LABELS[name]}, batch {args.batch}', f'{impl} ({r["wrapper"]})',
                   f'{t[impl] * 1e3:,.0f} ms', f'{c[impl] * 1e3:,.0f} ms',
                   f'{r["flops"] / 1e9:.1f} (3x fwd: {r["fwd3"] / 1e9:.1f})',
                   f'{achieved / 1e9:.1f}', f'{achieved / peak:.1%}', f'{mfu_cpu:.1%}',
                   f'{speedup:.2f}x ({speedup_cpu:.2f}x)' if impl == 'matmul' else '',
                   f'MFU >= {TARGET_MFU:.0%}' + (f'; speed-up >= {TARGET_SPEEDUP:.0f}x'
                                                 if impl == 'matmul' else '')])
    mfu = r['flops'] / t['matmul'] / peak
    mfu_cpu = (r['flops'] / c['matmul']) / (peak_flops / peak_cpu)
    met = lambda ok: 'met' if ok else 'MISSED'
    verdicts.append(
        f'{common.LABELS[name]}: matmul vs xla speed-up {speedup:.2f}x wall, {speedup_cpu:.2f}x '
        f'CPU time (target >= {TARGET_SPEEDUP:.0f}x: {met(speedup >= TARGET_SPEEDUP)} / '
        f'{met(speedup_cpu >= TARGET_SPEEDUP)}); MFU with matmul {mfu:.1%} wall, {mfu_cpu:.1%} '
        f'CPU time (target >= {TARGET_MFU:.0%}: {met(mfu >= TARGET_MFU)} / '
        f'{met(mfu_cpu >= TARGET_MFU)}).')
  header = ['work', 'conv impl', 'wall', 'CPU time', 'GFLOP / step', 'achieved GFLOP/s (wall)',
            'MFU (wall)', 'MFU (CPU time)', 'speed-up vs xla, wall (CPU)', 'target']
  text = report.table(header, rows)
  notes = [r['note'] for r in info.values() if r['note']]
  print(text)
  for line in verdicts + notes:
    print(line)
  body = (f'`python benchmarks/mfu.py`: {args.repeats} interleaved rounds of the '
          f'{PEAK_N}x{PEAK_N} float32 matmul (3 calls per round) and of each training step '
          f'(one device, batch {args.batch} of 32x32x3, SGD momentum, sync BN, k=1), after one '
          f'warm-up call each; medians of wall time and of this process\'s CPU time (all '
          f'threads). CPU time counts the work, not the time other processes held the cores, so '
          f'MFU (CPU time) = (FLOPs per CPU s of the step) / (FLOPs per CPU s of the matmul) is '
          f'the steadier figure on a shared machine. GFLOP / step: XLA\'s cost analysis of the '
          f'k=1 step compiled with conv_impl=xla (3x the eval-mode forward in brackets, as a '
          f'check). Achieved = GFLOP per step / step time; MFU (wall) = achieved / the matmul '
          f'peak measured in the same run ({peak / 1e9:.1f} GFLOP/s wall). '
          f'The issue\'s speed-up target is for a CIFAR ResNet-18 (3x3 stem, 32x32 stages), which '
          f'`bigbatch.models` does not have; `benchmarks/conv_grad.py` times a BN-free stack of '
          f'that shape.\n\n' + text + '\n\n' + '\n'.join(f'- {l}' for l in verdicts + notes))
  report.update_section('mfu', 'Training step time and MFU vs the matmul peak', body)


if __name__ == '__main__':
  main()
