"""bigbatch.study: the gradient noise scale estimator recovers a known tr(Sigma)/|G|^2, and
Lanczos finds the largest algebraic Hessian eigenvalue, with Hessian-vector products that work
through the custom-vjp CPU convolution."""
import math

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigbatch import config_lib
from bigbatch import models
from bigbatch import grad_stats
from bigbatch.study import noise_scale
from bigbatch.study import sharpness

# ---------------------------------------------------------------------------------------------
# Noise scale.

# Linear regression y = x . w* + e, x ~ N(0, I_D), e ~ N(0, S2), loss 0.5 (x . w - y)^2 at
# w = w* + delta. One example's gradient is g = x (x . delta - e), so G = E g = delta and
# (Isserlis) E g g^T = (|delta|^2 + S2) I + 2 delta delta^T, hence
#   Sigma = (|delta|^2 + S2) I + delta delta^T,  tr(Sigma) = D (|delta|^2 + S2) + |delta|^2,
#   B_simple = D + 1 + D S2 / |delta|^2.
D, S2, DELTA_SQ = 10, 1.0, 1.0
TRUE_TRACE = D * (DELTA_SQ + S2) + DELTA_SQ
TRUE_B_SIMPLE = TRUE_TRACE / DELTA_SQ  # 21
SHARDS, PER_SHARD = 8, 4  # b = 4, B = 32 (8 "devices")


def _delta():
  return jnp.zeros((D,), jnp.float32).at[0].set(math.sqrt(DELTA_SQ))


def _shard_loss(w, x_bxD, y_b):
  return 0.5 * jnp.mean(jnp.square(x_bxD @ w - y_b))


@jax.jit
def _sq_norms(x_TxSxbxD, e_TxSxb):
  """Per step (|G_b|^2 mean over shards, |G_B|^2), as the trainer would compute them; the B
  batch is the union of the S shards."""
  w = _delta()  # w* = 0

  def one_step(x_SxbxD, e_Sxb):
    y_Sxb = math.sqrt(S2) * e_Sxb
    grads_SxD = jax.vmap(jax.grad(_shard_loss), in_axes=(None, 0, 0))(w, x_SxbxD, y_Sxb)
    small = jnp.mean(jax.vmap(grad_stats.sq_norm)(grads_SxD))
    big = grad_stats.sq_norm(jnp.mean(grads_SxD, axis=0))
    return small, big
  return jax.vmap(one_step)(x_TxSxbxD, e_TxSxb)


def test_analytic_covariance_matches_a_large_sample():
  """Guards the derivation above: tr(Sigma) and |G|^2 from 200k per-example gradients."""
  rng = np.random.default_rng(1)
  x_NxD = rng.standard_normal((200_000, D))
  e_N = math.sqrt(S2) * rng.standard_normal(200_000)
  delta = np.asarray(_delta(), np.float64)
  g_NxD = x_NxD * (x_NxD @ delta - e_N)[:, None]
  trace = float(np.sum(g_NxD.var(0)))
  assert abs(trace / TRUE_TRACE - 1) < 0.02
  np.testing.assert_allclose(g_NxD.mean(0), delta, atol=0.03)


def test_noise_scale_recovered_on_linear_regression():
  steps = 3000
  rng = np.random.default_rng(0)
  x = rng.standard_normal((steps, SHARDS, PER_SHARD, D)).astype(np.float32)
  e = rng.standard_normal((steps, SHARDS, PER_SHARD)).astype(np.float32)
  small_T, big_T = _sq_norms(x, e)
  # Vectorized over steps: estimates is elementwise.
  g2_T, tr_T = grad_stats.estimates(small_T, big_T, PER_SHARD, SHARDS * PER_SHARD)
  g2_T, tr_T = np.asarray(g2_T), np.asarray(tr_T)
  # Each estimate is unbiased (per-step std is large, hence the loose 10%).
  assert abs(g2_T.mean() / DELTA_SQ - 1) < 0.1
  assert abs(tr_T.mean() / TRUE_TRACE - 1) < 0.1
  # One-step estimates are so noisy that |G|^2 is often negative: smoothing numerator and
  # denominator first is what makes the ratio usable.
  assert (g2_T < 0).any()

  ema = noise_scale.NoiseScaleEMA(decay=0.999)
  for g2, tr in zip(g2_T, tr_T):
    ema.update(g2, tr)
  assert abs(ema.b_simple / TRUE_B_SIMPLE - 1) < 0.1, ema.as_dict()
  assert ema.as_dict()['num_updates'] == steps
  uniform = noise_scale.b_simple_from_series(zip(g2_T, tr_T))
  assert abs(uniform / TRUE_B_SIMPLE - 1) < 0.1
  # |G_b|^2 alone is not |G|^2: a naive ratio would be far off (the estimator's whole point).
  assert np.asarray(small_T).mean() > 2 * DELTA_SQ


