"""Classification: softmax cross-entropy over num_classes; top-1/top-5 over the eval split."""
from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import optax

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.tasks import base


def loss_fn(params, batch_stats, image_MxHxWxC, label_M, key, *, model, num_classes: int,
            label_smoothing: float):
  """Mean softmax cross-entropy of one microbatch share; aux: (new BN stats, accuracy)."""
  del key
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  logits, updates = model.apply(variables, image_MxHxWxC, train=True, mutable=['batch_stats'])
  targets = optax.smooth_labels(jax.nn.one_hot(label_M, num_classes), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == label_M)
  return loss, (updates.get('batch_stats', {}), accuracy)


@functools.lru_cache(maxsize=8)
def objective(model, num_classes: int, label_smoothing: float):
  """The mean cross-entropy (with label smoothing) of the model with BN in inference mode
  (Task.objective); one object per (model, classes, smoothing)."""

  def loss(params, batch_stats, images, labels):
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits = model.apply(variables, images, train=False)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()

  return loss


def eval_step(state, batch: dict, *, model, num_classes: int):
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


class Task(base.Task):
  """Softmax classification (the image recipes, digits, synthetic)."""

  @staticmethod
  def defaults():
    # Label smoothing of the softmax targets (Szegedy et al. 2016); 0: hard labels.
    return {'label_smoothing': 0.0}

  @staticmethod
  def validate(config, num_devices: int) -> None:
    del num_devices
    fields.finite(config, 'label_smoothing', low=0.0, high=1.0, high_open=True)
    if config.task != 'classification':
      return
    if config.data.name.startswith('face_'):
      raise fields.ConfigError(f'config.data.name={config.data.name!r} is a face data set; set '
                               f'--config.task=face')

  def loss_fn(self, model):
    return functools.partial(loss_fn, model=model, num_classes=self.num_classes,
                             label_smoothing=self.config.label_smoothing)

  def objective(self, model):
    return objective(model, self.num_classes, float(self.config.label_smoothing))

  def eval_fn(self, model):
    return functools.partial(eval_step, model=model, num_classes=self.num_classes)

  def evaluate(self, trainer, state, dataset, prefix: str) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole eval split (every example counts once)."""
    totals = None
    for batch in input_pipeline.make_global_eval_batches(dataset, trainer.eval_sharding):
      sums = trainer.eval_step(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {f'{prefix}/top1': float(totals['top1']) / count,
            f'{prefix}/top5': float(totals['top5']) / count,
            f'{prefix}/loss': float(totals['loss']) / count, f'{prefix}/examples': count}
