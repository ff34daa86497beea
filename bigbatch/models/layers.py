"""Normalization layers whose statistics are a config choice, not a property of the hardware:
BatchNorm with sync (whole microbatch over a mesh axis) or ghost (groups of g examples within a
device's share) statistics, GroupNorm, and `make_norm`: the norm factory of config.model.

Why BatchNorm is written here, how the running statistics move under accumulation, and its
cost, numerics (moments about a shift) and fixed summation order are in docs/design.md, "Batch
norm statistics are a config choice" and "Batch norm: cost, numerics and one summation order".
"""
from __future__ import annotations

import dataclasses
import functools
import math
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

    per_channel = lambda v: v.reshape((1,) * (x.ndim - 1) + (c,))
    if self.use_running_average:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x.astype(jnp.float32) - per_channel(ra_mean.value)) * per_channel(mul)
      return (y + per_channel(bias)).astype(self.dtype)

    n = x.shape[0]
    g = self.group_size or n
    if n % g:
      raise ValueError(f'ghost BN group size {g} does not divide the per-device batch {n}')
    # Cast first, reshape after: XLA folds a bf16 producer's f32 -> bf16 -> f32 round trip only
    # where the two converts meet (CPU computes bf16 convolutions in f32), and a reshape between
    # them would keep the round trip and an extra pass.
    # x_GxgxF: G groups of g examples, F = all remaining axes (spatial..., channels); always
    # grouped, G = 1 under plain and sync BN and where a device holds one ghost group.
    xg = x.astype(jnp.float32).reshape((n // g, g) + x.shape[1:])
    per_channel = lambda v: v.reshape((1,) * (xg.ndim - 1) + (c,))
    sync = self.axis_name is not None and self.group_size is None
    # One pass over the activations: both moments from one read, accumulated in float32, taken
    # about a per-channel shift near the mean, so that E[(x - s)^2] - E[x - s]^2 does not cancel
    # (docs/design.md, Numerics). Ghost and local BN shift each group by one of its own values; sync
    # BN needs the same shift on every device for its one pmean and takes the running mean.
    if sync:
      shift = per_channel(ra_mean.value)
    else:
      first = (slice(None),) + (slice(0, 1),) * (xg.ndim - 2) + (slice(None),)
      shift = jax.lax.stop_gradient(xg[first])
    moments = _shifted_moments(xg, shift)
    if sync:
      # Sync BN: one collective per layer, both moments in one buffer.
      moments = jax.lax.pmean(moments, self.axis_name)
    running = moments  # device-invariant under sync BN, as the running statistics must be
    if sync and self.axis_name in _varying_axes(x):
      # Under shard_map's type checks each use of the invariant moments by device-varying code
      # gets an implicit cast to varying, and the backward pass of each cast is an all-reduce
      # of its cotangent (for the mean and for the variance: two per layer). One explicit cast
      # of both moments makes that one all-reduce per layer, as in the forward pass.
      moments = jax.lax.pcast(moments, self.axis_name, to='varying')
    mean, var = _mean_var(moments, shift)
    # y = x * a + b, a and b per channel (and group): the backward pass then reduces dy and
    # dy * x per group and derives every other gradient from those per-channel sums, where
    # (x - mean) * a + bias would keep x - mean in memory for its reduction and reduce dy again
    # over all groups for the bias. Both reductions are _group_sum's (the transpose of
    # _broadcast_groups), the statistics' own order (docs/design.md, one summation order).
    a = jax.lax.rsqrt(var + self.epsilon) * per_channel(scale)
    y = (xg * _broadcast_groups(a, xg.shape)
         + _broadcast_groups(per_channel(bias) - mean * a, xg.shape))

    if not self.is_initializing():
      mean, var = _mean_var(running, shift)
      m = self.momentum
      # The mean over ghost groups (one group under plain or sync BN).
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean.reshape(-1, c), axis=0)
      ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var.reshape(-1, c), axis=0)
    return y.reshape(x.shape).astype(self.dtype)


def _group_sum(x):
  """Sums of x_GxgxFxC over each group's examples and positions, keepdims: G x 1 x 1... x C.

  The order of the additions depends on g and F only, never on G (how many groups the device
  holds): each example's positions are reduced on their own (a reduction whose kept axes, not
  its reduced ones, grow with G), then the g per-example sums are added pairwise in a fixed
  tree (slices and adds, which XLA does not reassociate). One reduction over the group's axes
  is rounded differently by XLA for different G (and for G = 1, whose axis it drops).
  """
  s = jnp.sum(x, axis=tuple(range(2, x.ndim - 1))) if x.ndim > 3 else x  # G x g x C
  while s.shape[1] > 1:
    half = s.shape[1] // 2
    pairs = s[:, :half] + s[:, half:2 * half]
    s = pairs if s.shape[1] % 2 == 0 else jnp.concatenate([pairs, s[:, 2 * half:]], axis=1)
  return s.reshape(x.shape[:1] + (1,) * (x.ndim - 2) + x.shape[-1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_groups(v, shape):
  """v_Gx1...xC broadcast to x's shape G x g x F x C; its transpose is _group_sum."""
  return jnp.broadcast_to(v, shape)


def _broadcast_groups_fwd(v, shape):
  return _broadcast_groups(v, shape), None


def _broadcast_groups_bwd(shape, _, g):
  return (_group_sum(g),)


_broadcast_groups.defvjp(_broadcast_groups_fwd, _broadcast_groups_bwd)


@jax.custom_vjp
def _shifted_moments(x, shift):
  """[E[x - shift], E[(x - shift)^2]] over each group of x_GxgxFxC (keepdims), stacked; no
  gradient to shift.

  The backward pass, dx = (g_0 + 2 g_1 (x - shift)) / n, recomputes x - shift from x, which the
  layer's output keeps for its own backward anyway. (XLA's cost analysis of the ResNet-50 step
  counts the same bytes as for differentiating the expression with a stop_gradient shift.)
  """
  d = x - shift
  n = math.prod(x.shape[1:-1])
  return jnp.stack([_group_sum(d) / n, _group_sum(jnp.square(d)) / n])


def _shifted_moments_fwd(x, shift):
  return _shifted_moments(x, shift), (x, shift)


def _shifted_moments_bwd(residuals, g):
  x, shift = residuals
  n = math.prod(x.shape[1:-1])
  return (g[0] + 2 * g[1] * (x - shift)) / n, jnp.zeros_like(shift)


_shifted_moments.defvjp(_shifted_moments_fwd, _shifted_moments_bwd)


def _mean_var(moments, shift):
  """(mean, variance) from the stacked [E[x - shift], E[(x - shift)^2]]."""
  m1, m2 = moments[0], moments[1]
  # Rounding can leave the difference slightly negative; rsqrt(var + eps) must stay finite.
  return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def _varying_axes(x) -> frozenset:
  """The mesh axes x is device-varying over inside shard_map (empty outside it, or where
  shard_map's type checks are off: check_vma=False)."""
  manual = getattr(jax.typeof(x), 'manual_axis_type', None)
  return manual.varying if manual is not None else frozenset()


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

