"""Partial FC (An et al. 2022; InsightFace arcface_torch partial_fc_v2.py): a margin softmax over
millions of identities, its class centers split over devices, each device using only a sample
of its own.

`loss` is the per-device computation (inside `jax.shard_map`), `centers_spec` the centers'
sharding, `sampled_rows_update` the optional optimizer restriction to sampled rows. The layout,
the computation step by step, the gradient contract the trainer keeps (bigbatch/step.py) and
the batch layout it needs are in docs/design.md, "Partial FC: ..." sections; the margin itself
is bigbatch/face/losses.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from bigbatch.face import losses

AXES = ('data', 'model')
_POSITIVE_BONUS = 2.0  # uniform scores are in [0, 1): positives sort first
_PADDING_SCORE = -1.0  # below every real class
# The columns beyond S of an overflowing shard are computed in blocks of S / 4: the buffers of
# that (rarely run, compiled-in) path add about a quarter of the [B, S] logits' to the step.
EXTRA_BLOCKS_PER_SAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Config:
  """Partial FC and its margin. Defaults: ArcFace (s=64, m=0.5), sample rate 0.1.

  sample_rate: fraction of each shard's classes in the softmax (1.0: all, model parallel),
    int(rate * Cs) rows, or all of the shard's positives where they are more.
  straight_through: arcface_torch's CombinedMarginLoss (bigbatch/face/losses.py).
  cap_loss: report arcface_torch's loss value (each row capped at -log(1e-30)); same gradient.
  """
  num_classes: int
  sample_rate: float = 0.1
  s: float = 64.0
  m1: float = 1.0
  m2: float = 0.5
  m3: float = 0.0
  straight_through: bool = False
  cap_loss: bool = False
  axis_names: Sequence[str] = AXES

  def __post_init__(self):
    if self.straight_through:
      losses.check_straight_through(self.m1, self.m2, self.m3)
    if not 0.0 < self.sample_rate <= 1.0:
      raise ValueError(f'sample_rate must be in (0, 1], got {self.sample_rate}')
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {self.num_classes}')


def padded_num_classes(num_classes: int, num_shards: int) -> int:
  """C rounded up to a multiple of the device count: the rows of the centers parameter."""
  return -(-num_classes // num_shards) * num_shards


def sample_size(num_classes: int, num_shards: int, sample_rate: float) -> int:
  """S = int(rate * Cs): the rows of each shard in the softmax of a batch whose positives on
  every shard number at most S (docs/design.md). Rounded down, as arcface_torch's partial_fc_v2
  (`int(self.sample_rate * self.num_local)`); rate 1 is every row."""
  cs = padded_num_classes(num_classes, num_shards) // num_shards
  return cs if sample_rate >= 1.0 else int(sample_rate * cs)


def capacity(num_classes: int, num_shards: int, global_batch: int, sample_rate: float) -> int:
  """max(S, min(B, Cs)): the most rows one shard's softmax can have for a batch of B (the
  positives of a shard number at most min(B, Cs)); the sampled order is drawn this long and
  the rows beyond S are computed only when a shard's positives exceed S (docs/design.md)."""
  cs = padded_num_classes(num_classes, num_shards) // num_shards
  return max(sample_size(num_classes, num_shards, sample_rate), min(global_batch, cs))


def centers_spec(axis_names: Sequence[str] = AXES) -> P:
  """Row blocks over all devices, in their linear (data-major) order."""
  return P(tuple(axis_names), None)


def init_centers(key, num_classes: int, embedding_dim: int, num_shards: int,
                 std: float = 0.01, dtype=jnp.float32):
  """[C_pad, D] centers ~ N(0, std^2) (arcface_torch's init), padded rows zero. Run it under
  jit with out_shardings=NamedSharding(mesh, centers_spec()) to create it sharded."""
  c_pad = padded_num_classes(num_classes, num_shards)
  w = std * jax.random.normal(key, (c_pad, embedding_dim), dtype)
  real = (jnp.arange(c_pad) < num_classes)[:, None]
  return jnp.where(real, w, jnp.zeros((), dtype))


def microbatch_key(step_key, microbatch_index):
  """The sampling key of one accumulated microbatch: fold_in(step_key, index)."""
  return jax.random.fold_in(step_key, microbatch_index)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_gradient(x, factor: float):
  return x


def _scale_gradient_fwd(x, factor):
  return x, None


