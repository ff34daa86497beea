"""Bytes all-reduced per update, from the compiled step's HLO, on 8 emulated devices.

    python benchmarks/collectives.py [--model=cifar_resnet20] [--microbatch=128] [--ks=1,16]
                                     [--ghost_group=4]

For k = 1 and 16 accumulated microbatches (global batch k x microbatch) and for sync BN
(model.bn_group_size=None) vs ghost BN (bn_group_size=g), the train step is compiled for 8 CPU
devices and its optimized HLO is read computation by computation (bigbatch/hlo.py): every
all-reduce, the shapes of its operands, and how many times it runs per update, i.e. the product
of the trip counts of the while loops around it (XLA's known_trip_count; the accumulation scan
runs k times). Bytes per update = sum over all-reduces of operand bytes x executions (the
all-reduced buffer, not the wire traffic of a ring, which is ~2x that).

Operands are classified by shape against the parameters: each parameter's gradient is one
operand of the parameter's shape, reduced outside any loop (matched first; then, by element count,
a gradient XLA merged into a same-valued all-reduce of another shape, e.g. a BN bias gradient and
the batch sum of the BN backward at k=1 with sync BN); scalars are the
metrics (loss, accuracy); the rest are BatchNorm statistics: with sync BN, per-channel sums in the
forward and backward pass of every BN layer inside the accumulation loop; with ghost BN, the
running statistics averaged once after it. Targets: the gradient bytes per update equal the
parameter bytes and do not depend on k (gradients are reduced once per update, after the loop).
Compiled, not run: deterministic, so no repeats are needed.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys

# 8 emulated devices: must precede the first import of jax.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from bigbatch import hlo  # noqa: E402
from benchmarks import report  # noqa: E402

NUM_DEVICES = 8


def analyze(model: str, k: int, microbatch: int, group: int | None, conv_impl: str) -> dict:
  trainer = common.build(common.config(model, k=k, microbatch=microbatch, conv_impl=conv_impl,
                                       bn_group_size=group))
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  text = common.compile_step(trainer, k, microbatch).as_text()
  comps = hlo.computations(text)
  runs = hlo.executions(comps, hlo.entry_name(text), default_trip=k)
  in_loop = hlo.reachable(comps, [body for body, _ in hlo.while_bodies(comps)])
  params = jax.tree.leaves(trainer.state.params)
  # Gradient slots still unmatched: one per parameter, keyed by (dtype, shape).
  grad_slots = collections.Counter((hlo.dtype_name(p.dtype), tuple(p.shape)) for p in params)
  out = collections.Counter()
  operands = []  # (in loop, executions, dtype, shape)
  for op in hlo.all_reduces(comps):
    n, looped = runs.get(op.computation, 0), op.computation in in_loop
    out['ops'] += 1
    out['executions'] += n
    out['in_loop_ops'] += looped
    out['in_loop_executions'] += n * looped
    operands += [(looped, n, dtype, shape) for dtype, shape in op.operands]
  kinds = [None] * len(operands)
  # Pass 1: exact (dtype, shape) matches outside loops. Inside a loop only a kernel-shaped operand
  # (ndim >= 2) counts as a gradient: per-channel BN sums there have the shape of BN scale/bias
  # gradients but are statistics.
  order = sorted(range(len(operands)), key=lambda i: operands[i][0])  # outside loops first
  for i in order:
    looped, _, dtype, shape = operands[i]
    if grad_slots[(dtype, shape)] and (not looped or len(shape) >= 2):
      grad_slots[(dtype, shape)] -= 1
      kinds[i] = 'grad'
  # Pass 2: a gradient XLA folded into another all-reduce of the same values under another shape
  # (sync BN at k=1: a BN bias gradient is the batch sum the BN backward reduces as [1,1,1,1,C])
  # is matched by element count, outside loops.
  for i in order:
    looped, _, dtype, shape = operands[i]
    if kinds[i] is None and not looped and math.prod(shape) > 1:
      slot = next((s for s, c in grad_slots.items()
                   if c and s[0] == dtype and math.prod(s[1]) == math.prod(shape)), None)
      if slot is not None:
        grad_slots[slot] -= 1
        kinds[i] = 'grad'
        out['folded_grads'] += 1
  for (looped, n, dtype, shape), kind in zip(operands, kinds):
    kind = kind or ('scalar' if math.prod(shape) <= 1 else 'bn')
    size = hlo.dtype_bytes(dtype) * math.prod(shape) * n
    out[kind] += size
    if looped:
      out[kind + '_in_loop'] += size
  out['param_bytes'] = sum(p.size * p.dtype.itemsize for p in params)
  out['unmatched_grads'] = sum(grad_slots.values())
  out['trip_counts'] = sorted({t for _, t in hlo.while_bodies(comps)} - {None})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='cifar_resnet20', choices=sorted(common.MODELS))
  parser.add_argument('--microbatch', type=int, default=128)
  parser.add_argument('--ks', default='1,16')
  parser.add_argument('--ghost_group', type=int, default=4)
  # The collectives do not depend on the convolution's backward pass; 'xla' compiles fastest.
  parser.add_argument('--conv_impl', default='xla')
  args = parser.parse_args()
  ks = [int(k) for k in args.ks.split(',')]
  results = {}
  for group in (None, args.ghost_group):
    for k in ks:
      results[(group, k)] = analyze(args.model, k, args.microbatch, group, args.conv_impl)
      print(f'  done: bn_group_size={group} k={k}', file=sys.stderr, flush=True)

  kib = lambda n: f'{n / 1024:,.1f} KiB'
  rows, checks = [], []
  for (group, k), r in results.items():
    bn = 'sync' if group is None else f'ghost ({group})'
    rows.append([bn, k, k * args.microbatch, r['ops'], r['executions'], r['in_loop_executions'],
                 kib(r['grad']), f'{r["grad"] / r["param_bytes"]:.3f}', kib(r['bn']),
                 kib(r['bn_in_loop']), f'{r["scalar"]:,} B',
                 kib(r['grad'] + r['bn'] + r['scalar'])])
  for group in (None, args.ghost_group):
    bn = 'sync BN' if group is None else f'ghost BN ({group})'
    g = [results[(group, k)]['grad'] for k in ks]
    p = results[(group, ks[0])]['param_bytes']
    in_loop_grads = sum(results[(group, k)]['grad_in_loop'] for k in ks)
    unmatched = sum(results[(group, k)]['unmatched_grads'] for k in ks)
    ok = len(set(g)) == 1 and g[0] == p and in_loop_grads == 0 and unmatched == 0
    checks.append(f'{bn}: gradient bytes per update at k={ks[-1]} / k={ks[0]} = '
                  f'{g[-1] / g[0]:.3f} (target 1.000); gradient bytes / parameter bytes = '
                  f'{g[0] / p:.3f} (target 1.000); gradient bytes inside the loop: '
                  f'{in_loop_grads} (target 0): {"met" if ok else "MISSED"}.')
  folded = [f'{"sync" if g is None else "ghost"} BN k={k}: {r["folded_grads"]}'
            for (g, k), r in results.items() if r['folded_grads']]
  if folded:
    checks.append('Gradients XLA reduced inside a same-valued BN all-reduce of another shape '
                  '(matched by element count): ' + ', '.join(folded) + '.')
  s, gh = results[(None, ks[-1])], results[(args.ghost_group, ks[-1])]
  checks.append(f'BN statistics per update at k={ks[-1]}: sync {kib(s["bn"])} in '
                f'{s["in_loop_executions"]} all-reduce executions inside the loop, ghost '
                f'{kib(gh["bn"])} once after it ({s["bn"] / max(gh["bn"], 1):.1f}x less data, '
                f'{s["executions"] - gh["executions"]} fewer collective launches).')
  header = ['BN', 'k', 'global batch', 'all-reduce ops', 'executions / update',
            'executions in loop', 'gradient bytes', 'grad / param bytes', 'BN stat bytes',
            'BN stat bytes in loop', 'scalars', 'total / update']
  text = report.table(header, rows)
  print(text)
  for line in checks:
    print(line)
  params = results[(None, ks[0])]['param_bytes']
  body = (f'`python benchmarks/collectives.py`: the compiled train step\'s HLO on '
          f'{NUM_DEVICES} emulated CPU devices, {common.LABELS[args.model]} ({params:,} parameter '
          f'bytes), microbatch {args.microbatch} ({args.microbatch // NUM_DEVICES} per device) '
          f'accumulated k times, conv_impl={args.conv_impl}. Bytes per update = all-reduced '
          f'buffer bytes x executions, an all-reduce inside the accumulation loop counted once '
          f'per trip (XLA\'s known trip counts: {results[(None, ks[-1])]["trip_counts"]}). '
          f'Operands matched to parameter shapes are gradients, scalars are metrics, the rest '
          f'BN statistics. Compiled, not run.\n\n' + text + '\n\n'
          + '\n'.join(f'- {line}' for line in checks))
  report.update_section('collectives', 'All-reduce bytes per update', body)


if __name__ == '__main__':
  main()
