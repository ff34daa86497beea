"""The one trainer: classification (and, later, face recognition) by config.

The update is per-device code under `jax.shard_map` (DESIGN.md): each device computes the
gradients of its share of each microbatch, accumulates them locally over a `lax.scan`, and the
gradients are averaged across 'data' once per update, after the scan. Under plain `jit` with a
sharded batch XLA places that all-reduce inside the scan body (once per microbatch), which is
why the collective is written by hand here.

Shapes: K = accumulation steps (microbatches per update), M = examples per microbatch on this
device, H, W, C = image height, width, channels.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bigbatch import checkpoint as checkpoint_lib
from bigbatch import config_lib
from bigbatch import distributed
from bigbatch import input_pipeline
from bigbatch import metrics as metrics_lib
from bigbatch import models
from bigbatch import optim
from bigbatch import sharding
from bigbatch import workdir as workdir_lib
from bigbatch.face import partial_fc
from bigbatch.study import noise_scale


@flax.struct.dataclass
class TrainState:
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


# ----------------------------------------------------------------------------- pure step functions


def loss_fn(params, batch_stats, image_MxHxWxC, label_M, *, model, num_classes: int,
            label_smoothing: float):
  """Mean softmax cross-entropy of one microbatch share; aux: (new BN stats, accuracy)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  logits, updates = model.apply(variables, image_MxHxWxC, train=True, mutable=['batch_stats'])
  targets = optax.smooth_labels(jax.nn.one_hot(label_M, num_classes), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == label_M)
  return loss, (updates.get('batch_stats', {}), accuracy)


def face_loss_fn(params, batch_stats, image_MxHxWxC, label_M, key, *, model,
                 face: partial_fc.Config, dropout: bool):
  """Partial FC margin softmax of one microbatch (per-device code; the gradient contract is in
  bigbatch/face/partial_fc.py). params: {'backbone': ..., 'centers': this device's rows}."""
  variables = {'params': params['backbone']}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  # Dropout masks differ per device: the key is folded with the device's index.
  rngs = ({'dropout': jax.random.fold_in(jax.random.fold_in(key, 1), lax.axis_index('data'))}
          if dropout else None)
  embeddings, updates = model.apply(variables, image_MxHxWxC, train=True,
                                    mutable=['batch_stats'], rngs=rngs)
  loss, aux = partial_fc.loss(params['centers'], embeddings, label_M, key, config=face)
  return loss, (updates.get('batch_stats', {}), aux['accuracy'])


def _varying(x, axis: str) -> bool:
  mat = getattr(jax.typeof(x), 'manual_axis_type', None)
  return mat is not None and axis in mat.varying


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               lr_fn: Callable, num_classes: int, label_smoothing: float,
               ema_decay: float | None = None, noise_scale_decay: float | None = None,
               face: partial_fc.Config | None = None, dropout: bool = False):
  """One update; per-device code, run under shard_map over the 'data' axis.

  batch: {'image': [K, M, H, W, C], 'label': [K, M]}, this device's share of each microbatch.
  With noise_scale_decay, the gradient noise scale is estimated from the K x devices microbatch
  gradients of b = M examples each and their mean, the update's gradient of B examples
  (bigbatch/study/noise_scale.py): the squared norm of each microbatch gradient costs one
  reduction per microbatch, on the device, before any communication.

  Parameters that arrive sharded (device-varying: the face-recognition class centers) are
  this device's rows; their gradient is complete on the device and is not reduced
  (face=Partial FC config; the contract is in bigbatch/face/partial_fc.py).
  """
  k = batch['label'].shape[0]
  axes = ('data', 'model') if face is not None else 'data'
  if face is not None:
    # Partial FC runs over every device (both axes; 'model' has size 1 for faces): the batch
    # and the backbone are device-varying over both, so gradients stay local until the pmean.
    batch = jax.tree.map(lambda x: lax.pcast(x, 'model', to='varying'), batch)
  sharded = jax.tree.map(lambda p: _varying(p, 'data'), state.params)
  # Differentiating w.r.t. replicated (invariant) parameters makes shard_map insert the
  # cross-device psum of the gradient inside the scan body. Casting them to device-varying
  # keeps the gradients local until the single pmean below.
  params = jax.tree.map(lambda p, sh: p if sh else lax.pcast(p, axes, to='varying'),
                        state.params, sharded)
  if face is None:
    grad_fn = jax.value_and_grad(
        lambda p, x, y, key: loss_fn(p, state.batch_stats, x, y, model=model,
                                     num_classes=num_classes, label_smoothing=label_smoothing),
        has_aux=True)
  else:
    grad_fn = jax.value_and_grad(
        lambda p, x, y, key: face_loss_fn(p, state.batch_stats, x, y, key, model=model,
                                          face=face, dropout=dropout),
        has_aux=True)
  step_key = jax.random.fold_in(state.rng, state.step)
  replicated = lambda tree: [g for g, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(sharded))
                             if not sh]

  def microbatch(grad_sum, mb_and_index):
    mb, i = mb_and_index
    (loss, (stats, accuracy)), grads = grad_fn(params, mb['image'], mb['label'],
                                               partial_fc.microbatch_key(step_key, i))
    # The noise scale's small batch: this device's gradient of replicated parameters (sharded
    # ones have no per-device gradient of their own).
    small_sq = (noise_scale.per_shard_sq_norms(replicated(grads))
                if noise_scale_decay is not None else 0.0)
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, accuracy, stats, small_sq)

  grad_sum, (losses, accuracies, stats, small_sqs) = lax.scan(
      microbatch, jax.tree.map(jnp.zeros_like, params), (batch, jnp.arange(k)))
  # The one gradient reduction of the update (replicated parameters only).
  grads = jax.tree.map(lambda g, sh: g / k if sh else lax.pmean(g / k, axes), grad_sum, sharded)

  # BN running statistics: each microbatch updated them from the same starting point; their
  # mean applies m * running + (1 - m) * mean_k(batch statistic) once per update. Ghost-BN
  # statistics differ per device and are averaged over 'data' (sync-BN ones already agree).
  batch_stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
  batch_stats = jax.tree.map(_mean_over, batch_stats)

  lr = optim.learning_rate(state.opt_state, lr_fn)
  loss = _mean_over(losses.mean())
  norm = functools.partial(_norm, sharded=sharded, axes=axes)
  grad_norm = norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # A non-finite loss or gradient leaves params, optimizer state and BN statistics as they were
  # (the data step still advances). optax.apply_if_finite would cover the optimizer alone, and
  # applies the bad update after max_consecutive_errors; the host decides when to stop instead.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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
  gns_metrics = {}
  if noise_scale_decay is not None:
    b = batch['label'].shape[1]
    big = b * k * lax.axis_size('data')
    g2, trace = noise_scale.estimates(_mean_over(small_sqs.mean()),
                                      noise_scale.per_shard_sq_norms(replicated(grads)), b, big)
    ema = noise_scale.update_ema(state.noise_scale, g2, trace, noise_scale_decay)
    new_state = new_state.replace(noise_scale=keep(ema, state.noise_scale))
    gns_metrics = {f'gns/{k}': v for k, v in noise_scale.ema_metrics(
        ema, new_state.step, noise_scale_decay).items()}
    gns_metrics['gns/b_simple_step'] = trace / g2
  metrics = {
      'loss': loss,
      'accuracy': _mean_over(accuracies.mean()),
      'lr': lr,
      'grad_norm': grad_norm,
      'param_norm': norm(new_state.params),
      'update_norm': norm(updates),
      'nonfinite_streak': streak,
      'nonfinite_total': new_state.nonfinite_total,
      **optim.trust_ratio_stats(opt_state),
      **gns_metrics,
  }
  return new_state, metrics


