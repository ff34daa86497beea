"""Peak memory of a train step against the number of accumulated microbatches.

    python benchmarks/memory.py [--model=cifar_resnet20] [--microbatch=128] [--ks=1,4,16]

The same microbatch (128 examples of 32x32x3) is accumulated k = 1, 4, 16 times per update
(global batch = k x microbatch) on one device. Accumulation exists so that a batch k times larger
costs no more memory than one microbatch: activations live for one microbatch at a time inside
the scan, the gradient sum is one parameter-sized buffer. What grows with k is the batch itself
(the input, k x 1.5 MiB here) and the per-microbatch metrics and BN statistics stacked by the scan.

Memory is XLA's own account of the compiled step (`compiled.memory_analysis()`): argument
(state + batch), output (new state + metrics), temp (every intermediate buffer, activations
included); peak = argument + output + temp. The step donates its state, so most of the output
aliases the argument (the alias column); argument + output - alias + temp is the smaller,
tighter figure and gives the same ratios to within a percent. Compiled, not run: deterministic,
so no repeats are needed. Both convolution backward passes are tried ('xla' and 'matmul', the
one 'auto' picks on CPU); an impl whose step does not compile is reported as such.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import report  # noqa: E402

TARGET_RATIO = 1.2  # peak(k=16) <= 1.2 x peak(k=1)


def measure(model: str, k: int, microbatch: int, conv_impl: str) -> dict:
  trainer = common.build(common.config(model, k=k, microbatch=microbatch, conv_impl=conv_impl),
                         jax.devices()[:1])
  m = common.compile_step(trainer, k, microbatch).memory_analysis()
  out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
         'alias': m.alias_size_in_bytes, 'temp': m.temp_size_in_bytes}
  out['peak'] = out['argument'] + out['output'] + out['temp']
  out['live'] = out['peak'] - out['alias']
  image, _, _ = common.IMAGE_SHAPE
  out['batch'] = k * microbatch * (image * image * common.IMAGE_SHAPE[2] * 4 + 4)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='cifar_resnet20', choices=sorted(common.MODELS))
  parser.add_argument('--microbatch', type=int, default=128)
  parser.add_argument('--ks', default='1,4,16')
  parser.add_argument('--impls', default='xla,matmul')
  args = parser.parse_args()
  ks = [int(k) for k in args.ks.split(',')]
  rows, notes, verdicts = [], [], []
  for impl in args.impls.split(','):
    results = {}
    for k in ks:
      try:
        results[k] = measure(args.model, k, args.microbatch, impl)
      except Exception as e:  # pylint: disable=broad-except
        notes.append(f'conv_impl={impl}, k={k}: the step does not compile: {common.first_line(e)}')
        print(notes[-1], file=sys.stderr, flush=True)
        break
      print(f'  done: {impl} k={k}', file=sys.stderr, flush=True)
    if not results:
      continue
    base = results[min(results)]
    for k, r in results.items():
      ratio = r['peak'] / base['peak']
      target = f'<= {TARGET_RATIO}x (k=1)' if k == max(ks) else ''
      rows.append([impl, k, k * args.microbatch, common.mib(r['batch']), common.mib(r['argument']),
                   common.mib(r['output']), common.mib(r['alias']), common.mib(r['temp']),
                   common.mib(r['peak']), f'{ratio:.3f}x', f'{r["live"] / base["live"]:.3f}x',
                   target])
    if max(ks) in results and min(ks) in results:
      ratio = results[max(ks)]['peak'] / base['peak']
      verdicts.append(f'conv_impl={impl}: peak at k={max(ks)} is {ratio:.3f}x k={min(ks)} '
                      f'(target <= {TARGET_RATIO}x): '
                      f'{"met" if ratio <= TARGET_RATIO else "MISSED"}.')
  header = ['conv impl', 'k', 'global batch', 'batch input', 'argument', 'output', 'alias',
            'temp', 'peak (arg+out+temp)', 'peak / k=1', 'live (peak-alias) / k=1', 'target']
  text = report.table(header, rows)
  print(text)
  for line in verdicts + notes:
    print(line)
  body = (f'`python benchmarks/memory.py`: XLA\'s memory analysis of the compiled train step '
          f'(`compiled.memory_analysis()`), {common.LABELS[args.model]}, SGD, sync BN, microbatch '
          f'{args.microbatch} of 32x32x3 float32 accumulated k times per update, one device. '
          f'Peak = argument (state + batch) + output (state + metrics) + temp (all intermediates); '
          f'the state is donated, so most of the output aliases the argument (alias column). '
          f'Compiled, not run, so the figures do not depend on machine load.\n\n' + text + '\n\n'
          + '\n'.join(f'- {line}' for line in verdicts + notes))
  report.update_section('memory', 'Peak memory vs gradient accumulation', body)


if __name__ == '__main__':
  main()
