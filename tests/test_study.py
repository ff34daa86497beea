"""The study tool through the trainer: noise scale and sharpness as the trainer measures them,
steps-to-target recording, and a 2 x 2 sweep end to end (compiles once per batch size, writes
every figure, resumes without rerunning anything)."""
from __future__ import annotations

import json
import os

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import data as data_lib
from bigbatch import grad_stats
from bigbatch import loop
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch.study import aggregate
from bigbatch.study import grid
from bigbatch.study import hooks as study_hooks
from bigbatch.study import render_steps
from bigbatch.study import run
from bigbatch.tasks import classification
from configs import study_digits

IMAGE_SHAPE = (8, 8, 1)


def _mlp_config(**overrides):
  c = config_lib.base_config()
  c.model.name = 'mlp'
  c.model.width = 8
  c.model.norm = 'none'
  c.num_steps = 10
  c.global_batch = 32
  return config_lib.override(c, **overrides)


def test_noise_scale_in_the_step_equals_the_estimator_on_per_device_gradients():
  config = _mlp_config(**{'noise_scale.enabled': True, 'accumulation_steps': 2,
                          'optimizer.weight_decay': 1e-2})
  mesh = sharding.make_mesh(config)  # 8 devices: 2 microbatches x 8 devices of b = 2 examples
  trainer = trainer_lib.build(config, mesh, num_train=1000, image_shape=IMAGE_SHAPE, num_classes=10)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 16, *IMAGE_SHAPE)).astype(np.float32),
           'label': rng.integers(0, 10, size=(2, 16)).astype(np.int32)}
  params = jax.device_get(trainer.state.params)
  _, metrics = trainer.train_step(trainer.state, jax.device_put(batch, trainer.batch_sharding))

  # Reference: the loss gradient (no weight decay) of each device's share of each microbatch.
  def grad(x, y):
    return jax.grad(lambda p: classification.loss_fn(
        p, {}, x, y, None, model=trainer.model, num_classes=10, label_smoothing=0.0)[0])(params)
  small = [ravel_pytree(grad(batch['image'][k, d * 2:(d + 1) * 2],
                             batch['label'][k, d * 2:(d + 1) * 2]))[0]
           for k in range(2) for d in range(8)]
  big = np.mean(small, axis=0)
  g2, trace = grad_stats.estimates(np.mean([np.sum(s ** 2) for s in small]), np.sum(big ** 2),
                                    2, 32)
  np.testing.assert_allclose(metrics['gns/b_simple_step'], trace / g2, rtol=1e-4)
  # One step of the moving average, bias-corrected, is the step's own estimate.
  np.testing.assert_allclose(metrics['gns/g2'], g2, rtol=1e-4)
  np.testing.assert_allclose(metrics['gns/trace_sigma'], trace, rtol=1e-4)
  np.testing.assert_allclose(metrics['gns/b_simple'], trace / g2, rtol=1e-4)


def test_noise_scale_needs_a_small_batch_smaller_than_the_update():
  config = _mlp_config(**{'noise_scale.enabled': True})
  with pytest.raises(config_lib.ConfigError, match='accumulation_steps=2'):
    config_lib.validate(config, num_devices=1)
  config_lib.validate(config, num_devices=2)


@pytest.mark.slow
def test_trainer_sharpness_is_the_top_eigenvalue_of_the_dense_hessian():
  config = _mlp_config(**{'data.name': 'synthetic', 'data.num_train': 256, 'data.num_eval': 64,
                          'model.width': 4, 'sharpness.num_examples': 48,
                          'sharpness.num_iters': 40})
  dataset = data_lib.create(config)
  mesh = sharding.make_mesh(config)
  trainer = trainer_lib.build(config, mesh, num_train=dataset.num_train,
                        image_shape=dataset.image_shape, num_classes=dataset.num_classes)
  value = study_hooks.measure_sharpness(trainer, trainer.state, dataset, config)
  # The same 48 examples: the first 48 of the epoch-0 order (steps 0 and 1 at batch 32).
  rows = [dataset.train_batch(s) for s in range(2)]
  images = np.concatenate([r['image'].reshape(-1, *IMAGE_SHAPE) for r in rows])[:48]
  labels = np.concatenate([r['label'].reshape(-1) for r in rows])[:48]
  flat, unravel = ravel_pytree(jax.device_get(trainer.state.params))
  loss = lambda f: trainer.task.objective(trainer.model)(unravel(f), {}, images, labels)
  eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
  assert eigenvalues[-1] > 0
  np.testing.assert_allclose(value, eigenvalues[-1], rtol=1e-2)


