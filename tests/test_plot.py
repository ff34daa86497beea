"""bigbatch.plot: figures from workdirs written by hand in the trainer's formats."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bigbatch import hooks
from bigbatch import plot
from bigbatch import schedule
from test_workdir_paths import bucket  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHASES = [  # as schedule.Resolved.as_dict writes a batch schedule: 2 epochs at 128, then 512
    {'start_epoch': 0, 'global_batch': 128, 'accumulation_steps': 1, 'steps_per_epoch': 11,
     'start_step': 0, 'end_step': 22},
    {'start_epoch': 2, 'global_batch': 512, 'accumulation_steps': 4, 'steps_per_epoch': 2,
     'start_step': 22, 'end_step': 98},
]


def _derived(global_batch, steps_per_epoch, total_steps, phases=()):
  """derived.json as bigbatch.loop writes it."""
  return {'derived': {'num_train_examples': 1437, 'global_batch': global_batch,
                      'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps,
                      'warmup_steps': 2, 'peak_lr': 0.1, 'boundaries_steps': [],
                      'phases': list(phases), 'schedule_steps': 0},
          'mesh': {'data': 8, 'model': 1}, 'devices': 8, 'processes': 1,
          'examples_per_device_per_microbatch': global_batch // 8}


def _write_run(workdir, *, global_batch, steps_per_epoch, total, log_every, eval_every,
               rate, phases=(), torn=False):
  """metrics.jsonl (train records every log_every steps, eval records every eval_every, in
  JsonlWriter's format) and derived.json."""
  os.makedirs(workdir)
  lines = []
  for step in range(log_every, total + 1, log_every):
    lines.append({'step': step, 'train/accuracy': 1 - 0.9 * math.exp(-step / 20),
                  'train/loss': 2.3 * math.exp(-step / 15), 'train/lr': 0.1 * (1 - step / total),
                  'train/steps_per_sec': rate, 'train/examples_per_sec': rate * global_batch,
                  'perf/model_flops_per_step': 2.6e8})
    if step % eval_every == 0:
      lines.append({'step': step, 'eval/top1': 0.9 + step / total / 20, 'eval/top5': 1.0,
                    'eval/loss': 0.4 * math.exp(-step / 30), 'eval/examples': 360.0})
  text = ''.join(json.dumps(r) + '\n' for r in lines)
  if torn:
    text += '{"step": 999, "train/lo'  # killed mid-write
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(text)
  with open(os.path.join(workdir, 'derived.json'), 'w') as f:
    json.dump(_derived(global_batch, steps_per_epoch, total, phases), f, indent=2)
  return lines


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, MPLBACKEND='Agg')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'bigbatch.plot', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _check_png(path):
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  pixels = image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 900
  # Something was drawn: many distinct colours, not a blank canvas.
  assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 50


def test_two_runs_side_by_side_on_every_x_axis(tmp_path):
  _write_run(str(tmp_path / 'b128'), global_batch=128, steps_per_epoch=11, total=110,
             log_every=5, eval_every=55, rate=8.0)
  _write_run(str(tmp_path / 'b512'), global_batch=512, steps_per_epoch=2, total=20,
             log_every=2, eval_every=10, rate=2.0, torn=True)
  out = tmp_path / 'figures'
  proc = _cli(str(tmp_path / 'b128'), str(tmp_path / 'b512'),
              '--x=steps,epochs,examples,time', f'--out_dir={out}', '--smooth=0.5')
  assert proc.returncode == 0, proc.stderr
  names = [f'metrics_vs_{x}.png' for x in ('steps', 'epochs', 'examples', 'time')]
  assert proc.stdout.split() == [str(out / n) for n in names]
  for name in names:
    _check_png(out / name)


def test_reads_what_the_jsonl_writer_writes(tmp_path):
  from bigbatch import metrics  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  workdir.mkdir()
  writer = metrics.JsonlWriter(workdir / 'metrics.jsonl')
  writer.write_scalars(1, {'train/loss': 2.0, 'train/lr': 0.0, 'train/steps_per_sec': 0.5})
  writer.write_scalars(2, {'train/loss': float('nan'), 'train/lr': 0.1,
                           'train/steps_per_sec': 4.0})
  writer.write_scalars(2, {'eval/top1': 0.5, 'eval/loss': 1.5})
  writer.close()
  run = plot.read_run(str(workdir))
  assert run.label == 'run' and run.derived is None
  np.testing.assert_array_equal(run.series['train/loss'].steps, [1, 2])
  assert run.series['train/loss'].values[0] == 2.0
  assert math.isnan(run.series['train/loss'].values[1])  # written as the string "nan"
  np.testing.assert_array_equal(run.series['eval/top1'].steps, [2])
  # Minutes from the rates: update 1 took 1 / 0.5 = 2 s, update 2 took 1 / 4 s.
  np.testing.assert_allclose(run.x_of(np.array([1, 2]), 'time'), [2 / 60, 2.25 / 60])
  with pytest.raises(plot.PlotError, match='no derived.json'):
    run.x_of(np.array([1]), 'epochs')
  plot.plot([run], 'steps', str(tmp_path / 'one.png'))
  _check_png(tmp_path / 'one.png')


