"""`bigbatch.derive` (main --print_derived): what a config will do, worked out without running it,
equals what a run uses; nothing is written; full-size configs derive on abstract shapes only."""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

from bigbatch import config_lib
from bigbatch import data as data_lib
from bigbatch import derive
from bigbatch import loop
from bigbatch import optim
from bigbatch import schedule

ROOT = os.path.join(os.path.dirname(__file__), '..')


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, dirs, files in os.walk(root) for f in files + dirs)


def test_quickstart_data_and_schedule_are_the_runs():
  """The sizes derive finds without reading through TFDS are those of the data set the run
  reads, and the schedule is schedule.resolve's on it."""
  config = load('quickstart')
  facts = derive.data_facts(config)
  dataset = data_lib.create(config)  # what loop.load_dataset reads
  assert (facts.num_train, facts.num_eval, tuple(facts.image_shape), facts.num_classes) == (
      dataset.num_train, dataset.num_eval, tuple(dataset.image_shape), dataset.num_classes)
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config)
  real = schedule.resolve(config, dataset.num_train)
  assert d['run_info']['derived'] == real.as_dict()
  s = d['schedule']
  assert (s['total_steps'], s['warmup_steps'], s['steps_per_epoch']) == (440, 22, 11)
  assert s['peak_lr'] == pytest.approx(0.1)
  lr_fn = optim.lr_schedule(config, real)
  for step, lr in s['lr_at_step'].items():
    assert lr == pytest.approx(float(lr_fn(step, real.peak_lr)), rel=1e-6, abs=1e-12)
  # eval every 10 epochs of 11 steps, and at the end; checkpoints every 200 and at the end.
  assert d['cadence']['eval']['steps'] == [110, 220, 330, 440]
  assert d['cadence']['checkpoint']['steps'] == [200, 400, 440]


@pytest.mark.slow  # a real run: about a minute on a busy 2-core machine
def test_equals_what_a_short_run_records(tmp_path):
  """derived.json, which train_and_evaluate writes, is derive's run_info for the same config."""
  config = load('quickstart', 'steps=2')
  config.eval_batch = 64  # one small eval batch per device: the run is about the record
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config)
  loop.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'derived.json') as f:
    assert json.load(f) == json.loads(json.dumps(d['run_info']))
  assert d['schedule']['total_steps'] == 2 and d['schedule']['warmup_steps'] == 0


def test_r50_64k_prints_its_recipe_and_writes_nothing(tmp_path, monkeypatch):
  """The 64k LARS recipe's 1,759 steps and 312 warmup steps, and ResNet-50's 25,557,032
  parameters from eval_shape; with HOME and the working directory empty, nothing appears in
  them (no TFDS directory, no cache, no workdir)."""
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  monkeypatch.chdir(cwd)
  config = load('r50_64k')
  text = derive.main_entry(config)
  assert _files(tmp_path) == ['cwd', 'home']
  lines = {line.split('  ')[1].strip(): line for line in text.splitlines() if line.startswith('  ')}
  assert '1,759 ' in lines['total steps']
  assert lines['warmup steps'].split()[-1] == '312'
  assert lines['total'].split()[-1] == '25,557,032'  # ResNet-50, torchvision's count
  assert 'published size of imagenet2012' in text and 'would prepare it' in text
  assert 'peak lr          41 ' in text
  assert 'lr.epoch_steps=total_examples_floor' in text
  assert '8,192 per update' in text  # 65,536 over the 8 test devices
  assert 'not computed' in text  # the memory analysis is opt-in
  as_json = json.loads(derive.main_entry(config, as_json=True))
  assert as_json['parameters']['total'] == 25_557_032


def test_memory_analysis_of_the_quickstart_step(tmp_path, monkeypatch):
  # Compiling is most of it: 5-20 s on 2 cores, depending on what else runs.
  monkeypatch.setenv('HOME', str(tmp_path))
  config = load('quickstart')
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config, memory=True)
  m = d['memory']
  assert m['available']
  for key in ('argument', 'output', 'temp', 'peak_estimate'):
    assert m[key] > 0, key
  # The arguments hold at least this device's share of the state (params, optimizer, BN).
  assert m['argument'] >= sum(d['parameters']['state_bytes_per_device'].values())
  assert 'Compiled step memory per device' in derive.format(d)
  assert _files(tmp_path) == []


