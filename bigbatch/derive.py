"""What a config will do, worked out without running it (`main --print_derived`).

`derive(config)` gathers, for this process's devices, every number a run would compute before
its first update: the data set's size (from the config, a prepared copy's metadata, or the
published size; never downloaded or prepared here), the batch split over the mesh, the
schedule (schedule.resolve, the same function the run uses), the eval and checkpoint steps (the
hooks' own `Every`), the parameter count from `jax.eval_shape` (trainer.build with
initialize=False: nothing is allocated), and with memory=True the train step lowered and
compiled on abstract inputs for XLA's per-device memory analysis. `format` renders it as text.

Nothing is written: no workdir, no checkpoint, no data set preparation, no compilation cache.
`run_info` is also what the loop logs and writes to workdir/derived.json, so both agree.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import types
from typing import Any, Sequence

import jax
import numpy as np

from bigbatch import core_config
from bigbatch import data as data_lib
from bigbatch import hooks as hooks_lib
from bigbatch import optim
from bigbatch import schedule
from bigbatch import sharding

DataFacts = data_lib.DataFacts


def data_facts(config) -> DataFacts:
  """The training set's size, image shape and classes, as the run's data source would find
  them, without downloading or preparing anything: the source's own `facts`."""
  return data_lib.facts(config)


