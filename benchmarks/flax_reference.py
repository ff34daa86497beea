"""The yardstick for bigbatch's ResNet: the network and train step of google/flax's
examples/imagenet, written here so that benchmarks can compile and time it beside ours.

Model: as flax's examples/imagenet/models.py (ResNet v1.5 with ResNetBlock /
BottleneckResNetBlock): `nn.Conv` without bias in the compute dtype and flax's default
(lecun_normal) kernel init; `nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype,
axis_name=...)`, i.e. flax's one-pass float32 statistics with one stacked `pmean` per layer under
sync BN; zero-init scale in each block's last norm; a 7x7/2 stem padded 3, 'SAME' 3x3/2 max
pooling, widths 64 * 2^i (x4 in bottlenecks), a `nn.Dense` head in the compute dtype.

Step: as flax's examples/imagenet/train.py `train_step`: softmax cross-entropy on one-hot labels
plus 1e-4 / 2 * sum of squared kernels (parameters with ndim > 1), `pmean` of the gradients and of
the new batch statistics over the data axis, loss and accuracy metrics (a second cross-entropy
on the logits) averaged the same way, SGD with Nesterov momentum 0.9 under a warmup + cosine
schedule, and optionally its GPU default: float16 with `DynamicScale` (skip non-finite steps).
flax runs it under `pmap(axis_name='batch')`; here it is `jax.shard_map` over a 1-D mesh of that
name with check_vma=False, which gives the same per-device program (each device differentiates its
own loss; the explicit pmeans average).

Not bigbatch code and not used by it: benchmarks/bytes_accessed.py (CPU, XLA cost analysis) and
benchmarks/accelerator.py (GPU/TPU, img/s) compare bigbatch's model and trainer against it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

AXIS = 'batch'  # flax's pmap axis name


class BasicBlock(nn.Module):
  """flax's ResNetBlock: 3x3 (stride) - BN - relu - 3x3 - BN(scale 0), projection, relu."""
  filters: int
  conv: Callable
  norm: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
    residual = x
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """flax's BottleneckResNetBlock (v1.5: the stride on the 3x3)."""
  filters: int
  conv: Callable
  norm: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    residual = x
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  axis_name: str | None = AXIS  # None: statistics of this device's batch only

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, self.dtype)


STAGES = {18: ((2, 2, 2, 2), BasicBlock), 34: ((3, 4, 6, 3), BasicBlock),
          50: ((3, 4, 6, 3), BottleneckBlock), 101: ((3, 4, 23, 3), BottleneckBlock)}


def resnet(depth: int, num_classes: int = 1000, dtype: Any = jnp.bfloat16,
           axis_name: str | None = AXIS, num_filters: int = 64) -> ResNet:
  stage_sizes, block_cls = STAGES[depth]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes,
                num_filters=num_filters, dtype=dtype, axis_name=axis_name)


class TrainState(train_state.TrainState):
  batch_stats: Any
  dynamic_scale: Any  # a DynamicScale, or None


def learning_rate_fn(base_lr: float = 0.1, warmup_steps: int = 5 * 5004,
                     total_steps: int = 100 * 5004) -> optax.Schedule:
  """flax's schedule: linear warmup, then cosine decay (its defaults at batch 256 on ImageNet)."""
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base_lr, warmup_steps),
       optax.cosine_decay_schedule(base_lr, total_steps - warmup_steps)], [warmup_steps])


def create_state(model: nn.Module, image_shape: Sequence[int], *, dynamic_scale: bool = False,
                 seed: int = 0) -> TrainState:
  """Parameters and BN statistics from `model.init` (eval mode: no collective to bind), SGD
  with Nesterov momentum 0.9 as flax's create_train_state."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(seed), jnp.ones((1, *image_shape), jnp.float32))
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=optax.sgd(learning_rate_fn(), momentum=0.9, nesterov=True),
      dynamic_scale=dynamic_scale_lib.DynamicScale() if dynamic_scale else None)


def cross_entropy_loss(logits, labels):
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))


def compute_metrics(logits, labels, axis_name: str | None):
  metrics = {'loss': cross_entropy_loss(logits, labels),
             'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}
  return lax.pmean(metrics, axis_name) if axis_name else metrics


def train_step(state: TrainState, batch: dict, *, axis_name: str | None = AXIS,
               weight_decay: float = 1e-4):
  """One SGD step on this device's share of the batch (per-device code, as flax's)."""
  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'])
    loss = cross_entropy_loss(logits, batch['label'])
    weight_l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(params) if x.ndim > 1)
    return loss + weight_decay * 0.5 * weight_l2, (new_model_state, logits)

  mean = (lambda t: lax.pmean(t, axis_name)) if axis_name else (lambda t: t)
  dynamic_scale = state.dynamic_scale
  if dynamic_scale:
    grad_fn = dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name=axis_name)
    dynamic_scale, is_finite, aux, grads = grad_fn(state.params)
  else:
    aux, grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = mean(grads)
  new_model_state, logits = aux[1]
  metrics = compute_metrics(logits, batch['label'], axis_name)
  metrics['learning_rate'] = learning_rate_fn()(state.step)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=mean(new_model_state['batch_stats']))
  if dynamic_scale:
    # A non-finite gradient skips the step: the previous parameters and optimizer state stay.
    keep = functools.partial(jnp.where, is_finite)
    new_state = new_state.replace(
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        params=jax.tree.map(keep, new_state.params, state.params), dynamic_scale=dynamic_scale)
    metrics['scale'] = dynamic_scale.scale
  return new_state, metrics


def make_step(mesh: jax.sharding.Mesh, step_fn: Callable = train_step) -> Callable:
  """`step_fn` over every device of a 1-D mesh named AXIS, batch split along its first axis,
  state replicated and donated: flax's `pmap(train_step, axis_name='batch')` under jit."""
  if mesh.axis_names != (AXIS,):
    raise ValueError(f'the reference step wants a 1-D mesh named {AXIS!r}, got {mesh.axis_names}')
  per_device = jax.shard_map(functools.partial(step_fn, axis_name=AXIS), mesh=mesh,
                             in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)
  return jax.jit(per_device, donate_argnums=0)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  return jax.sharding.Mesh(devices, (AXIS,))
