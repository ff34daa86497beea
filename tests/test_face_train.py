"""Face recognition through the one trainer: Partial FC's sharded centers in the step, N devices =
1 device, accumulation = one batch, sampled-rows optimizer state, verification as the evaluator,
and the CPU config learning held-out identities."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import data as data_lib
from bigbatch import loop
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch.face import partial_fc

IMAGE_SHAPE = (16, 16, 3)
NUM_CLASSES = 37  # not a multiple of 8: padded rows on the 8-device mesh


def _config(**overrides):
  c = config_lib.base_config()
  c.task = 'face'
  c.data.name = 'face_synthetic'
  c.model.name = 'iresnet'
  c.model.depth = 18
  c.model.stage_depths = (1, 1, 1, 1)
  c.model.width = 4
  c.model.embedding_dim = 8
  c.model.bn_group_size = 4
  c.model.conv_impl = 'xla'
  c.face.s, c.face.m2 = 16.0, 0.3
  c.face.sample_rate = 1.0
  c.global_batch = 32
  c.num_steps = 10
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.5
  c.lr.base_batch = 32
  return config_lib.override(c, **overrides)


def _batch(k, m, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(k, m, *IMAGE_SHAPE)).astype(np.float32),
          'label': rng.integers(0, NUM_CLASSES, size=(k, m)).astype(np.int32)}


def _run(config, devices, batches):
  config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config, devices)
  trainer = trainer_lib.build(config, mesh, num_train=10_000, image_shape=IMAGE_SHAPE,
                        num_classes=NUM_CLASSES)
  state = trainer.state
  for b in batches:
    state, metrics = trainer.train_step(state, jax.device_put(b, trainer.batch_sharding))
  return trainer, state, jax.device_get(metrics)


def _close(a, b, rtol=2e-4, atol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_face_step_on_8_devices_equals_1_device():
  """Sample rate 1 (no sampling): backbone, class centers (the real rows), BN statistics and
  momentum agree; on 8 devices the centers are split into row blocks."""
  config = _config(**{'optimizer.name': 'sgd', 'lr.base_lr': 0.05})  # well-conditioned steps
  batches = [_batch(1, 32, seed=s) for s in range(2)]
  _, one, m1 = _run(config, jax.devices()[:1], batches)
  _, eight, m8 = _run(config, jax.devices(), batches)
  # atol: biases just before a BatchNorm (head_dense, norm3 + proj_norm before the next norm1)
  # have a true gradient of 0; theirs is float32 rounding noise of the order 1e-4 x lr here,
  # which differs with the reduction order.
  _close(eight.params['backbone'], one.params['backbone'], atol=5e-4)
  _close(np.asarray(eight.params['centers'])[:NUM_CLASSES],
         np.asarray(one.params['centers'])[:NUM_CLASSES], rtol=1e-3, atol=2e-4)
  _close(eight.batch_stats, one.batch_stats)
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  # The second step's gradient norm, after one update whose rounding differs with the layout
  # (the biases above): 1.28e-4 apart on the development machine (AMD EPYC, XLA:CPU), where the
  # code before one reduction order for every BN layout was 8e-3 apart in the parameters.
  np.testing.assert_allclose(m8['grad_norm'], m1['grad_norm'], rtol=3e-4)
  assert np.isfinite(m8['loss']) and m8['loss'] > 0
  # Centers and their momentum: C_pad / 8 rows per device.
  c_pad = partial_fc.padded_num_classes(NUM_CLASSES, 8)
  assert eight.params['centers'].shape == (c_pad, 8)
  for leaf in (eight.params['centers'],
               *[x for x in jax.tree.leaves(eight.opt_state) if x.shape == (c_pad, 8)]):
    assert {s.data.shape for s in leaf.addressable_shards} == {(c_pad // 8, 8)}
  assert len([x for x in jax.tree.leaves(eight.opt_state) if x.shape == (c_pad, 8)]) == 1


@pytest.mark.slow
def test_face_accumulation_equals_one_large_batch():
  # Ghost BN groups of 4 hold the same examples either way.
  fields = {'model.bn_group_size': 4, 'lr.base_lr': 0.05, 'global_batch': 64}
  big = _batch(1, 64, seed=3)
  split = {k: v.reshape(2, 32, *v.shape[2:]) for k, v in big.items()}
  _, one, m1 = _run(_config(**fields), jax.devices(), [big])
  _, acc, m2 = _run(_config(accumulation_steps=2, **fields), jax.devices(), [split])
  _close(acc.params['backbone'], one.params['backbone'], atol=5e-4)
  _close(acc.params['centers'], one.params['centers'], rtol=1e-3, atol=2e-4)
  np.testing.assert_allclose(m2['loss'], m1['loss'], rtol=1e-5)


@pytest.mark.slow
def test_sampled_rows_only_leaves_unsampled_centers_and_momentum_alone():
  config = _config(**{'face.sample_rate': 0.25, 'face.sampled_rows_only': True,
                      'global_batch': 8, 'model.bn_group_size': None})
  _, state, _ = _run(config, jax.devices(), [_batch(1, 8, seed=5)])
  mesh = sharding.make_mesh(config)  # the initial state again (the step donated its input)
  fresh = trainer_lib.build(config, mesh, num_train=10_000, image_shape=IMAGE_SHAPE,
                      num_classes=NUM_CLASSES).state
  moved = np.any(np.asarray(state.params['centers']) != np.asarray(fresh.params['centers']), 1)
  momentum = [x for x in jax.tree.leaves(state.opt_state) if x.shape == moved.shape + (8,)]
  (trace,) = momentum
  assert moved.any() and not moved.all()
  np.testing.assert_array_equal(np.any(np.asarray(trace) != 0, axis=1), moved)


@pytest.mark.parametrize('overrides, message', [
    ({'data.name': 'digits'}, 'face data set'),
    ({'optimizer.name': 'lars'}, 'trust_ratio_exclude'),
    ({'mesh.model': 2, 'mesh.data': 4}, 'mesh.model=1'),
    ({'face.sample_rate': 0.0}, 'face.sample_rate'),
    ({'optimizer.clip_grad_norm': 1.0}, 'clip_grad_norm'),
])
def test_face_config_errors_name_the_field(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_config(**overrides), num_devices=8)


@pytest.mark.slow
def test_face_synthetic_config_learns_held_out_identities(tmp_path):
  """The CPU config, shortened: verification on identities never trained on."""
  from configs import face_synthetic
  config = face_synthetic.get_config('steps=30')
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['verify/synthetic/pairs'] == 600
  assert result['verify/synthetic/accuracy'] >= 0.8
  assert 0.0 <= result['verify/synthetic/tar_at_far_1e-3'] <= 1.0
  # The eval split is never used for faces: the training set only holds training identities.
  dataset = data_lib.create(config)
  assert dataset.num_classes == config.data.num_identities
