"""Margin softmax for face recognition: ArcFace, CosFace and their combined form.

Embeddings and class centers are L2-normalized, so the logit of class c is s * cos(theta_c).
The target class gets a margin (Deng et al. 2019, "combined margin"):

    target logit = s * (cos(m1 * theta + m2) - m3)

ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace (1, 0, 0.4); s = 64 in both, as InsightFace's
arcface_torch configures them (the CosFace paper itself used m = 0.35; docs/references.md).

What is computed, exactly (`margin_target` below), for c = cos(theta) of the target class:

  sin(theta) = sqrt(max(1 - c^2, eps))                               (eps = SIN_EPS = 1e-6)
  m1 == 1:  cos(theta + m2) = c * cos(m2) - sin(theta) * sin(m2)     (no arccos)
  m1 != 1:  theta = atan2(sin(theta), c); cos(m1 * theta + m2)

Fallback (InsightFace `easy_margin=False`): m1 * theta + m2 stops decreasing the logit once
it passes pi, so beyond the threshold angle theta_t = (pi - m2) / m1, i.e. where
c <= cos(theta_t), the target is instead

  c - (pi - theta_t) * sin(theta_t)     [for m1 = 1: c - m2 * sin(m2), InsightFace's `mm`]

which is cos(theta) minus the first-order margin penalty at the threshold, cos(theta + d) ~
cos(theta) - d * sin(theta) with d = (m1 - 1) * theta_t + m2 = pi - theta_t, held constant
beyond it: monotone in theta, and InsightFace's form for m1 = 1. It is not continuous at theta_t
(for ArcFace m = 0.5 the target jumps from -1 down to -cos(m) - m sin(m) = -1.117), exactly as in
the reference. No fallback when theta_t >= pi (CosFace: m1 = 1, m2 = 0). m3 is subtracted in both
branches.

Gradients are the true derivative of that function: the sine uses max(1 - c^2, eps), so its
derivative -c / sin is at most 1/sqrt(eps) = 1000 in size, and where |c| > sqrt(1 - eps) (theta
within ~1e-3 rad of 0 or pi, including c = +-1 and slightly beyond, as rounding after
normalization gives) sin is the constant sqrt(eps) with derivative 0. This moves the value by at
most sin(m2) * sqrt(eps) ~ 5e-4 (x s) there and keeps every gradient finite. Nothing is clipped:
non-target logits are s * c as given.

`straight_through=True` reproduces the current InsightFace CombinedMarginLoss, which applies the
margin under torch.no_grad: the value is as above, the gradient as if logits = s * cos(theta)
everywhere (the margin is a stop_gradient offset).
"""
from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

SIN_EPS = 1e-6
NORM_EPS = 1e-12  # torch.nn.functional.normalize's


def normalize(x, axis: int = -1, eps: float = NORM_EPS):
  """x / max(||x||, eps) along `axis` (torch F.normalize), computed in float32 or wider."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def _fallback_threshold(m1: float, m2: float) -> float | None:
  """theta_t = (pi - m2) / m1, or None where the margin never passes pi (theta_t >= pi)."""
  if m1 <= 0:
    raise ValueError(f'margin m1 must be positive, got {m1}')
  theta_t = (math.pi - m2) / m1
  return theta_t if theta_t < math.pi else None


def margin_target(cos, *, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                  eps: float = SIN_EPS):
  """cos(m1 * theta + m2) - m3 with the easy_margin=False fallback, elementwise (module doc).

  Margins are Python floats (static): each form compiles to its own few ops.
  """
  out = cos
  if m1 != 1.0 or m2 != 0.0:
    sin = jnp.sqrt(jnp.maximum(1.0 - jnp.square(cos), eps))
    if m1 == 1.0:
      out = cos * math.cos(m2) - sin * math.sin(m2)
    else:
      out = jnp.cos(m1 * jnp.arctan2(sin, cos) + m2)
    theta_t = _fallback_threshold(m1, m2)
    if theta_t is not None:
      penalty = (math.pi - theta_t) * math.sin(theta_t)
      out = jnp.where(cos > math.cos(theta_t), out, cos - penalty)
  if m3:
    out = out - m3
  return out


def margin_logits(cos_BxC, labels_B, *, s: float, m1: float = 1.0, m2: float = 0.0,
                  m3: float = 0.0, straight_through: bool = False, eps: float = SIN_EPS):
  """s * cos, with s * margin_target(cos) at [b, labels_B[b]].

  cos_BxC: cosines of B (normalized) embeddings with C (normalized) centers.
  labels_B: int target column of each row in [0, C), or -1: the row's target is not among these
    columns (another Partial FC shard holds it) and the row gets no margin.
  straight_through: the gradient of the target entries is s (as without margin), not
    s * d margin_target / d cos.
  The margin function is evaluated on the B target cosines only, not on all B x C entries.
  """
  _, c = cos_BxC.shape
  labels_B = labels_B.astype(jnp.int32)
  is_target_BxC = labels_B[:, None] == jnp.arange(c, dtype=jnp.int32)[None, :]
  # -1 rows pick column 0; its value is discarded by the where (and gets a zero cotangent).
  target_B = jnp.take_along_axis(cos_BxC, jnp.maximum(labels_B, 0)[:, None], axis=1)[:, 0]
  new_B = margin_target(target_B, m1=m1, m2=m2, m3=m3, eps=eps)
  if straight_through:
    new_B = target_B + lax.stop_gradient(new_B - target_B)
  return s * jnp.where(is_target_BxC, new_B[:, None], cos_BxC)


def margin_softmax_loss(embeddings_BxD, centers_CxD, labels_B, *, s: float, m1: float = 1.0,
                        m2: float = 0.0, m3: float = 0.0, straight_through: bool = False):
  """Mean cross-entropy of the margin softmax over all C classes on one device: the dense
  reference that Partial FC at sample rate 1 equals. Embeddings and centers are unnormalized."""
  cos_BxC = normalize(embeddings_BxD) @ normalize(centers_CxD).T
  logits = margin_logits(cos_BxC, labels_B, s=s, m1=m1, m2=m2, m3=m3,
                         straight_through=straight_through)
  logz_B = jax.nn.logsumexp(logits, axis=1)
  target_B = jnp.take_along_axis(logits, labels_B.astype(jnp.int32)[:, None], axis=1)[:, 0]
  return jnp.mean(logz_B - target_B)
