"""What a run prints: quiet library logs, progress lines with an ETA that leaves compilation
out, and a final summary table."""
import json
import logging as std_logging
import os
import subprocess
import sys

from absl import logging
import pytest

from bigbatch import console
from bigbatch import main
from bigbatch import metrics

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _record(pathname, level, msg, name='absl', exc=False):
  exc_info = None
  if exc:
    try:
      raise ValueError('RESOURCE_EXHAUSTED: disk full')
    except ValueError:
      exc_info = sys.exc_info()
  return std_logging.LogRecord(name, level, pathname, 1, msg, (), exc_info)


ORBAX = '/site-packages/orbax/checkpoint/_src/checkpoint_manager.py'


@pytest.fixture
def default_verbosity():
  before = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  yield
  logging.set_verbosity(before)


def test_library_info_is_dropped_and_their_errors_cut_to_one_line(default_verbosity):
  del default_verbosity
  quiet = console.QuietLibraries()  # pylint: disable=protected-access
  own = os.path.join(os.path.dirname(main.__file__), 'loop.py')
  assert quiet.filter(_record(own, std_logging.INFO, 'step 20/440'))
  assert not quiet.filter(_record(ORBAX, std_logging.INFO, 'Saving checkpoint at step 4'))
  assert not quiet.filter(_record('/site-packages/tensorflow_datasets/core/reader.py',
                                  std_logging.INFO, 'Creating a tf.data.Dataset'))
  assert quiet.filter(_record('/site-packages/jax/_src/xla_bridge.py', std_logging.WARNING,
                              'An NVIDIA GPU may be present'))
  error = _record(ORBAX, std_logging.ERROR, 'Save Finalize thread failed.\nmore detail', exc=True)
  assert quiet.filter(error)
  assert error.getMessage() == 'Save Finalize thread failed.' and error.exc_info is None
  # asyncio's report of orbax's failed write task: the run reports the failure itself.
  assert not quiet.filter(_record('/lib/asyncio/base_events.py', std_logging.ERROR,
                                  'Task exception was never retrieved\nfuture: <Task ... '
                                  'orbax/checkpoint/...>', name='asyncio'))
  # An asyncio error that is not orbax's is kept whole.
  other = _record('/lib/asyncio/base_events.py', std_logging.ERROR, 'Unclosed client', 'asyncio',
                  exc=True)
  assert quiet.filter(other) and other.exc_info is not None


class _Collect(std_logging.Handler):

  def __init__(self):
    super().__init__()
    self.records = []

  def emit(self, record):
    self.records.append(record)


def test_orbax_errors_wait_for_the_next_line_and_a_save_failure_replaces_them(
    default_verbosity):
  del default_verbosity
  quiet = console.QuietLibraries()  # pylint: disable=protected-access
  quiet.target = out = _Collect()
  own = os.path.join(os.path.dirname(main.__file__), 'loop.py')
  error = _record(ORBAX, std_logging.ERROR, 'Save Finalize thread failed.\nmore', exc=True)
  assert not quiet.filter(error) and not out.records  # held back
  assert quiet.filter(_record(own, std_logging.INFO, 'step 40/440'))
  assert out.records == [error]  # released (one line) before the next line
  assert out.records[0].getMessage() == 'Save Finalize thread failed.'
  assert not quiet.filter(_record(ORBAX, std_logging.ERROR, 'failed again', exc=True))
  quiet.discard()  # the run's own 'checkpoint not written' line says it
  quiet.release()
  assert len(out.records) == 1


def test_verbosity_1_shows_every_library_line():
  before = logging.get_verbosity()
  logging.set_verbosity(logging.DEBUG)
  try:
    quiet = console.QuietLibraries()  # pylint: disable=protected-access
    assert quiet.filter(_record(ORBAX, std_logging.INFO, 'Saving checkpoint at step 4'))
    error = _record(ORBAX, std_logging.ERROR, 'failed.\nmore', exc=True)
    assert quiet.filter(error) and error.exc_info is not None
  finally:
    logging.set_verbosity(before)


def test_eta_leaves_out_compilation_and_one_slow_interval():
  p = metrics.Progress(total_steps=1000, global_batch=256, start_step=0, now=0.0,
                       epoch_of=lambda s: s / 100)
  p.restart_clock(1, 120.0)  # the first update took 2 minutes to compile
  values = p.rates(101, 130.0)  # 100 updates in 10 s
  assert values['train/steps_per_sec'] == pytest.approx(10.0)
  assert values['train/examples_per_sec'] == pytest.approx(2560.0)
  line = p.line(101, {**values, 'train/loss': 2.5, 'train/lr': 0.1})
  assert line.startswith('step 101/1000 (epoch 1.0) | loss 2.5000 | lr 0.1 | 2,560 ex/s')
  assert line.endswith('ETA 1m30s')  # 899 steps at 10/s, not at 101 / 130 s
  p.rates(201, 140.0)
  p.rates(301, 190.0)  # an evaluation in this interval: 2 steps/s
  assert p.eta_seconds(301) == pytest.approx(699 / 10.0)  # the median of 10, 10, 2


