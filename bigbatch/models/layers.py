"""Normalization layers whose statistics are a config choice, not a property of the hardware.

flax's `nn.BatchNorm` reduces over the whole (optionally cross-device) batch; it has no ghost
(virtual) batches. Ghost BN normalizes over groups of g examples within one device's share
(Hoffer et al. 2017), which is what lets a large global batch keep the statistics of a small one
and lets 1 device with accumulation reproduce the update of a pod. So BatchNorm is written here.

Running statistics: each call in training mode returns m * running + (1 - m) * batch_stat, where
batch_stat is the mean over groups (ghost BN) or the statistic of the whole synchronized
microbatch. Under gradient accumulation the trainer averages the k microbatch results, i.e.
running <- m * running + (1 - m) * mean_k(batch_stat): one update per optimizer step.
Variances are biased (divide by n), as in flax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """BatchNorm over the last axis; sync (axis_name) or ghost (group_size) statistics."""
  use_running_average: bool
  group_size: int | None = None  # ghost BN: groups of g examples along axis 0
  axis_name: str | None = None  # sync BN over this mesh axis (ignored for ghost BN)
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)

    x32 = x.astype(jnp.float32)
    per_channel = lambda v: v.reshape((1,) * (x.ndim - 1) + (c,))
    if self.use_running_average:
      y = (x32 - per_channel(ra_mean.value)) * jax.lax.rsqrt(per_channel(ra_var.value) + self.epsilon)
      return (y * per_channel(scale) + per_channel(bias)).astype(self.dtype)

    n = x.shape[0]
    g = self.group_size or n
    if n % g:
      raise ValueError(f'ghost BN group size {g} does not divide the per-device batch {n}')
    # x_GxgxF: G groups of g examples, F = all remaining axes (spatial..., channels).
    xg = x32.reshape((n // g, g) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    sync = self.axis_name is not None and self.group_size is None
    if sync:
      mean = jax.lax.pmean(mean, self.axis_name)
    # Two-pass variance: E[(x - mean)^2] avoids the cancellation of E[x^2] - E[x]^2.
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    if sync:
      var = jax.lax.pmean(var, self.axis_name)
    y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y.reshape(x.shape) * per_channel(scale) + per_channel(bias)

    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=0).reshape(c)
      ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, axis=0).reshape(c)
    return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Norm:
  """A normalization-layer factory from the config: norm(train, name=..., scale_init=...).

  axis_name is the mesh axis that sync BN reduces over; the trainer passes 'data' inside
  shard_map and None outside (init, eval), where a collective would have no axis to bind.
  """
  kind: str  # batch | group | none
  group_size: int | None = None
  axis_name: str | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  gn_groups: int = 8
  dtype: Any = jnp.float32

  def __call__(self, train: bool, name: str | None = None,
               scale_init: Callable = nn.initializers.ones) -> nn.Module:
    if self.kind == 'batch':
      return BatchNorm(use_running_average=not train, group_size=self.group_size,
                       axis_name=self.axis_name, momentum=self.momentum, epsilon=self.epsilon,
                       dtype=self.dtype, scale_init=scale_init, name=name)
    if self.kind == 'group':  # batch-free
      return nn.GroupNorm(num_groups=self.gn_groups, epsilon=self.epsilon, dtype=self.dtype,
                          scale_init=scale_init, name=name)
    return _Identity(name=name)


def make_norm(model_config, axis_name: str | None) -> Norm:
  if model_config.norm not in ('batch', 'group', 'none'):
    raise ValueError(f'unknown norm {model_config.norm!r}')
  return Norm(kind=model_config.norm, group_size=model_config.bn_group_size,
              axis_name=axis_name, momentum=model_config.bn_momentum,
              epsilon=model_config.bn_epsilon, gn_groups=model_config.gn_groups,
              dtype=jnp.dtype(model_config.dtype))


class _Identity(nn.Module):

  def __call__(self, x):
    return x

