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
import os
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
from bigbatch import input_pipeline
from bigbatch import metrics as metrics_lib
from bigbatch import models
from bigbatch import optim
from bigbatch import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  batch_stats: Any  # BN running statistics ({} without BatchNorm)
  opt_state: Any
  rng: jax.Array  # uint32[2]; per-step keys are fold_in(rng, step)


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


def _varying(x, axis: str) -> bool:
  mat = getattr(jax.typeof(x), 'manual_axis_type', None)
  return mat is not None and axis in mat.varying


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               lr_fn: Callable, num_classes: int, label_smoothing: float):
  """One update; per-device code, run under shard_map over the 'data' axis.

  batch: {'image': [K, M, H, W, C], 'label': [K, M]}, this device's share of each microbatch.
  """
  k = batch['label'].shape[0]
  # Differentiating w.r.t. replicated (invariant) parameters makes shard_map insert the
  # cross-device psum of the gradient inside the scan body. Casting them to device-varying
  # keeps the gradients local until the single pmean below.
  params = jax.tree.map(lambda p: lax.pcast(p, 'data', to='varying'), state.params)
  grad_fn = jax.value_and_grad(
      lambda p, x, y: loss_fn(p, state.batch_stats, x, y, model=model, num_classes=num_classes,
                              label_smoothing=label_smoothing),
      has_aux=True)

  def microbatch(grad_sum, mb):
    (loss, (stats, accuracy)), grads = grad_fn(params, mb['image'], mb['label'])
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, accuracy, stats)

  grad_sum, (losses, accuracies, stats) = lax.scan(
      microbatch, jax.tree.map(jnp.zeros_like, params), batch)
  # The one gradient reduction of the update.
  grads = lax.pmean(jax.tree.map(lambda g: g / k, grad_sum), 'data')

  # BN running statistics: each microbatch updated them from the same starting point; their
  # mean applies m * running + (1 - m) * mean_k(batch statistic) once per update. Ghost-BN
  # statistics differ per device and are averaged over 'data' (sync-BN ones already agree).
  batch_stats = jax.tree.map(lambda s: s.mean(axis=0), stats)
  batch_stats = jax.tree.map(
      lambda s: lax.pmean(s, 'data') if _varying(s, 'data') else s, batch_stats)

  lr = optim.learning_rate(state.opt_state, lr_fn)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': lax.pmean(losses.mean(), 'data'),
      'accuracy': lax.pmean(accuracies.mean(), 'data'),
      'lr': lr,
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
      'update_norm': optax.tree.norm(updates),
      **optim.trust_ratio_stats(opt_state),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


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
  optimizer: optim.Optimizer
  mesh: jax.sharding.Mesh
  batch_sharding: NamedSharding
  eval_sharding: NamedSharding


# Trials that differ only in values held in the optimizer state (the peak lr) reuse one jitted
# step, and so one compilation: keyed on everything else that the step's code depends on.
_STEP_CACHE: dict[str, Callable] = {}
_NOT_IN_STEP = ('seed', 'lr.base_lr', 'log_every_steps', 'eval_every_epochs',
                'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'data.prefetch',
                'data.data_dir')


def _step_key(config, mesh, num_train: int) -> str:
  flat = json.loads(config.to_json_best_effort())
  for path in _NOT_IN_STEP:
    node = flat
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node.pop(leaf, None)
  devices = [d.id for d in mesh.devices.flat]
  return json.dumps([flat, devices, mesh.axis_names, mesh.devices.shape, num_train], sort_keys=True)


def build(config: ml_collections.ConfigDict, mesh, *, num_train: int,
          image_shape: tuple[int, ...], num_classes: int,
          param_rules=()) -> Trainer:
  """Model, optimizer, initial state (initialized from shapes into its sharding) and steps."""
  optimizer = optim.make(config, num_train)
  init_model = models.build(config.model, num_classes, axis_name=None)

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    variables = init_model.init(params_rng, jnp.zeros((1, *image_shape), jnp.float32),
                                train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=optimizer.tx.init(params), rng=state_rng)

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  specs = sharding.specs_for(abstract, param_rules)
  state_shardings = sharding.named(mesh, specs)
  state = jax.jit(init, out_shardings=state_shardings)(rng)

  batch_sharding = NamedSharding(mesh, sharding.BATCH_SPEC)
  eval_sharding = NamedSharding(mesh, sharding.EVAL_SPEC)
  key = _step_key(config, mesh, num_train)
  if key not in _STEP_CACHE:
    step_model = models.build(config.model, num_classes, axis_name='data')
    per_device = functools.partial(
        train_step, model=step_model, tx=optimizer.tx, lr_fn=optimizer.lr_fn,
        num_classes=num_classes, label_smoothing=config.label_smoothing)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, sharding.BATCH_SPEC),
                           out_specs=(specs, P()))
    _STEP_CACHE[key] = jax.jit(mapped, in_shardings=(state_shardings, batch_sharding),
                               out_shardings=(state_shardings, NamedSharding(mesh, P())),
                               donate_argnums=0)
  eval_fn = jax.jit(
      functools.partial(eval_step, model=init_model, num_classes=num_classes),
      in_shardings=(state_shardings, eval_sharding), out_shardings=NamedSharding(mesh, P()))
  return Trainer(state=state, state_specs=specs, train_step=_STEP_CACHE[key], eval_step=eval_fn,
                 optimizer=optimizer, mesh=mesh, batch_sharding=batch_sharding,
                 eval_sharding=eval_sharding)


