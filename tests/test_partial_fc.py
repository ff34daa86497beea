"""Partial FC on 8 emulated devices, under the trainer's gradient contract (pcast replicated
params, one pmean of their gradients, centers' gradients unreduced): at sample rate 1 it is the
dense margin softmax (value and gradients); at rate < 1 it is the float64 dense softmax
restricted to the classes it reports: int(rate * Cs) per shard, positives first, or all of a
shard's positives and nothing else where they are more (an overflowing batch, flagged in the
step's metrics); centers and their momentum stay sharded C_pad / 8 rows per device;
sampled_rows_update freezes unsampled rows; face_64k_lamb derives 3,218 rows per shard on 64
devices."""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigbatch.face import losses
from bigbatch.face import partial_fc

D_IN, D = 6, 8  # the toy backbone: embeddings = x @ theta
BATCH = 16
MARGIN = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)


def _mesh(shape):
  return jax.make_mesh(shape, partial_fc.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _problem(num_classes, seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  c_pad = partial_fc.padded_num_classes(num_classes, 8)
  theta = jnp.asarray(rng.normal(size=(D_IN, D)) / np.sqrt(D_IN), jnp.float32)
  w = rng.normal(size=(c_pad, D))
  w[num_classes:] = 0.0
  x = jnp.asarray(rng.normal(size=(batch, D_IN)), jnp.float32)
  # Repeated labels (several examples of one identity) and the last real class.
  labels = rng.integers(0, num_classes, size=batch)
  labels[:3] = labels[3]
  labels[4] = num_classes - 1
  return theta, jnp.asarray(w, jnp.float32), x, jnp.asarray(labels, jnp.int32)


@functools.lru_cache(maxsize=None)
def _step(mesh_shape, config):
  """jit(shard_map) of one per-device value_and_grad, as the trainer does it."""
  return _jit(_mapped(mesh_shape, config))


def _mapped(mesh_shape, config):
  mesh = _mesh(mesh_shape)
  axes = partial_fc.AXES

  def per_device(theta, w_local, x_local, labels_local, key):
    theta = lax.pcast(theta, axes, to='varying')  # replicated backbone parameter

    def f(theta, w_local):
      return partial_fc.loss(w_local, x_local @ theta, labels_local, key, config=config)

    (value, aux), (g_theta, g_w) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        theta, w_local)
    return value, aux, lax.pmean(g_theta, axes), g_w  # centers' gradient: not reduced

  spec_w = partial_fc.centers_spec()
  return jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), spec_w, P(axes), P(axes), P()),
      out_specs=(P(), {'accuracy': P(), 'sampled_classes': P(axes), 'overflow': P()}, P(),
                 spec_w))


def _jit(f, **kwargs):
  # Tiny problems run once or twice: XLA's backend optimizations cost more than they save.
  return jax.jit(f, compiler_options={'xla_backend_optimization_level': 0}, **kwargs)


def _dense(theta, w, x, labels, num_classes, columns=None):
  """Dense single-device margin softmax over all classes, or over `columns` (global ids) only;
  its value and gradients w.r.t. theta and the (padded) centers."""
  def f(theta, w):
    centers = w[:num_classes] if columns is None else w[columns]
    if columns is None:
      target = labels
    else:
      target = jnp.argmax(labels[:, None] == columns[None, :], axis=1)
    return losses.margin_softmax_loss(x @ theta, centers, target, **MARGIN)
  return _jit(jax.value_and_grad(f, argnums=(0, 1)))(theta, w)


def _config(num_classes, rate):
  return partial_fc.Config(num_classes=num_classes, sample_rate=rate, **MARGIN)


