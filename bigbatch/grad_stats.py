"""The gradient noise scale's in-step measurement: the squared norms of the small (per-device
or per-microbatch) and large (per-update) gradients of each step, their unbiased estimates of
|G|^2 and tr(Sigma), and the moving averages the training state carries (config.noise_scale).

The estimator and its biases are in docs/design.md, "The gradient noise scale"; the studies
read the gns/* metrics (bigbatch/study/noise_scale.py has the host-side averaging for offline
series).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bigbatch import fields


def defaults() -> dict[str, Any]:
  """The config fields of the in-step noise-scale measurement, with their defaults."""
  return {
      # Gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018), from the
      # squared norms of each device's microbatch gradients (batch b) and of the update's
      # gradient (batch B) in every step, smoothed by moving averages of numerator and
      # denominator; logged as gns/*. Needs b < B: more than one device or
      # accumulation_steps > 1.
      'noise_scale.enabled': False,
      'noise_scale.ema_decay': 0.95,
  }


def validate(config, data_parallel: int) -> None:
  """Raises fields.ConfigError; `data_parallel` is the mesh's 'data' size."""
  if not config.noise_scale.enabled:
    return
  fields.finite(config, 'noise_scale.ema_decay', low=0.0, high=1.0, high_open=True)
  if not config.noise_scale.ema_decay > 0:
    raise fields.ConfigError(f'config.noise_scale.ema_decay={config.noise_scale.ema_decay}: '
                             f'must be in (0, 1)')
  if data_parallel * config.accumulation_steps < 2:
    raise fields.ConfigError(
        'config.noise_scale.enabled: the small batch (one device\'s microbatch) and the large '
        'batch (the update) coincide with one data-parallel device and accumulation_steps=1; '
        'use several devices or set --config.accumulation_steps=2 or more')


def sq_norm(grads_tree) -> jax.Array:
  """Squared L2 norm of a gradient pytree: the sum of squares over all leaves, in float32.

  Pure jnp, for use inside jit / shard_map on each device's (or microbatch's) local gradient and
  on the reduced global one. An empty tree gives 0.
  """
  leaves = jax.tree_util.tree_leaves(grads_tree)
  total = jnp.zeros((), jnp.float32)
  for leaf in leaves:
    total = total + jnp.sum(jnp.square(jnp.asarray(leaf).astype(jnp.float32)))
  return total


def _is_static_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def estimates(small_sq_norm, big_sq_norm, b, B) -> tuple[jax.Array, jax.Array]:
  """Unbiased one-step estimates (|G|^2, tr(Sigma)) from two batch sizes b < B.

  Args:
    small_sq_norm: |G_b|^2, the mean over small batches of their gradients' squared norms.
    big_sq_norm: |G_B|^2, the squared norm of the gradient of the whole B-example batch.
    b: examples behind each small gradient.
    B: examples behind the large gradient.
  Returns:
    (g2, trace_sigma), jnp arrays of at least float32 (elementwise if the inputs are arrays).
    Either may be negative on one step; smooth before dividing (`update_ema`).
  Raises:
    ValueError: on the host, when b and B are Python/numpy ints and not 0 < b < B. Traced b, B
      are not checked.
  """
  if _is_static_int(b) and _is_static_int(B):
    if b >= B:
      raise ValueError(
          f'noise scale: the small batch (b={b}) and the large batch (B={B}) coincide or are in '
          'the wrong order; with one device and no gradient accumulation there is no smaller '
          'batch to compare with (need b < B)')
    if b <= 0:
      raise ValueError(f'noise scale: batch sizes must be positive, got b={b}, B={B}')
  small = jnp.asarray(small_sq_norm)
  big = jnp.asarray(big_sq_norm)
  dtype = jnp.result_type(small, big, jnp.float32)
  small, big = small.astype(dtype), big.astype(dtype)
  b = jnp.asarray(b, dtype)
  B = jnp.asarray(B, dtype)
  g2 = (B * big - b * small) / (B - b)
  # 1 / (1/b - 1/B) = b B / (B - b), without the cancellation of two small reciprocals.
  trace_sigma = (small - big) * (b * B / (B - b))
  return g2, trace_sigma


def init_ema() -> dict[str, jax.Array]:
  """Device-side moving averages (the trainer's state): {'g2', 'trace'}, starting at 0."""
  return {'g2': jnp.zeros((), jnp.float32), 'trace': jnp.zeros((), jnp.float32)}


def update_ema(ema: dict, g2, trace_sigma, decay: float) -> dict:
  """One step of the moving averages m = decay m + (1 - decay) x, on device (inside the step)."""
  return {'g2': decay * ema['g2'] + (1 - decay) * g2,
          'trace': decay * ema['trace'] + (1 - decay) * trace_sigma}


def ema_metrics(ema: dict, num_updates, decay: float) -> dict[str, jax.Array]:
  """b_simple (the ratio needs no bias correction) and the bias-corrected g2 and trace_sigma
  after `num_updates` updates (as Adam corrects its moments)."""
  correction = 1 - decay ** jnp.asarray(num_updates, jnp.float32)
  return {'b_simple': ema['trace'] / ema['g2'], 'g2': ema['g2'] / correction,
          'trace_sigma': ema['trace'] / correction}