# ----------------------------------------------------------------------------- the loop


def evaluate(trainer: Trainer, state: TrainState, dataset) -> dict[str, float]:
  """Top-1, top-5 and loss over the whole eval split; every example counts once."""
  totals = None
  for batch in input_pipeline.make_global_eval_batches(dataset, trainer.eval_sharding):
    sums = trainer.eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'eval/top1': float(totals['top1']) / count, 'eval/top5': float(totals['top5']) / count,
          'eval/loss': float(totals['loss']) / count, 'eval/examples': count}


def _every(config, derived: optim.Derived, steps_field: str, epochs_field: str) -> int | None:
  steps = config[steps_field]
  if steps is None and config[epochs_field] is not None:
    steps = max(1, round(config[epochs_field] * derived.steps_per_epoch))
  return steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates as the config says, resuming from the latest checkpoint in workdir.

  Returns the final evaluation metrics.
  """
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  dataset = input_pipeline.create(config)
  trainer = build(config, mesh, num_train=dataset.num_train, image_shape=dataset.image_shape,
                  num_classes=dataset.num_classes)
  derived = trainer.optimizer.derived
  is_main = jax.process_index() == 0

  # Nothing is written before the config and the derived values have been checked.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     keep=config.keep_checkpoints)
  state = trainer.state
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, state)
    logging.info('Resumed from the checkpoint at step %d.', start)
  start = int(start or 0)
  info = {'derived': derived.as_dict(), 'mesh': dict(mesh.shape),
          'devices': jax.device_count(), 'processes': jax.process_count(),
          'examples_per_device_per_microbatch':
              config.global_batch // (config.accumulation_steps * mesh.shape['data'])}
  logging.info('Derived hyperparameters: %s', json.dumps(info))
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, 'derived.json'), 'w') as f:
      json.dump(info, f, indent=2)
  writer = metrics_lib.create_writer(workdir, is_main=is_main, resume_step=start)

  total = derived.total_steps
  eval_every = _every(config, derived, 'eval_every_steps', 'eval_every_epochs')
  batches = input_pipeline.Prefetcher(
      functools.partial(input_pipeline.make_global_batches, dataset,
                        sharding=trainer.batch_sharding),
      start, total, dataset.prefetch)
  progress = metrics_lib.Progress(total_steps=total, global_batch=config.global_batch,
                                  start_step=start, now=time.monotonic())
  pending = None  # (step, device metrics) of the last logged step, read one step late
  eval_metrics: dict[str, float] = {}
  try:
    for step, batch in batches:
      state, step_metrics = trainer.train_step(state, batch)
      done = step + 1
      if pending is not None:  # the device is busy with this step; read the last one's values
        _write_train_metrics(writer, progress, *pending)
        pending = None
      if done % config.log_every_steps == 0 or done == total:
        pending = (done, step_metrics)
      if (eval_every and done % eval_every == 0) or done == total:
        if pending is not None:
          _write_train_metrics(writer, progress, *pending)
          pending = None
        eval_metrics = evaluate(trainer, state, dataset)
        writer.write_scalars(done, eval_metrics)
        logging.info('eval at step %d: %s', done,
                     ', '.join(f'{k}={v:.4f}' for k, v in eval_metrics.items()))
      if done % config.checkpoint_every_steps == 0 or done == total:
        ckpt.save(done, state, config=config)
    if pending is not None:
      _write_train_metrics(writer, progress, *pending)
  finally:
    batches.close()
    ckpt.close()
    writer.flush()
    writer.close()
  if not eval_metrics:  # resumed at the end: nothing ran
    eval_metrics = evaluate(trainer, state, dataset)
  return eval_metrics


def _write_train_metrics(writer, progress, step: int, device_metrics) -> None:
  values = {f'train/{k}': float(v) for k, v in jax.device_get(device_metrics).items()}
  values.update(progress.rates(step, time.monotonic()))
  writer.write_scalars(step, values)
  logging.info('%s', progress.line(step, values))