def test_reads_and_writes_object_store_paths(bucket):  # pylint: disable=redefined-outer-name
  # The fake gs:// bucket of test_workdir_paths: no append, no directory rename.
  _write_run(os.path.join(bucket.root, 'bucket', 'run'), global_batch=64, steps_per_epoch=22,
             total=44, log_every=4, eval_every=22, rate=3.0)
  run = plot.read_run('gs://bucket/run')
  assert run.label == 'run (batch 64)' and len(run.series['train/loss'].steps) == 11
  plot.plot([run], 'epochs', 'gs://bucket/plots/metrics_vs_epochs.png')
  _check_png(os.path.join(bucket.root, 'bucket', 'plots', 'metrics_vs_epochs.png'))
  assert ('gs://bucket/plots/metrics_vs_epochs.png', 'wb') in bucket.modes


def test_epochs_and_examples_follow_the_batch_schedule(tmp_path):
  _write_run(str(tmp_path / 'phased'), global_batch=128, steps_per_epoch=11, total=98,
             log_every=7, eval_every=49, rate=1.0, phases=PHASES)
  run = plot.read_run(str(tmp_path / 'phased'))
  assert run.label == 'phased (batch 128)'
  phases = tuple(schedule.Phase(**p) for p in PHASES)
  steps = np.arange(0, 99)
  # The trainer's own epoch count (hooks.epochs_at, used by eval_every_epochs).
  np.testing.assert_allclose(run.x_of(steps, 'epochs'),
                             [hooks.epochs_at(int(s), phases) for s in steps])
  # Examples: every update's own global batch, summed.
  seen = np.cumsum([0] + [schedule.phase_at(u, phases).global_batch for u in range(98)])
  np.testing.assert_array_equal(run.x_of(steps, 'examples'), seen)
  assert run.x_of(np.array([98]), 'epochs')[0] == 40  # 2 + 76 / 2


def test_without_a_schedule_epochs_are_steps_over_steps_per_epoch(tmp_path):
  _write_run(str(tmp_path / 'plain'), global_batch=64, steps_per_epoch=22, total=44,
             log_every=4, eval_every=22, rate=3.0)
  run = plot.read_run(str(tmp_path / 'plain'), label='mine')
  assert run.label == 'mine'
  np.testing.assert_allclose(run.x_of(np.array([0, 11, 44]), 'epochs'), [0, 0.5, 2])
  np.testing.assert_allclose(run.x_of(np.array([0, 11, 44]), 'examples'), [0, 704, 2816])


def _one_error_line(proc, *words):
  assert proc.returncode == 1, proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('bigbatch.plot: error: '), proc.stderr
  for word in words:
    assert word in lines[0], lines[0]


def test_unreadable_workdirs_are_one_line_and_exit_1(tmp_path):
  good = str(tmp_path / 'good')
  _write_run(good, global_batch=64, steps_per_epoch=22, total=44, log_every=4,
             eval_every=22, rate=3.0)
  empty = tmp_path / 'empty'
  empty.mkdir()
  bad_derived = tmp_path / 'bad_derived'
  bad_derived.mkdir()
  (bad_derived / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 2.0}\n')
  (bad_derived / 'derived.json').write_text('{"mesh": {}}')
  # Several cases in one process each; the first bad workdir is the one reported.
  _one_error_line(_cli(good, str(tmp_path / 'missing'), f'--out_dir={tmp_path}'),
                  'missing does not exist')
  _one_error_line(_cli(str(empty), f'--out_dir={tmp_path}'),
                  'metrics.jsonl does not exist')
  _one_error_line(_cli(str(bad_derived), f'--out_dir={tmp_path}'),
                  'derived.json is not what the trainer writes')
  _one_error_line(_cli(good, '--x=steps,walltime', f'--out_dir={tmp_path}'),
                  '--x=steps,walltime')
  assert not list(tmp_path.glob('*.png'))  # nothing half-written


def test_a_damaged_line_costs_that_line_only(tmp_path):
  # The one policy of bigbatch/jsonl.py: a damaged line in the middle, a value that is no
  # number and a torn last line are skipped, named in one warning, and the rest is plotted.
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  (corrupt / 'metrics.jsonl').write_text(
      '{"step": 1, "train/loss": 2.0}\nnot json\n{"step": 3, "train/loss": 1.0}\n'
      '{"step": 4, "train/loss": [1]}\n{"step": 5, "train/loss": 0.5}\n{"step": 6, "tr')
  proc = _cli(str(corrupt), '--x=steps', f'--out_dir={tmp_path}')
  assert proc.returncode == 0, proc.stderr
  assert 'metrics.jsonl: 3 damaged line(s) skipped (2, 4, 6)' in proc.stderr
  assert list(tmp_path.glob('*.png'))


def test_axes_that_need_what_a_run_lacks_say_so():
  run = plot.Curves(workdir='w', label='w', derived=None,
                 series={'train/loss': plot.Series(np.array([1.0]), np.array([2.0]))})
  with pytest.raises(plot.PlotError, match='no train/steps_per_sec'):
    run.x_of(np.array([1]), 'time')
  with pytest.raises(plot.PlotError, match='is not one of'):
    plot.plot([run], 'hours', '/nonexistent/x.png')