def _mean_over(x, axes=('data', 'model')):
  """pmean over the mesh axes `x` varies over; a device-invariant value (Partial FC's loss) is
  returned as it is."""
  varying = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if _varying(x, a))
  return lax.pmean(x, varying) if varying else x


def _norm(tree, *, sharded, axes) -> jax.Array:
  """Global L2 norm of a tree whose `sharded` leaves hold this device's rows only."""
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
  flags = jax.tree.leaves(sharded)
  local = sum((q for q, sh in zip(sq, flags) if sh), jnp.zeros((), jnp.float32))
  total = sum((q for q, sh in zip(sq, flags) if not sh), jnp.zeros((), jnp.float32))
  if any(flags):
    total = total + lax.psum(local, axes)
  return jnp.sqrt(total)


def backbone(params, face: bool):
  """The parameters the model applies: all of them, or for faces all but the centers."""
  return params['backbone'] if face else params


def bn_statistics_step(state: TrainState, batch: dict, *, model, face: bool = False):
  """Per-device code: the batch-norm statistics of one training batch, as the training step's
  BN computes them (sync or ghost), averaged over its microbatches and devices. `model` has
  bn_momentum 0, so the 'running' statistics it returns are the batch's own."""
  variables = {'params': backbone(state.params, face), 'batch_stats': state.batch_stats}

  def microbatch(_, mb):
    _, updates = model.apply(variables, mb['image'], train=True, mutable=['batch_stats'])
    return None, updates['batch_stats']

  _, stats = lax.scan(microbatch, None, batch)
  stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
  return jax.tree.map(lambda s: lax.pmean(s, 'data') if _varying(s, 'data') else s, stats)


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int):
  """Sums over one (padded, masked) eval batch: loss, top-1 and top-5 hits, example count."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  logits = model.apply(variables, batch['image'], train=False)
  label, mask = batch['label'], batch['mask'].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  _, top = lax.top_k(logits, min(5, num_classes))
  top1 = top[:, 0] == label
  top5 = jnp.any(top == label[:, None], axis=-1)
  return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
          'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}


# ----------------------------------------------------------------------------- construction


@dataclasses.dataclass
class Trainer:
  """Everything built from a config for one mesh: initial state and compiled-on-demand steps."""
  state: TrainState
  state_specs: Any
  train_step: Callable  # (state, batch) -> (state, metrics); jitted, state donated
  eval_step: Callable  # (state, eval batch) -> sums
  model: Any  # the flax module, outside shard_map (sync BN without an axis)
  optimizer: optim.Optimizer
  mesh: jax.sharding.Mesh
  batch_sharding: NamedSharding
  eval_sharding: NamedSharding
  bn_statistics: Callable | None = None  # (state, batch) -> BN statistics; None without BN
  config: ml_collections.ConfigDict | None = None
  # task=face: eval_step is embed(state, images [n, H, W, C]) -> embeddings; the verification
  # pairs are loaded at the first evaluation.
  verification: dict | None = None

  @property
  def face(self) -> bool:
    return self.config is not None and self.config.task == 'face'


# Trials that differ only in values held in the optimizer state (the peak lr) reuse one jitted
# step, and so one compilation: keyed on everything else that the step's code depends on. The
# run's length enters only through the derived schedule (warmup, total steps, boundaries).
_STEP_CACHE: dict[str, tuple[Callable, Callable, Callable | None]] = {}
_INIT_CACHE: dict[str, Callable] = {}
_NOT_IN_STEP = ('seed', 'lr.base_lr', 'log_every_steps', 'eval_every_epochs', 'eval_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints', 'data.prefetch', 'data.data_dir',
                'num_steps', 'num_epochs', 'nonfinite', 'max_nonfinite_steps', 'data.tfds_name',
                'data.train_split', 'data.eval_split', 'data.file_format',
                'data.num_parallel_calls', 'data.shuffle_buffer', 'profile_steps',
                'compilation_cache_dir', 'mode', 'precise_bn_batches', 'init_from', 'target',
                'sharpness')


def _step_key(config, mesh, derived: optim.Derived) -> str:
  flat = json.loads(config.to_json_best_effort())
  for path in _NOT_IN_STEP:
    node = flat
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node.pop(leaf, None)
  schedule = [derived.warmup_steps, list(derived.boundaries_steps),
              derived.total_steps if config.lr.decay in ('cosine', 'polynomial', 'linear') else 0,
              [dataclasses.astuple(p) for p in derived.phases], derived.schedule_steps]
  devices = [d.id for d in mesh.devices.flat]
  return json.dumps([flat, schedule, devices, mesh.axis_names, mesh.devices.shape],
                    sort_keys=True)


def build(config: ml_collections.ConfigDict, mesh, *, num_train: int,
          image_shape: tuple[int, ...], num_classes: int,
          param_rules=(), initialize: bool = True) -> Trainer:
  """Model, optimizer, initial state (initialized from shapes into its sharding) and steps.

  initialize=False leaves the state abstract (ShapeDtypeStructs carrying their shardings), for
  lowering a full-size step on a machine that could not hold or compile it.
  """
  optimizer = optim.make(config, num_train)
  face = config.task == 'face'
  face_config = None
  # A face model's outputs are the embedding (iresnet's head; any other model's last layer).
  outputs = config.model.embedding_dim if face else num_classes
  init_model = models.build(config.model, outputs, axis_name=None)
  if face:
    face_config = partial_fc.Config(
        num_classes=num_classes, sample_rate=config.face.sample_rate, s=config.face.s,
        m1=config.face.m1, m2=config.face.m2, m3=config.face.m3,
        straight_through=config.face.straight_through)
    # The class centers: contiguous row blocks over every device, their optimizer state too.
    param_rules = (*param_rules, (r'(^|/)centers$', partial_fc.centers_spec()))
    if config.face.sampled_rows_only:
      only_centers = lambda p: {'backbone': jax.tree.map(lambda _: False, p['backbone']),
                                'centers': True}
      optimizer = dataclasses.replace(
          optimizer, tx=partial_fc.sampled_rows_update(optimizer.tx, mask=only_centers))

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    variables = init_model.init(params_rng, jnp.zeros((1, *image_shape), jnp.float32),
                                train=False)
    params = variables['params']
    if face:
      params = {'backbone': params, 'centers': partial_fc.init_centers(
          jax.random.fold_in(params_rng, 1), num_classes, config.model.embedding_dim,
          mesh.devices.size)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=optimizer.tx.init(params), rng=state_rng,
                      nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32),
                      ema_params=params if config.ema_decay is not None else {},
                      noise_scale=(noise_scale.init_ema() if config.noise_scale.enabled
                                   else {}))

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  specs = sharding.specs_for(abstract, param_rules)
  state_shardings = sharding.named(mesh, specs)
  if initialize:
    # The initial state's structure depends on the model and the optimizer's structure, not on
    # the batch, the schedule or the peak lr: trials of a study share one compiled init (XLA
    # takes seconds for it even for a small CNN), and the peak lr is set afterwards.
    init_key = json.dumps([config.model.to_dict(), config.optimizer.to_dict(),
                           config.ema_decay is not None, config.noise_scale.enabled,
                           config.task, config.face.to_dict(),
                           list(image_shape), num_classes, str(param_rules),
                           [d.id for d in mesh.devices.flat], mesh.devices.shape],
                          sort_keys=True, default=str)
    if init_key not in _INIT_CACHE:
      _INIT_CACHE[init_key] = jax.jit(init, out_shardings=state_shardings)
    state = _INIT_CACHE[init_key](rng)
    state = jax.device_put(state.replace(opt_state=optim.set_peak_lr(
        state.opt_state, optimizer.derived.peak_lr)), state_shardings)
  else:
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_shardings)

  batch_sharding = NamedSharding(mesh, sharding.BATCH_SPEC)
  eval_sharding = NamedSharding(mesh, sharding.EVAL_SPEC)
  key = _step_key(config, mesh, optimizer.derived)
  if key not in _STEP_CACHE:
    step_model = models.build(config.model, outputs, axis_name='data')
    per_device = functools.partial(
        train_step, model=step_model, tx=optimizer.tx, lr_fn=optimizer.lr_fn,
        num_classes=num_classes, label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
        noise_scale_decay=(config.noise_scale.ema_decay if config.noise_scale.enabled
                           else None),
        face=face_config, dropout=face and config.model.dropout > 0)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, sharding.BATCH_SPEC),
                           out_specs=(specs, P()))
    step_fn = jax.jit(mapped, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, NamedSharding(mesh, P())),
                      donate_argnums=0)
    if face:
      eval_fn = jax.jit(
          lambda state, images: init_model.apply(
              {'params': state.params['backbone'], **(
                  {'batch_stats': state.batch_stats} if state.batch_stats else {})},
              images, train=False),
          in_shardings=(state_shardings, eval_sharding), out_shardings=NamedSharding(mesh, P()))
    else:
      eval_fn = jax.jit(
          functools.partial(eval_step, model=init_model, num_classes=num_classes),
          in_shardings=(state_shardings, eval_sharding), out_shardings=NamedSharding(mesh, P()))
    bn_fn = None
    if config.model.norm == 'batch':
      # Precise BN (config.precise_bn_batches) and sharpness: the same BN code, momentum 0.
      stats_config = ml_collections.ConfigDict(config.model.to_dict())
      stats_config.bn_momentum = 0.0
      stats_model = models.build(stats_config, outputs, axis_name='data')
      bn_fn = jax.jit(jax.shard_map(
          functools.partial(bn_statistics_step, model=stats_model, face=face), mesh=mesh,
          in_specs=(specs, sharding.BATCH_SPEC), out_specs=specs.batch_stats))
    _STEP_CACHE[key] = (step_fn, eval_fn, bn_fn)
  step_fn, eval_fn, bn_fn = _STEP_CACHE[key]
  return Trainer(state=state, state_specs=specs, train_step=step_fn, eval_step=eval_fn,
                 model=init_model, bn_statistics=bn_fn,
                 optimizer=optimizer, mesh=mesh, batch_sharding=batch_sharding,
                 eval_sharding=eval_sharding, config=config)


# ----------------------------------------------------------------------------- the loop


def precise_bn(trainer: Trainer, state: TrainState, dataset, num_batches: int,
               first_step: int) -> TrainState:
  """`state` with BN population statistics recomputed as the plain mean of the statistics of
  `num_batches` training batches (those of steps first_step, first_step + 1, ...), instead of
  the running averages, which lag when the parameters move fast (large lr, large batch)."""
  total = None
  for i in range(num_batches):
    batch = input_pipeline.make_global_batches(dataset, first_step + i, trainer.batch_sharding)
    stats = trainer.bn_statistics(state, batch)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return state.replace(batch_stats=jax.tree.map(lambda t: t / num_batches, total))


def evaluate(trainer: Trainer, state: TrainState, dataset, *, precise_bn_batches: int = 0,
             ) -> dict[str, float]:
  """Top-1, top-5 and loss over the whole eval split (every example counts once), for the
  parameters and, with config.ema_decay, their moving average (eval_ema/*). With
  precise_bn_batches, BN statistics are first recomputed over that many training batches."""
  if precise_bn_batches and trainer.bn_statistics is not None:
    state = precise_bn(trainer, state, dataset, precise_bn_batches, int(state.step))
  run = _verify if trainer.face else _evaluate
  out = run(trainer, state, dataset, 'verify' if trainer.face else 'eval')
  if state.ema_params:
    out.update(run(trainer, state.replace(params=state.ema_params), dataset,
                   'verify_ema' if trainer.face else 'eval_ema'))
  return out


def _verify(trainer: Trainer, state: TrainState, dataset, prefix: str) -> dict[str, float]:
  """task=face: the verification protocol (10 folds, flip test, TAR at FAR 1e-3) on each pair
  set of the config (held-out synthetic identities, or the .bin files), with the embeddings of
  the current backbone."""
  from bigbatch.data import faces  # pylint: disable=g-import-not-at-top
  from bigbatch.face import verification  # pylint: disable=g-import-not-at-top
  del dataset
  if trainer.verification is None:
    trainer.verification = faces.verification_sets(trainer.config, as_uint8=True)
  batch = trainer.config.face.verify_batch
  embed = lambda x: trainer.eval_step(state, jax.device_put(x, trainer.eval_sharding))
  out = {}
  for name, (images, issame) in trainer.verification.items():
    preprocess = faces.normalize if images.dtype == np.uint8 else None
    emb = verification.embed_pairs(embed, images, batch, preprocess=preprocess)
    result = verification.evaluate(emb, issame)
    out[f'{prefix}/{name}/accuracy'] = result['accuracy_mean']
    out[f'{prefix}/{name}/accuracy_std'] = result['accuracy_std']
    out[f'{prefix}/{name}/tar_at_far_1e-3'] = result['tar_at_far_1e-3']
    out[f'{prefix}/{name}/pairs'] = float(len(issame))
  return out


def _evaluate(trainer: Trainer, state: TrainState, dataset, prefix: str) -> dict[str, float]:
  totals = None
  for batch in input_pipeline.make_global_eval_batches(dataset, trainer.eval_sharding):
    sums = trainer.eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {f'{prefix}/top1': float(totals['top1']) / count,
          f'{prefix}/top5': float(totals['top5']) / count,
          f'{prefix}/loss': float(totals['loss']) / count, f'{prefix}/examples': count}


def model_flops_per_example(trainer: Trainer, image_shape, batch: int = 8) -> float:
  """Training FLOPs per example: 3x the forward pass (forward + two backward products), from
  XLA's cost analysis of the eval-mode forward. Analytic rather than from the compiled step:
  its cost analysis counts a loop body once, and the CPU convolution backward runs in loops."""
  variables = {'params': backbone(trainer.state.params, trainer.face)}
  if trainer.state.batch_stats:
    variables['batch_stats'] = trainer.state.batch_stats
  forward = jax.jit(lambda v, x: trainer.model.apply(v, x, train=False))
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  cost = forward.lower(abstract, x).cost_analysis() or {}
  return 3.0 * float(cost.get('flops', float('nan'))) / batch


def _every(config, derived: optim.Derived, steps_field: str, epochs_field: str) -> int | None:
  steps = config[steps_field]
  if steps is None and config[epochs_field] is not None:
    steps = max(1, round(config[epochs_field] * derived.steps_per_epoch))
  return steps


def _host_epochs(step: int, phases) -> float:
  p = optim.phase_at(max(step - 1, 0), phases) if step else phases[0]
  return p.start_epoch + (step - p.start_step) / p.steps_per_epoch


def _epoch_crossed(done: int, phases, every: float) -> bool:
  """Under a batch schedule: whether update `done` crossed a multiple of `every` epochs."""
  now, before = _host_epochs(done, phases), _host_epochs(done - 1, phases)
  return math.floor(now / every + 1e-9) > math.floor(before / every + 1e-9)


class _PhasedBatches:
  """The global batches of updates [start, end) under a batch-size schedule. Each phase reads
  a Dataset of its own batch size at the step that holds the same (epoch, offset), so the data
  position is exact across phases and on resume: update s of a phase starting at epoch e and
  update S is that Dataset's step e * steps_per_epoch + (s - S)."""

  def __init__(self, config, dataset, phases, sharding_, start: int, end: int):
    self.config, self.dataset, self.phases = config, dataset, phases
    self.sharding, self.start, self.end = sharding_, start, end
    self._current = None
    self._waited = 0.0

  @property
  def wait_seconds(self) -> float:
    return self._waited + (self._current.wait_seconds if self._current else 0.0)

  def __iter__(self):
    for p in self.phases:
      lo, hi = max(self.start, p.start_step), min(p.end_step, self.end)
      if lo >= hi:
        continue
      ds = self.dataset
      if p.global_batch != ds.global_batch:
        ds = load_dataset(config_lib.override(
            ml_collections.ConfigDict(self.config.to_dict()),
            global_batch=p.global_batch, accumulation_steps=p.accumulation_steps))
      shift = p.start_epoch * p.steps_per_epoch - p.start_step
      logging.info('Batch schedule: updates %d-%d at batch %d (%d microbatches), from epoch %d.',
                   lo + 1, hi, p.global_batch, p.accumulation_steps, p.start_epoch)
      self._current = input_pipeline.Prefetcher(
          functools.partial(input_pipeline.make_global_batches, ds, sharding=self.sharding),
          lo + shift, hi + shift, ds.prefetch)
      try:
        for local, batch in self._current:
          yield local - shift, batch
      finally:
        self._waited += self._current.wait_seconds
        self._current.close()
        self._current = None

  def close(self):
    if self._current is not None:
      self._current.close()


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was written. main exits with EXIT_PREEMPTED."""

  def __init__(self, step: int):
    super().__init__(f'preempted (SIGTERM): checkpoint written at step {step}; rerun the same '
                     f'command to resume')
    self.step = step


class DataError(RuntimeError):
  """The data set cannot be read (missing or corrupt files)."""


def load_dataset(config):
  """input_pipeline.create, with read failures reported as DataError naming the data."""
  try:
    return input_pipeline.create(config)
  except config_lib.ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (TF/TFDS raise many kinds)
    where = config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise DataError(
        f'the {config.data.name} data set under {where} cannot be read ({type(e).__name__}: '
        f'{detail[:200]}); delete its prepared files there so it is rebuilt, or point '
        f'config.data.data_dir at a good copy') from e


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class _Faults:
  """Deterministic fault injection for the fault-tolerance tests, from $BIGBATCH_FAULT:
  'kill_after_step:N' (SIGKILL once step N is dispatched), 'kill_during_save:N' (SIGKILL right
  after the asynchronous save of step N starts), 'term_after_step:N' (SIGTERM to itself),
  'nan_from_step:N' (the images of update N and later become NaN).
  Unset in normal runs: a string comparison per step."""

  def __init__(self):
    spec = os.environ.get('BIGBATCH_FAULT', '')
    self.kind, _, at = spec.partition(':')
    self.at = int(at) if at else -1

  def __call__(self, kind: str, step: int, settle: Callable[[], None] = lambda: None) -> None:
    if kind == self.kind and step == self.at:
      settle()  # e.g. let earlier async saves finish, so which checkpoint survives is fixed
      logging.warning('BIGBATCH_FAULT: %s at step %d', kind, step)
      logging.flush()
      os.kill(os.getpid(), signal.SIGTERM if kind.startswith('term') else signal.SIGKILL)

  def poison(self, batch: dict, step: int) -> dict:
    if self.kind == 'nan_from_step' and step >= self.at:
      return dict(batch, image=batch['image'] * jnp.nan)
    return batch


class _SigtermFlag:
  """Records SIGTERM (sent by Cloud TPU and SLURM before preemption) for the loop to act on at
  the next step boundary; the previous handler is restored on exit."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart_from_scratch: bool = False) -> dict[str, float]:
  """Trains and evaluates as the config says, resuming from the latest good checkpoint.

  Returns the final evaluation metrics. Raises Preempted after writing a checkpoint on SIGTERM,
  NonFiniteError, workdir.WorkdirError and checkpoint.CheckpointError with actionable messages.
  """
  config_lib.validate(config, jax.device_count())
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.compilation_cache_dir))
  mesh = sharding.make_mesh(config)
  distributed.log_topology(config, mesh)
  dataset = load_dataset(config)
  trainer = build(config, mesh, num_train=dataset.num_train, image_shape=dataset.image_shape,
                  num_classes=dataset.num_classes)
  derived = trainer.optimizer.derived
  is_main = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, 'checkpoints')

  # Nothing is written before the config, the derived values and the workdir have been checked.
  if restart_from_scratch and is_main:
    moved = workdir_lib.set_aside(workdir)
    if moved:
      logging.warning('--restart_from_scratch: the previous run in %s was moved to %s.',
                      workdir, moved)
  if is_main:
    workdir_lib.ensure_writable(workdir)
  # Multi-host: nobody looks at the workdir before process 0 has set it aside or created it, and
  # all act on process 0's view of it (a shared directory may lag on some hosts); acting on
  # different views would run different collectives.
  distributed.sync('workdir ready')
  if distributed.from_process_0(workdir_lib.isdir(ckpt_dir)):
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    steps = distributed.from_process_0(ckpt.all_steps())
  else:
    ckpt, steps = None, []
  workdir_lib.check_compatible(workdir, config, num_train=dataset.num_train,
                               resume_step=steps[-1] if steps else 0)
  if ckpt is None:
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
  state, start = distributed.restore_latest(ckpt, trainer.state)
  if start is None and config.init_from and config.mode == 'train':
    state = init_from_workdir(trainer, state, config.init_from, image_shape=dataset.image_shape,
                              num_classes=dataset.num_classes)
  if config.mode == 'eval':
    return _evaluate_checkpoint(trainer, state, start, dataset, workdir, ckpt, is_main,
                                config.precise_bn_batches)
  # Checkpoints newer than the one restored failed to read or verify: set them aside, or orbax
  # would skip saving those steps again when the run gets there.
  unusable = [s for s in distributed.from_process_0(ckpt.all_steps()) if s > (start or 0)]
  if unusable:
    if is_main:
      for moved in ckpt.set_aside(unusable):
        logging.warning('Set aside the unusable checkpoint as %s.', moved)
    distributed.sync('unusable checkpoints set aside')
    ckpt.reload()
  if start is not None:
    logging.info('Resumed from the checkpoint at step %d in %s.', start, ckpt_dir)
  start = int(start or 0)
  last_good = start or None
  info = {'derived': derived.as_dict(), 'mesh': dict(mesh.shape),
          'devices': jax.device_count(), 'processes': jax.process_count(),
          'examples_per_device_per_microbatch':
              config.global_batch // (config.accumulation_steps * mesh.shape['data'])}
  logging.info('Derived hyperparameters: %s', json.dumps(info))
  if is_main:
    workdir_lib.record(workdir, config)
    workdir_lib.write_json(os.path.join(workdir, 'derived.json'), info)
  writer = metrics_lib.create_writer(workdir, is_main=is_main, resume_step=start)

  total = derived.total_steps
  eval_every = _every(config, derived, 'eval_every_steps', 'eval_every_epochs')
  if derived.phases:
    batches = _PhasedBatches(config, dataset, derived.phases, trainer.batch_sharding, start,
                             total)
    if config.eval_every_epochs:
      eval_every = None  # epochs of varying length: _epoch_crossed below
  else:
    batches = input_pipeline.Prefetcher(
        functools.partial(input_pipeline.make_global_batches, dataset,
                          sharding=trainer.batch_sharding),
        start, total, dataset.prefetch)
  progress = metrics_lib.Progress(total_steps=total, global_batch=config.global_batch,
                                  start_step=start, now=time.monotonic())
  faults = _Faults()
  limit = 1 if config.nonfinite == 'stop' else config.max_nonfinite_steps
  flops_per_step = model_flops_per_example(trainer, dataset.image_shape) * config.global_batch
  logging.info('Model FLOPs per step: %.3g (3x forward, %d examples).', flops_per_step,
               config.global_batch)
  throughput = _Throughput(flops_per_step, lambda: batches.wait_seconds, time.monotonic())
  preempted = distributed.PreemptionSync()  # SIGTERM to any process stops all at one step

  def save(step):
    nonlocal last_good
    if not bool(_all_finite(state)):  # never write a checkpoint holding a non-finite value
      logging.error('Not saving step %d: the state holds a non-finite value.', step)
      return
    ckpt.save(step, state, config=config)
    last_good = step

  profile = tuple(config.profile_steps) if config.profile_steps and is_main else None
  target = _Target(config, workdir, is_main)
  if target.reached and config.target.stop and target.reached['step'] <= start:
    logging.info('The target was reached at step %d (workdir/target.json); nothing to train.',
                 target.reached['step'])
    batches.close()
    ckpt.close()
    writer.close()
    return evaluate(trainer, state, dataset, precise_bn_batches=config.precise_bn_batches)
  sharpness_every = config.sharpness.every_steps
  started = time.monotonic()
  pending = None  # (step, device metrics) of the last logged step, read one step late
  previous = None  # (step, device metrics) of the previous step, for the non-finite check
  eval_metrics: dict[str, float] = {}
  try:
    with _SigtermFlag() as sigterm:
      for step, batch in batches:
        done = step + 1
        batch = faults.poison(batch, done)
        if profile and done == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        state, step_metrics = trainer.train_step(state, batch)
        if profile and done == profile[1]:
          jax.block_until_ready(step_metrics)
          jax.profiler.stop_trace()
          logging.info('Profile of updates %d-%d written to %s.', *profile,
                       os.path.join(workdir, 'profile'))
        faults('kill_after_step', done, settle=ckpt.wait)
        faults('term_after_step', done)
        # The device is busy with this step: read what the previous one left behind.
        if previous is not None:
          _check_finite(previous, limit, last_good, ckpt_dir)
        previous = (done, step_metrics)
        if pending is not None:
          _write_train_metrics(writer, progress, throughput, *pending)
          pending = None
        if done % config.log_every_steps == 0 or done == total:
          pending = (done, step_metrics)
        if ((eval_every and done % eval_every == 0) or done == total
            or (derived.phases and config.eval_every_epochs
                and _epoch_crossed(done, derived.phases, config.eval_every_epochs))):
          _check_finite(previous, limit, last_good, ckpt_dir)
          if pending is not None:
            _write_train_metrics(writer, progress, throughput, *pending)
            pending = None
          eval_metrics = evaluate(trainer, state, dataset,
                                  precise_bn_batches=config.precise_bn_batches)
          writer.write_scalars(done, eval_metrics)
          logging.info('eval at step %d: %s', done,
                       ', '.join(f'{k}={v:.4f}' for k, v in eval_metrics.items()))
          if target.check(done, config.global_batch, eval_metrics, time.monotonic() - started):
            writer.write_scalars(done, {'target/steps': done,
                                        'target/examples': done * config.global_batch})
        stop = target.reached is not None and config.target.stop
        if ((sharpness_every and done % sharpness_every == 0)
            or (config.sharpness.at_end and (done == total or stop))):
          value = measure_sharpness(trainer, state, dataset, config)
          writer.write_scalars(done, {'sharpness/top_eigenvalue': value})
          logging.info('sharpness at step %d: top Hessian eigenvalue %.4g', done, value)
        if done % config.checkpoint_every_steps == 0 or done == total or stop:
          _check_finite(previous, limit, last_good, ckpt_dir)
          save(done)
          faults('kill_during_save', done)
        if stop:
          logging.info('Target %s %s %g reached at step %d; stopping (config.target.stop).',
                       config.target.metric, '>=' if config.target.mode == 'max' else '<=',
                       config.target.value, done)
          break
        if preempted(sigterm.received):
          if pending is not None:
            _write_train_metrics(writer, progress, throughput, *pending)
            pending = None
          if last_good != done:
            save(done)
          ckpt.wait()
          logging.warning('SIGTERM: checkpoint written at step %d in %s; exiting.', done,
                          ckpt_dir)
          raise Preempted(done)
      if previous is not None:
        _check_finite(previous, limit, last_good, ckpt_dir)
      if pending is not None:
        _write_train_metrics(writer, progress, throughput, *pending)
  finally:
    batches.close()
    ckpt.close()
    writer.flush()
    writer.close()
  if not eval_metrics:  # resumed at the end: nothing ran
    eval_metrics = evaluate(trainer, state, dataset,
                            precise_bn_batches=config.precise_bn_batches)
  return eval_metrics


def init_from_workdir(trainer: Trainer, state: TrainState, source: str, *,
                      image_shape: tuple[int, ...], num_classes: int) -> TrainState:
  """`state` with params and BN statistics from the latest good checkpoint of the run in
  `source` (another workdir): fine-tuning, or continuing with a new recipe. The optimizer state,
  step and RNG stay fresh. The source's own config (its config.json) says what its checkpoint
  holds, so its optimizer may differ; its model must give the same parameter shapes."""
  recorded = workdir_lib.recorded_config(source)
  ckpt_dir = os.path.join(source, 'checkpoints')
  if recorded is None or not workdir_lib.isdir(ckpt_dir):
    raise checkpoint_lib.CheckpointError(
        f'config.init_from={source}: not a bigbatch workdir (no config.json or checkpoints/); '
        f'point it at the --workdir of a finished or running run')
  source_config = ml_collections.ConfigDict(recorded)
  source_trainer = build(source_config, trainer.mesh, num_train=trainer.optimizer.derived
                         .num_train_examples, image_shape=image_shape,
                         num_classes=num_classes, initialize=False)
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir)
  try:
    restored, step = distributed.restore_latest(ckpt, source_trainer.state)
  finally:
    ckpt.close()
  if step is None:
    raise checkpoint_lib.CheckpointError(f'config.init_from={source}: it has no checkpoint')
  for name in ('params', 'batch_stats'):
    ours, theirs = checkpoint_lib.layout(getattr(state, name)), checkpoint_lib.layout(
        getattr(restored, name))
    if ours != theirs:
      diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
      raise checkpoint_lib.CheckpointError(
          f'config.init_from={source}: its {name} do not fit this model: {len(diff)} arrays '
          f'differ, e.g. {name}/{diff[0]}: source {theirs.get(diff[0])}, this model '
          f'{ours.get(diff[0])}; use a source with the same model')
  logging.info('Initialized params and BN statistics from step %d of %s.', step, source)
  place = lambda new, old: jax.device_put(new, old.sharding)
  return state.replace(params=jax.tree.map(place, restored.params, state.params),
                       batch_stats=jax.tree.map(place, restored.batch_stats, state.batch_stats),
                       ema_params=(jax.tree.map(place, restored.params, state.params)
                                   if state.ema_params else state.ema_params))


def _evaluate_checkpoint(trainer, state, step, dataset, workdir, ckpt, is_main,
                         precise_bn_batches: int):
  """config.mode=eval: the latest good checkpoint, evaluated; results in workdir/eval-<step>.json.
  Nothing else in the workdir changes."""
  ckpt.close()
  if step is None:
    raise checkpoint_lib.CheckpointError(
        f'no checkpoint in {ckpt.directory} to evaluate; train first, or point --workdir at a run')
  result = evaluate(trainer, state, dataset, precise_bn_batches=precise_bn_batches)
  logging.info('Evaluated the checkpoint at step %d: %s', step,
               ', '.join(f'{k}={v:.4f}' for k, v in result.items()))
  if is_main:
    workdir_lib.write_json(os.path.join(workdir, f'eval-{step}.json'), {'step': step, **result})
  return result


class _Target:
  """config.target: the first evaluated step at which the target metric is met, recorded in
  workdir/target.json ({step, examples, wall_s, metric, value, achieved}); read back on resume.
  wall_s counts from the start of the training loop of the process that reached it."""

  def __init__(self, config, workdir: str, is_main: bool):
    self.config = config.target
    self.path = os.path.join(workdir, 'target.json')
    self.is_main = is_main
    self.reached = None
    if self.config.value is not None and workdir_lib.exists(self.path):
      self.reached = workdir_lib.read_json(self.path)

  def check(self, step: int, global_batch: int, metrics: dict, wall_s: float) -> bool:
    """Records `step` if it is the first to meet the target; True then."""
    c = self.config
    if c.value is None or self.reached is not None:
      return False
    if c.metric not in metrics:
      raise config_lib.ConfigError(
          f'config.target.metric={c.metric!r} is not an evaluation metric of this run; it has '
          f'{", ".join(sorted(metrics))}')
    achieved = metrics[c.metric]
    if not (achieved >= c.value if c.mode == 'max' else achieved <= c.value):
      return False
    self.reached = {'step': step, 'examples': step * global_batch, 'wall_s': wall_s,
                    'metric': c.metric, 'value': c.value, 'achieved': achieved}
    if self.is_main:
      workdir_lib.write_json(self.path, self.reached)
    return True


def measure_sharpness(trainer: Trainer, state: TrainState, dataset, config) -> float:
  """The largest (algebraic) eigenvalue of the training-loss Hessian w.r.t. the parameters,
  by Lanczos over reverse-over-reverse Hessian-vector products (bigbatch/study/sharpness.py).

  The loss is the mean cross-entropy (with the run's label smoothing) over the first
  config.sharpness.num_examples examples of the epoch-0 training order: the same examples for
  every batch size of a study. BN is frozen: its statistics are those of these examples as the
  training step's BN computes them (sync or ghost groups), held constant, so the Hessian is of a
  fixed function of the parameters."""
  from bigbatch.study import sharpness  # pylint: disable=g-import-not-at-top
  n = config.sharpness.num_examples
  num_batches = -(-n // config.global_batch)
  batches = [input_pipeline.make_global_batches(dataset, i, trainer.batch_sharding)
             for i in range(num_batches)]
  if trainer.bn_statistics is not None:
    state = precise_bn(trainer, state, dataset, num_batches, first_step=0)
  images, labels = _first_examples(batches, n)
  loss = _sharpness_loss(trainer.model, dataset.num_classes, config.label_smoothing)
  key = jax.random.fold_in(state.rng, int(state.step))
  value, _ = sharpness.top_eigenvalue(loss, state.params, state.batch_stats, images, labels,
                                      num_iters=config.sharpness.num_iters, key=key)
  return float(value)


@functools.partial(jax.jit, static_argnums=1)
def _first_examples(batches: list[dict], n: int):
  flat = lambda key: jnp.concatenate([b[key].reshape(-1, *b[key].shape[2:]) for b in batches])
  return flat('image')[:n], flat('label')[:n]


@functools.lru_cache(maxsize=8)
def _sharpness_loss(model, num_classes: int, smoothing: float) -> Callable:
  """The training loss with BN in inference mode (statistics given), one object per model so
  that sharpness.top_eigenvalue compiles its Hessian-vector product once per run."""

  def loss(params, batch_stats, images, labels):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits = model.apply(variables, images, train=False)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()

  return loss


def _check_finite(step_and_metrics, limit: int, last_good: int | None, ckpt_dir: str) -> None:
  step, device_metrics = step_and_metrics
  streak = int(device_metrics['nonfinite_streak'])
  if streak >= limit:
    lr = float(device_metrics['lr'])
    raise NonFiniteError(
        f'step {step}: the loss or gradients were not finite for {streak} consecutive step(s) '
        f'(lr {lr:.4g}); no update was applied. Last good checkpoint: '
        f'{"step %d in %s" % (last_good, ckpt_dir) if last_good else "none"}. Lower the lr, '
        f'add warmup or clipping (optimizer.clip_grad_norm), then resume or start over')


class _Throughput:
  """FLOP/s and the fraction of wall time the loop waited for input, between logged steps."""

  def __init__(self, flops_per_step: float, waited: Callable[[], float], now: float):
    self.flops_per_step = flops_per_step
    self._waited = waited
    self._last = (now, waited())

  def rates(self, steps_per_sec: float | None, now: float) -> dict[str, float]:
    waited = self._waited()
    (then, waited_then), self._last = self._last, (now, waited)
    out = {'perf/model_flops_per_step': self.flops_per_step,
           'perf/input_wait_fraction': (waited - waited_then) / max(now - then, 1e-9)}
    if steps_per_sec:
      out['perf/flops_per_sec'] = self.flops_per_step * steps_per_sec
    return out


def _write_train_metrics(writer, progress, throughput, step: int, device_metrics) -> None:
  values = {f'train/{k}': float(v) for k, v in jax.device_get(device_metrics).items()}
  now = time.monotonic()
  values.update(progress.rates(step, now))
  values.update(throughput.rates(values.get('train/steps_per_sec'), now))
  writer.write_scalars(step, values)
  logging.info('%s', progress.line(step, values))