def test_batch_size_phases_are_listed():
  config = load('quickstart')
  config.batch_schedule = ((10, 2), (30, 4))
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config)
  phases = d['schedule']['phases']
  real = schedule.resolve(config, 1437).phases
  assert [(p['global_batch'], p['accumulation_steps'], p['start_step'], p['end_step'])
          for p in phases] == [(p.global_batch, p.accumulation_steps, p.start_step, p.end_step)
                               for p in real]
  assert [p['per_device_microbatch'] for p in phases] == [16, 16, 16]
  assert d['schedule']['total_steps'] == real[-1].end_step
  text = derive.format(d)
  assert 'phase 3' in text and 'batch 512 in 4 microbatches' in text


def test_face_class_centers_per_shard():
  config = load('face_64k_lamb')
  config.data.face_root = None
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config)
  assert 'assumed WebFace42M' in d['data']['source']
  c = d['parameters']['class_centers']
  assert (c['classes'], c['rows'], c['shards'], c['rows_per_shard']) == (
      2_059_906, 2_059_912, 8, 257_489)
  assert d['parameters']['by_module']['backbone'] == 65_156_160  # iResNet-100
  assert d['parameters']['by_module']['centers'] == 2_059_912 * 512


def test_an_invalid_config_is_the_usual_config_error():
  config = load('quickstart')
  config.global_batch = 100  # not a multiple of the 8 devices
  with pytest.raises(config_lib.ConfigError, match='global_batch=100'):
    derive.main_entry(config)


def test_unprepared_custom_tfds_set_is_said_unknown(tmp_path):
  config = load('cifar10_small_batch')
  config.data.tfds_name = 'my_cifar_copy'
  config.data.data_dir = str(tmp_path)
  config_lib.validate(config, jax.device_count())
  d = derive.derive(config)
  assert 'schedule' not in d and 'unknown' in d
  text = derive.format(d)
  assert 'not prepared' in text and 'global batch' in text
  assert _files(tmp_path) == []


def test_face_folder_is_counted_from_its_listing(tmp_path):
  """A real face set's size comes from listing (or indexing) it, never decoding it."""
  for identity, n in (('alice', 3), ('bob', 2), ('carol', 0)):
    (tmp_path / identity).mkdir()
    for i in range(n):
      (tmp_path / identity / f'{i}.jpg').write_bytes(b'')  # listed, not decoded
  config = load('face_synthetic')
  config.data.name = 'face_folder'
  config.data.face_root = str(tmp_path)
  facts = derive.data_facts(config)
  assert (facts.num_train, facts.num_classes) == (5, 3)
  assert facts.source.startswith('read from face_folder:')


@pytest.mark.slow  # a fresh interpreter importing TensorFlow: ~30 s on 2 busy cores
def test_a_fresh_process_writes_nothing_of_its_own(tmp_path):
  """In a new process with an empty HOME and working directory, deriving the quickstart leaves
  only the caches importing TensorFlow (keras) and matplotlib make, no TFDS directory, no
  workdir, no compilation cache."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=os.path.abspath(ROOT))
  env.pop('TFDS_DATA_DIR', None)
  script = ('import sys; from configs import quickstart; from bigbatch import derive; '
            'sys.stdout.write(derive.main_entry(quickstart.get_config()))')
  out = subprocess.run([sys.executable, '-c', script], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=300, check=True).stdout
  assert '440 (= 39.19 x the 1,437 training examples)' in out
  library_caches = ('.keras', '.cache/matplotlib', '.config/matplotlib')
  assert [f for f in _files(tmp_path)
          if not f.startswith(library_caches) and f not in ('.cache', '.config')] == []


@pytest.mark.slow
def test_command_line_prints_and_exits_0_without_a_workdir(tmp_path):
  """`main --print_derived` (no --workdir): the text on stdout, exit 0, nothing written in the
  working directory; a bad config is still the one-line config error (exit 2)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  command = [sys.executable, '-m', 'bigbatch.main',
             f'--config={os.path.abspath(ROOT)}/configs/quickstart.py', '--print_derived']
  proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'total steps      440' in proc.stdout and 'mesh       data=2, model=1' in proc.stdout
  assert 'per device    64 per update' in proc.stdout
  assert os.listdir(tmp_path) == []
  bad = subprocess.run(command + ['--config.global_batch=101'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert [l for l in bad.stderr.splitlines() if l.startswith('bigbatch:')] == [
      l for l in bad.stderr.splitlines() if 'global_batch' in l]