def _scale_gradient_bwd(factor, _, g):
  return (g * factor,)


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def _varying(x, axes: Sequence[str]):
  """x pcast to device-varying over those of `axes` it is not varying over yet."""
  mat = getattr(jax.typeof(x), 'manual_axis_type', None)
  varying = mat.varying if mat is not None else frozenset()
  missing = tuple(a for a in axes if a not in varying)
  return lax.pcast(x, missing, to='varying') if missing else x


def sample_rows(key, labels_B, *, offset, shard_rows: int, num_classes: int, num_sampled: int,
                every_row: bool | None = None):
  """The sampled order of one shard: (rows_K local indices, positives first, then uniformly
  random other real classes, then padding; valid_K (row holds a real class); column_B: each
  label's column in rows_K, -1 if not in this shard; num_positive: the distinct positives).

  offset: the shard's first class id (may be traced). K = num_sampled; the order keeps every
  positive when K >= min(B, shard_rows), which `capacity` guarantees. every_row: the rows in
  their order, unsampled (rate 1); default: K == shard_rows.
  """
  if every_row is None:
    every_row = num_sampled == shard_rows
  local_B = labels_B.astype(jnp.int32) - offset
  in_shard_B = (local_B >= 0) & (local_B < shard_rows)
  local_B = jnp.where(in_shard_B, local_B, 0)
  row_ids = jnp.arange(shard_rows, dtype=jnp.int32)
  valid_rows = offset + row_ids < num_classes
  positive = jnp.zeros((shard_rows,), jnp.int32).at[local_B].max(in_shard_B.astype(jnp.int32))
  if every_row:
    rows_K = row_ids[:num_sampled]
  else:
    score = jax.random.uniform(key, (shard_rows,)) + _POSITIVE_BONUS * positive
    _, rows_K = lax.top_k(jnp.where(valid_rows, score, _PADDING_SCORE), num_sampled)
  column_of_row = jnp.full((shard_rows,), -1, jnp.int32).at[rows_K].set(
      jnp.arange(num_sampled, dtype=jnp.int32))
  column_B = jnp.where(in_shard_B, column_of_row[local_B], -1)
  return rows_K, valid_rows[rows_K], column_B, jnp.sum(positive)


def _merge(a, b):
  """Two partial softmax statistics of the same rows over disjoint columns, as one."""
  (m_a, s_a, t_a, best_a, tc_a), (m_b, s_b, t_b, best_b, tc_b) = a, b
  m = jnp.maximum(m_a, m_b)
  scale = lambda mx: jnp.where(jnp.isfinite(mx), jnp.exp(mx - jnp.where(jnp.isfinite(m), m, 0)),
                               0.0)
  return (m, s_a * scale(m_a) + s_b * scale(m_b), t_a + t_b, jnp.maximum(best_a, best_b),
          tc_a + tc_b)


def _block(config: Config, e_BxD, centers_CsxD, rows_W, valid_W, column_B, start, gather: bool):
  """Partial statistics of the columns [start, start + W) of the sampled order: per row the max
  logit m (no gradient; -inf without a valid column), sum exp(logit - m), the target logit
  where the target is in the block (else 0), and the best and the target cosine (accuracy;
  no gradient)."""
  width = rows_W.shape[0]
  # The gather's backward scatters into zeros: unsampled rows get an exactly zero gradient.
  w_WxD = centers_CsxD[rows_W] if gather else centers_CsxD
  cos_BxW = e_BxD @ losses.normalize(w_WxD).T
  local_B = column_B - start
  in_block_B = (local_B >= 0) & (local_B < width)
  logits_BxW = losses.margin_logits(
      cos_BxW, jnp.where(in_block_B, local_B, -1), s=config.s, m1=config.m1, m2=config.m2,
      m3=config.m3, straight_through=config.straight_through)
  logits_BxW = jnp.where(valid_W[None, :], logits_BxW, -jnp.inf)
  m_B = lax.stop_gradient(jnp.max(logits_BxW, axis=1))
  safe_m_B = jnp.where(jnp.isfinite(m_B), m_B, 0.0)
  s_B = jnp.sum(jnp.exp(logits_BxW - safe_m_B[:, None]), axis=1)
  col_B = jnp.clip(local_B, 0, width - 1)[:, None]
  t_B = jnp.where(in_block_B, jnp.take_along_axis(logits_BxW, col_B, axis=1)[:, 0], 0.0)
  cos_BxW = lax.stop_gradient(cos_BxW)
  best_B = jnp.max(jnp.where(valid_W[None, :], cos_BxW, -jnp.inf), axis=1)
  tc_B = jnp.where(in_block_B, jnp.take_along_axis(cos_BxW, col_B, axis=1)[:, 0], 0.0)
  return m_B, s_B, t_B, best_B, tc_B


