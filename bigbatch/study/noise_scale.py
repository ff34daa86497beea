"""Gradient noise scale (McCandlish et al. 2018): the host-side averaging of the in-step
measurement (bigbatch/grad_stats.py), for series computed off the trainer.

`NoiseScaleEMA` smooths |G|^2 and tr(Sigma) separately and divides afterwards;
`b_simple_from_series` does that for a whole series. The estimator, what b and B are in
data-parallel training and the biases to avoid are in docs/design.md, "The gradient noise
scale".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable


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
