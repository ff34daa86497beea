"""The LARS/LAMB trust-ratio transform: per leaf, u -> ratio * (u + wd*w), with the ratios kept
(`trust_ratio_stats`), in the reference forms rather than optax.lars / optax.lamb (why:
docs/design.md, "Batch-dependent hyperparameters are derived once"). `bigbatch.optim` chains it
into the LARS and LAMB optimizers; `path_mask` also gives the other optimizers their
weight-decay mask.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


def path_mask(params, exclude_regex: str | None):
  """True where a leaf gets weight decay / a trust ratio: its '/'-joined path does not match."""
  if not exclude_regex:  # re.search('') matches everything; an empty pattern excludes nothing
    return jax.tree.map(lambda _: True, params)
  pattern = re.compile(exclude_regex)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: pattern.search(jax.tree_util.keystr(path, simple=True, separator='/'))
      is None, params)


class TrustRatioState(NamedTuple):
  """The transform's state: the last ratios, and which leaves get one."""
  trust_ratios: Any  # like params: float32 scalars, the last update's ratio (1 before the first)
  adapted: Any  # like params: bool scalars, False where trust_ratio_exclude matched


# ratio_fn(||w||, ||u||, ||d||, wd) -> ratio, where u is the incoming update and d = u + wd*w.
RatioFn = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


def _norm(x) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))


def _safe_ratio(num, den, valid):
  # The inner where keeps inf/nan out of the unused branch (jax_debug_nans would flag it).
  return jnp.where(valid, num / jnp.where(valid, den, 1.0), 1.0)


def lars_ratio(eta: float) -> RatioFn:
  """Reference LARS: eta*||w|| / (||g|| + wd*||w||); 1 where ||w|| or ||g|| is 0."""
  def ratio(w_norm, g_norm, d_norm, wd):
    del d_norm
    return _safe_ratio(eta * w_norm, g_norm + wd * w_norm, (w_norm > 0) & (g_norm > 0))
  return ratio


def lamb_ratio(w_norm, g_norm, d_norm, wd):
  """LAMB: ||w|| / ||r + wd*w||; 1 where either is 0."""
  del g_norm, wd
  return _safe_ratio(w_norm, d_norm, (w_norm > 0) & (d_norm > 0))


def scale_by_masked_trust_ratio(ratio_fn: RatioFn, trust_ratio_exclude: str | None,
                                weight_decay: float = 0.0,
                                weight_decay_exclude: str | None = None
                                ) -> optax.GradientTransformation:
  """u -> ratio * (u + wd*w) per leaf; excluded leaves get ratio 1 (and the ratio is recorded).

  Weight decay is applied here, not by a preceding add_decayed_weights, because the LARS ratio
  needs ||g|| before the decay is added and then scales the decayed update. Leaves matching
  `weight_decay_exclude` get no decay; leaves matching `trust_ratio_exclude` get ratio 1.
  """
  def init_fn(params):
    return TrustRatioState(
        trust_ratios=jax.tree.map(lambda _: jnp.ones((), jnp.float32), params),
        adapted=jax.tree.map(jnp.asarray, path_mask(params, trust_ratio_exclude)))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('scale_by_masked_trust_ratio needs params: call tx.update(g, s, params)')

    def leaf(u, w, adapted, decayed):
      wd = weight_decay if decayed else 0.0
      d = u + wd * w if wd else u
      if not adapted:
        return d, jnp.ones((), jnp.float32)
      ratio = ratio_fn(_norm(w), _norm(u), _norm(d), wd).astype(jnp.float32)
      return (ratio * d).astype(u.dtype), ratio

    treedef = jax.tree.structure(updates)
    pairs = treedef.flatten_up_to(jax.tree.map(
        leaf, updates, params, path_mask(params, trust_ratio_exclude),
        path_mask(params, weight_decay_exclude)))
    new_updates = treedef.unflatten([u for u, _ in pairs])
    ratios = treedef.unflatten([r for _, r in pairs])
    return new_updates, TrustRatioState(trust_ratios=ratios, adapted=state.adapted)

  return optax.GradientTransformation(init_fn, update_fn)


def trust_ratio_stats(opt_state) -> dict[str, jax.Array]:
  """Min/mean/max trust ratio of the last update over adapted leaves; {} for sgd/adamw.

  With every leaf excluded the three values are nan.
  """
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TrustRatioState))
            if isinstance(s, TrustRatioState)]
  if not states:
    return {}
  ratios = jnp.stack([r for s in states for r in jax.tree.leaves(s.trust_ratios)])
  adapted = jnp.stack([a for s in states for a in jax.tree.leaves(s.adapted)])
  # The mask is data in the state (traced under jit), so select with where, not by indexing.
  count = jnp.sum(adapted)
  some = count > 0
  nan = jnp.float32(jnp.nan)
  return {
      'trust_ratio_min': jnp.where(some, jnp.min(jnp.where(adapted, ratios, jnp.inf)), nan),
      'trust_ratio_mean': jnp.where(
          some, jnp.sum(jnp.where(adapted, ratios, 0.0)) / jnp.maximum(count, 1), nan),
      'trust_ratio_max': jnp.where(some, jnp.max(jnp.where(adapted, ratios, -jnp.inf)), nan),
  }