def test_summary_table(tmp_path):
  rows = [{'step': 10, 'train/loss': 1.0, 'train/accuracy': 0.5},
          {'step': 10, 'eval/top1': 0.80, 'eval/loss': 0.9, 'eval/examples': 360.0},
          'not json',
          {'step': 20, 'train/loss': 0.5, 'train/accuracy': 0.75},
          {'step': 20, 'eval/top1': 0.85, 'eval/loss': 0.7, 'eval/examples': 360.0},
          {'step': 30, 'train/loss': 0.25, 'train/accuracy': 0.875},
          {'step': 30, 'eval/top1': 0.84, 'eval/loss': 0.8, 'eval/examples': 360.0}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
  text = metrics.summary(str(tmp_path), {'eval/top1': 0.84, 'eval/loss': 0.8,
                                         'eval/examples': 360.0}, 125.0)
  lines = text.splitlines()
  assert lines[0] == 'Finished in 2m05s. 360 held-out examples.'
  assert lines[1].split() == ['metric', 'final', 'best', '(step)']
  assert lines[2].split() == ['eval/top1', '0.8400', '0.8500', '(20)']
  assert lines[3].split() == ['eval/loss', '0.8000', '0.7000', '(20)']  # lower is better
  assert lines[4].split() == ['train/loss', '0.2500', '-']
  assert lines[5].split() == ['train/accuracy', '0.8750', '-']
  assert lines[6] == f'Files in {tmp_path}: metrics.jsonl.'
  assert 'eval/examples' not in text


def test_quickstart_prints_progress_and_a_summary_not_library_logs(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # main quiets TensorFlow itself
  proc = subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', '--config=configs/quickstart.py:steps=4',
       f'--workdir={tmp_path / "wd"}', '--config.model.width=4',
       '--config.eval_every_epochs=1000', '--config.log_every_steps=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = proc.stderr.splitlines()
  for noise in ('checkpoint_manager', 'dataset_info', 'reader.py', 'Saving checkpoint',
                'cpu_feature_guard', 'libtpu', 'I0000', 'Final evaluation'):
    assert not [l for l in err if noise in l], (noise, proc.stderr)
  progress = [l for l in err if ' | loss ' in l and l.split(' ', 1)[1].startswith('step ')]
  assert [l.split(' | ')[0].split(' ', 1)[1] for l in progress] == [
      'step 2/4 (epoch 0.2)', 'step 4/4 (epoch 0.4)']
  assert all('ETA' in l for l in progress)
  (evaluation,) = [l for l in err if 'eval at step' in l]
  assert evaluation.split(' ', 1)[1].startswith('eval at step 4 (epoch 0.4): top1 0.')
  assert evaluation.endswith('| 360 examples')
  assert len(err) < 12, proc.stderr
  out = proc.stdout.splitlines()
  assert out[0].startswith('Finished in ') and out[1].split()[:2] == ['metric', 'final']
  assert out[2].split()[0] == 'eval/top1'
  assert out[-1] == f'Plot: python -m bigbatch.plot {tmp_path / "wd"}'


def test_summary_of_a_face_run_leaves_counts_out_and_gives_spreads_no_best(tmp_path):
  rows = [{'step': 5, 'verify/lfw/accuracy': 0.9, 'verify/lfw/accuracy_std': 0.01,
           'verify/lfw/pairs': 6000.0},
          {'step': 10, 'verify/lfw/accuracy': 0.8, 'verify/lfw/accuracy_std': 0.02,
           'verify/lfw/pairs': 6000.0}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  final = {k: v for k, v in rows[-1].items() if k != 'step'}  # what the run returns
  text = metrics.summary(str(tmp_path), final, 5.0)
  table = [l.split() for l in text.splitlines()[1:4]]
  assert table == [['metric', 'final', 'best', '(step)'],
                   ['verify/lfw/accuracy', '0.8000', '0.9000', '(5)'],
                   ['verify/lfw/accuracy_std', '0.0200', '-']]
  assert 'pairs' not in text


def test_unraisable_exceptions_cannot_split_the_error_line(caplog):
  """Python's unraisable-exception hook writes tracebacks to stderr in pieces: orbax's
  callbacks on a closed event loop are dropped, anything else is one logged warning."""
  import types  # pylint: disable=g-import-not-at-top
  closed = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(
      'Event loop is closed'), exc_traceback=None, err_msg=None, object=None)
  other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError('bad'),
                                exc_traceback=None, err_msg=None, object='f')
  with caplog.at_level(std_logging.WARNING):
    console.unraisable(closed)  # pylint: disable=protected-access
    assert not caplog.records
    console.unraisable(other)  # pylint: disable=protected-access
  assert [r.getMessage() for r in caplog.records] == ["exception ignored in 'f': ValueError: bad"]
