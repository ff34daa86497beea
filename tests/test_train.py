"""The properties the trainer exists for: N devices = 1 device, accumulation = one large batch,
one gradient reduction per update, lr trials share one compilation."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import hlo
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch.models import layers

IMAGE_SHAPE = (8, 8, 1)


def _config(**overrides):
  c = config_lib.base_config()
  c.model.name = 'cnn'
  c.model.width = 8
  c.num_steps = 10
  c.optimizer.weight_decay = 1e-4
  return config_lib.override(c, **overrides)


def _batch(k, m, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(k, m, *IMAGE_SHAPE)).astype(np.float32),
          'label': rng.integers(0, 10, size=(k, m)).astype(np.int32)}


def _run(config, devices, batches, cache=None):
  mesh = sharding.make_mesh(config, devices)
  trainer = trainer_lib.build(config, mesh, num_train=10_000, image_shape=IMAGE_SHAPE,
                              num_classes=10, cache=cache)
  state = trainer.state
  for b in batches:
    state, metrics = trainer.train_step(state, jax.device_put(b, trainer.batch_sharding))
  return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_lars_sync_bn_update_8_devices_equals_1_device():
  config = _config(**{'optimizer.name': 'lars', 'lr.base_lr': 2.0, 'global_batch': 64})
  batches = [_batch(1, 64, seed=s) for s in range(2)]
  one, m1 = _run(config, jax.devices()[:1], batches)
  eight, m8 = _run(config, jax.devices(), batches)
  _assert_trees_close(eight.params, one.params)
  _assert_trees_close(eight.opt_state, one.opt_state)
  _assert_trees_close(eight.batch_stats, one.batch_stats)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  # The update did something: parameters moved and trust ratios are not trivially 1.
  init = jax.device_get(trainer_lib.build(config, sharding.make_mesh(config, jax.devices()[:1]),
                                    num_train=10_000, image_shape=IMAGE_SHAPE,
                                    num_classes=10).state)
  assert not np.allclose(init.params['conv0']['kernel'], one.params['conv0']['kernel'])
  assert m1['trust_ratio_max'] != pytest.approx(1.0)


def _reorder_for_one_microbatch(batch, devices):
  """The k=1 batch whose per-device shares are the concatenation of that device's shares of
  each of the k microbatches, so ghost-BN groups hold the same examples in both runs."""
  k, m = batch['label'].shape
  per = m // devices
  out = {}
  for name, x in batch.items():
    x = x.reshape(k, devices, per, *x.shape[2:])
    x = np.swapaxes(x, 0, 1)  # [devices, k, per, ...]
    out[name] = x.reshape(1, devices * k * per, *x.shape[3:])
  return out


@pytest.mark.parametrize('optimizer', ['sgd', pytest.param('lamb', marks=pytest.mark.slow)])
def test_accumulation_equals_one_large_batch_with_ghost_bn(optimizer):
  g = 4
  acc = [_batch(4, 64, seed=s) for s in range(2)]  # 4 microbatches of 64 = 8 per device
  ref = [_reorder_for_one_microbatch(b, 8) for b in acc]
  common = {'optimizer.name': optimizer, 'lr.base_lr': 0.1, 'global_batch': 256,
            'model.bn_group_size': g}
  accumulated, _ = _run(_config(accumulation_steps=4, **common), jax.devices(), acc)
  large, _ = _run(_config(accumulation_steps=1, **common), jax.devices(), ref)
  # Adam-style normalization divides by sqrt(v): tiny float32 differences of near-zero gradient
  # entries grow, so LAMB gets a looser (still float32-level) tolerance.
  tol = {'rtol': 1e-4, 'atol': 1e-5} if optimizer == 'lamb' else {}
  _assert_trees_close(accumulated.params, large.params, **tol)
  _assert_trees_close(accumulated.opt_state, large.opt_state, **tol)
  _assert_trees_close(accumulated.batch_stats, large.batch_stats, **tol)


def test_gradients_reduced_once_after_the_accumulation_loop():
  config = _config(accumulation_steps=4, global_batch=256, **{'model.bn_group_size': None})
  mesh = sharding.make_mesh(config)
  trainer = trainer_lib.build(config, mesh, num_train=10_000, image_shape=IMAGE_SHAPE, num_classes=10)
  batch = jax.device_put(_batch(4, 64), trainer.batch_sharding)
  text = trainer.train_step.lower(trainer.state, batch).compile().as_text()
  comps = hlo.computations(text)
  bodies = [body for body, _ in hlo.while_bodies(comps)]
  assert bodies, 'the accumulation scan should compile to a while loop'
  in_loop = hlo.reachable(comps, bodies)
  num_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
  largest_kernel = max(x.size for x in jax.tree.leaves(trainer.state.params))
  elements = lambda r: sum(int(np.prod(shape)) for _, shape in r.operands)
  loop_sizes = [elements(r) for r in hlo.all_reduces(comps) if r.computation in in_loop]
  outside = [elements(r) for r in hlo.all_reduces(comps) if r.computation not in in_loop]
  # Inside the loop: only the sync-BN statistics (a few channels each), nothing gradient-sized.
  assert loop_sizes, 'sync BN should reduce its statistics inside the loop'
  assert max(loop_sizes) < largest_kernel
  assert sum(loop_sizes) < num_params / 10
  # After the loop: the gradients, all of them (possibly combined into one all-reduce).
  assert sum(outside) >= num_params


def test_ghost_bn_equals_bn_on_each_group_separately():
  x = np.random.default_rng(0).normal(size=(12, 4, 4, 3)).astype(np.float32) * 3 + 1
  ghost = layers.BatchNorm(use_running_average=False, group_size=4, momentum=0.5)
  plain = layers.BatchNorm(use_running_average=False, group_size=None, momentum=0.5)
  variables = ghost.init(jax.random.key(0), x)
  y, new = ghost.apply(variables, x, mutable=['batch_stats'])
  outs, means, variances = [], [], []
  for i in range(3):
    yi, stats = plain.apply(variables, x[4 * i:4 * i + 4], mutable=['batch_stats'])
    outs.append(yi)
    means.append(stats['batch_stats']['mean'])
    variances.append(stats['batch_stats']['var'])
  np.testing.assert_allclose(y, np.concatenate(outs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['mean'], np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['var'], np.mean(variances, 0), rtol=1e-5)
  # And the groups really are separate: BN over all 12 differs.
  y_all, _ = plain.apply(variables, x, mutable=['batch_stats'])
  assert not np.allclose(y_all, y, atol=1e-3)


def test_ghost_bn_rejects_group_not_dividing_batch():
  bn = layers.BatchNorm(use_running_average=False, group_size=5)
  with pytest.raises(ValueError, match='does not divide'):
    bn.init(jax.random.key(0), jnp.ones((12, 3)))


@pytest.mark.slow
def test_lr_trials_share_one_compiled_step():
  cache = trainer_lib.CompileCache()
  lrs = []
  for base_lr in (0.05, 0.1, 0.2):
    config = _config(**{'lr.base_lr': base_lr, 'global_batch': 64})
    _, metrics = _run(config, jax.devices(), [_batch(1, 64)], cache)
    lrs.append(float(metrics['lr']))
  assert len(cache.entries('steps')) == 1
  ((step_fn, _, _),) = cache.entries('steps')
  assert step_fn._cache_size() == 1  # one trace, one compilation for the three trials
  np.testing.assert_allclose(lrs, [0.05 / 4, 0.1 / 4, 0.2 / 4], rtol=1e-5)  # 64/256 linear rule


@pytest.mark.slow
def test_builds_with_different_class_counts_in_one_process():
  """The compile cache is keyed on build()'s arguments too: 10 classes, then 40, in one cache."""
  cache = trainer_lib.CompileCache()
  config = _config(global_batch=16)
  for num_classes in (10, 40):
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    t = trainer_lib.build(config, mesh, num_train=10_000, image_shape=IMAGE_SHAPE,
                          num_classes=num_classes, cache=cache)
    batch = _batch(1, 16)
    batch['label'] = batch['label'] % num_classes
    state, metrics = t.train_step(t.state, jax.device_put(batch, t.batch_sharding))
    logits = t.model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                           batch['image'][0], train=False)
    assert logits.shape == (16, num_classes)
    assert np.isfinite(float(metrics['loss']))
  assert len(cache.entries('steps')) == 2 and len(cache.entries('init')) == 2