def _digits_config(**overrides):
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.model.width = 8
  c.global_batch = 64
  c.eval_batch = 360
  c.num_steps = 12
  c.eval_every_steps = 3
  c.lr.decay = 'constant'
  c.lr.base_lr = 0.2
  c.lr.base_batch = 64
  return config_lib.override(c, **overrides)


@pytest.mark.slow
def test_steps_to_target_is_the_first_evaluation_that_meets_it(tmp_path):
  config = _digits_config(**{'target.value': 0.28})
  loop.train_and_evaluate(config, str(tmp_path),
                          hooks=study_hooks.hooks_for(config, str(tmp_path)))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  curve = [(r['step'], r['eval/top1']) for r in rows if 'eval/top1' in r]
  reached = json.load(open(tmp_path / 'target.json'))
  first = next(step for step, top1 in curve if top1 >= 0.28)
  assert reached['step'] == first == curve[-1][0]  # and training stopped there
  assert reached['examples'] == first * 64 and reached['achieved'] >= 0.28
  assert first < 12


@pytest.mark.slow
def test_a_trial_that_never_meets_the_target_is_recorded_as_not_reached(tmp_path):
  study = study_digits.get_config('quick')
  study.batch_sizes = (64,)
  study.lr_search.num_trials = 1
  study.target.value = 1.01  # unreachable
  study.budget.epochs, study.budget.steps = None, 6
  study.sharpness = False
  results = run.run_study(study, str(tmp_path), echo=lambda *_: None)
  (row,) = results
  assert row['reached'] is False and row['steps_to_target'] is None
  assert row['examples_to_target'] is None and row['steps_run'] == 6
  assert row['final_metric'] is not None and row['eval_curve']
  (agg,) = aggregate.steps_to_target(results)
  assert not agg['reached']
  assert 'not reached' in (tmp_path / 'report.md').read_text()


def test_a_bad_variant_field_fails_before_any_trial_runs(tmp_path):
  study = study_digits.get_config('quick')
  study.variants.sgd_tuned = {'optimizer': {'nmae': 'lars'}}
  with pytest.raises(config_lib.ConfigError, match=r'variants\.sgd_tuned\.optimizer\.nmae'):
    run.run_study(study, str(tmp_path))
  assert not os.path.exists(tmp_path / 'trials')


