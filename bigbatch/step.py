"""The pure per-device step functions: one update (`train_step`), BN statistics
(`bn_statistics_step`). No task branches: what differs between tasks (the loss, which parameters
the model applies, the axes an update reduces over) arrives as arguments from bigbatch/tasks/.

The update runs under `jax.shard_map`: gradients accumulate locally over a `lax.scan` of the
microbatches and are averaged across devices once, after it. Why the collective is written by
hand: docs/design.md, "The update is per-device code under shard_map".

Shapes: K = accumulation steps (microbatches per update), M = examples per microbatch on this
device, H, W, C = image height, width, channels.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import jax
from jax import lax
import jax.numpy as jnp
import optax

from bigbatch import adascale as adascale_lib
from bigbatch import grad_stats
from bigbatch import optim
from bigbatch import trust_ratio

# loss_fn(params, batch_stats, image_MxHxWxC, label_M, key) -> (loss, (new BN stats, accuracy)):
# the mean loss of one microbatch share on one device. `accuracy` may instead be a dict with
# 'accuracy' and counts (device-invariant scalars) that the step's metrics sum over microbatches.
LossFn = Callable[..., tuple[jax.Array, tuple[Any, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from update to update; what a checkpoint holds."""
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  batch_stats: Any  # BN running statistics ({} without BatchNorm)
  opt_state: Any
  rng: jax.Array  # uint32[2]; per-step keys are fold_in(rng, step)
  nonfinite_streak: jax.Array  # int32: consecutive steps whose update was not applied
  nonfinite_total: jax.Array  # int32: all such steps of the run
  ema_params: Any  # moving average of params (config.ema_decay); {} when off
  # Moving averages of the noise-scale estimates |G|^2 and tr(Sigma) (config.noise_scale), not
  # bias-corrected (the ratio B_simple needs no correction); {} when off.
  noise_scale: Any


def varying(x, axis: str) -> bool:
  """Whether `x` (inside shard_map) differs across devices along mesh `axis`."""
  mat = getattr(jax.typeof(x), 'manual_axis_type', None)
  return mat is not None and axis in mat.varying


def mean_over(x, axes: Sequence[str] = ('data', 'model')):
  """pmean over the mesh axes `x` varies over; a device-invariant value (Partial FC's loss) is
  returned as it is."""
  along = tuple(a for a in axes if varying(x, a))
  return lax.pmean(x, along) if along else x


def global_norm(tree, *, sharded, axes: Sequence[str]) -> jax.Array:
  """Global L2 norm of a tree whose `sharded` leaves hold this device's rows only."""
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  flags = jax.tree.leaves(sharded)
  local = sum((q for q, sh in zip(sq, flags) if sh), jnp.zeros((), jnp.float32))
  total = sum((q for q, sh in zip(sq, flags) if not sh), jnp.zeros((), jnp.float32))
  if any(flags):
    total = total + lax.psum(local, tuple(axes))
  return jnp.sqrt(total)


def _count_nonfinite(leaves) -> jax.Array:
  """The number of non-finite values in `leaves`, as one reduction per dtype over their
  concatenation: a reduction per leaf (hundreds in a ResNet's parameters and optimizer state)
  made XLA take 3x as long to compile the whole step on CPU (29 s against 10 s for the
  runlocal ResNet-50 step with LAMB), for the same exact count."""
  by_dtype: dict[Any, list[jax.Array]] = {}
  for x in leaves:
    by_dtype.setdefault(jnp.dtype(x.dtype), []).append(jnp.ravel(x))
  return sum((jnp.sum(~jnp.isfinite(jnp.concatenate(xs)), dtype=jnp.int32)
              for xs in by_dtype.values()), jnp.zeros((), jnp.int32))


