"""Whether each accelerator config's train step fits the device memory of the hardware its
docstring names, estimated on CPU.

  python benchmarks/fit.py [--configs=r50_64k,...] [--jobs=2] [--no_check] [--no_write]

For each config x hardware in TOPOLOGIES, the per-device microbatch the topology implies
(global_batch / devices / accumulation_steps) is estimated by a linear rule: the train step,
with the config's real model, image size, optimizer and dtype, is compiled on emulated CPU
devices from abstract inputs at microbatches of 8 and 16 per device, and XLA's per-device
peak (argument + output - alias + temp, derive.compiled_memory) is fitted as a + b x microbatch
and extrapolated. With the convolutions' own XLA gradient (conv_impl=xla, what GPU and TPU run;
'auto' picks the im2col gradient on CPU, whose buffers and compile time grow with the batch) a
compile takes about as long at the real microbatch as at 8, so the real microbatch is compiled
too (unless --no_check) and the rule's error is measured against it at every row. A row that
does not fit is compiled again with accumulation_steps = 2, 4, ... until it fits.

Emulated devices: image classification replicates its state, so its per-device step is the
same on 8 devices as on 1,024 (the all-reduce is the same size) and 8 are emulated. The face
task splits its class centers over all devices and each device's softmax spans the global
microbatch (embeddings are all-gathered), so the topology's own device count is emulated.

XLA:CPU's buffer assignment and layouts are not TPU's or GPU's (TPU tiles and pads arrays to
(8, 128) for float32 and (16, 128) for bfloat16; fusion and rematerialization decisions
differ), so the figure is an estimate; a config x hardware "fits" only with >= 10% headroom.
Device memory per device: DEVICES below, each with its public source.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

GiB = 2**30
GB = 10**9
HEADROOM = 0.10  # a config fits a device when its estimated peak leaves this fraction free
FIT_MICROBATCHES = (8, 16)
ACCUMULATION_TRIES = (2, 4, 8, 16)
EMULATED_DEVICES = 8  # image classification (replicated state); the face task emulates all


@dataclasses.dataclass(frozen=True)
class Device:
  """One JAX device of a kind of hardware: its memory in bytes, what the device is, and where
  the number comes from (read on 2026-12-07). Vendors' "GB" is taken as 10^9 bytes, the lower
  reading of the two."""
  memory_bytes: int
  unit: str
  source: str


DEVICES = {
    'TPU v3': Device(16 * GiB, 'one TensorCore (2 per chip; 32 GiB HBM2 per chip)',
                     'https://cloud.google.com/tpu/docs/v3'),
    'TPU v4': Device(32 * GiB, 'one chip (2 TensorCores as one device; v4-N has N/2 chips)',
                     'https://cloud.google.com/tpu/docs/v4'),
    'TPU v5e': Device(16 * GB, 'one chip (one TensorCore)',
                      'https://cloud.google.com/tpu/docs/v5e'),
    'TPU v5p': Device(95 * GB, 'one chip (v5p-N has N/2 chips)',
                      'https://cloud.google.com/tpu/docs/v5p-training'),
    'TPU v6e': Device(32 * GB, 'one chip (one TensorCore)',
                      'https://docs.cloud.google.com/tpu/docs/v6e'),
    'V100 16GB': Device(16 * GB, 'one GPU', 'NVIDIA Tesla V100 PCIe product brief PB-08744-001 '
                        '(images.nvidia.com/content/tesla/pdf/Tesla-V100-PCIe-Product-Brief.pdf)'),
    'A100 40GB': Device(40 * GB, 'one GPU', 'NVIDIA A100 datasheet (nvidia.com, '
                        'nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)'),
    'A100 80GB': Device(80 * GB, 'one GPU', 'NVIDIA A100 datasheet (as above)'),
    'H100 80GB': Device(80 * GB, 'one GPU',
                        'https://docs.nvidia.com/launchpad/ai/h100-mig/latest/h100-mig-gpu.html'),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  label: str  # as a docstring names it, e.g. 'TPU v3-1024'
  device: str  # a DEVICES key
  devices: int  # JAX devices


# What each accelerator config's docstring "Hardware:" line names.
_R50_32K = (Topology('TPU v3-256', 'TPU v3', 256), Topology('TPU v3-512', 'TPU v3', 512),
            Topology('256 x A100 40GB', 'A100 40GB', 256))  # both 32k ResNet-50 recipes
TOPOLOGIES = {
    'r50_baseline': (Topology('8 x V100 16GB', 'V100 16GB', 8),
                     Topology('TPU v3-8', 'TPU v3', 8)),
    'r50_8k_goyal': (Topology('256 x V100 16GB', 'V100 16GB', 256),
                     Topology('TPU v3-256', 'TPU v3', 256)),
    'r50_32k_lamb': _R50_32K,
    'r50_32k_nesterov': _R50_32K,
    'r50_64k': (Topology('TPU v3-1024', 'TPU v3', 1024),
                Topology('512 x A100 40GB', 'A100 40GB', 512)),
    'face_r100_cosface_4k': (Topology('8 x A100 80GB', 'A100 80GB', 8),
                             Topology('8 x H100 80GB', 'H100 80GB', 8),
                             Topology('TPU v4-32', 'TPU v4', 16)),
    'face_64k_lamb': (Topology('TPU v4-128', 'TPU v4', 64),
                      Topology('64 x H100 80GB', 'H100 80GB', 64)),
}


def headroom(peak_bytes: float, device: str) -> float:
  """The fraction of the device's memory left free by a step that needs peak_bytes."""
  return 1.0 - peak_bytes / DEVICES[device].memory_bytes