def test_estimates_exact_on_expected_norms_and_under_jit():
  g2, tr, b, B = 2.0, 30.0, 4, 32
  small, big = g2 + tr / b, g2 + tr / B  # E|G_b|^2, E|G_B|^2
  got = grad_stats.estimates(small, big, b, B)
  np.testing.assert_allclose(np.asarray(got), [g2, tr], rtol=1e-6)
  jitted = jax.jit(grad_stats.estimates, static_argnums=(2, 3))(
      jnp.float32(small), jnp.float32(big), b, B)
  np.testing.assert_allclose(np.asarray(jitted), [g2, tr], rtol=1e-6)
  traced_sizes = jax.jit(grad_stats.estimates)(small, big, b, B)
  np.testing.assert_allclose(np.asarray(traced_sizes), [g2, tr], rtol=1e-6)


@pytest.mark.parametrize('b,B', [(32, 32), (64, 32)])
def test_estimates_rejects_b_not_below_B(b, B):
  with pytest.raises(ValueError, match='coincide'):
    grad_stats.estimates(1.0, 1.0, b, B)


def test_ema_bias_correction_and_edge_cases():
  ema = noise_scale.NoiseScaleEMA(decay=0.9)
  assert math.isnan(ema.b_simple)
  ema.update(2.0, 10.0)
  # Bias-corrected: one update reports the value itself, not 0.1 of it.
  assert ema.g2 == pytest.approx(2.0) and ema.trace_sigma == pytest.approx(10.0)
  assert ema.b_simple == pytest.approx(5.0)
  ema.update(4.0, 10.0)
  # Weights 0.1 * 0.9 and 0.1, renormalized by 1 - 0.81.
  assert ema.g2 == pytest.approx((0.09 * 2 + 0.1 * 4) / 0.19)
  ema.update(float('nan'), 1.0)
  assert ema.num_skipped == 1 and ema.num_updates == 2
  # Numerator and denominator are averaged separately: mean ratio != ratio of means.
  series = [(1.0, 1.0), (3.0, 9.0)]
  assert noise_scale.b_simple_from_series(series) == pytest.approx(10.0 / 4.0)
  assert noise_scale.b_simple_from_series([(-1.0, 5.0)]) == math.inf
  assert noise_scale.b_simple_from_series([(0.0, 5.0)], decay=0.5) == math.inf
  assert math.isnan(noise_scale.b_simple_from_series([]))
  with pytest.raises(ValueError):
    noise_scale.NoiseScaleEMA(decay=1.0)


def test_sq_norm_of_a_gradient_tree():
  tree = {'a': jnp.array([3.0, 4.0]), 'b': {'c': jnp.ones((2, 2), jnp.bfloat16)}}
  assert float(grad_stats.sq_norm(tree)) == pytest.approx(29.0)
  assert grad_stats.sq_norm(tree).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Sharpness.


def _quadratic(eigs, seed=0):
  """0.5 p^T A p over a two-leaf pytree, A = Q diag(eigs) Q^T with a random rotation Q."""
  n = len(eigs)
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  a_NxN = jnp.asarray((q * np.asarray(eigs)) @ q.T, jnp.float32)
  params = {'u': jnp.ones((n - 12,), jnp.float32), 'w': jnp.ones((3, 4), jnp.float32)}

  def loss_fn(p, a):
    flat = jnp.concatenate([p['u'], p['w'].reshape(-1)])
    return 0.5 * flat @ a @ flat
  return loss_fn, params, a_NxN


def test_lanczos_finds_largest_algebraic_not_largest_magnitude():
  # Dimension 50, spectrum in [-10, 3]: top 3.0, next 2.0 (gap 1.0, i.e. 1/13 of the width), and
  # -10 is the largest in magnitude (what power iteration would find). 20 iterations < 50.
  eigs = np.concatenate([[3.0, 2.0, -10.0, -9.5], np.linspace(-9.0, 1.5, 46)])
  loss_fn, params, a = _quadratic(eigs)
  top, info = sharpness.top_eigenvalue(loss_fn, params, a, num_iters=20, key=jax.random.key(0))
  assert abs(top - 3.0) < 0.01 * 3.0, info
  assert info['num_iters'] == 20 and not info['breakdown']
  assert info['ritz_values'][0] < -9.0  # the negative end is seen, and not returned
  assert info['residual'] < 0.1


