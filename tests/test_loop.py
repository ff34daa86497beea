"""The training loop end to end on the digits: quickstart accuracy, workdir contents, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bigbatch import checkpoint
from bigbatch import data as data_lib
from bigbatch import loop
from bigbatch import models
from bigbatch import sharding
from bigbatch import trainer as trainer_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import quickstart  # noqa: E402


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_quickstart_shortened_reaches_90_percent(tmp_path):
  config = quickstart.get_config('steps=60')
  workdir = str(tmp_path)
  result = loop.train_and_evaluate(config, workdir)
  assert result['eval/top1'] >= 0.90, result
  assert result['eval/examples'] == 360
  # The workdir holds what a researcher reads back.
  records = _records(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == [20, 40, 60]
  last = [r for r in records if 'train/loss' in r][-1]
  for key in ('train/lr', 'train/grad_norm', 'train/param_norm', 'train/examples_per_sec',
              'perf/flops_per_sec', 'perf/input_wait_fraction'):
    assert key in last
  # Training FLOPs: 3x the forward of the CNN (3x3 convs on 8x8, 8x8 -> 4x4 stride 2, 4x4, and
  # a dense head). XLA counts the kernel taps that land inside the image (SAME padding): per
  # axis 22 of 8x3 at 8x8, 11 of 4x3 for the strided conv, 10 of 4x3 at 4x4.
  w = 32
  forward = 2 * (22**2 * 1 * w + 11**2 * w * 2 * w + 10**2 * 2 * w * 2 * w + 2 * w * 10)
  assert last['perf/model_flops_per_step'] == pytest.approx(3 * forward * 128, rel=0.05)
  assert 0.0 <= last['perf/input_wait_fraction'] <= 1.0
  assert [r['step'] for r in records if 'eval/top1' in r] == [60]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
  derived = json.load(open(tmp_path / 'derived.json'))['derived']
  assert derived['total_steps'] == 60 and derived['steps_per_epoch'] == 1437 // 128
  assert json.load(open(tmp_path / 'config.json'))['global_batch'] == 128
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 60


def _resume_config(steps):
  config = quickstart.get_config(f'steps={steps}')
  config.lr.decay = 'constant'  # the lr of a step must not depend on the run's length
  config.lr.warmup_steps = None
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval_every_epochs = None
  config.accumulation_steps = 2
  config.model.width = 8
  return config


def test_restart_resumes_and_equals_an_uninterrupted_run(tmp_path):
  straight, restarted = str(tmp_path / 'a'), str(tmp_path / 'b')
  loop.train_and_evaluate(_resume_config(12), straight)
  loop.train_and_evaluate(_resume_config(6), restarted)  # stops at 6 (checkpoint at 4 and 6)
  loop.train_and_evaluate(_resume_config(12), restarted)  # resumes from 6

  config = _resume_config(12)
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                        image_shape=(8, 8, 1), num_classes=10)
  a = checkpoint.Checkpointer(os.path.join(straight, 'checkpoints')).restore(12, trainer.state)
  b = checkpoint.Checkpointer(os.path.join(restarted, 'checkpoints')).restore(12, trainer.state)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  steps = [r['step'] for r in _records(restarted) if 'train/loss' in r]
  assert steps == [2, 4, 6, 8, 10, 12]  # each step once
  drop = lambda r: {k: v for k, v in r.items() if 'per_sec' not in k and not k.startswith('perf/')}
  assert ([drop(r) for r in _records(straight) if 'train/loss' in r] ==
          [drop(r) for r in _records(restarted) if 'train/loss' in r])


def _tiny(steps=4, **fields):
  config = quickstart.get_config(f'steps={steps}')
  config.model.width = 8
  config.log_every_steps = 1
  config.eval_every_epochs = None
  for key, value in fields.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_ema_of_parameters_is_updated_and_evaluated(tmp_path):
  config = _tiny(ema_decay=0.75)
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                        image_shape=(8, 8, 1), num_classes=10)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(1, 128, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, size=(1, 128)).astype(np.int32)}
  before = jax.device_get(trainer.state.params)
  state, _ = trainer.train_step(trainer.state, jax.device_put(batch, trainer.batch_sharding))
  after, ema = jax.device_get(state.params), jax.device_get(state.ema_params)
  for p0, p1, e in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(ema)):
    np.testing.assert_allclose(e, 0.75 * p0 + 0.25 * p1, rtol=1e-6, atol=1e-7)
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= result['eval_ema/top1'] <= 1.0 and result['eval_ema/examples'] == 360
  assert result['eval_ema/loss'] != result['eval/loss']


@pytest.mark.slow
def test_profile_of_chosen_steps_is_written(tmp_path):
  loop.train_and_evaluate(_tiny(profile_steps=(2, 3)), str(tmp_path))
  traces = [f for d, _, fs in os.walk(tmp_path / 'profile') for f in fs if 'xplane' in f]
  assert traces


@pytest.mark.slow
def test_persistent_compilation_cache_is_written(tmp_path):
  cache = tmp_path / 'cache'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  proc = subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', '--config=configs/quickstart.py:steps=2',
       f'--workdir={tmp_path / "wd"}', f'--config.compilation_cache_dir={cache}',
       '--config.model.width=8'],
      cwd=os.path.join(os.path.dirname(__file__), '..'), env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert cache.is_dir() and any(cache.iterdir())


@pytest.mark.slow
def test_eval_mode_evaluates_the_latest_checkpoint_and_changes_nothing_else(tmp_path):
  trained = loop.train_and_evaluate(_tiny(), str(tmp_path))
  metrics_before = (tmp_path / 'metrics.jsonl').read_text()
  config = _tiny()
  config.mode = 'eval'
  config.eval_batch = 256  # an observing change: allowed in the same workdir
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['eval/top1'] == trained['eval/top1']
  assert result['eval/loss'] == pytest.approx(trained['eval/loss'], rel=1e-6)
  assert json.load(open(tmp_path / 'eval-4.json'))['eval/top1'] == result['eval/top1']
  assert (tmp_path / 'metrics.jsonl').read_text() == metrics_before
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint'):
    loop.train_and_evaluate(config, str(tmp_path / 'empty'))


@pytest.mark.slow
def test_precise_bn_is_the_mean_of_batch_statistics_and_is_evaluated(tmp_path):
  config = _tiny(precise_bn_batches=3)
  config.accumulation_steps = 2
  dataset = data_lib.create(config)
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=dataset.num_train,
                        image_shape=dataset.image_shape, num_classes=10)
  state = trainer_lib.precise_bn(trainer, trainer.state, dataset, 3, first_step=5)
  # Reference: one device, no shard_map, each microbatch of each batch whole (sync BN over the
  # microbatch = BN of the whole microbatch), momentum 0, plain mean over all 6 microbatches.
  model = models.build(_with(config.model, bn_momentum=0.0), 10)
  variables = jax.device_get({'params': trainer.state.params,
                              'batch_stats': trainer.state.batch_stats})
  stats = []
  for step in range(5, 8):
    for mb in dataset.train_batch(step)['image']:
      _, new = model.apply(variables, mb, train=True, mutable=['batch_stats'])
      stats.append(new['batch_stats'])
  expected = jax.tree.map(lambda *s: np.mean(s, axis=0), *stats)
  for x, y in zip(jax.tree.leaves(jax.device_get(state.batch_stats)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  assert not np.allclose(jax.device_get(state.batch_stats['norm0']['var']),
                         jax.device_get(trainer.state.batch_stats['norm0']['var']))
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= result['eval/top1'] <= 1.0


def _with(model_config, **fields):
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(model_config.to_dict())
  for k, v in fields.items():
    out[k] = v
  return out


@pytest.mark.slow
def test_init_from_another_run_takes_its_params_with_a_fresh_optimizer(tmp_path):
  source = str(tmp_path / 'source')
  loop.train_and_evaluate(_tiny(), source)  # SGD
  config = _tiny(init_from=source)
  config.optimizer.name = 'lamb'
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                        image_shape=(8, 8, 1), num_classes=10)
  state = trainer_lib.init_from_workdir(trainer, trainer.state, source, image_shape=(8, 8, 1),
                                  num_classes=10)
  src = checkpoint.Checkpointer(os.path.join(source, 'checkpoints'))
  src_trainer = trainer_lib.build(_tiny(), sharding.make_mesh(config), num_train=1437,
                            image_shape=(8, 8, 1), num_classes=10)
  expected = src.restore(src.latest_step(), src_trainer.state)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(state.step) == 0
  loop.train_and_evaluate(config, str(tmp_path / 'finetune'))
  scratch = _tiny()
  scratch.optimizer.name = 'lamb'
  loop.train_and_evaluate(scratch, str(tmp_path / 'scratch'))
  first_loss = lambda d: _records(tmp_path / d)[0]['train/loss']
  assert first_loss('finetune') < first_loss('scratch')  # it started from trained weights
  wider = _tiny(init_from=source)
  wider.model.width = 16
  with pytest.raises(checkpoint.CheckpointError, match='do not fit this model.*conv0/kernel'):
    loop.train_and_evaluate(wider, str(tmp_path / 'wider'))