def fits(peak_bytes: float, device: str) -> bool:
  """Whether peak_bytes leaves at least HEADROOM of the device's memory free."""
  return headroom(peak_bytes, device) >= HEADROOM


def per_device_microbatch(global_batch: int, devices: int, accumulation_steps: int = 1) -> int:
  """Examples per device per microbatch; raises ValueError where they do not divide."""
  if global_batch % (devices * accumulation_steps):
    raise ValueError(f'global batch {global_batch} does not split over {devices} devices x '
                     f'{accumulation_steps} microbatches')
  return global_batch // (devices * accumulation_steps)


def linear_fit(points: dict[int, float]) -> tuple[float, float]:
  """(a, b) of memory = a + b * microbatch through two (microbatch, bytes) points."""
  (m0, y0), (m1, y1) = sorted(points.items())[:2]
  b = (y1 - y0) / (m1 - m0)
  return y0 - b * m0, b


def predict(fit: tuple[float, float], microbatch: int) -> float:
  a, b = fit
  return a + b * microbatch


def emulated_devices(config, devices: int) -> int:
  """How many CPU devices reproduce the topology's per-device step (see the module doc)."""
  return devices if config.task == 'face' else min(devices, EMULATED_DEVICES)


def step_config(config, microbatch: int, devices: int, accumulation_steps: int = 1):
  """A copy of config whose step on `devices` devices has this per-device microbatch: the
  global batch scaled, BN groups capped at the microbatch (their statistics are a few numbers
  per channel), XLA's own convolution gradient (GPU and TPU's)."""
  c = config.copy_and_resolve_references()
  c.model.conv_impl = 'xla'
  c.accumulation_steps = accumulation_steps
  c.global_batch = microbatch * devices * accumulation_steps
  if c.num_steps is not None:  # a run fixed in steps: keep its warmup inside it
    c.num_steps = max(1, c.num_steps * config.global_batch // c.global_batch)
  if c.model.bn_group_size is not None and c.model.bn_group_size > microbatch:
    c.model.bn_group_size = microbatch
  c.eval_batch = devices * max(1, c.eval_batch // devices)
  return c


def compiled_peak(config, devices=None) -> dict:
  """derive.compiled_memory of config's train step on `devices` (default: all), its data set's
  shapes from data.facts, nothing allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from bigbatch import config_lib, data, derive, sharding, trainer
  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(config, len(devices))
  facts = data.facts(config)
  t = trainer.build(config, sharding.make_mesh(config, devices), num_train=facts.num_train,
                    image_shape=facts.image_shape, num_classes=facts.num_classes,
                    initialize=False)
  return derive.compiled_memory(config, t, facts.image_shape)


def load(name: str):
  return importlib.import_module(f'configs.{name}').get_config()


def _step_key(config) -> str:
  """What the step's memory depends on (not the lr schedule): configs with equal keys share a
  compile."""
  return json.dumps([config.task, config.model.to_dict(), config.optimizer.to_dict(),
                     config.face.to_dict(), config.data.name, config.data.image_size,
                     config.ema_decay, config.global_batch, config.accumulation_steps],
                    sort_keys=True, default=str)


def _child(spec: dict) -> None:
  c = step_config(load(spec['config']), spec['microbatch'], spec['devices'], spec['k'])
  started = time.monotonic()
  out = compiled_peak(c)
  out['wall_s'] = time.monotonic() - started
  print(json.dumps(out), flush=True)


def _run(spec: dict) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={spec["devices"]}')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  out = subprocess.run([sys.executable, __file__, '--child', json.dumps(spec)], env=env,
                       cwd=os.path.join(os.path.dirname(__file__), '..'), capture_output=True,
                       text=True, check=False, timeout=1800)
  if out.returncode:
    raise RuntimeError(f'{spec}: {out.stderr.strip().splitlines()[-3:]}')
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(f'  {spec["config"]} m={spec["microbatch"]} k={spec["k"]} on {spec["devices"]}: '
        f'{result["peak_estimate"] / GiB:.2f} GiB, {result["wall_s"]:.0f} s', flush=True)
  return result


class Compiler:
  """Runs each distinct step once, in a fresh process per compile, `jobs` at a time."""

  def __init__(self, jobs: int):
    self.pool = concurrent.futures.ThreadPoolExecutor(jobs)
    self.futures: dict[str, concurrent.futures.Future] = {}

  def submit(self, name: str, microbatch: int, devices: int, k: int = 1):
    key = _step_key(step_config(load(name), microbatch, devices, k)) + f'|{devices}'
    if key not in self.futures:
      spec = {'config': name, 'microbatch': microbatch, 'devices': devices, 'k': k}
      self.futures[key] = self.pool.submit(_run, spec)
    return self.futures[key]


def _gib(n: float) -> str:
  return f'{n / GiB:.2f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(TOPOLOGIES))
  parser.add_argument('--jobs', type=int, default=2)
  parser.add_argument('--no_check', action='store_true', help='skip the real-size compiles')
  parser.add_argument('--no_write', action='store_true')
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(json.loads(args.child))
    return
  started = time.monotonic()
  compiler = Compiler(args.jobs)
  rows = []
  for name in args.configs.split(','):
    config = load(name)
    for topo in TOPOLOGIES[name]:
      m = per_device_microbatch(config.global_batch, topo.devices, config.accumulation_steps)
      e = emulated_devices(config, topo.devices)
      points = {p: compiler.submit(name, p, e, config.accumulation_steps)
                for p in FIT_MICROBATCHES}
      real = (None if args.no_check or m in FIT_MICROBATCHES else
              compiler.submit(name, m, e, config.accumulation_steps))
      rows.append((name, config, topo, m, e, points, real))
  results, errors = [], []
  for name, config, topo, m, e, points, real in rows:
    try:
      results.append(_row(compiler, name, config, topo, m, e, points, real, errors))
    except Exception as err:  # pylint: disable=broad-except
      results.append([name, topo.label, f'{topo.devices:,}', m, e] + ['-'] * 8
                     + [f'not compiled: {str(err)[-200:]}'])
    print(results[-1], flush=True)
  elapsed = time.monotonic() - started
  header = ['config', 'hardware', 'devices', 'microbatch per device', 'emulated devices',
            'a GiB', 'b MiB / example', 'rule GiB', 'compiled GiB', 'rule error',
            'device GiB', 'headroom', 'fits (>= 10%)', 'what to change']
  table = report_table(header, results)
  summary = summarize(errors)
  print(table)
  print(summary)
  print(f'{elapsed:.0f} s in all')
  if not args.no_write:
    write(table, summary, elapsed, args.jobs)


def _row(compiler, name, config, topo, m, e, points, real, errors) -> list:
  """One table row: the rule's and the compiled peak, the verdict, what to change."""
  fit = linear_fit({p: f.result()['peak_estimate'] for p, f in points.items()})
  rule = predict(fit, m)
  direct = real.result()['peak_estimate'] if real is not None else None
  if direct is not None:
    errors.append((name, m, (rule - direct) / direct))
  peak = max(rule, direct or 0.0)
  change = ''
  if not fits(peak, topo.device):
    change = 'does not fit at any accumulation tried'
    for k in ACCUMULATION_TRIES:
      if m % k or (config.model.bn_group_size and (m // k) % config.model.bn_group_size):
        continue
      k_peak = compiler.submit(name, m // k, e, k).result()['peak_estimate']
      if fits(k_peak, topo.device):
        change = (f'`--config.accumulation_steps={k}`: {m // k} per microbatch, '
                  f'{_gib(k_peak)} GiB ({100 * headroom(k_peak, topo.device):.0f}% free)')
        break
  return [name, topo.label, f'{topo.devices:,}', m, e, _gib(fit[0]), f'{fit[1] / 2**20:.1f}',
          _gib(rule), _gib(direct) if direct is not None else '-',
          f'{(rule - direct) / direct * 100:+.1f}%' if direct is not None else '-',
          f'{DEVICES[topo.device].memory_bytes / GiB:.1f}',
          f'{100 * headroom(peak, topo.device):.0f}%',
          'yes' if fits(peak, topo.device) else 'NO', change]


def summarize(errors: list[tuple[str, int, float]], tolerance: float = 0.10) -> str:
  """The rule's error (rule - compiled) / compiled over rows (config, microbatch, error): its
  range where it holds (within `tolerance`), and the rows where it does not."""
  if not errors:
    return 'Rule error not measured (--no_check).'
  held = [e for e in errors if abs(e[2]) <= tolerance]
  failed = [e for e in errors if abs(e[2]) > tolerance]
  out = []
  if held:
    out.append(f'The rule\'s error, (rule - compiled) / compiled, is {min(e[2] for e in held):+.1%}'
               f' to {max(e[2] for e in held):+.1%} on {len(held)} of {len(errors)} rows '
               f'({", ".join(sorted({e[0] for e in held}))}).')
  if failed:
    cases = ', '.join(f'{n} at {m}: {e:+.1%}' for n, m, e in dict.fromkeys(failed))
    out.append(
        f'It fails on {len(failed)} rows ({cases}): there the peak hardly grows between the two '
        'fit points (b near 0 in the table), because a part of the step that does not depend '
        'on the microbatch sets the peak at 8 and 16 examples, and the activations take over '
        'only at a larger microbatch. The verdict therefore takes the larger of rule and '
        'compiled, and the real microbatch is compiled by default.')
  return ' '.join(out)

def report_table(header, rows) -> str:
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  return report.table(header, rows)


def write(table: str, summary: str, elapsed: float, jobs: int) -> None:
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  devices = report.table(['device kind', 'memory per JAX device', 'a JAX device is', 'source'], [
      [k, f'{d.memory_bytes / GiB:.1f} GiB', d.unit, d.source] for k, d in DEVICES.items()])
  body = (
      '`python benchmarks/fit.py`: for every accelerator config and each hardware its docstring '
      'names, the per-device peak memory of the train step (XLA\'s `memory_analysis()`: '
      'argument + output - alias + temp, the state donated) compiled on emulated CPU devices '
      'from abstract inputs with the config\'s real model, image size, optimizer and dtype, and '
      'the convolutions\' XLA gradient (`conv_impl=xla`, as on GPU and TPU). The rule: compile '
      f'at {FIT_MICROBATCHES[0]} and {FIT_MICROBATCHES[1]} examples per device, fit '
      'peak = a + b x microbatch, extrapolate to the topology\'s microbatch (global batch / '
      'devices / accumulation steps). With the XLA gradient the real microbatch compiles about '
      'as fast, so it is compiled too ("compiled") and the rule\'s error measured on it. Image '
      'classification replicates its state, so 8 emulated devices give the per-device step of '
      'any data-parallel topology; the face task emulates the topology\'s device count (the '
      'class centers are split over every device and each device\'s Partial FC logits span the '
      'global microbatch). The verdict takes the larger of rule and compiled. '
      '**XLA:CPU\'s buffer assignment and layouts are not TPU\'s or GPU\'s** (TPU pads arrays '
      'to (8, 128) tiles, (16, 128) in bfloat16; fusion, rematerialization and scheduling '
      'differ; a GPU process also holds the CUDA context and its allocator\'s fragmentation): '
      'the figures are estimates, and the 10% headroom required is the margin for that. On '
      'XLA:CPU a bfloat16 step needs no less per example than a float32 one (column b: '
      'r50_baseline and r50_8k_goyal are float32, the other configs bfloat16), where a TPU or '
      'GPU keeps bfloat16 activations at half the bytes, so for the bfloat16 configs the '
      'estimate likely errs high. Rows '
      'that do not fit are compiled again with 2, 4, ... accumulated microbatches until one '
      f'fits. Run time: {elapsed / 60:.1f} min with {jobs} compiles at a time (`--no_check` '
      'leaves out the real-size compiles).\n\n'
      + table + '\n\n' + summary + '\n\nDevice memory (read on 2026-12-07; vendors\' GB taken '
      'as 10^9 bytes):\n\n' + devices)
  report.update_section('fit', 'Does each accelerator config fit its hardware?', body)


if __name__ == '__main__':
  main()
