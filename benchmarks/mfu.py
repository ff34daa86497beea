"""Model FLOPs (analytic vs XLA:CPU), training-step time and model FLOP utilization (MFU).

    python benchmarks/mfu.py [--models=cifar_resnet20,resnet18] [--batch=128] [--repeats=3]
    python benchmarks/mfu.py --flops_only     # the FLOP comparison alone (~1 min, no timing)

FLOPs: bigbatch.flops counts the convolutions and matrix products of each model's eval-mode
forward from its jaxpr (no compute), for ResNet-18/50, iResNet-50/100 and the small models, at
their usual resolutions and at the small ones the tests use. Beside it: the same count with
the padded kernel taps included (the published convention), and XLA:CPU's cost analysis of the
lowered forward (the convolutions' valid taps plus one FLOP per element of every elementwise
op). Model FLOPs per training step = 3 x forward x batch.

Timing, in one run, interleaved round by round so that load from other processes hits every
entry alike (medians over rounds); each entry is timed by wall clock and by this process's CPU
time (all threads), which does not depend on how much of the machine other processes took:
  peak    a 2048x2048 float32 matrix product, 2 * 2048^3 FLOPs per call (median of 3 calls per
          round): the FLOP/s this machine's XLA reaches on its best-shaped work right now.
  steps   one training update (forward, backward, SGD momentum) on one device, batch 128 of
          32x32x3, k=1, BN, for conv_impl='xla' (XLA's convolution gradients) and 'matmul'
          (bigbatch.models.conv's matrix-product backward; what 'auto' picks on CPU), for a CIFAR
          ResNet-20 and an ImageNet ResNet-18 (7x7/2 stem + max pool) on 32x32 inputs.
Achieved FLOP/s = analytic model FLOPs per step / step time (the same for both impls: the work
the model needs, not what an impl executes). MFU = achieved / peak: against the device's
published dense peak (bigbatch.flops.peak_flops_per_device) where there is one, and against
the matmul measured in the same run (a CPU has no published peak). XLA's cost analysis of the
compiled step is shown as a check; it counts the matmul backward's kernel-gradient loop body
once, so it is not used.

The step is the trainer's (trainer.build(...).train_step, a shard_map over a 1-device mesh). Where
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
from bigbatch import config_lib  # noqa: E402
from bigbatch import flops  # noqa: E402
from bigbatch import models  # noqa: E402
from bigbatch import trainer as trainer_lib  # noqa: E402
from bigbatch.tasks import classification  # noqa: E402

PEAK_N = 2048
TARGET_SPEEDUP = 3.0  # matmul vs xla, ResNet-18 CIFAR at batch 128
TARGET_MFU = 0.25
IMPLS = ('xla', 'matmul')


def plain_step_fn(cfg, trainer: trainer_lib.Setup):
  """The trainer's update without shard_map: one device, k=1 (batch [1, M, H, W, C])."""
  model = models.build(cfg.model, common.NUM_CLASSES, axis_name=None)
  tx = trainer.optimizer.tx

  def step(state, batch):
    grad_fn = jax.value_and_grad(
        lambda p: classification.loss_fn(p, state.batch_stats, batch['image'][0],
                                         batch['label'][0], None, model=model,
                                         num_classes=common.NUM_CLASSES,
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


# name -> (config.model fields, image size, outputs, label) for the FLOP comparison: the tests'
# small resolutions and the usual ones.
FLOP_MODELS = {
    'cnn': (dict(name='cnn', width=32), 32, 10, 'CNN width 32'),
    'cifar_resnet20': (dict(name='cifar_resnet', depth=20, width=16), 32, 10, 'CIFAR ResNet-20'),
    'resnet18@32': (dict(name='resnet', depth=18, width=64), 32, 10, 'ResNet-18'),
    'resnet18@64': (dict(name='resnet', depth=18, width=64), 64, 10, 'ResNet-18'),
    'resnet18@224': (dict(name='resnet', depth=18, width=64), 224, 1000, 'ResNet-18'),
    'resnet50@64': (dict(name='resnet', depth=50, width=64), 64, 10, 'ResNet-50'),
    'resnet50@224': (dict(name='resnet', depth=50, width=64), 224, 1000, 'ResNet-50'),
    'iresnet50@112': (dict(name='iresnet', depth=50, width=64), 112, 512, 'iResNet-50'),
    'iresnet100@112': (dict(name='iresnet', depth=100, width=64), 112, 512, 'iResNet-100'),
}


def model_of(fields: dict, outputs: int):
  c = config_lib.base_config()
  for key, value in fields.items():
    c.model[key] = value
  return models.build(c.model, outputs, axis_name=None)


def flop_comparison(name: str, batch: int = 2) -> dict:
  """Forward GFLOP per example: analytic (valid taps; all taps) and XLA:CPU's cost analysis."""
  fields, size, outputs, _ = FLOP_MODELS[name]
  net = model_of(fields, outputs)
  shape = (size, size, 3)
  variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                                              train=False))
  t = time.perf_counter()
  count = flops.forward_count(net, variables, shape)
  seconds = time.perf_counter() - t
  full = flops.forward_count(net, variables, shape, count_padding=True)
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  cost = jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(variables, x).cost_analysis()
  return {'conv': count.conv, 'dot': count.dot, 'analytic': count.total, 'full': full.total,
          'xla': float(cost['flops']) / batch, 'seconds': seconds, 'size': size}