@pytest.mark.parametrize('mesh_shape, num_classes', [
    ((8, 1), 37),   # C_pad 40, the last shard part padding
    ((4, 2), 37),   # model axis > 1: batch and centers over both axes
    ((8, 1), 9),    # C_pad 16: shards 5-7 are all padding
])
def test_rate_one_equals_dense_margin_softmax(mesh_shape, num_classes):
  theta, w, x, labels = _problem(num_classes)
  value, aux, g_theta, g_w = _step(mesh_shape, _config(num_classes, 1.0))(
      theta, w, x, labels, jax.random.key(0))
  want, (want_theta, want_w) = _dense(theta, w, x, labels, num_classes)
  np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_theta), np.asarray(want_theta), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_w), np.asarray(want_w), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(g_w)[num_classes:] == 0)  # padding: no gradient
  assert float(jnp.max(jnp.abs(g_w))) > 1e-3
  # Every real class is in some shard's softmax, in order; padding reported as -1.
  sampled = np.asarray(aux['sampled_classes'])
  c_pad = partial_fc.padded_num_classes(num_classes, 8)
  np.testing.assert_array_equal(sampled, np.where(np.arange(c_pad) < num_classes,
                                                  np.arange(c_pad), -1))
  # Accuracy: top-1 over all classes of the plain cosine.
  e, c = np.asarray(x @ theta), np.asarray(w[:num_classes])
  cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (
      c / np.linalg.norm(c, axis=1, keepdims=True)).T
  np.testing.assert_allclose(float(aux['accuracy']),
                             np.mean(np.argmax(cos, 1) == np.asarray(labels)))


def test_per_device_embedding_gradient_is_the_local_mean_convention():
  # The embedding path's gradient on each device is N x dL/de_i (module doc): with the input as
  # the differentiated variable, x's gradient is 8x the dense one.
  num_classes = 37
  theta, w, x, labels = _problem(num_classes)
  config = _config(num_classes, 1.0)
  axes = partial_fc.AXES

  def per_device(x_local, w_local, labels_local):
    return jax.grad(lambda x: partial_fc.loss(w_local, x @ theta, labels_local,
                                              jax.random.key(0), config=config)[0])(x_local)

  g_x = _jit(jax.shard_map(per_device, mesh=_mesh((8, 1)),
                              in_specs=(P(axes), partial_fc.centers_spec(), P(axes)),
                              out_specs=P(axes)))(x, w, labels)
  want = _jit(jax.grad(lambda x: losses.margin_softmax_loss(x @ theta, w[:num_classes], labels,
                                                            **MARGIN)))(x)
  np.testing.assert_allclose(np.asarray(g_x), 8 * np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2)])
def test_sampled_softmax_equals_dense_softmax_over_the_sampled_classes(mesh_shape):
  num_classes, rate = 301, 0.5  # C_pad 304: 38 rows per shard, S = max(19, 16) = 19
  theta, w, x, labels = _problem(num_classes, seed=1)
  config = _config(num_classes, rate)
  s = partial_fc.sample_size(num_classes, 8, rate)
  assert s == 19 and partial_fc.capacity(num_classes, 8, BATCH, rate) == 19
  step = _step(mesh_shape, config)
  value, aux, g_theta, g_w = step(theta, w, x, labels, jax.random.key(3))
  sampled = np.asarray(aux['sampled_classes']).reshape(8, s)
  for shard, row in enumerate(sampled):
    real = row[row >= 0]
    assert len(set(real)) == len(real)
    assert np.all((real >= 38 * shard) & (real < 38 * (shard + 1)))
    positives = {int(y) for y in np.asarray(labels) if 38 * shard <= y < 38 * (shard + 1)}
    # Positives first, then negatives.
    assert set(real[:len(positives)]) == positives
  columns = sampled[sampled >= 0]
  assert len(columns) < num_classes  # really sampled
  want, (want_theta, want_w) = _dense(theta, w, x, labels, num_classes,
                                      columns=jnp.asarray(columns))
  np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_theta), np.asarray(want_theta), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_w), np.asarray(want_w), rtol=1e-4, atol=1e-6)
  unsampled = np.setdiff1d(np.arange(w.shape[0]), columns)
  assert np.all(np.asarray(g_w)[unsampled] == 0)  # exactly zero: sampled_rows_update relies on it
  assert np.all(np.any(np.asarray(g_w)[columns] != 0, axis=1))

  # Another key samples other negatives (the same positives); the same key the same ones.
  _, aux2, _, _ = step(theta, w, x, labels, jax.random.key(4))
  _, aux3, _, _ = step(theta, w, x, labels, jax.random.key(3))
  assert not np.array_equal(np.asarray(aux2['sampled_classes']), sampled.reshape(-1))
  np.testing.assert_array_equal(np.asarray(aux3['sampled_classes']), sampled.reshape(-1))


