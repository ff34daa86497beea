"""Convolution gradients on this backend: XLA's against bigbatch.models.conv's matrix products.

    python benchmarks/conv_grad.py [--batch=128] [--repeats=5] [--stack_batch=128] [--no_stack]

Part 1, single layers (3x3 64->64 at 32x32 is the headline; then the other shapes of a CIFAR
ResNet-18): forward, input gradient (dx), kernel gradient (dW) and the whole backward (dx and
dW from one vjp), for impl='xla' and impl='matmul'. Part 2, a ResNet-18-like CIFAR stack
(stem, 4 stages of 2 basic blocks, 1x1 stride-2 shortcuts; ReLU, no normalization): forward and
gradient w.r.t. all kernels.

Each entry is jit'ed, warmed up, and timed `repeats` times with block_until_ready, the two impls
interleaved so that load from other processes hits both alike; the table shows the median wall
time and the median CPU time of this process (on a shared machine, CPU time is the steadier
measure of work; wall < CPU means the work ran on several cores). Prints only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import report  # noqa: E402
from bigbatch.models import conv  # noqa: E402

IMPLS = ('xla', 'matmul')
# (name, spatial size, in channels, out channels, kernel, stride): the convolutions of a CIFAR
# ResNet-18, the first one being the layer the task is about.
LAYERS = [
    ('3x3 64->64', 32, 64, 64, 3, 1),
    ('stem 3x3 3->64', 32, 3, 64, 3, 1),
    ('3x3/2 64->128', 32, 64, 128, 3, 2),
    ('1x1/2 64->128', 32, 64, 128, 1, 2),
    ('3x3 128->128', 16, 128, 128, 3, 1),
    ('3x3 256->256', 8, 256, 256, 3, 1),
    ('3x3 512->512', 4, 512, 512, 3, 1),
]


def time_interleaved(fns: dict, args, repeats: int) -> dict:
  """{name: (median wall s, median process CPU s)}; one warm-up call (compilation) each."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  walls = {k: [] for k in fns}
  cpus = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      c, t = time.process_time(), time.perf_counter()
      jax.block_until_ready(f(*args))
      walls[k].append(time.perf_counter() - t)
      cpus[k].append(time.process_time() - c)
  return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def layer_fns(impl: str, stride: int) -> dict:
  f = lambda x, w: conv.conv2d(x, w, stride, 'SAME', impl=impl)
  return {
      'fwd': jax.jit(lambda x, w, dy: f(x, w)),
      'dx': jax.jit(lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0]),
      'dW': jax.jit(lambda x, w, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]),
      'dx+dW': jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy)),
  }


def bench_layer(batch, size, cin, cout, k, stride, repeats):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, size, size, cin), jnp.float32)
  w = jax.random.normal(kw, (k, k, cin, cout), jnp.float32) * (k * k * cin) ** -0.5
  out = -(-size // stride)
  dy = jax.random.normal(kg, (batch, out, out, cout), jnp.float32)
  fns = {(impl, part): f for impl in IMPLS for part, f in layer_fns(impl, stride).items()}
  return time_interleaved(fns, (x, w, dy), repeats)


def resnet18_params(key, width=64, num_classes=10):
  """Kernels of a CIFAR ResNet-18: [(name, kernel, stride)], plus the head."""
  keys = iter(jax.random.split(key, 64))
  init = lambda k, cin, cout: (jax.random.normal(next(keys), (k, k, cin, cout), jnp.float32)
                               * (2.0 / (k * k * cin)) ** 0.5)
  params = {'stem': init(3, 3, width)}
  cin = width
  for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
    for block in range(2):
      stride = 2 if stage > 0 and block == 0 else 1
      name = f's{stage}b{block}'
      params[name + 'a'] = init(3, cin, cout)
      params[name + 'b'] = init(3, cout, cout)
      if stride != 1 or cin != cout:
        params[name + 'sc'] = init(1, cin, cout)
      cin = cout
  params['head'] = jax.random.normal(next(keys), (cin, num_classes), jnp.float32) * cin ** -0.5
  return params


def resnet18_loss(params, x, labels, impl):
  c = lambda h, name, stride: conv.conv2d(h, params[name], stride, 'SAME', impl=impl)
  h = jax.nn.relu(c(x, 'stem', 1))
  for stage in range(4):
    for block in range(2):
      stride = 2 if stage > 0 and block == 0 else 1
      name = f's{stage}b{block}'
      r = jax.nn.relu(c(h, name + 'a', stride))
      r = c(r, name + 'b', 1)
      sc = c(h, name + 'sc', stride) if name + 'sc' in params else h
      # Scaled residual sum keeps activations O(1) without normalization layers.
      h = jax.nn.relu((r + sc) * 0.5 ** 0.5)
  logits = jnp.mean(h, axis=(1, 2)) @ params['head']
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def bench_stack(batch, repeats):
  kp, kx, kl = jax.random.split(jax.random.PRNGKey(1), 3)
  params = resnet18_params(kp)
  x = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(kl, (batch,), 0, 10)
  fns = {}
  for impl in IMPLS:
    fns[(impl, 'fwd')] = jax.jit(lambda p, x, l, impl=impl: resnet18_loss(p, x, l, impl))
    fns[(impl, 'fwd+grad')] = jax.jit(
        lambda p, x, l, impl=impl: jax.value_and_grad(resnet18_loss)(p, x, l, impl))
  return time_interleaved(fns, (params, x, labels), repeats)


def fmt(t):
  return f'{t[0]:.3f} ({t[1]:.3f})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--stack_batch', type=int, default=128)
  parser.add_argument('--stack_repeats', type=int, default=3)
  parser.add_argument('--no_stack', action='store_true')
  parser.add_argument('--layers', type=int, default=len(LAYERS),
                      help='benchmark only the first this many layers of the list')
  args = parser.parse_args()
  print(f'Machine: {report.machine()}')
  print(f'conv impl auto -> {conv.resolve_impl("auto")}; times: median wall s (median CPU s)\n')

  rows = []
  for name, size, cin, cout, k, stride in LAYERS[:args.layers]:
    t = bench_layer(args.batch, size, cin, cout, k, stride, args.repeats)
    for part in ('fwd', 'dx', 'dW', 'dx+dW'):
      xla, mm = t[('xla', part)], t[('matmul', part)]
      rows.append([name if part == 'fwd' else '', part, fmt(xla), fmt(mm),
                   f'{xla[0] / mm[0]:.2f}x'])
    print(f'  done: {name}', file=sys.stderr, flush=True)
  print(f'Single layers, batch {args.batch}, float32, SAME padding:\n')
  print(report.table(['layer', 'part', 'xla', 'matmul', 'speed-up (wall)'], rows))

  if not args.no_stack:
    t = bench_stack(args.stack_batch, args.stack_repeats)
    rows = [[part, fmt(t[('xla', part)]), fmt(t[('matmul', part)]),
             f'{t[("xla", part)][0] / t[("matmul", part)][0]:.2f}x']
            for part in ('fwd', 'fwd+grad')]
    print(f'\nResNet-18-like CIFAR stack (no BN), batch {args.stack_batch}, 32x32x3, float32:\n')
    print(report.table(['part', 'xla', 'matmul', 'speed-up (wall)'], rows))


if __name__ == '__main__':
  main()