def training_flops_per_step(model: str, trainer: trainer_lib.Setup, batch: int) -> float:
  """The analytic count (bigbatch.flops): 3 x forward per example x batch."""
  net = models.build(common.config(model).model, common.NUM_CLASSES, axis_name=None)
  variables = {'params': trainer.state.params, 'batch_stats': trainer.state.batch_stats}
  return flops.training_flops_per_example(net, variables, common.IMAGE_SHAPE) * batch


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


def flops_section(names) -> str:
  """Runs the FLOP comparison, prints its table and returns the docs section's body."""
  rows = []
  for name in names:
    r = flop_comparison(name)
    label = f'{FLOP_MODELS[name][3]}, {r["size"]}x{r["size"]}'
    rows.append([label, f'{r["conv"] / 1e9:.4g}', f'{r["dot"] / 1e9:.3g}',
                 f'{r["analytic"] / 1e9:.4f}', f'{r["xla"] / 1e9:.4f}',
                 f'{r["analytic"] / r["xla"] - 1:+.2%}', f'{r["full"] / 1e9:.4f}',
                 f'{r["full"] / r["analytic"] - 1:+.1%}', f'{3 * r["analytic"] / 1e9:.3f}',
                 f'{r["seconds"]:.1f} s'])
    print(f'  flops: {name}', file=sys.stderr, flush=True)
  header = ['model, input', 'conv GFLOP', 'dense GFLOP', 'analytic forward GFLOP',
            'XLA:CPU forward GFLOP', 'analytic vs XLA', 'all taps (published convention)',
            'all taps vs analytic', 'training GFLOP (3x)', 'count time']
  text = report.table(header, rows)
  print(text)
  return ('`python benchmarks/mfu.py --flops_only`: forward FLOPs per example of the eval-mode '
          'model. Analytic: `bigbatch.flops` (convolutions and matrix products from the jaxpr of '
          'the forward, traced on abstract values; kernel taps on padding not counted), the '
          'count that `perf/*` and MFU use, the same on every backend. XLA:CPU: '
          '`jax.jit(apply).lower(...).cost_analysis()["flops"]` at batch 2, which counts the same '
          'convolution taps plus one FLOP per element of each elementwise op (BN, ReLU/PReLU, '
          'residual adds): the analytic count is below it by that, never above. All taps: the '
          'count with padded taps included, the convention of published figures (ResNet-50 at '
          '224x224: 4.09 G multiply-adds). Training = 3 x analytic forward (one forward and two '
          'backward products). Count time: tracing the forward once on this machine.\n\n'
          + text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='cifar_resnet20,resnet18')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--flop_models', default=','.join(FLOP_MODELS))
  parser.add_argument('--flops_only', action='store_true',
                      help='only the FLOP comparison (no compilation, no timing)')
  args = parser.parse_args()
  names = args.models.split(',')

  flops_body = flops_section(args.flop_models.split(','))
  report.update_section('flops', 'Model FLOPs: analytic count vs XLA cost analysis', flops_body)
  if args.flops_only:
    return

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
    info[name] = {'wrapper': wrapper, 'note': note,
                  'flops': training_flops_per_step(name, trainer_xla, args.batch),
                  'xla_step': step_flops(compiled_xla)}
    for impl, (trainer, compiled) in steps.items():
      fns[(name, impl)] = Runner(trainer, compiled, args.batch)
    print(f'  compiled: {name} ({time.perf_counter() - t:.0f} s)', file=sys.stderr, flush=True)

  walls, cpus = common.time_interleaved(fns, args.repeats, warmup=1)
  peak_wall = common.median([x for i in range(3) for x in walls[('peak', i)]])
  peak_cpu = common.median([x for i in range(3) for x in cpus[('peak', i)]])
  peak_flops = 2 * PEAK_N**3
  peak = peak_flops / peak_wall
  device = jax.devices()[0]
  # Published dense peak of this chip for the steps' float32 products (None on a CPU).
  published = flops.peak_flops_per_device(device, jnp.float32)
  vs_published = lambda f: 'n/a' if published is None else f'{f / published:.1%}'

  rows, verdicts = [], []
  rows.append([f'matmul {PEAK_N}x{PEAK_N} f32 (peak)', '', f'{peak_wall * 1e3:.0f} ms',
               f'{peak_cpu * 1e3:.0f} ms', f'{peak_flops / 1e9:.1f}', f'{peak / 1e9:.1f}',
               vs_published(peak), '100%', '100%', '', ''])
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
                   f'{r["flops"] / 1e9:.1f} (XLA step: {r["xla_step"] / 1e9:.1f})',
                   f'{achieved / 1e9:.1f}', vs_published(achieved), f'{achieved / peak:.1%}',
                   f'{mfu_cpu:.1%}',
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
  header = ['work', 'conv impl', 'wall', 'CPU time', 'model GFLOP / step',
            'achieved GFLOP/s (wall)', 'MFU vs published peak', 'MFU vs matmul (wall)',
            'MFU vs matmul (CPU time)', 'speed-up vs xla, wall (CPU)', 'target']
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
          f'the steadier figure on a shared machine. Model GFLOP / step: the analytic count '
          f'(`bigbatch.flops`, 3x the forward, section above), the same for both impls; XLA\'s '
          f'cost analysis of the compiled k=1 xla step in brackets, as a check. Achieved = model '
          f'GFLOP per step / step time. MFU vs published peak: achieved / '
          f'`flops.peak_flops_per_device` ({device.device_kind}: '
          f'{"none published" if published is None else f"{published / 1e12:.1f} TFLOP/s"}); '
          f'MFU vs matmul (wall) = achieved / the matmul peak measured in the same run '
          f'({peak / 1e9:.1f} GFLOP/s wall). '
          f'A speed-up target stated for a CIFAR ResNet-18 (3x3 stem, 32x32 stages) needs a model '
          f'that `bigbatch.models` does not have; `benchmarks/conv_grad.py` times a BN-free stack of '
          f'that shape.\n\n' + text + '\n\n' + '\n'.join(f'- {l}' for l in verdicts + notes))
  report.update_section('mfu', 'Training step time and MFU vs the matmul peak', body)

if __name__ == '__main__':
  main()