def _dense64(theta, w, x, labels, columns, **margin):
  """The float64 margin softmax over `columns` (global class ids) only, on one device."""
  with jax.enable_x64(True):
    def f(theta, w):
      target = jnp.argmax(labels[:, None] == columns[None, :], axis=1)
      return losses.margin_softmax_loss(x @ theta, w[columns], target, **{**MARGIN, **margin})
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (theta, w, x)]
    labels, columns = jnp.asarray(np.asarray(labels)), jnp.asarray(np.asarray(columns))
    value, (g_theta, g_w) = jax.value_and_grad(f, argnums=(0, 1))(args[0], args[1])
    return float(value), np.asarray(g_theta), np.asarray(g_w)


def _check_sampled(mesh_shape, num_classes, rate, labels, seed, **margin):
  """One step against the float64 softmax over the classes it reports; returns the per-shard
  columns and the overflow flag."""
  theta, w, x, _ = _problem(num_classes, seed=seed)
  config = partial_fc.Config(num_classes=num_classes, sample_rate=rate, **{**MARGIN, **margin})
  value, aux, g_theta, g_w = _step(mesh_shape, config)(theta, w, x, labels, jax.random.key(5))
  cs = partial_fc.padded_num_classes(num_classes, 8) // 8
  sampled = np.asarray(aux['sampled_classes']).reshape(8, -1)
  assert sampled.shape[1] == partial_fc.capacity(num_classes, 8, len(labels), rate)
  s = partial_fc.sample_size(num_classes, 8, rate)
  for shard, row in enumerate(sampled):
    real = row[row >= 0]
    assert len(set(real)) == len(real) and np.all(real // cs == shard)
    positives = {int(y) for y in np.asarray(labels) if y // cs == shard}
    assert set(real[:len(positives)]) == positives  # every positive, first
    padding = cs * (shard + 1) - num_classes
    assert len(real) == min(max(s, len(positives)), cs - max(padding, 0))  # rate * Cs, or more
  columns = sampled[sampled >= 0]
  want, want_theta, want_w = _dense64(theta, w, x, labels, columns, **margin)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_theta), want_theta, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_w), want_w, rtol=1e-4, atol=1e-6)
  unsampled = np.setdiff1d(np.arange(w.shape[0]), columns)
  assert np.all(np.asarray(g_w)[unsampled] == 0)
  return sampled, float(aux['overflow'])


def test_sample_size_is_rate_times_shard_rows_rounded_down():
  # int(rate * Cs) as arcface_torch's partial_fc_v2, whatever the batch; rate 1: every row.
  assert partial_fc.sample_size(10**6, 8, 0.1) == 12500
  assert partial_fc.sample_size(301, 8, 0.1) == 3  # Cs 38: int(3.8)
  assert partial_fc.sample_size(301, 8, 1.0) == 38
  assert partial_fc.sample_size(37, 8, 0.1) == 0  # Cs 5: positives only, as arcface_torch
  # face_64k_lamb: 2,059,906 WebFace42M identities over 64 devices, Cs = 32,187.
  assert partial_fc.sample_size(2_059_906, 64, 0.1) == 3218
  assert partial_fc.sample_size(2_059_906, 8, 0.1) == 25748  # Cs 257,489: 10%, not 25%
  # The sampled order is long enough for every positive a batch can bring to a shard.
  assert partial_fc.capacity(301, 8, 16, 0.1) == 16
  assert partial_fc.capacity(301, 8, 64, 0.1) == 38
  assert partial_fc.capacity(2_059_906, 64, 65536, 0.1) == 32187


@pytest.mark.parametrize('mesh_shape', [(8, 1), (4, 2)])
def test_normal_batch_is_rate_times_shard_rows_and_the_float64_sampled_softmax(mesh_shape):
  num_classes, rate = 301, 0.1  # Cs 38, S = 3
  rng = np.random.default_rng(7)
  # At most 3 distinct positives per shard: the softmax is exactly S = 3 columns per shard.
  labels = np.concatenate([38 * shard + rng.choice(35, 2, replace=False) for shard in range(8)])
  labels = jnp.asarray(labels, jnp.int32)
  sampled, overflow = _check_sampled(mesh_shape, num_classes, rate, labels, seed=3)
  assert overflow == 0
  assert np.all(np.sum(sampled >= 0, axis=1)[:7] == 3)