def all_finite(tree, axes: Sequence[str]) -> jax.Array:
  """Whether every float value in `tree` is finite on every device: a leaf that differs across
  devices (a sharded parameter, its optimizer state) is checked on all of them, so every device
  decides alike. An exact test (isfinite), not a norm, which could overflow on finite values."""
  common, local = [], []
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      (local if any(varying(x, a) for a in axes) else common).append(x)
  total = _count_nonfinite(common)
  if local:
    spread = _count_nonfinite(local)
    total = total + lax.psum(spread, tuple(a for a in axes if varying(spread, a)))
  return total == 0


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, lr_fn: Callable,
               axes: Sequence[str] = ('data',), ema_decay: float | None = None,
               noise_scale_decay: float | None = None,
               adascale: adascale_lib.Settings | None = None):
  """One update; per-device code, run under shard_map.

  batch: {'image': [K, M, H, W, C], 'label': [K, M]}, this device's share of each microbatch,
  split over 'data'. `axes`: the mesh axes the update is data-parallel over (the gradient
  reduction's axes); an axis other than 'data' sees the same batch on each of its devices.

  With noise_scale_decay, the gradient noise scale is estimated from the K x devices microbatch
  gradients of b = M examples each and their mean, the update's gradient of B examples
  (bigbatch/grad_stats.py): the squared norm of each microbatch gradient costs one
  reduction per microbatch, on the device, before any communication. With `adascale`
  (Optimizer.adascale; needs noise_scale_decay) the update's lr is the gain from those moving
  averages, after this step's estimates, times the base schedule at tau / S (bigbatch/adascale.py).

  Parameters that arrive sharded (device-varying: the face-recognition class centers) are
  this device's rows; their gradient is complete on the device and is not reduced
  (the contract is in bigbatch/face/partial_fc.py).
  """
  axes = tuple(axes)
  k = batch['label'].shape[0]
  others = tuple(a for a in axes if a != 'data')
  if others:
    # The batch is split over 'data' only: make it device-varying over the other axes too, so
    # that gradients stay local until the single pmean below.
    batch = jax.tree.map(lambda x: lax.pcast(x, others, to='varying'), batch)
  sharded = jax.tree.map(lambda p: varying(p, 'data'), state.params)
  # Differentiating w.r.t. replicated (invariant) parameters makes shard_map insert the
  # cross-device psum of the gradient inside the scan body. Casting them to device-varying
  # keeps the gradients local until the single pmean below.
  params = jax.tree.map(lambda p, sh: p if sh else lax.pcast(p, axes, to='varying'),
                        state.params, sharded)
  grad_fn = jax.value_and_grad(
      lambda p, x, y, key: loss_fn(p, state.batch_stats, x, y, key), has_aux=True)
  step_key = jax.random.fold_in(state.rng, state.step)
  replicated = lambda tree: [g for g, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(sharded))
                             if not sh]

  def microbatch(grad_sum, mb_and_index):
    mb, i = mb_and_index
    (loss, (stats, accuracy)), grads = grad_fn(params, mb['image'], mb['label'],
                                               jax.random.fold_in(step_key, i))
    # The noise scale's small batch: this device's gradient of replicated parameters (sharded
    # ones have no per-device gradient of their own).
    small_sq = (grad_stats.sq_norm(replicated(grads))
                if noise_scale_decay is not None else 0.0)
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, accuracy, stats, small_sq)

  grad_sum, (losses, accuracies, stats, small_sqs) = lax.scan(
      microbatch, jax.tree.map(jnp.zeros_like, params), (batch, jnp.arange(k)))
  counts = {}
  if isinstance(accuracies, dict):  # the task's counts, e.g. Partial FC's overflows
    counts = {name: mean_over(v.sum()) for name, v in accuracies.items() if name != 'accuracy'}
    accuracies = accuracies['accuracy']
  # The one gradient reduction of the update (replicated parameters only).
  grads = jax.tree.map(lambda g, sh: g / k if sh else lax.pmean(g / k, axes), grad_sum, sharded)

  # BN running statistics: each microbatch updated them from the same starting point; their
  # mean applies m * running + (1 - m) * mean_k(batch statistic) once per update. Ghost-BN
  # statistics differ per device and are averaged over 'data' (sync-BN ones already agree).
  batch_stats = jax.tree.map(lambda s: mean_over(s.mean(axis=0)), stats)

  stat_metrics, ema, opt_in = {}, None, state.opt_state
  if noise_scale_decay is not None:
    b = batch['label'].shape[1]
    big = b * k * lax.axis_size('data')
    g2, trace = grad_stats.estimates(mean_over(small_sqs.mean()),
                                      grad_stats.sq_norm(replicated(grads)), b, big)
    ema = grad_stats.update_ema(state.noise_scale, g2, trace, noise_scale_decay)
    stat_metrics = {f'gns/{name}': v for name, v in grad_stats.ema_metrics(
        ema, state.step + 1, noise_scale_decay).items()}
    stat_metrics['gns/b_simple_step'] = trace / g2
    if adascale is not None:
      gain = adascale_lib.gain(stat_metrics['gns/g2'], stat_metrics['gns/trace_sigma'], adascale)
      opt_in = optim.set_adascale_gain(opt_in, gain)

  lr = optim.learning_rate(opt_in, lr_fn, adascale)
  loss = mean_over(losses.mean())
  norm = functools.partial(global_norm, sharded=sharded, axes=axes)
  grad_norm = norm(grads)
  updates, opt_state = tx.update(grads, opt_in, state.params)
  if adascale is not None:
    opt_state = optim.advance_adascale_tau(opt_state)
  params = optax.apply_updates(state.params, updates)

  # A non-finite loss or gradient, or an update that makes a parameter, the optimizer state or a
  # BN statistic non-finite (a finite gradient times an lr overflowing, a second moment
  # overflowing), leaves params, optimizer state and BN statistics as they were (the data step
  # still advances). optax.apply_if_finite would cover the gradient alone, and applies the bad
  # update after max_consecutive_errors; the host decides when to stop instead.
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            & all_finite((params, opt_state, batch_stats), axes))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state), nonfinite_streak=streak,
      nonfinite_total=state.nonfinite_total + (1 - finite.astype(jnp.int32)))
  if ema_decay is not None:
    new_state = new_state.replace(ema_params=jax.tree.map(
        lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, new_state.params))
  if ema is not None:
    new_state = new_state.replace(noise_scale=keep(ema, state.noise_scale))
  if adascale is not None:  # the last applied update's gain, and tau after it
    stat_metrics['adascale/gain'], stat_metrics['adascale/tau'] = optim.adascale_values(
        new_state.opt_state)
  metrics = {
      'loss': loss,
      'accuracy': mean_over(accuracies.mean()),
      'lr': lr,
      'grad_norm': grad_norm,
      'param_norm': norm(new_state.params),
      'update_norm': norm(updates),
      'nonfinite_streak': streak,
      'nonfinite_total': new_state.nonfinite_total,
      **trust_ratio.trust_ratio_stats(opt_state),
      **stat_metrics,
      **counts,
  }
  return new_state, metrics


def bn_statistics_step(state: TrainState, batch: dict, *, model,
                       backbone: Callable[[Any], Any] = lambda params: params):
  """Per-device code: the batch-norm statistics of one training batch, as the training step's
  BN computes them (sync or ghost), averaged over its microbatches and devices. `model` has
  bn_momentum 0, so the 'running' statistics it returns are the batch's own. `backbone` picks
  the parameters the model applies out of the state's."""
  variables = {'params': backbone(state.params), 'batch_stats': state.batch_stats}

  def microbatch(_, mb):
    _, updates = model.apply(variables, mb['image'], train=True, mutable=['batch_stats'])
    return None, updates['batch_stats']

  _, stats = lax.scan(microbatch, None, batch)
  return jax.tree.map(lambda s: mean_over(s.mean(axis=0), ('data',)), stats)
