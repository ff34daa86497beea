"""Margin softmax (ArcFace, CosFace, combined) against a float64 NumPy reference written from the
formulas with arccos: values, gradients (central finite differences of the reference), the
easy_margin=False fallback beyond theta + m > pi, finiteness at cos = +-1; straight_through and
cap_loss against a float64 transcription of arcface_torch's CombinedMarginLoss and
DistCrossEntropy."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch.face import losses

S = 64.0
MARGINS = {  # name -> (m1, m2, m3)
    'arcface': (1.0, 0.5, 0.0),
    'cosface': (1.0, 0.0, 0.4),
    'combined': (1.0, 0.3, 0.2),
    'multiplicative': (1.2, 0.3, 0.1),  # theta_t = (pi - 0.3) / 1.2 = 2.37 rad
}


def ref_target(c, m1, m2, m3):
  """cos(m1 theta + m2) - m3; beyond theta_t = (pi - m2) / m1 (if < pi), c - (pi - theta_t) *
  sin(theta_t) - m3. For m1 = 1 that is InsightFace's where(c > cos(pi - m), cos(theta + m),
  c - sin(pi - m) * m)."""
  theta = np.arccos(c)
  out = np.cos(m1 * theta + m2)
  theta_t = (math.pi - m2) / m1
  if theta_t < math.pi:
    out = np.where(theta < theta_t, out, c - (math.pi - theta_t) * math.sin(theta_t))
  return out - m3


def ref_logits(cos, labels, m):
  logits = S * cos.copy()
  for b, y in enumerate(labels):
    if y >= 0:
      logits[b, y] = S * ref_target(cos[b, y], *m)
  return logits


def ref_loss(cos, labels, m):
  logits = ref_logits(cos, labels, m)
  mx = logits.max(axis=1, keepdims=True)
  logz = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
  return np.mean(logz - logits[np.arange(len(labels)), labels])


def finite_difference_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    g[i] = (f(xp) - f(xm)) / (2 * h)
  return g


# Target cosines spanning the range, including ones beyond each margin's fallback threshold
# (theta + m > pi for ArcFace: c < cos(pi - 0.5) = -0.878); none within 1e-3 of a threshold
# or of +-1 (finite differences across the fallback's jump would be meaningless).
TARGET_COS = np.array([0.93, 0.5, 0.05, -0.4, -0.8, -0.95, -0.99])


def _cos_and_labels(seed=0):
  rng = np.random.default_rng(seed)
  b, c = len(TARGET_COS), 5
  cos = rng.uniform(-0.6, 0.6, size=(b, c))
  labels = rng.integers(0, c, size=b)
  cos[np.arange(b), labels] = TARGET_COS
  return cos, labels


@pytest.mark.parametrize('name', sorted(MARGINS))
def test_values_and_gradients_equal_float64_reference(name):
  m = MARGINS[name]
  cos, labels = _cos_and_labels()
  theta_t = (math.pi - m[1]) / m[0]
  if theta_t < math.pi:  # some rows really are in the fallback branch
    assert np.sum(np.arccos(TARGET_COS) > theta_t) >= 1
  loss_fn = lambda c: jnp.mean(
      jax.nn.logsumexp(losses.margin_logits(c, jnp.asarray(labels), s=S, m1=m[0], m2=m[1],
                                            m3=m[2]), axis=1)
      - jnp.take_along_axis(losses.margin_logits(c, jnp.asarray(labels), s=S, m1=m[0],
                                                 m2=m[1], m3=m[2]),
                            jnp.asarray(labels)[:, None], axis=1)[:, 0])
  with jax.enable_x64(True):
    c64 = jnp.asarray(cos, jnp.float64)
    logits = losses.margin_logits(c64, jnp.asarray(labels), s=S, m1=m[0], m2=m[1], m3=m[2])
    np.testing.assert_allclose(np.asarray(logits), ref_logits(cos, labels, m), rtol=0, atol=1e-10)
    value, grad = jax.value_and_grad(loss_fn)(c64)
  np.testing.assert_allclose(float(value), ref_loss(cos, labels, m), rtol=1e-12)
  fd = finite_difference_grad(lambda c: ref_loss(c, labels, m), cos)
  np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-5, atol=1e-7)


def test_arcface_fallback_is_insightface_constants():
  # The reference's th = cos(pi - m), mm = sin(pi - m) * m, for c on both sides of th.
  m = 0.5
  c = np.array([math.cos(math.pi - m) + 1e-3, math.cos(math.pi - m) - 1e-3, -0.999])
  got = np.asarray(losses.margin_target(jnp.asarray(c, jnp.float32), m2=m))
  expected = np.where(c > math.cos(math.pi - m),
                      c * math.cos(m) - np.sqrt(1 - c * c) * math.sin(m),
                      c - math.sin(math.pi - m) * m)
  np.testing.assert_allclose(got, expected, atol=2e-6)
  assert got[1] < got[0] - 0.1  # the reference's jump at the threshold


def test_rows_labelled_minus_one_get_no_margin():
  cos, labels = _cos_and_labels()
  labels = labels.copy()
  labels[[1, 4]] = -1
  logits = np.asarray(losses.margin_logits(jnp.asarray(cos, jnp.float32), jnp.asarray(labels),
                                           s=S, m2=0.5))
  np.testing.assert_allclose(logits[[1, 4]], S * cos[[1, 4]], rtol=1e-6)
  np.testing.assert_allclose(logits, ref_logits(cos, labels, (1.0, 0.5, 0.0)), rtol=1e-5,
                             atol=1e-4)


def ref_arcface_torch_logits(cos, labels, m):
  """arcface_torch's CombinedMarginLoss after PartialFC_V2's clamp, as written there: cosines
  clamped to [-1, 1]; ArcFace (m1 = 1, m3 = 0): target cos(arccos(c) + m2), no fallback;
  CosFace (m3 > 0): target c - m3; times s."""
  m1, m2, m3 = m
  cos = np.clip(cos, -1.0, 1.0)
  logits = cos.copy()
  for b, y in enumerate(labels):
    if y >= 0:
      c = cos[b, y]
      logits[b, y] = np.cos(np.arccos(c) + m2) if m3 == 0 else c - m3
  return S * logits


def _ce(logits, labels):
  mx = logits.max(axis=1, keepdims=True)
  return (np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
          - logits[np.arange(len(labels)), labels])


@pytest.mark.parametrize('name', ['arcface', 'cosface'])
def test_straight_through_is_arcface_torch_loss(name):
  m = MARGINS[name]
  cos, labels = _cos_and_labels()
  cos[0, (labels[0] + 1) % cos.shape[1]] = 1.0000002  # rounding past 1: clamped
  lbl = jnp.asarray(labels)

  def loss_fn(c):
    logits = losses.margin_logits(c, lbl, s=S, m1=m[0], m2=m[1], m3=m[2], straight_through=True)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1)
                    - jnp.take_along_axis(logits, lbl[:, None], axis=1)[:, 0])

  with jax.enable_x64(True):
    c64 = jnp.asarray(cos, jnp.float64)
    v_st, g_st = jax.value_and_grad(loss_fn)(c64)
  logits = ref_arcface_torch_logits(cos, labels, m)
  np.testing.assert_allclose(float(v_st), np.mean(_ce(logits, labels)), rtol=1e-12)
  # Its gradient: d CE / d cos = s * (softmax - onehot) / B, zero where the clamp is active.
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = S * (p - np.eye(cos.shape[1])[labels]) / len(labels) * (np.abs(cos) <= 1)
  np.testing.assert_allclose(np.asarray(g_st), want, atol=1e-10)
  if name == 'arcface':
    # No fallback: rows with theta + m > pi (2 of TARGET_COS) differ from the default form;
    # the others agree with it.
    beyond = np.arccos(TARGET_COS) + m[1] > math.pi
    assert beyond.sum() == 2
    ours = ref_logits(np.clip(cos, -1, 1), labels, m)
    idx = np.arange(len(labels)), labels
    assert np.all(np.abs(logits[idx] - ours[idx])[beyond] > 1)
    np.testing.assert_allclose(logits[idx][~beyond], ours[idx][~beyond], atol=1e-9)


@pytest.mark.parametrize('m', [(1.2, 0.3, 0.1), (1.0, 0.3, 0.2), (1.0, 0.0, -0.1),
                               (0.9, 0.0, 0.0)])
def test_straight_through_refuses_what_arcface_torch_does_not_compute(m):
  with pytest.raises(ValueError, match='arcface_torch'):
    losses.margin_logits(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), s=S, m1=m[0], m2=m[1],
                         m3=m[2], straight_through=True)


def test_cap_loss_is_arcface_torch_reported_value_with_the_uncapped_gradient():
  rng = np.random.default_rng(3)
  x, w = rng.normal(size=(6, 4)), rng.normal(size=(5, 4))
  labels = rng.integers(0, 5, size=6)
  x[:2] = 3 * w[labels[:2]]  # these two rows on their centers: small losses
  labels = jnp.asarray(labels)
  # A large margin and scale put the other rows' target probability below 1e-30.
  kw = dict(s=S, m2=1.5)
  with jax.enable_x64(True):
    x64, w64 = jnp.asarray(x), jnp.asarray(w)
    v, g = jax.value_and_grad(losses.margin_softmax_loss)(x64, w64, labels, **kw)
    v_cap, g_cap = jax.value_and_grad(losses.margin_softmax_loss)(x64, w64, labels,
                                                                  cap_loss=True, **kw)
    cos = np.asarray(losses.normalize(x64) @ losses.normalize(w64).T)
    rows = _ce(np.asarray(losses.margin_logits(jnp.asarray(cos), labels, **kw)),
               np.asarray(labels))
  assert np.sum(rows > losses.LOSS_CAP) >= 1 and np.sum(rows < losses.LOSS_CAP) >= 1
  np.testing.assert_allclose(float(v), np.mean(rows), rtol=1e-12)
  # mean(-log(max(p, 1e-30))): each row capped at 69.08.
  np.testing.assert_allclose(float(v_cap), np.mean(np.minimum(rows, -np.log(1e-30))),
                             rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(g_cap), np.asarray(g))


@pytest.mark.parametrize('name', sorted(MARGINS))
def test_gradient_is_finite_at_and_beyond_cos_plus_minus_one(name):
  m1, m2, m3 = MARGINS[name]
  c = jnp.asarray([1.0, -1.0, 1.0000001, -1.0000001, 0.9999999, -0.9999999], jnp.float32)
  value, grad = jax.vmap(jax.value_and_grad(
      lambda x: losses.margin_target(x, m1=m1, m2=m2, m3=m3)))(c)
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.isfinite(np.asarray(value)))
  assert np.max(np.abs(np.asarray(grad))) <= 1e3 + 1  # |d sin/d c| <= 1/sqrt(eps)
  exact = ref_target(np.clip(np.asarray(c, np.float64), -1, 1), m1, m2, m3)
  np.testing.assert_allclose(np.asarray(value), exact, atol=2e-3)


def test_normalize_and_dense_loss():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 4))
  n = np.asarray(losses.normalize(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, rtol=1e-6)
  zero = losses.normalize(jnp.zeros((2, 4)))
  assert np.all(np.asarray(zero) == 0)
  assert np.all(np.isfinite(np.asarray(jax.grad(lambda z: losses.normalize(z).sum())(
      jnp.zeros((2, 4))))))
  # The dense loss is the reference loss of the normalized cosines.
  w = rng.normal(size=(5, 4))
  labels = rng.integers(0, 5, size=6)
  cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
      w / np.linalg.norm(w, axis=1, keepdims=True)).T
  got = losses.margin_softmax_loss(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                   jnp.asarray(labels), s=S, m2=0.5)
  np.testing.assert_allclose(float(got), ref_loss(cos, labels, (1.0, 0.5, 0.0)), rtol=1e-5)


@pytest.mark.parametrize('margins', [(1.2, 0.3, 0.1), (1.0, 0.5, 0.4)])
def test_straight_through_config_error_names_the_field(margins):
  from bigbatch import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.task, c.data.name, c.model.name = 'face', 'face_synthetic', 'iresnet'
  c.num_steps, c.global_batch = 10, 32
  c.face.m1, c.face.m2, c.face.m3 = margins
  c.face.straight_through = True
  with pytest.raises(config_lib.ConfigError, match=r'config\.face\.straight_through.*arcface_torch'):
    config_lib.validate(c, num_devices=8)
  c.face.straight_through = False
  config_lib.validate(c, num_devices=8)  # the true-gradient form computes any margins
