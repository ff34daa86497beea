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

`straight_through=True` is InsightFace arcface_torch's current loss (CombinedMarginLoss in
recognition/arcface_torch/losses.py, unchanged since 2023-06-10, behind PartialFC_V2), case by
case as it computes it:
  * every cosine is first clamped to [-1, 1] (PartialFC_V2 clamps the logits before the margin;
    the clamp's gradient is 0 outside);
  * m1 == 1, m3 == 0 (ArcFace; m2 = 0 is no margin): the target is cos(arccos(c) + m2),
    computed under torch.no_grad, so its gradient is that of c (straight-through) and there is
    NO fallback: beyond theta + m2 > pi the value wraps around (cos rises again), unlike the
    default form above and unlike the older arcface_torch with `easy_margin`/`th`/`mm`;
  * m3 > 0 (CosFace): the target is c - m3 (derivative 1, the same as straight-through);
    arcface_torch ignores m1 and m2 there, so they must be 1 and 0;
  * anything else arcface_torch refuses (`raise`): so does `check_straight_through`, with the
    reason.
So its value differs from the default form only where theta + m2 > pi (ArcFace) and its
gradient is s * (softmax - onehot) at the targets.

The reported loss. arcface_torch's DistCrossEntropy reports mean(-log(max(p_target, 1e-30))),
each row's cross-entropy capped at -log(1e-30) = 69.08 (LOSS_CAP), while its backward is the
uncapped cross-entropy's gradient (softmax - onehot) / B. Ours reports the uncapped mean by
default (the value whose gradient is taken); `cap_loss=True` (config face.cap_loss) reports the
capped value with the same uncapped gradient, reproducing arcface_torch's logged loss. The two
differ only on rows whose target probability is below 1e-30 (early training, large margins).
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
  straight_through: arcface_torch's CombinedMarginLoss (module doc): cosines clamped to
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
  cap_loss: each row's value capped at LOSS_CAP, its gradient uncapped (module doc)."""
  cos_BxC = normalize(embeddings_BxD) @ normalize(centers_CxD).T
  logits = margin_logits(cos_BxC, labels_B, s=s, m1=m1, m2=m2, m3=m3,
                         straight_through=straight_through)
  logz_B = jax.nn.logsumexp(logits, axis=1)
  target_B = jnp.take_along_axis(logits, labels_B.astype(jnp.int32)[:, None], axis=1)[:, 0]
  row_B = logz_B - target_B
  if cap_loss:
    row_B = row_B + lax.stop_gradient(jnp.minimum(row_B, LOSS_CAP) - row_B)
  return jnp.mean(row_B)