def test_lanczos_early_breakdown_is_exact():
  # Three distinct eigenvalues: the Krylov space is 3-dimensional, so Lanczos stops at step 3.
  eigs = np.array([1.5] * 20 + [-4.0] * 20 + [0.5] * 10)
  loss_fn, params, a = _quadratic(eigs, seed=1)
  top, info = sharpness.top_eigenvalue(loss_fn, params, a, num_iters=20, key=jax.random.key(1))
  assert info['breakdown'] and info['num_iters'] == 3, info
  assert top == pytest.approx(1.5, rel=1e-4)
  np.testing.assert_allclose(info['ritz_values'], [-4.0, 0.5, 1.5], rtol=1e-4, atol=1e-4)


def test_lanczos_compiles_the_step_once():
  loss_fn, params, a = _quadratic(np.linspace(-1.0, 1.0, 50))
  sharpness._lanczos_step._clear_cache()
  sharpness.top_eigenvalue(loss_fn, params, a, num_iters=5, key=jax.random.key(0))
  sharpness.top_eigenvalue(loss_fn, params, a * 2, num_iters=5, key=jax.random.key(1))
  assert sharpness._lanczos_step._cache_size() == 1


def _cnn(conv_impl):
  """A small BN CNN and its CE loss with frozen (running) statistics, loss_fn(params, *args)."""
  config = config_lib.base_config()
  config.model.name = 'cnn'
  config.model.width = 4
  config.model.norm = 'batch'
  config.model.conv_impl = conv_impl
  model = models.build(config.model, num_classes=3, axis_name=None)

  def loss_fn(params, stats, x, labels):
    logits = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return model, loss_fn


def _relu_pattern(model, params, stats, x):
  """Signs of every ReLU input (the norm layers' outputs in the CNN)."""
  _, state = model.apply({'params': params, 'batch_stats': stats}, x, train=False,
                         capture_intermediates=lambda m, _: (m.name or '').startswith('norm'),
                         mutable=['intermediates'])
  return np.concatenate([np.ravel(np.asarray(a) > 0) for a in jax.tree_util.tree_leaves(state)])


@pytest.mark.slow
def test_hvp_through_matmul_conv_matches_xla_and_finite_differences():
  model, loss_m = _cnn('matmul')
  _, loss_x = _cnn('xla')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray([0, 2, 1, 2])
  variables = model.init(jax.random.key(0), x, train=False)  # conv_impl does not change params
  params = variables['params']
  # Non-trivial running statistics, so normalization actually does something.
  stats = jax.tree_util.tree_map(
      lambda s: s + jnp.asarray(0.1 * np.abs(rng.standard_normal(s.shape)), s.dtype),
      variables['batch_stats'])
  args = (stats, x, labels)
  v = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  hvp_m = jax.jit(lambda p, v, *a: sharpness.hvp(lambda q: loss_m(q, *a), p, v))
  hvp_x = jax.jit(lambda p, v, *a: sharpness.hvp(lambda q: loss_x(q, *a), p, v))
  flat_m = ravel_pytree(hvp_m(params, v, *args))[0]
  flat_x = ravel_pytree(hvp_x(params, v, *args))[0]
  assert float(jnp.linalg.norm(flat_m)) > 0
  assert float(jnp.linalg.norm(flat_m - flat_x) / jnp.linalg.norm(flat_x)) < 1e-4

  # Central differences of gradients. The loss is piecewise smooth (ReLU kinks): a difference
  # step that moves any ReLU input across zero adds a jump of order |grad| / eps, so use the
  # largest step that keeps every ReLU's sign, then the only error is float32 rounding.
  shift = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, v)
  eps = next((e for e in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
              if np.array_equal(_relu_pattern(model, shift(e), stats, x),
                                _relu_pattern(model, shift(-e), stats, x))), None)
  assert eps is not None, 'every difference step crosses a ReLU kink'
  grad = jax.jit(jax.grad(loss_m))
  flat_fd = (ravel_pytree(grad(shift(eps), *args))[0] -
             ravel_pytree(grad(shift(-eps), *args))[0]) / (2 * eps)
  assert float(jnp.linalg.norm(flat_m - flat_fd) / jnp.linalg.norm(flat_fd)) < 2e-2