def loss(centers_CsxD, embeddings_MxD, labels_M, key, *, config: Config):
  """Partial FC margin softmax; per-device code under shard_map over config.axis_names.

  centers_CsxD: this device's row block of the centers (spec `centers_spec`).
  embeddings_MxD: this device's (unnormalized) embeddings; labels_M: their class ids in [0, C).
  key: the step's (or microbatch's) sampling key, the same on every device.
  Returns (loss, aux): loss is the mean over the global batch (device-invariant); aux holds
    'accuracy' (top-1 among the sampled classes, exact at rate 1; no gradient),
    'sampled_classes' [K] int32 global class ids of this shard's softmax columns in the
      sampled order, -1 for padding and for the columns beyond max(S, positives) (K =
      `capacity`),
    'overflow' float32 0/1 (device-invariant): whether some shard's positives exceeded S.
  Gradients follow the contract in docs/design.md, "Partial FC: the gradient contract".
  """
  axes = tuple(config.axis_names)
  num_shards = lax.axis_size(axes)
  shard_rows, _ = centers_CsxD.shape
  global_batch = num_shards * embeddings_MxD.shape[0]
  num_sampled = sample_size(config.num_classes, num_shards, config.sample_rate)
  num_ordered = capacity(config.num_classes, num_shards, global_batch, config.sample_rate)
  want_rows = padded_num_classes(config.num_classes, num_shards) // num_shards
  if shard_rows != want_rows:
    raise ValueError(f'centers shard has {shard_rows} rows; {config.num_classes} classes over '
                     f'{num_shards} devices need {want_rows}')

  embeddings_MxD = _varying(embeddings_MxD, axes)
  labels_M = _varying(labels_M, axes)
  # Backward: x N, so that the trainer's pmean over devices gives the true backbone gradient.
  e_MxD = losses.normalize(_scale_gradient(embeddings_MxD, float(num_shards)))
  e_BxD = lax.all_gather(e_MxD, axes, tiled=True)
  labels_B = lax.all_gather(labels_M, axes, tiled=True)

  shard = lax.axis_index(axes)
  offset = shard * shard_rows
  rows_K, valid_K, column_B, num_positive = sample_rows(
      jax.random.fold_in(key, shard), labels_B, offset=offset, shard_rows=shard_rows,
      num_classes=config.num_classes, num_sampled=num_ordered,
      every_row=num_sampled == shard_rows)
  # The softmax columns: the first max(S, positives) of the sampled order (arcface_torch's
  # rule: all positives, topped up with random negatives to S).
  num_active = jnp.maximum(num_sampled, num_positive)
  valid_K = valid_K & (jnp.arange(num_ordered) < num_active)
  width = max(num_sampled, 1)
  block = functools.partial(_block, config, e_BxD, centers_CsxD, column_B=column_B)
  stats = block(rows_K[:width], valid_K[:width], start=0, gather=width < shard_rows)
  extra_width = -(-width // EXTRA_BLOCKS_PER_SAMPLE)
  num_extra = -(-(num_ordered - width) // extra_width)
  if num_extra:
    # Positives beyond S: further blocks of S / EXTRA_BLOCKS_PER_SAMPLE columns, each computed
    # (under lax.cond) only where this shard's positives reach it, its activations recomputed
    # in the backward pass: the buffers they add are a fraction of the [B, S] logits', whatever
    # the batch.
    pad = width + num_extra * extra_width - num_ordered
    rows_NxW = jnp.pad(rows_K, (0, pad))[width:].reshape(num_extra, extra_width)
    valid_NxW = jnp.pad(valid_K, (0, pad))[width:].reshape(num_extra, extra_width)

    @jax.checkpoint
    def extra(carry, xs):
      rows_W, valid_W, start = xs
      return lax.cond(start < num_active,
                      lambda: _merge(carry, block(rows_W, valid_W, start=start, gather=True)),
                      lambda: carry), None

    starts = width + extra_width * jnp.arange(num_extra, dtype=jnp.int32)
    stats, _ = lax.scan(extra, stats, (rows_NxW, valid_NxW, starts))
  m_B, s_B, target_B, best_B, target_cos_B = stats

  # Distributed log-softmax. Every row has its target among the valid columns of some shard,
  # so the global max is finite even where a shard is all padding.
  max_B = lax.pmax(m_B, axes)
  sumexp_B = lax.psum(jnp.where(jnp.isfinite(m_B), s_B * jnp.exp(
      jnp.where(jnp.isfinite(m_B), m_B, 0.0) - max_B), 0.0), axes)
  target_B = lax.psum(target_B, axes)
  row_loss_B = jnp.log(sumexp_B) + max_B - target_B
  if config.cap_loss:
    # arcface_torch's reported value: -log(max(p_target, 1e-30)) per row; the gradient stays
    # the uncapped cross-entropy's, as its backward.
    row_loss_B = row_loss_B + lax.stop_gradient(
        jnp.minimum(row_loss_B, losses.LOSS_CAP) - row_loss_B)
  loss_value = jnp.mean(row_loss_B)

  best_B = lax.pmax(best_B, axes)
  target_cos_B = lax.psum(target_cos_B, axes)
  overflow = lax.pmax((num_positive > num_sampled).astype(jnp.float32), axes)
  aux = {'accuracy': jnp.mean((target_cos_B >= best_B).astype(jnp.float32)),
         'sampled_classes': jnp.where(valid_K, offset + rows_K, -1).astype(jnp.int32),
         'overflow': overflow}
  return loss_value, aux


# ------------------------------------------------------------------------------ optimizer


def rows_with_gradient(g) -> jax.Array:
  """bool [rows]: rows of g (axis 0) with any nonzero entry, i.e. rows sampled this step."""
  return jnp.any(g != 0, axis=tuple(range(1, g.ndim)))


def sampled_rows_update(inner: optax.GradientTransformation,
                        mask: Any = None) -> optax.GradientTransformation:
  """`inner`, restricted to the rows of the masked leaves that have a nonzero gradient.

  For each leaf selected by `mask` (a pytree of bools like params, or a callable params ->
  such a tree; None: every leaf of rank >= 1), rows whose incoming gradient is all zero (not
  sampled by any microbatch of this step, or padding) get a zero update (so no momentum and no
  weight decay is applied to them) and keep their optimizer state: every state leaf in a subtree
  shaped like the params (e.g. optax.trace's momentum, Adam's mu / nu) with the leaf's shape
  keeps its old rows there. Scalar state (counts, schedules) advances as usual. Sampled rows
  get exactly inner's update. The row mask is computed from the gradient before `inner` adds
  weight decay, and elementwise, so sharded rows need no communication.
  """
  def leaf_mask(params):
    if mask is None:
      return jax.tree.map(lambda p: getattr(p, 'ndim', 0) >= 1, params)
    return mask(params) if callable(mask) else mask

  def update_fn(updates, state, params=None):
    selected = leaf_mask(updates if params is None else params)
    treedef = jax.tree.structure(updates)
    rows = treedef.unflatten([
        rows_with_gradient(g) if sel else None
        for g, sel in zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(selected))])
    new_updates, new_state = inner.update(updates, state, params)

    def keep_rows(row_mask, new, old, like):
      if row_mask is None or new.shape != like.shape:
        return new
      m = row_mask.reshape(row_mask.shape + (1,) * (new.ndim - 1))
      return jnp.where(m, new, jnp.zeros((), new.dtype) if old is None else old)

    flat_rows = treedef.flatten_up_to(rows)
    flat_like = treedef.flatten_up_to(updates)
    new_updates = treedef.unflatten([
        keep_rows(r, u, None, g)
        for r, u, g in zip(flat_rows, treedef.flatten_up_to(new_updates), flat_like)])

    def restrict(new_sub, old_sub):
      if jax.tree.structure(new_sub) != treedef:
        return new_sub  # not per-parameter state: leave inner's
      return treedef.unflatten([
          keep_rows(r, n, o, g) for r, n, o, g in zip(
              flat_rows, treedef.flatten_up_to(new_sub), treedef.flatten_up_to(old_sub),
              flat_like)])

    is_per_param = lambda x: jax.tree.structure(x) == treedef
    new_state = jax.tree.map(restrict, new_state, state, is_leaf=is_per_param)
    return new_updates, new_state

  return optax.GradientTransformation(inner.init, update_fn)
