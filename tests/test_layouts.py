"""One global batch, many layouts, many updates: devices x accumulation steps compute the same run.

tests/test_train.py checks one or two updates. Early training at a large lr without warmup
multiplies a rounding difference between layouts by 10-1000x per update once it starts to grow,
so a layout-dependent rounding (BatchNorm statistics reduced in a different order when a device
holds one ghost group than when it holds several) shows only after a few updates: 2.3e-6 after 5
updates here, 2.5e-5 on the CIFAR ResNet-20 at 16x16, where every layout now stays below 2e-7.

Layouts are (devices, mesh data x model, accumulation steps k) over one global batch of 256; the
global batch of each update is the same array in each layout, reshaped to [k, 256 / k], so ghost
groups (consecutive examples of a device's share) hold the same examples in every layout.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import sharding
from bigbatch import trainer as trainer_lib

IMAGE_SHAPE = (16, 16, 3)
GLOBAL_BATCH = 256
UPDATES = 5
# name: (devices, mesh.data, mesh.model, accumulation steps); per-device microbatch in brackets.
LAYOUTS = {
    '8x8': (8, 8, 1, 8),  # [4]
    '8x1': (8, 8, 1, 1),  # [32]
    '1x8': (1, 1, 1, 8),  # [32]
    '2x4_k2': (8, 2, 4, 2),  # [64], each batch row on the 4 devices of its 'model' row
    '1x1': (1, 1, 1, 1),  # [256]
    '1x2': (1, 1, 1, 2),  # [128]
}
# Max |difference| over all parameters allowed after each update. Measured with this file's
# model and data (2-core CPU, XLA:CPU, jax 0.10.2), every case below except the xfail: at most
# 1.2e-7 after any of the 5 updates, except ghost 2 (2.8e-7 after update 5) and sync BN under
# LARS, 8 x 1 vs 1 x 1: 1.2e-7, 2.7e-7, 5.1e-7, 7.3e-7, 9.3e-7 (LARS scales each step by
# 1 / ||g||, so a rounding of the norm moves every weight; 1 x 8 against itself with its
# initialization moved 1 ulp grows the same way, to 4.6e-7): LARS's bounds leave 3x of that.
# 8 x 8 against 8 x 1 (ghost 4, SGD) differs by 3e-8, 6e-8, 6e-8, 6e-8, 7.5e-8; BN reduced in a
# layout-dependent order gave 1.2e-7 for 4 updates, then 2.3e-6 (and 3.2e-6, 4.4e-6, 6.8e-5
# after updates 6-8). Parameters are O(0.1-1): 1e-6 is a few float32 ulps of the largest. Past 5
# updates a 1-ulp perturbation of one run grows too (to 3.2e-5 after 6 with ghost 2), so the
# layouts cannot be held to rounding beyond it (README, How it works).
ATOL = {'sgd': (1e-6,) * UPDATES, 'lars': (1e-6, 1e-6, 2e-6, 2e-6, 3e-6)}


def _config(layout, group, optimizer):
  _, data, model, k = LAYOUTS[layout]
  c = config_lib.base_config()
  c.model.name = 'cifar_resnet'
  c.model.depth = 8
  c.model.width = 8
  c.model.bn_group_size = group
  c.global_batch = GLOBAL_BATCH
  c.accumulation_steps = k
  c.mesh.data, c.mesh.model = data, model
  c.num_steps = 100
  c.optimizer.name = optimizer
  c.optimizer.nesterov = optimizer == 'sgd'
  # No warmup, constant lr: the regime where early updates amplify rounding differences most.
  c.lr.base_lr = {'sgd': 0.4, 'lars': 1.0}[optimizer]
  c.lr.scaling = 'none'
  c.lr.decay = 'constant'
  return c


def _batches():
  rng = np.random.default_rng(0)
  return [(rng.normal(size=(GLOBAL_BATCH, *IMAGE_SHAPE)).astype(np.float32),
           rng.integers(0, 10, size=(GLOBAL_BATCH,)).astype(np.int32))
          for _ in range(UPDATES)]


def _run(layout, group, optimizer, nudge=False):
  """The parameters after each update, and the final state. nudge: the initial parameters moved
  up by one float32 ulp each."""
  config = _config(layout, group, optimizer)
  devices = LAYOUTS[layout][0]
  mesh = sharding.make_mesh(config, jax.devices()[:devices])
  trainer = trainer_lib.build(config, mesh, num_train=50_000, image_shape=IMAGE_SHAPE,
                              num_classes=10)
  k = config.accumulation_steps
  state, params = trainer.state, []
  if nudge:
    moved = jax.tree.map(lambda x: np.nextafter(x, np.float32(np.inf)),
                         jax.device_get(state.params))
    state = state.replace(params=jax.tree.map(lambda m, p: jax.device_put(m, p.sharding),
                                              moved, state.params))
  for image, label in _batches():
    batch = {'image': image.reshape(k, GLOBAL_BATCH // k, *IMAGE_SHAPE),
             'label': label.reshape(k, GLOBAL_BATCH // k)}
    state, _ = trainer.train_step(state, jax.device_put(batch, trainer.batch_sharding))
    params.append(jax.device_get(state.params))
  return params, jax.device_get(state)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def _rounding_growth(layout, group, optimizer) -> tuple[float, ...]:
  """Max |difference| after each update between the run of `layout` and the same run with its
  initial parameters moved by one ulp: how far this run's own rounding can carry it."""
  plain, nudged = _run(layout, group, optimizer), _run(layout, group, optimizer, nudge=True)
  return tuple(_max_diff(a, b) for a, b in zip(plain[0], nudged[0]))


