"""Partial FC vs the full softmax: step time and per-device memory of the classifier, 8 devices.

    python benchmarks/partial_fc.py [--num_classes=200000] [--dim=512] [--batch=512]
                                    [--rates=1.0,0.3,0.1] [--repeats=3] [--no_docs]
    python benchmarks/partial_fc.py --shard_shape [--shards=64] [--num_classes=2059906]
                                    [--batch=65536] [--time_batch=8192] [--repeats=2]

--shard_shape: one device's share of Partial FC at the scale it is for, face_64k_lamb on 64
devices (WebFace42M's 2,059,906 identities, 32,187 rows per shard, global batch 65,536 gathered
on every device): the per-device program run on one device (its collectives over one device
are no-ops, so the work and the memory are one shard's, the communication is left out), at
rate 0.1 (3,218 rows: int(0.1 * 32,187), arcface_torch's rounding) vs rate 1 (every row of the
shard: the full softmax, model parallel). Memory: XLA's memory analysis of the program compiled
at the full batch (nothing is run at that size); time: the same program at --time_batch
examples (the full batch would take minutes per call on CPU), labels drawn as a shard sees them
at 64 devices (about batch / 64 distinct positives), and once with an overflowing batch (2 x S
distinct positives on the shard: the extra column blocks run).

The classifier part of a face-recognition step only: given fixed embeddings [batch, dim] (split
over 8 emulated CPU devices) and labels, forward and backward of the ArcFace margin softmax
(s=64, m=0.5) w.r.t. the embeddings and the class centers. Entries:
  * full softmax, data parallel: the centers [C, D] replicated on every device, each device
    computing the logits of its own examples over all C classes, the centers' gradient
    all-reduced (pmean): a plain dense classifier head.
  * Partial FC at sample rates 1.0 (model parallel: every class, no sampling), 0.3, 0.1:
    `bigbatch.face.partial_fc.loss` under shard_map, centers sharded C_pad / 8 rows per device,
    the centers' gradient left sharded.
Time: median over `repeats` interleaved calls (benchmarks/common.time_interleaved) of wall and
process CPU seconds; the 8 "devices" share the host's cores, so the time is the total work of all
of them, not the latency of 8 real accelerators. Memory: XLA's per-device account of the
compiled step (argument + output + temp bytes; the step is SPMD, so every device runs the same
program), and the analytic bytes of what scales with C: centers + their gradient + logits (+ the
logits' gradient, same size). Target: rate 0.1 at least 5x faster than the full softmax.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

# 8 emulated devices: must precede the first import of jax.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import report  # noqa: E402
from bigbatch.face import losses  # noqa: E402
from bigbatch.face import partial_fc  # noqa: E402

NUM_DEVICES = 8
TARGET_SPEEDUP = 5.0  # rate 0.1 vs the full softmax
MARGIN = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)


def _dense_step(mesh):
  """Data-parallel full softmax: replicated centers, local logits, pmean'd centers gradient."""
  axes = partial_fc.AXES

  def per_device(w_CxD, e_MxD, labels_M):
    w = lax.pcast(w_CxD, axes, to='varying')
    loss, (g_w, g_e) = jax.value_and_grad(
        lambda w, e: losses.margin_softmax_loss(e, w, labels_M, **MARGIN), argnums=(0, 1))(
            w, e_MxD)
    return lax.pmean(loss, axes), lax.pmean(g_w, axes), g_e

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axes), P(axes)),
                               out_specs=(P(), P(), P(axes))))


def _pfc_step(mesh, num_classes: int, rate: float):
  axes = partial_fc.AXES
  config = partial_fc.Config(num_classes=num_classes, sample_rate=rate, **MARGIN)

  def per_device(w_CsxD, e_MxD, labels_M, key):
    (loss, _), (g_w, g_e) = jax.value_and_grad(
        lambda w, e: partial_fc.loss(w, e, labels_M, key, config=config), argnums=(0, 1),
        has_aux=True)(w_CsxD, e_MxD)
    return loss, g_w, g_e

  spec = partial_fc.centers_spec()
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, P(axes), P(axes), P()),
                               out_specs=(P(), spec, P(axes))))


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
         'temp': m.temp_size_in_bytes}
  out['total'] = out['argument'] + out['output'] + out['temp']
  return out


