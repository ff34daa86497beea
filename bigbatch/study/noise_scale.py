"""Gradient noise scale (McCandlish et al. 2018), measured for free in data-parallel training.

The simple noise scale B_simple = tr(Sigma) / |G|^2 predicts the critical batch size: G is the
true (full-data) gradient of the mean loss and Sigma the covariance of one example's gradient.
The gradient of a mean over a batch of b examples has E|G_b|^2 = |G|^2 + tr(Sigma) / b, so the
squared norms at two batch sizes b < B of the same step give unbiased estimates of both:

  |G|^2     ~= (B |G_B|^2 - b |G_b|^2) / (B - b)
  tr(Sigma) ~= (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each step's estimates are noisy (tr(Sigma) is often negative on a single step), and the ratio of
two noisy numbers is biased; so the numerator and the denominator are smoothed SEPARATELY
(moving averages) and divided afterwards (`NoiseScaleEMA`), as the paper does.

What b and B are in data-parallel training: each device (or each microbatch under gradient
accumulation) computes the gradient of the mean loss over its own b examples before the
cross-device reduction. |G_b|^2 is the MEAN over devices/microbatches of those gradients'
squared norms (`per_shard_sq_norms` on each, then a mean), |G_B|^2 the squared norm of the
reduced (averaged) gradient, and B the global batch. b is the number of examples behind ONE small
gradient: the per-device microbatch if the squared norm is taken per microbatch, the per-device
batch if taken after local accumulation. With one device and no accumulation b == B and there is
nothing to compare (`estimates` raises).

Biases to avoid when measuring:
* Synchronized batch norm normalizes each device's examples with statistics of the WHOLE global
  batch, so the per-device gradients are coupled through those statistics: they are not
  gradients of independent b-example batches, and the estimator's E|G_b|^2 = |G|^2 +
  tr(Sigma)/b no longer holds (the estimate is biased). Prefer ghost BN with groups inside one
  device (model.bn_group_size dividing the per-device batch): each device's gradient is then the
  gradient of its own examples only. The independent unit is then a ghost group rather than an
  example; b and B stay example counts (both multiples of the group size) and the estimate is
  that of the ghost-BN loss. Batch-free norms (group norm) have no such issue.
* Use the gradient of the LOSS only: exclude weight decay / L2 terms (and any other
  deterministic term). They add the same vector to every small and large gradient, which
  cancels in tr(Sigma) but inflates |G|^2, so B_simple would describe the regularizer too.
* Both gradients must be of a MEAN (not a sum) over their examples, with the same loss scale.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from bigbatch import grad_stats

# The in-step estimates, for series computed off the trainer (tests, notebooks).
estimates = grad_stats.estimates
sq_norm = grad_stats.sq_norm


def _ratio(trace_sigma: float, g2: float) -> float:
  if math.isnan(g2) or math.isnan(trace_sigma):
    return math.nan
  if g2 <= 0.0:
    return math.inf
  return trace_sigma / g2


@dataclasses.dataclass
class NoiseScaleEMA:
  """Bias-corrected moving averages of |G|^2 and tr(Sigma), smoothed separately.

  Host-side: `update` takes Python/numpy floats (fetch device values with jax.device_get first).
  Each average is m_t = decay m_{t-1} + (1 - decay) x_t, reported as m_t / (1 - decay^t) (as in
  Adam), so the first values are not pulled toward the zero start. decay=0 keeps the last step.

  A step where either value is non-finite (nan/inf) is skipped and counted in `num_skipped`
  instead of poisoning every later average.

  `b_simple` = smoothed tr(Sigma) / smoothed |G|^2, with: nan before any update; +inf if the
  smoothed |G|^2 <= 0 (the gradient is not resolved above the noise yet); a negative value when
  the smoothed tr(Sigma) is negative (too few steps), returned as is rather than hidden.
  """
  decay: float = 0.99
  num_updates: int = dataclasses.field(default=0, init=False)
  num_skipped: int = dataclasses.field(default=0, init=False)
  _g2: float = dataclasses.field(default=0.0, init=False, repr=False)
  _trace: float = dataclasses.field(default=0.0, init=False, repr=False)

  def __post_init__(self):
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f'NoiseScaleEMA decay must be in [0, 1), got {self.decay}')

  def update(self, g2, trace_sigma) -> None:
    g2, trace_sigma = float(g2), float(trace_sigma)
    if not (math.isfinite(g2) and math.isfinite(trace_sigma)):
      self.num_skipped += 1
      return
    d = self.decay
    self._g2 = d * self._g2 + (1.0 - d) * g2
    self._trace = d * self._trace + (1.0 - d) * trace_sigma
    self.num_updates += 1

  def _corrected(self, m: float) -> float:
    if self.num_updates == 0:
      return math.nan
    return m / (1.0 - self.decay**self.num_updates)

  @property
  def g2(self) -> float:
    """Smoothed |G|^2 (nan before any update)."""
    return self._corrected(self._g2)

  @property
  def trace_sigma(self) -> float:
    """Smoothed tr(Sigma) (nan before any update)."""
    return self._corrected(self._trace)

  @property
  def b_simple(self) -> float:
    return _ratio(self.trace_sigma, self.g2)

  def as_dict(self) -> dict[str, float]:
    """Values for a metrics writer: g2, trace_sigma, b_simple, num_updates, num_skipped."""
    return {'g2': self.g2, 'trace_sigma': self.trace_sigma, 'b_simple': self.b_simple,
            'num_updates': self.num_updates, 'num_skipped': self.num_skipped}


def b_simple_from_series(series: Iterable[tuple[float, float]],
                         decay: float | None = None) -> float:
  """B_simple from per-step (g2, trace_sigma) pairs, e.g. the outputs of `estimates`.

  decay=None averages all steps uniformly; a decay in [0, 1) uses `NoiseScaleEMA` (recent steps
  weigh more). Numerator and denominator are averaged separately, then divided; non-finite steps
  are skipped; same nan/inf rules as `NoiseScaleEMA.b_simple`.
  """
  if decay is not None:
    ema = NoiseScaleEMA(decay)
    for g2, tr in series:
      ema.update(g2, tr)
    return ema.b_simple
  total_g2 = total_tr = 0.0
  n = 0
  for g2, tr in series:
    g2, tr = float(g2), float(tr)
    if math.isfinite(g2) and math.isfinite(tr):
      total_g2 += g2
      total_tr += tr
      n += 1
  if n == 0:
    return math.nan
  return _ratio(total_tr / n, total_g2 / n)
