"""Batch-size schedule (Smith et al. 2017): phases, the lr as a function of the data seen, exact
data position across phases and on resume, one compilation per batch size."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import data as data_lib
from bigbatch import input_pipeline
from bigbatch import loop
from bigbatch import optim
from bigbatch import schedule
from bigbatch import sharding
from bigbatch import trainer as trainer_lib


def _config(**overrides):
  c = config_lib.base_config()
  c.data.name = 'synthetic'
  c.data.num_train = 1000
  c.data.num_eval = 64
  c.model.name = 'mlp'
  c.model.width = 8
  c.model.norm = 'none'
  c.global_batch = 40
  c.eval_batch = 64
  c.num_epochs = 4.0
  c.batch_schedule = ((1, 2), (3, 4))
  c.lr.decay = 'step'
  c.lr.boundaries_epochs = (2,)
  c.lr.warmup_epochs = 0.5
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1000
  return config_lib.override(c, **overrides)


def test_phases_and_the_lr_follow_the_epochs_seen():
  c = _config()
  d = schedule.resolve(c, 1000)
  assert [(p.start_epoch, p.global_batch, p.accumulation_steps, p.steps_per_epoch, p.start_step,
           p.end_step) for p in d.phases] == [(0, 40, 1, 25, 0, 25), (1, 80, 2, 12, 25, 49),
                                              (3, 160, 4, 6, 49, 55)]
  assert d.total_steps == 55 and d.schedule_steps == 100  # 4 epochs of the initial batch
  lr_fn = optim.lr_schedule(c, d)
  peak = d.peak_lr
  lr = lambda step: float(lr_fn(step, peak))
  # Warmup of half an epoch = 12 steps at batch 40; the step decay at epoch 2 happens at update
  # 37 (epoch 1 + 12 updates of 80), not at update 50 (the initial batch's step count).
  assert lr(6) == pytest.approx(peak * 0.5)
  assert lr(36) == pytest.approx(peak) and lr(37) == pytest.approx(peak * 0.1)
  assert float(schedule.epochs_seen(52, d.phases)) == pytest.approx(3.5)


@pytest.mark.parametrize('bad', [((0, 2),), ((1, 1),), ((2, 2), (1, 4)), ((1.5, 2),),
                                 ((4, 2),), ((1, 2), (2, 2))])
def test_bad_schedules_are_config_errors_naming_the_field(bad):
  with pytest.raises(config_lib.ConfigError, match='batch_schedule'):
    config_lib.validate(_config(batch_schedule=bad), num_devices=8)


def test_schedule_needs_epochs():
  with pytest.raises(config_lib.ConfigError, match='num_epochs'):
    config_lib.validate(_config(num_epochs=None, num_steps=10), num_devices=8)


def _phased(c, start):
  dataset = data_lib.create(c)
  d = schedule.resolve(c, dataset.num_train)
  mesh = sharding.make_mesh(c)
  batches = loop.PhasedBatches(c, dataset, d.phases,
                                 jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC), start,
                                 d.total_steps)
  try:
    return {s: jax.device_get(b) for s, b in batches}
  finally:
    batches.close()


def test_data_position_is_exact_across_phases_and_on_resume():
  c = _config()
  full = _phased(c, 0)
  assert sorted(full) == list(range(55))
  perm = lambda epoch: input_pipeline.epoch_permutation(c.seed, epoch, 1000)
  # Every epoch is one pass over its permutation, whatever the batch of its phase.
  for epoch, steps in ((0, range(0, 25)), (1, range(25, 37)), (2, range(37, 49)),
                       (3, range(49, 55))):
    labels = np.concatenate([full[s]['label'].reshape(-1) for s in steps])
    dataset = data_lib.create(c)
    _, expected = dataset.train_source(perm(epoch)[:len(labels)])
    np.testing.assert_array_equal(labels, expected)
  assert full[30]['label'].shape == (2, 40) and full[52]['label'].shape == (4, 40)
  resumed = _phased(c, 30)  # mid-phase
  for s in range(30, 55):
    np.testing.assert_array_equal(resumed[s]['image'], full[s]['image'])


@pytest.mark.slow
def test_training_with_a_schedule_compiles_once_per_batch_size(tmp_path):
  c = _config(num_epochs=2.0, batch_schedule=((1, 2),), eval_every_epochs=1.0,
              **{'lr.boundaries_epochs': None, 'lr.decay': 'cosine'})
  cache = trainer_lib.CompileCache()
  loop.train_and_evaluate(c, str(tmp_path), cache=cache)
  ((step_fn, _, _),) = cache.entries('steps')
  assert step_fn._cache_size() == 2  # batch 40 and batch 80 (2 x 40)
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  evals = [r['step'] for r in rows if 'eval/top1' in r]
  assert evals == [25, 37]  # end of epoch 1 (25 x 40) and of epoch 2 (+ 12 x 80)
  d = schedule.resolve(c, 1000)
  lr_fn = optim.lr_schedule(c, d)
  for r in rows:
    if 'train/lr' in r:  # the lr the update applied: the schedule at its epochs seen
      assert r['train/lr'] == pytest.approx(float(lr_fn(r['step'] - 1, d.peak_lr)), rel=1e-5)