def _assert_same_run(got, expected, label, optimizer, reference):
  """Layouts agree after each update within ATOL, or within twice what a 1-ulp change of the
  reference's initialization makes (where the run passes near a ReLU's or a rounding's edge,
  that alone grows past ATOL: 2.3e-6 after update 5 for ghost 4, SGD, 8 x 1, once the finite
  check's reduction changed XLA's fusions; a layout-dependent BN order gave that with a 1-ulp
  growth of 1.8e-7)."""
  (got_params, got_state), (expected_params, expected_state) = got, expected
  diffs = [_max_diff(a, b) for a, b in zip(got_params, expected_params)]
  growth = _rounding_growth(*reference)
  print(f'{label}: max |difference| after each update', ' '.join(f'{d:.1e}' for d in diffs),
        '; 1-ulp growth of the reference', ' '.join(f'{d:.1e}' for d in growth))
  for update, (d, tol, g) in enumerate(zip(diffs, ATOL[optimizer], growth), 1):
    assert d <= max(tol, 2 * g), (f'{label}: parameters differ by {d:.2e} after update {update} '
                                  f'(> {tol}, and > 2 x the 1-ulp growth {g:.2e})')
  # The runs moved: the comparison is not between two unchanged initializations.
  assert _max_diff(got_params[-1], got_params[0]) > 1e-2
  # The running statistics are averaged over groups, microbatches and devices in an order that
  # does depend on the layout (they never feed back into ghost-BN training): rounding level.
  for a, b in zip(jax.tree.leaves(got_state.batch_stats),
                  jax.tree.leaves(expected_state.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_ghost_group_per_device_microbatch_equals_eight_groups_over_updates():
  """8 devices x k=8 hold one group of 4 per device and microbatch; 8 x 1 hold eight."""
  _assert_same_run(_run('8x8', 4, 'sgd'), _run('8x1', 4, 'sgd'), 'ghost 4, sgd, 8x8 vs 8x1',
                   'sgd', ('8x1', 4, 'sgd'))


@pytest.mark.slow
@pytest.mark.parametrize('group,optimizer', [(4, 'sgd'), (2, 'sgd'), (4, 'lars')])
def test_ghost_bn_layouts_agree_over_updates(group, optimizer):
  """Group 4: one group per device microbatch under 8 x 8, several elsewhere; group 2: several
  in every layout."""
  reference = _run('8x1', group, optimizer)
  for layout in ('8x8', '1x8', '2x4_k2'):
    _assert_same_run(_run(layout, group, optimizer), reference,
                     f'ghost {group}, {optimizer}, {layout} vs 8x1', optimizer,
                     ('8x1', group, optimizer))


_SYNC_LARS_K8 = pytest.mark.xfail(strict=True, reason=(
    'sync BN under LARS, 8 x 8 (4 examples per device) vs 1 x 8: 6.4e-5 after update 2, where '
    '1 x 8 against itself with its initialization moved 1 ulp stays at 4.6e-7 after 5; not '
    'traced (the sync statistics are shifted by the running mean, 0 at initialization)'))


@pytest.mark.slow
@pytest.mark.parametrize('optimizer,layout,reference', [
    ('sgd', '8x1', '1x1'), ('sgd', '8x8', '1x8'), ('sgd', '2x4_k2', '1x2'),
    ('lars', '8x1', '1x1'), pytest.param('lars', '8x8', '1x8', marks=_SYNC_LARS_K8),
    ('lars', '2x4_k2', '1x2')])
def test_sync_bn_layouts_agree_over_updates(optimizer, layout, reference):
  """Sync BN normalizes over the whole global microbatch: N devices equal 1 device at the same
  k (8 x 1 = 1 x 1, 8 x 8 = 1 x 8, 2 x 4 with k=2 = 1 x 2). Different k are different
  statistics, not compared."""
  _assert_same_run(_run(layout, None, optimizer), _run(reference, None, optimizer),
                   f'sync BN, {optimizer}, {layout} vs {reference}', optimizer,
                   (reference, None, optimizer))