def run(num_classes: int, dim: int, batch: int, rates, repeats: int) -> dict:
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES, 1), partial_fc.AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  axes = partial_fc.AXES
  c_pad = partial_fc.padded_num_classes(num_classes, NUM_DEVICES)
  kw, ke, kl = jax.random.split(jax.random.key(0), 3)
  sharded = NamedSharding(mesh, partial_fc.centers_spec())
  centers = jax.jit(functools.partial(partial_fc.init_centers, num_classes=num_classes,
                                      embedding_dim=dim, num_shards=NUM_DEVICES),
                    out_shardings=sharded)(kw)
  emb = jax.device_put(jax.random.normal(ke, (batch, dim)), NamedSharding(mesh, P(axes)))
  labels = jax.device_put(jax.random.randint(kl, (batch,), 0, num_classes, jnp.int32),
                          NamedSharding(mesh, P(axes)))
  key = jax.random.key(1)

  entries = {}  # name -> (call, compiled, columns per device, analytic bytes)
  m = batch // NUM_DEVICES
  replicated = jax.device_put(centers[:num_classes], NamedSharding(mesh, P()))
  dense = _dense_step(mesh)
  compiled = dense.lower(replicated, emb, labels).compile()
  # centers + gradient (and its all-reduce buffer) + logits and their gradient.
  entries['full softmax, data parallel'] = (
      lambda: jax.block_until_ready(compiled(replicated, emb, labels)), compiled, num_classes,
      4 * (2 * num_classes * dim + 2 * m * num_classes))
  for rate in rates:
    step = _pfc_step(mesh, num_classes, rate)
    c = step.lower(centers, emb, labels, key).compile()
    s = partial_fc.sample_size(num_classes, NUM_DEVICES, rate)
    entries[f'Partial FC, rate {rate:g}'] = (
        (lambda c=c: jax.block_until_ready(c(centers, emb, labels, key))), c, s,
        4 * (2 * (c_pad // NUM_DEVICES) * dim + 2 * batch * s))
    print(f'  compiled: rate {rate:g}', file=sys.stderr, flush=True)

  # The losses agree where they should: the full softmax = Partial FC at rate 1.
  values = {name: float(e[0]()[0]) for name, e in entries.items()}
  walls, cpus = common.time_interleaved({n: e[0] for n, e in entries.items()}, repeats)
  results = {}
  for name, (_, compiled, columns, analytic) in entries.items():
    results[name] = {'wall_s': common.median(walls[name]), 'cpu_s': common.median(cpus[name]),
                     'columns': columns, 'analytic_bytes': analytic, 'loss': values[name],
                     **_memory(compiled)}
  return results


def run_shard_shape(num_classes: int, shards: int, dim: int, batch: int, time_batch: int,
                    rate: float, repeats: int) -> dict:
  cs = partial_fc.padded_num_classes(num_classes, shards) // shards
  s = partial_fc.sample_size(num_classes, shards, rate)
  mesh = jax.make_mesh((1, 1), partial_fc.AXES, devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  # One shard's classes are the whole class set of the one-device program: Cs rows, S of them
  # sampled (int(rate * Cs) is the same number).
  assert partial_fc.sample_size(cs, 1, rate) == s
  entries = {'full softmax (rate 1, model parallel)': 1.0, f'Partial FC, rate {rate:g}': rate}
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  kw = jax.random.key(0)
  centers = partial_fc.init_centers(kw, cs, dim, 1)
  emb = jax.random.normal(jax.random.key(1), (time_batch, dim))
  per_shard = max(1, batch // shards)  # the distinct positives a shard sees at `shards` devices
  normal = jnp.asarray(rng.choice(cs, per_shard, replace=False)[
      rng.integers(0, per_shard, time_batch)], jnp.int32)
  crowded = jnp.asarray(rng.choice(cs, min(cs, 2 * s, time_batch), replace=False)[
      np.arange(time_batch) % min(cs, 2 * s, time_batch)], jnp.int32)
  key = jax.random.key(2)
  results, calls = {}, {}
  for name, r in entries.items():
    step = _pfc_step(mesh, cs, r)
    big = step.lower(sds((cs, dim), jnp.float32), sds((batch, dim), jnp.float32),
                     sds((batch,), jnp.int32), key).compile()
    columns = partial_fc.sample_size(cs, 1, r)
    small = step.lower(centers, emb, normal, key).compile()
    results[name] = {'columns': columns, 'logits_bytes': 4 * batch * columns, **_memory(big)}
    calls[name] = lambda small=small, labels=normal: jax.block_until_ready(
        small(centers, emb, labels, key))
    if r < 1:
      calls[name + ', overflowing batch'] = lambda small=small: jax.block_until_ready(
          small(centers, emb, crowded, key))
      results[name + ', overflowing batch'] = dict(
          results[name], columns=min(cs, 2 * s),
          extra_block_bytes=4 * batch * -(-s // partial_fc.EXTRA_BLOCKS_PER_SAMPLE))
    print(f'  compiled: rate {r:g}', file=sys.stderr, flush=True)
  losses_seen = {n: float(c()[0]) for n, c in calls.items()}
  walls, cpus = common.time_interleaved(calls, repeats)
  for name in calls:
    results[name].update(wall_s=common.median(walls[name]), cpu_s=common.median(cpus[name]),
                         loss=losses_seen[name])
  return results


def main_shard_shape(args):
  num_classes = args.num_classes if args.num_classes != 200_000 else 2_059_906
  batch = args.batch if args.batch != 512 else 65_536
  rate = [float(r) for r in args.rates.split(',')][-1]
  results = run_shard_shape(num_classes, args.shards, args.dim, batch, args.time_batch, rate,
                            args.repeats)
  cs = partial_fc.padded_num_classes(num_classes, args.shards) // args.shards
  full = results['full softmax (rate 1, model parallel)']
  rows = []
  for name, r in results.items():
    logits = common.mib(r['logits_bytes'])
    if 'extra_block_bytes' in r:
      logits += f' + {common.mib(r["extra_block_bytes"])} per extra block'
    rows.append([name, f'{r["columns"]:,}', logits,
                 common.mib(r['temp']), common.mib(r['total']),
                 f'{full["total"] / r["total"]:.2f}x', f'{r["wall_s"]:.3f}',
                 f'{r["cpu_s"]:.2f}', f'{full["wall_s"] / r["wall_s"]:.2f}x'])
  header = ['classifier (one shard)', 'softmax columns', f'logits [{batch:,} x columns] f32',
            'temp / device', 'total / device', 'less memory', f'step wall s (batch '
            f'{args.time_batch:,})', 'step CPU s', 'speedup (wall)']
  text = report.table(header, rows)
  pfc = results[f'Partial FC, rate {rate:g}']
  ratio = full['total'] / pfc['total']
  checks = [
      f'Rate {rate:g} vs the full softmax at this shard shape: {ratio:.1f}x less memory per '
      f'device (XLA total), {full["temp"] / pfc["temp"]:.1f}x less temp, '
      f'{full["logits_bytes"] / pfc["logits_bytes"]:.1f}x smaller logits; target >= 5x: '
      f'{"met" if ratio >= 5 else "MISSED"}.',
      'The overflowing batch runs the same compiled program (one shape): its extra column '
      'blocks are computed only when a shard\'s positives exceed S, and recomputed in the '
      'backward pass, so its memory is the normal batch\'s.']
  print(text)
  for line in checks:
    print(line)
  body = (f'`python benchmarks/partial_fc.py --shard_shape`: one device\'s share of the '
          f'classifier (forward + backward w.r.t. embeddings and centers, ArcFace s=64 m=0.5) '
          f'for face_64k_lamb on {args.shards} devices: {num_classes:,} classes, {cs:,} rows per '
          f'shard, {args.dim}-d embeddings, the global batch of {batch:,} gathered on every '
          f'device. The per-device program on one CPU device (collectives over one device are '
          f'no-ops: one shard\'s work and memory, no communication). Memory: XLA\'s memory '
          f'analysis of the program compiled at batch {batch:,} (argument + output + temp; '
          f'nothing run at that size). Time: the same program at batch {args.time_batch:,} '
          f'({jax.default_backend()}'
          f'{"; the full batch takes minutes per call there" if jax.default_backend() == "cpu" else ""}'
          f'), labels as a shard sees them at '
          f'{args.shards} devices (~{max(1, batch // args.shards):,} distinct positives), median '
          f'of {args.repeats} interleaved runs.\n\n'
          + text + '\n\n' + '\n'.join(f'- {line}' for line in checks))
  if not args.no_docs:
    report.update_section('partial-fc-shard',
                          f'Partial FC at the {args.shards}-device shard shape', body)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shard_shape', action='store_true',
                      help='one shard of face_64k_lamb on --shards devices (module doc)')
  parser.add_argument('--shards', type=int, default=64)
  parser.add_argument('--time_batch', type=int, default=8192)
  parser.add_argument('--num_classes', type=int, default=200_000)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--rates', default='1.0,0.3,0.1')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--no_docs', action='store_true',
                      help='print only; do not write the section of docs/performance.md')
  args = parser.parse_args()
  if args.shard_shape:
    return main_shard_shape(args)
  rates = [float(r) for r in args.rates.split(',')]
  results = run(args.num_classes, args.dim, args.batch, rates, args.repeats)

  full = results['full softmax, data parallel']
  mp_name = 'Partial FC, rate 1'
  rows = []
  for name, r in results.items():
    vs_mp = f'{results[mp_name]["wall_s"] / r["wall_s"]:.2f}x' if mp_name in results else ''
    rows.append([name, f'{r["columns"]:,}', f'{r["wall_s"]:.3f}', f'{r["cpu_s"]:.2f}',
                 f'{full["wall_s"] / r["wall_s"]:.2f}x', f'{full["cpu_s"] / r["cpu_s"]:.2f}x',
                 vs_mp, common.mib(r['argument']), common.mib(r['output']),
                 common.mib(r['temp']), common.mib(r['total']), common.mib(r['analytic_bytes']),
                 f'{r["loss"]:.4f}'])
  header = ['classifier', 'softmax columns / device', 'step wall s', 'step CPU s',
            'speedup (wall)', 'speedup (CPU)', 'vs rate 1 (wall)', 'argument / device',
            'output / device', 'temp / device', 'total / device', 'centers+grad+logits',
            'loss']
  text = report.table(header, rows)
  checks = []
  name = 'Partial FC, rate 0.1'
  if name in results:
    speedup = full['wall_s'] / results[name]['wall_s']
    checks.append(f'Rate 0.1 vs the full softmax: {speedup:.2f}x faster (wall), '
                  f'{full["cpu_s"] / results[name]["cpu_s"]:.2f}x (CPU), '
                  f'{full["total"] / results[name]["total"]:.1f}x less memory per device; target '
                  f'>= {TARGET_SPEEDUP:g}x: {"met" if speedup >= TARGET_SPEEDUP else "MISSED"}.')
  if mp_name in results:
    diff = abs(results[mp_name]['loss'] - full['loss'])
    checks.append(f'Loss at rate 1 vs the full softmax: |diff| = {diff:.2e} (same function).')
  print(text)
  for line in checks:
    print(line)
  rows_per_device = partial_fc.padded_num_classes(args.num_classes, NUM_DEVICES) // NUM_DEVICES
  body = (f'`python benchmarks/partial_fc.py`: the classifier part of a step (forward + '
          f'backward w.r.t. embeddings and centers, ArcFace s=64 m=0.5) for '
          f'{args.num_classes:,} classes, {args.dim}-d embeddings, global batch {args.batch} on '
          f'{NUM_DEVICES} emulated CPU devices sharing the host\'s cores (times are the total '
          f'work of all 8). Full softmax: centers replicated, gradient all-reduced. Partial FC: '
          f'centers sharded {rows_per_device:,} rows per device, positives + random negatives. '
          f'Median of {args.repeats} interleaved runs; memory per device from XLA\'s memory '
          f'analysis of the compiled step.\n\n'
          + text + '\n\n' + '\n'.join(f'- {line}' for line in checks))
  if not args.no_docs:
    report.update_section('partial-fc', 'Partial FC vs the full softmax', body)
  return results


if __name__ == '__main__':
  main()