def run_info(config, derived: schedule.Resolved, mesh) -> dict:
  """The run's derived numbers as the loop logs them and writes workdir/derived.json."""
  return {'derived': derived.as_dict(), 'mesh': dict(mesh.shape),
          'devices': jax.device_count(), 'processes': jax.process_count(),
          'examples_per_device_per_microbatch':
              config.global_batch // (config.accumulation_steps * mesh.shape['data'])}


def _fires(every: hooks_lib.Every, derived: schedule.Resolved) -> list[int]:
  """The updates after which `every` fires in an uninterrupted run: the hooks' own rule."""
  run = types.SimpleNamespace(total=derived.total_steps, should_stop=False, derived=derived)
  return [s for s in range(1, derived.total_steps + 1) if every(run, s)]


def _cadence(config, derived: schedule.Resolved) -> dict:
  out = {}
  for name, every in (
      ('eval', hooks_lib.Every(steps=config.eval_every_steps, epochs=config.eval_every_epochs)),
      ('checkpoint', hooks_lib.Every(steps=config.checkpoint_every_steps)),
      ('log', hooks_lib.Every(steps=config.log_every_steps))):
    steps = _fires(every, derived)
    if every.steps:
      rule = f'every {every.steps:,} steps and at the end'
    elif every.epochs and derived.phases:
      rule = f'every {every.epochs:g} epochs and at the end'
    elif every.epochs:  # Every's own rounding: whole passes of floor(N / B) steps
      rule = (f'every {every.epochs:g} epochs = '
              f'{max(1, round(every.epochs * derived.steps_per_epoch)):,} steps, and at the end')
    else:
      rule = 'at the end only'
    out[name] = {'count': len(steps), 'rule': rule,
                 'steps': steps if len(steps) <= 12 else steps[:5] + steps[-2:]}
  return out


def _schedule(config, derived: schedule.Resolved) -> dict:
  """The peak lr and how it was reached, and the lr at the schedule's turning points."""
  lr = config.lr
  if lr.scaling == 'table':
    row = schedule.table_row(config)  # the run's own lookup
    below = [r[0] for r in lr.table if r[0] < row[0]]
    batches = (f'batches {below[-1] + 1:,} to {row[0]:,}' if below else f'batches <= {row[0]:,}'
               ) if row[0] < 1 << 30 else f'batches above {below[-1]:,}' if below else 'any batch'
    rule = f'lr.table row for {batches}: peak {row[1]:g}' + (
        f', warmup {row[2]:g} epochs' if row[2] is not None else '')
  else:
    ratio = derived.global_batch / lr.base_batch
    rule = (f'{lr.scaling}: base_lr {lr.base_lr:g} at batch {lr.base_batch:,} x '
            f'{schedule.scaling_factor(lr.scaling, ratio):.6g}')
  lr_fn = optim.lr_schedule(config, derived)
  total = derived.total_steps
  if derived.adascale_scale:  # the base schedule, in steps of the global batch (tau / S)
    total = derived.schedule_steps
    rule += (f'; AdaScale: lr = gain (1 to S = {derived.adascale_scale:.6g}) x lr_at_step at '
             f'tau / S, at most {derived.total_steps:,} steps')
  points = {0, derived.warmup_steps, total // 4, total // 2, 3 * total // 4, total - 1, total}
  for b in derived.boundaries_steps:
    points |= {b - 1, b}
  for p in derived.phases:
    points.add(p.start_step)
  points = sorted(s for s in points if 0 <= s <= total)
  values = jax.device_get([lr_fn(s, derived.peak_lr) for s in points])
  shape = ('linear warmup from {:g} over {:,} steps, then '.format(lr.warmup_init_lr,
                                                                    derived.warmup_steps)
           if derived.warmup_steps else '')
  if lr.decay == 'step':
    shape += (f'step: x{lr.decay_factor:g} at steps '
              f'{", ".join(f"{b:,}" for b in derived.boundaries_steps)}')
  elif lr.decay == 'polynomial':
    shape += f'polynomial (power {lr.power:g}) decay to {lr.end_lr:g}'
  elif lr.decay in ('cosine', 'linear'):
    shape += f'{lr.decay} decay to {lr.end_lr:g}'
  else:
    shape += 'constant'
  return {'rule': rule, 'shape': shape, 'lr_at_step': {int(s): float(v)
                                                       for s, v in zip(points, values)}}


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes_per_device(tree) -> int:
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _parameters(config, trainer, num_classes: int) -> dict:
  params = trainer.state.params
  out = {'total': _count(params),
         'by_module': {str(k): _count(v) for k, v in params.items()},
         'state_bytes_per_device': {
             name: _bytes_per_device(getattr(trainer.state, name))
             for name in ('params', 'batch_stats', 'opt_state', 'ema_params')}}
  if config.task == 'face':
    from bigbatch.face import partial_fc  # pylint: disable=g-import-not-at-top
    centers = params['centers']
    shards = trainer.mesh.devices.size
    microbatch = config.global_batch // config.accumulation_steps
    out['class_centers'] = {
        'classes': num_classes, 'rows': centers.shape[0], 'dim': centers.shape[1],
        'shards': shards, 'rows_per_shard': centers.sharding.shard_shape(centers.shape)[0],
        'sampled_rows_per_shard': partial_fc.sample_size(num_classes, shards,
                                                         config.face.sample_rate),
        'max_rows_per_shard': partial_fc.capacity(num_classes, shards, microbatch,
                                                  config.face.sample_rate)}
  return out


def abstract_batch(config, trainer, image_shape) -> dict:
  """ShapeDtypeStructs of one global batch [microbatches, examples, ...], as the loop feeds."""
  k, m = config.accumulation_steps, config.global_batch // config.accumulation_steps
  s = trainer.batch_sharding
  return {'image': jax.ShapeDtypeStruct((k, m, *image_shape), np.float32, sharding=s),
          'label': jax.ShapeDtypeStruct((k, m), np.int32, sharding=s)}


def compiled_memory(config, trainer, image_shape) -> dict:
  """XLA's memory analysis of the train step compiled for these devices on abstract inputs
  (per device; bytes), and how long lowering and compiling took."""
  started = time.monotonic()
  compiled = trainer.train_step.lower(trainer.state,
                                      abstract_batch(config, trainer, image_shape)).compile()
  seconds = time.monotonic() - started
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {'available': False, 'compile_seconds': seconds}
  out = {k: int(getattr(analysis, f'{k}_size_in_bytes')) for k in
         ('argument', 'output', 'alias', 'temp', 'generated_code')}
  # Arguments and outputs share the donated (aliased) state buffers.
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  out.update(available=True, compile_seconds=seconds)
  return out


def derive(config, devices: Sequence[jax.Device] | None = None, *,
           memory: bool = False) -> dict:
  """Everything `format` prints, as plain data (JSON-serializable). The config must have been
  validated for these devices (config_lib.validate). memory=True compiles the train step."""
  from bigbatch import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  devices = list(devices if devices is not None else jax.devices())
  mesh = sharding.make_mesh(config, devices)
  data_axis = mesh.shape['data']
  k = config.accumulation_steps
  out: dict[str, Any] = {
      'config': {'task': config.task, 'data': config.data.name, 'model': config.model.name,
                 'optimizer': config.optimizer.name},
      'hardware': {'platform': devices[0].platform, 'device_kind': devices[0].device_kind,
                   'devices': len(devices), 'processes': jax.process_count(),
                   'mesh': dict(mesh.shape)},
      'batch': {'global_batch': config.global_batch, 'microbatches': k,
                'microbatch': config.global_batch // k,
                'per_device': config.global_batch // data_axis,
                'per_device_microbatch': config.global_batch // (k * data_axis),
                'eval_batch': config.eval_batch,
                'eval_per_device': config.eval_batch // data_axis},
  }
  facts = data_facts(config)
  out['data'] = dataclasses.asdict(facts)
  if facts.num_train is None:
    out['unknown'] = ('the training set size is unknown, so the schedule, cadence and parameter '
                      'count are not derived: ' + facts.source)
    return out
  derived = schedule.resolve(config, facts.num_train)  # the run's own (optim.make)
  out['run_info'] = run_info(config, derived, mesh)
  out['schedule'] = {
      'num_train_examples': derived.num_train_examples,
      'epoch_steps': derived.epoch_steps,
      'steps_per_epoch': derived.steps_per_epoch,
      'examples_per_step_over_n': derived.num_train_examples / derived.global_batch,
      'total_steps': derived.total_steps,
      # Examples seen over N: epochs as tf/tpu counts them (passes of floor(N / B) steps can
      # differ from it, a lot at small N / B).
      'epochs_of_examples': sum((p.end_step - p.start_step) * p.global_batch
                                for p in derived.phases) / derived.num_train_examples
                            if derived.phases else
                            derived.total_steps * derived.global_batch / derived.num_train_examples,
      'warmup_steps': derived.warmup_steps,
      'peak_lr': derived.peak_lr,
      'boundaries_steps': list(derived.boundaries_steps),
      'phases': [dict(dataclasses.asdict(p), per_device_microbatch=p.global_batch // (
          p.accumulation_steps * data_axis)) for p in derived.phases],
      **_schedule(config, derived)}
  if facts.num_eval is not None:
    out['schedule']['eval_batches'] = math.ceil(facts.num_eval / config.eval_batch)
  out['cadence'] = _cadence(config, derived)
  if not facts.known:
    out['unknown'] = 'parameters not counted: ' + facts.source
    return out
  trainer = trainer_lib.build(config, mesh, num_train=facts.num_train,
                              image_shape=facts.image_shape, num_classes=facts.num_classes,
                              initialize=False)
  out['parameters'] = _parameters(config, trainer, facts.num_classes)
  if memory:
    out['memory'] = compiled_memory(config, trainer, facts.image_shape)
    if derived.phases:
      out['memory']['note'] = (f'the first phase\'s step ({k} microbatches); later phases add '
                               'microbatches of the same size')
  return out


# ------------------------------------------------------------------------------------ output


def _bytes(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:,} B' if unit == 'B' else f'{n:,.1f} {unit}'
    n /= 1024
  raise AssertionError


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
  width = max((len(k) for k, _ in rows), default=0)
  return [title] + [f'  {k:<{width}}  {v}' for k, v in rows] + ['']


def _steps(c: dict) -> str:
  listed = ', '.join(f'{s:,}' for s in c['steps'])
  if c['count'] > len(c['steps']):
    listed = ', '.join(f'{s:,}' for s in c['steps'][:5]) + ', ..., ' + ', '.join(
        f'{s:,}' for s in c['steps'][5:])
  return f'{c["count"]:,} ({c["rule"]}): {listed}'


# pylint: disable-next=redefined-builtin
def format(d: dict, *, memory_hint: str = '--print_derived_memory') -> str:
  """`derive`'s result as aligned plain text."""
  h, b, data = d['hardware'], d['batch'], d['data']
  lines = _section('Config', [(k, str(v)) for k, v in d['config'].items()])
  lines += _section('Devices', [
      ('devices', f'{h["devices"]} x {h["device_kind"]}' + (
          f' ({h["platform"]})' if h['device_kind'].lower() != h['platform'] else '')),
      ('processes', str(h['processes'])),
      ('mesh', ', '.join(f'{k}={v}' for k, v in h['mesh'].items()))])
  lines += _section('Batch', [
      ('global batch', f'{b["global_batch"]:,}'),
      ('microbatches', f'{b["microbatches"]} of {b["microbatch"]:,} (gradient accumulation)'),
      ('per device', f'{b["per_device"]:,} per update, {b["per_device_microbatch"]:,} per '
                     f'microbatch'),
      ('eval batch', f'{b["eval_batch"]:,} ({b["eval_per_device"]:,} per device)')])
  rows = [('source', data['source'])]
  for key, label in (('num_train', 'training examples'), ('num_eval', 'eval examples'),
                     ('num_classes', 'classes')):
    if data[key] is not None:
      rows.append((label, f'{data[key]:,}'))
  if data['image_shape'] is not None:
    rows.append(('image shape', ' x '.join(map(str, data['image_shape']))))
  lines += _section('Data', rows)
  s = d.get('schedule')
  if s:
    rows = [
        ('epoch counting', f'lr.epoch_steps={s["epoch_steps"]}'),
        ('steps per epoch', f'{s["steps_per_epoch"]:,} whole batches (N / B = '
                            f'{s["examples_per_step_over_n"]:,.2f})'),
        ('total steps', f'{s["total_steps"]:,} (= {s["epochs_of_examples"]:,.4g} x the '
                        f'{s["num_train_examples"]:,} training examples)'),
        ('warmup steps', f'{s["warmup_steps"]:,}'),
        ('peak lr', f'{s["peak_lr"]:.6g} ({s["rule"]})'),
        ('schedule', s['shape'])]
    if s['boundaries_steps']:
      rows.append(('decay boundaries', ', '.join(f'{x:,}' for x in s['boundaries_steps'])))
    rows.append(('lr at step', ', '.join(f'{k:,}: {v:.4g}' for k, v in s['lr_at_step'].items())))
    if 'eval_batches' in s:
      rows.append(('eval batches', f'{s["eval_batches"]:,} per evaluation'))
    lines += _section('Schedule', rows)
    if s['phases']:
      rows = [(f'phase {i + 1}', f'from epoch {p["start_epoch"]}: updates '
               f'{p["start_step"] + 1:,}-{p["end_step"]:,}, batch {p["global_batch"]:,} in '
               f'{p["accumulation_steps"]} microbatches ({p["per_device_microbatch"]:,} per '
               f'device), {p["steps_per_epoch"]:,} steps/epoch')
              for i, p in enumerate(s['phases'])]
      lines += _section('Batch-size phases (lr counted in initial-batch steps)', rows)
    lines += _section('Cadence (updates after which it happens)',
                      [(k, _steps(v)) for k, v in d['cadence'].items()])
  p = d.get('parameters')
  if p:
    rows = [('total', f'{p["total"]:,}')] + [(f'  {k}', f'{v:,}')
                                             for k, v in p['by_module'].items()]
    rows += [(f'{k} per device', _bytes(v)) for k, v in p['state_bytes_per_device'].items() if v]
    c = p.get('class_centers')
    if c:
      rows += [('class centers', f'{c["classes"]:,} classes -> {c["rows"]:,} rows x {c["dim"]} '
                                 f'over {c["shards"]} shards'),
               ('rows per shard', f'{c["rows_per_shard"]:,} ({c["sampled_rows_per_shard"]:,} '
                                  f'sampled per step; all positives, up to '
                                  f'{c["max_rows_per_shard"]:,}, when they are more)')]
    lines += _section('Parameters (jax.eval_shape; nothing initialized)', rows)
  m = d.get('memory')
  if m is None:
    if p:
      lines += _section('Compiled step memory', [
          ('not computed', f'add {memory_hint} to compile the train step on abstract inputs '
                           f'(the quickstart: seconds on CPU; a full-size ResNet-50 at 8,192 '
                           f'per CPU device did not finish in 15 minutes on 2 cores)')])
  elif not m['available']:
    lines += _section('Compiled step memory', [
        ('unavailable', f'this backend gives no memory analysis (compiled in '
                        f'{m["compile_seconds"]:.1f} s)')])
  else:
    rows = [(k.replace('_', ' '), _bytes(m[k])) for k in
            ('argument', 'output', 'alias', 'temp', 'generated_code')]
    rows += [('peak (estimate)', f'{_bytes(m["peak_estimate"])} = argument + output - alias + '
                                 f'temp'),
             ('compiled in', f'{m["compile_seconds"]:.1f} s')]
    if 'note' in m:
      rows.append(('note', m['note']))
    lines += _section(f'Compiled step memory per device ({h["platform"]})', rows)
  if 'unknown' in d:
    lines += _section('Not derived', [('why', d['unknown'])])
  return '\n'.join(lines).rstrip() + '\n'


def main_entry(config, *, memory: bool = False, as_json: bool = False) -> str:
  """For `main --print_derived`: the text (or JSON) of what `config` will do on this process's
  devices. Validates the core's fields first (main validates the whole config before): raises
  fields.ConfigError with the usual one-line message."""
  core_config.validate(config, jax.device_count())
  d = derive(config, memory=memory)
  if as_json:
    return json.dumps(d, indent=1, sort_keys=False) + '\n'
  return format(d)