@pytest.mark.slow
def test_quick_sweep_end_to_end_compiles_once_per_batch_size_and_resumes(tmp_path, monkeypatch):
  study = study_digits.get_config('quick')
  cache = trainer_lib.CompileCache()
  lines = []
  results = run.run_study(study, str(tmp_path), echo=lines.append, cache=cache)
  assert len(results) == 4  # 2 batch sizes x 2 learning rates
  assert any('trial 4/4' in l and 'ETA' in l for l in lines)
  new = cache.entries('steps')
  assert len(new) == 2  # one step per batch size, each compiled for one input shape
  for step_fn, _, _ in new:
    assert step_fn._cache_size() == 1
  for row in results:
    assert row['noise_scale'] and row['sharpness'] and row['eval_curve']
    assert any(row['lr'] == pytest.approx(lr) for lr in (0.05, 0.2))
  text = (tmp_path / 'report.md').read_text()
  for stem, _ in render_steps.FIGURES:
    if f'figures/{stem}.png' not in text:
      # Only the trade-off fit may be missing: it needs two batch sizes that reached the target.
      assert stem == 'steps_vs_examples', stem
      continue
    assert (tmp_path / 'figures' / f'{stem}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert len((tmp_path / 'results.jsonl').read_text().splitlines()) == 4

  # Resume: nothing reruns, the report is written again from results.jsonl.
  monkeypatch.setattr(run, 'run_trial', lambda *a: pytest.fail('a finished trial was rerun'))
  again = run.run_study(study, str(tmp_path), echo=lines.append)
  assert [r['trial_id'] for r in again] == [r['trial_id'] for r in results]
  # Cluster mode: no command is left to run; merge rewrites the report.
  assert run.commands(study, str(tmp_path), 'configs/study_digits.py:quick') == []
  run.merge(study, str(tmp_path), echo=lines.append)


@pytest.mark.parametrize('name', ['study_digits', 'study_synthetic'])
def test_every_trial_of_the_shipped_studies_validates(name):
  import importlib  # pylint: disable=g-import-not-at-top
  study = importlib.import_module(f'configs.{name}').get_config()
  trials = grid.trials(study)
  per_point = {(t.variant, t.batch_size) for t in trials}
  assert len(per_point) == sum(len(v.get('batch_sizes', study.batch_sizes))
                               for v in study.variants.values())
  assert len({t.trial_id for t in trials}) == len(trials)
  per_step = study.microbatch * jax.device_count()
  for t in trials:  # a device's microbatch is the study's, where the batch splits into them
    per_device = t.batch_size // (t.config.accumulation_steps * jax.device_count())
    splits = t.batch_size > per_step and t.batch_size % per_step == 0
    assert per_device == (study.microbatch if splits else t.batch_size // jax.device_count())
    assert t.config.target.value == study.target.value and t.config.target.stop


@pytest.mark.slow
def test_face_sharpness_is_the_top_eigenvalue_of_the_full_margin_softmax():
  # Sharpness differentiates the task's objective: for faces, the margin softmax over every
  # class (the centers' padding rows left out), with the backbone's BN frozen.
  c = config_lib.base_config()
  c.task, c.data.name, c.model.name = 'face', 'face_synthetic', 'mlp'
  c.data.image_size, c.data.num_identities, c.data.images_per_identity = 8, 13, 8
  # Wide enough that no example's embedding is 0 (all ReLUs off), where the normalization has
  # no second derivative.
  c.model.width, c.model.embedding_dim = 12, 4
  c.face.s, c.face.m2 = 16.0, 0.3
  c.global_batch, c.num_steps = 32, 2
  c.sharpness.num_examples, c.sharpness.num_iters = 40, 40
  config_lib.validate(c, jax.device_count())
  dataset = data_lib.create(c)
  trainer = trainer_lib.build(c, sharding.make_mesh(c), num_train=dataset.num_train,
                              image_shape=dataset.image_shape, num_classes=dataset.num_classes)
  state = trainer_lib.precise_bn(trainer, trainer.state, dataset, 2, first_step=0)
  value = study_hooks.measure_sharpness(trainer, trainer.state, dataset, c)
  rows = [jax.device_get(dataset.train_batch(s)) for s in range(2)]
  images = np.concatenate([r['image'].reshape(-1, *dataset.image_shape) for r in rows])[:40]
  labels = np.concatenate([r['label'].reshape(-1) for r in rows])[:40]
  params = jax.device_get(trainer.state.params)
  flat, unravel = ravel_pytree(params)

  def loss(f):  # written here from the margin's definition, not through the task
    p = unravel(f)
    e = trainer.model.apply({'params': p['backbone'], 'batch_stats': state.batch_stats},
                            images, train=False)
    w = p['centers'][:dataset.num_classes]
    cos = (e / jnp.linalg.norm(e, axis=1, keepdims=True)) @ (
        w / jnp.linalg.norm(w, axis=1, keepdims=True)).T
    theta = jnp.arccos(jnp.clip(cos, -1 + 1e-7, 1 - 1e-7))
    is_target = jax.nn.one_hot(labels, dataset.num_classes) > 0
    logits = c.face.s * jnp.where(is_target, jnp.cos(theta + c.face.m2), cos)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.sum(logits * is_target, axis=1))

  assert np.prod(trainer.state.params['centers'].shape) > dataset.num_classes * 4  # padded
  eigenvalues = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))
  np.testing.assert_allclose(value, eigenvalues[-1], rtol=2e-2)
