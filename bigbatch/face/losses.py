"""Margin softmax for face recognition: ArcFace, CosFace and their combined form
s (cos(m1 theta + m2) - m3) on normalized embeddings and centers.

`margin_target` is the target logit (with InsightFace's fallback beyond the threshold angle),
`straight_through=True` arcface_torch's current CombinedMarginLoss, `cap_loss=True` its
reported (capped) loss. The exact formulas, the gradient guarantees and the differences from
arcface_torch are in docs/design.md, "Margin softmax"; Partial FC (partial_fc.py) applies the
margin.
"""
from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

SIN_EPS = 1e-6
NORM_EPS = 1e-12  # torch.nn.functional.normalize's
LOSS_CAP = -math.log(1e-30)  # arcface_torch's DistCrossEntropy: p_target.clamp_min_(1e-30)


def check_straight_through(m1: float, m2: float, m3: float) -> None:
  """Raises ValueError unless arcface_torch's CombinedMarginLoss computes these margins (module
  doc): ArcFace (m1 = 1, m3 = 0, any m2) or CosFace (m1 = 1, m2 = 0, m3 > 0)."""
  if m1 != 1.0:
    raise ValueError(f'straight_through with m1={m1}: arcface_torch\'s loss has no '
                     f'multiplicative margin (it raises, or ignores m1 when m3 > 0); use m1=1 or '
                     f'straight_through=False')
  if m3 < 0 or (m3 > 0 and m2 != 0):
    raise ValueError(f'straight_through with m2={m2}, m3={m3}: arcface_torch\'s loss is ArcFace '
                     f'(m3=0) or CosFace (m2=0, m3>0); it ignores m2 when m3 > 0 and raises for '
                     f'm3 < 0; use one of the two, or straight_through=False')


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
  """cos(m1 * theta + m2) - m3 with the easy_margin=False fallback, elementwise
  (docs/design.md, "Margin softmax").

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
  straight_through: arcface_torch's CombinedMarginLoss (docs/design.md): cosines clamped to
    [-1, 1], ArcFace without the fallback, the target's gradient s (as without margin).
  The margin function is evaluated on the B target cosines only, not on all B x C entries.
  """
  _, c = cos_BxC.shape
  labels_B = labels_B.astype(jnp.int32)
  if straight_through:
    check_straight_through(m1, m2, m3)
    cos_BxC = jnp.clip(cos_BxC, -1.0, 1.0)
  is_target_BxC = labels_B[:, None] == jnp.arange(c, dtype=jnp.int32)[None, :]
  # -1 rows pick column 0; its value is discarded by the where (and gets a zero cotangent).
  target_B = jnp.take_along_axis(cos_BxC, jnp.maximum(labels_B, 0)[:, None], axis=1)[:, 0]
  if not straight_through:
    new_B = margin_target(target_B, m1=m1, m2=m2, m3=m3, eps=eps)
  elif m3 > 0:
    new_B = target_B - m3
  elif m2:
    new_B = target_B + lax.stop_gradient(jnp.cos(jnp.arccos(target_B) + m2) - target_B)
  else:
    new_B = target_B
  return s * jnp.where(is_target_BxC, new_B[:, None], cos_BxC)


def margin_softmax_loss(embeddings_BxD, centers_CxD, labels_B, *, s: float, m1: float = 1.0,
                        m2: float = 0.0, m3: float = 0.0, straight_through: bool = False,
                        cap_loss: bool = False):
  """Mean cross-entropy of the margin softmax over all C classes on one device: the dense
  reference that Partial FC at sample rate 1 equals. Embeddings and centers are unnormalized.
  cap_loss: each row's value capped at LOSS_CAP, its gradient uncapped (docs/design.md)."""
  cos_BxC = normalize(embeddings_BxD) @ normalize(centers_CxD).T
  logits = margin_logits(cos_BxC, labels_B, s=s, m1=m1, m2=m2, m3=m3,
                         straight_through=straight_through)
  logz_B = jax.nn.logsumexp(logits, axis=1)
  target_B = jnp.take_along_axis(logits, labels_B.astype(jnp.int32)[:, None], axis=1)[:, 0]
  row_B = logz_B - target_B
  if cap_loss:
    row_B = row_B + lax.stop_gradient(jnp.minimum(row_B, LOSS_CAP) - row_B)
  return jnp.mean(row_B)