@pytest.mark.parametrize('margin', [{}, {'straight_through': True}, {'cap_loss': True}])
def test_overflowing_batch_keeps_every_positive_exactly(margin):
  # 11 distinct labels on shard 2 (S = 3 there): its softmax is those 11 classes, nothing else
  # (arcface_torch's rule), computed in blocks of 3 columns; the other shards sample 3 each.
  num_classes, rate = 301, 0.1
  labels = np.asarray([76, 77, 79, 80, 83, 85, 88, 90, 95, 101, 113, 113, 0, 150, 151, 300])
  sampled, overflow = _check_sampled((8, 1), num_classes, rate, jnp.asarray(labels, jnp.int32),
                                     seed=2, **margin)
  assert overflow == 1
  assert set(sampled[2][sampled[2] >= 0]) == set(labels[:11])
  assert np.sum(sampled[3] >= 0) == 3 and {150, 151} <= set(sampled[3])


def test_batch_larger_than_a_shard_samples_positives_first():
  # B = 16 >= Cs = 5 (37 classes): the order covers the whole shard, yet only max(S = 2,
  # positives) of it is in the softmax, positives first; several shards overflow.
  labels = np.asarray([0, 1, 2, 3, 3, 4, 5, 6, 11, 12, 13, 17, 22, 30, 35, 36])
  sampled, overflow = _check_sampled((8, 1), 37, 0.5, jnp.asarray(labels, jnp.int32), seed=4)
  assert overflow == 1 and sampled.shape[1] == 5
  assert set(sampled[0][sampled[0] >= 0]) == {0, 1, 2, 3, 4}  # 5 positives: all, only them
  assert np.sum(sampled[4] >= 0) == 2 and 22 in sampled[4]  # 1 positive + 1 negative


def test_overflow_counts_in_the_step_metrics():
  from bigbatch import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh, axes = _mesh((8, 1)), partial_fc.AXES
  config = _config(301, 0.1)
  theta, w, x, _ = _problem(301, seed=2)
  normal = np.arange(16) * 19  # 2 per shard
  crowded = 76 + np.arange(16)  # 16 on shard 2

  def loss_fn(params, batch_stats, x, y, key):
    loss, aux = partial_fc.loss(params['centers'], x @ params['theta'], y, key, config=config)
    return loss, ({}, {'accuracy': aux['accuracy'], 'partial_fc_overflow': aux['overflow']})

  tx = optax.inject_hyperparams(lambda peak_lr: optax.sgd(0.0))(peak_lr=0.0)
  assert isinstance(tx.init({}), optax.InjectStatefulHyperparamsState)

  def per_device(params, batch):
    state = step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0), nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32), ema_params={}, noise_scale={})
    _, metrics = step_lib.train_step(state, batch, loss_fn=loss_fn, tx=tx,
                                     lr_fn=lambda count, peak: peak, axes=axes)
    return metrics['partial_fc_overflow'], metrics['loss']

  spec = {'theta': P(), 'centers': partial_fc.centers_spec()}
  step = _jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, P(None, 'data')),
                            out_specs=(P(), P())))
  # Three microbatches, two of them overflowing: the metric counts them.
  labels = jnp.asarray(np.stack([normal, crowded, crowded]), jnp.int32)
  count, loss = step({'theta': theta, 'centers': w},
                     {'image': jnp.stack([x, x, x]), 'label': labels})
  assert float(count) == 2 and np.isfinite(float(loss))


@pytest.mark.slow
def test_face_64k_lamb_derives_rate_times_shard_rows_on_64_devices():
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.join(os.path.dirname(__file__), '..')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=64')
  out = subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', '--config=configs/face_64k_lamb.py',
       '--print_derived'], cwd=root, env=env, capture_output=True, text=True, timeout=300,
      check=True).stdout
  assert ('rows per shard          32,187 (3,218 sampled per step; all positives, up to '
          '32,187, when they are more)') in out


def test_centers_and_momentum_stay_sharded_and_unsampled_rows_stay_put():
  num_classes, rate = 301, 0.5
  mesh = _mesh((8, 1))
  c_pad = partial_fc.padded_num_classes(num_classes, 8)
  sharding = NamedSharding(mesh, partial_fc.centers_spec())
  centers = jax.jit(functools.partial(partial_fc.init_centers, num_classes=num_classes,
                                      embedding_dim=D, num_shards=8),
                    out_shardings=sharding)(jax.random.key(0))
  assert centers.shape == (c_pad, D)
  assert np.all(np.asarray(centers)[num_classes:] == 0)
  tx = partial_fc.sampled_rows_update(optax.chain(optax.add_decayed_weights(5e-4),
                                                  optax.sgd(0.1, momentum=0.9)))
  opt_state = jax.jit(tx.init)(centers)
  theta, _, x, labels = _problem(num_classes)
  step = _mapped((8, 1), _config(num_classes, rate))

  @functools.partial(_jit, donate_argnums=(0, 1), out_shardings=(sharding, None))
  def update(centers, opt_state, key):
    _, _, _, g_w = step(theta, centers, x, labels, key)
    updates, opt_state = tx.update(g_w, opt_state, centers)
    return optax.apply_updates(centers, updates), opt_state

  before = np.asarray(centers)
  new_centers, opt_state = update(centers, opt_state, jax.random.key(1))
  momentum = [l for l in jax.tree.leaves(opt_state) if l.ndim == 2]
  assert len(momentum) == 1
  for array in (new_centers, momentum[0]):
    assert array.sharding.is_equivalent_to(sharding, 2)
    assert {s.data.shape for s in array.addressable_shards} == {(c_pad // 8, D)}
  changed = np.any(np.asarray(new_centers) != before, axis=1)
  s = partial_fc.sample_size(num_classes, 8, rate)
  assert changed.sum() == 8 * s  # every sampled row (all real here), nothing else
  assert not np.any(changed[num_classes:])


def test_sampled_rows_update_freezes_rows_without_gradient():
  inner = optax.inject_hyperparams(
      lambda lr: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(lr, momentum=0.9)))(
          lr=0.5)
  params = {'centers': jnp.arange(12.0).reshape(4, 3) + 1, 'bias': jnp.ones(3)}
  mask = {'centers': True, 'bias': False}
  tx = partial_fc.sampled_rows_update(inner, mask)
  g1 = {'centers': jnp.asarray([[1.0, 0, 0], [0, 0, 0], [0, 2, 0], [0, 0, 0]]),
        'bias': jnp.zeros(3)}
  g2 = {'centers': jnp.asarray([[0.0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 3]]),
        'bias': jnp.zeros(3)}
  p, s = params, tx.init(params)
  p_ref, s_ref = params, inner.init(params)
  for g in (g1, g2):
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    u_ref, s_ref = inner.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u_ref)
  c, c_ref, c0 = (np.asarray(t['centers']) for t in (p, p_ref, params))
  np.testing.assert_array_equal(c[1], c0[1])  # never sampled: no decay
  # Row 0: sampled in step 1 only. The plain optimizer keeps moving it in step 2 (momentum and
  # decay); the wrapper leaves it where step 1 put it.
  step1 = c0[0] - 0.5 * (g1['centers'][0] + 0.1 * c0[0])
  np.testing.assert_allclose(c[0], step1, rtol=1e-6)
  assert np.max(np.abs(c_ref[0] - step1)) > 1e-3
  # Row 2: sampled in both steps: exactly the inner optimizer. Bias (not masked): inner's too.
  np.testing.assert_allclose(c[2], c_ref[2], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p['bias']), np.asarray(p_ref['bias']), rtol=1e-6)
  # The momentum of row 0 is still step 1's: 1 * (g + wd * w).
  trace = [l for l in jax.tree.leaves(s) if getattr(l, 'shape', None) == (4, 3)]
  assert len(trace) == 1
  np.testing.assert_allclose(np.asarray(trace[0])[0], g1['centers'][0] + 0.1 * c0[0], rtol=1e-6)
  assert np.all(np.asarray(trace[0])[1] == 0)
