"""Construction: everything built from a config for one mesh (`build`, `Setup`), the compiled
functions shared between builds (`CompileCache`), and what a built trainer computes outside the
training step (evaluation, precise BN, model FLOPs, starting from another run).

The step functions are in bigbatch/step.py, what differs between tasks in bigbatch/tasks/, the
loop in bigbatch/loop.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections

from bigbatch import checkpoint as checkpoint_lib
from bigbatch import distributed
from bigbatch import fields
from bigbatch import flops
from bigbatch import grad_stats
from bigbatch import input_pipeline
from bigbatch import models
from bigbatch import optim
from bigbatch import schedule as schedule_lib
from bigbatch import sharding
from bigbatch import step as step_lib
from bigbatch import tasks
from bigbatch import workdir as workdir_lib
from bigbatch.tasks import base as tasks_base

TrainState = step_lib.TrainState


@dataclasses.dataclass
class Setup:
  """Everything built from a config for one mesh: initial state and compiled-on-demand steps."""
  state: step_lib.TrainState
  state_specs: Any
  train_step: Callable  # (state, batch) -> (state, metrics); jitted, state donated
  eval_step: Callable  # the task's evaluation function, jitted (tasks/<name>.py: eval_fn)
  model: Any  # the flax module, outside shard_map (sync BN without an axis)
  optimizer: optim.Optimizer
  mesh: jax.sharding.Mesh
  batch_sharding: NamedSharding
  eval_sharding: NamedSharding
  task: tasks_base.Task
  config: ml_collections.ConfigDict
  bn_statistics: Callable | None = None  # (state, batch) -> BN statistics; None without BN


class CompileCache:
  """Jitted functions shared by builds whose compiled code is the same, owned by the caller (the
  study runner holds one for all its trials; each test makes its own; a plain run needs none).

  Trials that differ only in values held in the optimizer state (the peak lr) reuse one jitted
  step, and so one compilation. The key is everything the compiled code depends on: the config
  (less the fields their owners declare host-only with fields.declare_host_only: those only the
  host loop, the data reader or the initial state read), the arguments of `build` (class count,
  image shape, sharding rules), the resolved schedule, and the mesh. An undeclared host-only
  field costs a compilation, never a wrong reuse.
  """

  def __init__(self):
    self._entries: dict[tuple[str, str], Any] = {}

  def get(self, kind: str, key: str, make: Callable[[], Any]) -> Any:
    """The entry of `kind` ('init', 'steps') under `key`, made on first use."""
    if (kind, key) not in self._entries:
      self._entries[kind, key] = make()
    return self._entries[kind, key]

  def entries(self, kind: str) -> list[Any]:
    """The entries made so far of `kind` ('init', 'steps')."""
    return [v for (k, _), v in self._entries.items() if k == kind]

  @classmethod
  def step_key(cls, config, mesh, derived: schedule_lib.Resolved, **build_args) -> str:
    """The key of the compiled steps: the config less its host-only fields, the schedule's
    shape, the mesh and `build_args`."""
    flat = json.loads(config.to_json_best_effort())
    for path in fields.host_only():
      fields.pop(flat, path)
    schedule = [derived.warmup_steps, list(derived.boundaries_steps),
                derived.total_steps if config.lr.decay in ('cosine', 'polynomial', 'linear')
                else 0, [dataclasses.astuple(p) for p in derived.phases], derived.schedule_steps]
    return json.dumps([flat, schedule, _mesh_key(mesh), build_args], sort_keys=True, default=str)

  @staticmethod
  def init_key(config, mesh, **build_args) -> str:
    """The initial state's structure depends on the model, the optimizer's structure and the
    task, not on the batch, the schedule or the peak lr."""
    return json.dumps([config.model.to_dict(), config.optimizer.to_dict(),
                       config.ema_decay is not None, config.noise_scale.enabled, config.task,
                       config.face.to_dict(), _mesh_key(mesh), build_args],
                      sort_keys=True, default=str)


def _mesh_key(mesh) -> list:
  return [[d.id for d in mesh.devices.flat], list(mesh.devices.shape), list(mesh.axis_names)]


def build(config: ml_collections.ConfigDict, mesh, *, num_train: int,
          image_shape: tuple[int, ...], num_classes: int, param_rules=(),
          initialize: bool = True, cache: CompileCache | None = None) -> Setup:
  """Model, optimizer, initial state (initialized from shapes into its sharding) and steps.

  initialize=False leaves the state abstract (ShapeDtypeStructs carrying their shardings), for
  lowering a full-size step on a machine that could not hold or compile it. `cache`: share
  compiled functions with earlier builds (see CompileCache); None compiles afresh.
  """
  cache = cache if cache is not None else CompileCache()
  task = tasks.get(config.task)(config, num_classes)
  optimizer = task.wrap_optimizer(optim.make(config, num_train))
  param_rules = (*param_rules, *task.param_rules())
  init_model = models.build(config.model, task.outputs, axis_name=None)
  build_args = dict(num_classes=num_classes, image_shape=list(image_shape),
                    param_rules=str(param_rules))

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    variables = init_model.init(params_rng, jnp.zeros((1, *image_shape), jnp.float32),
                                train=False)
    params = task.init_params(params_rng, variables['params'], mesh.devices.size)
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        batch_stats=variables.get('batch_stats', {}), opt_state=optimizer.tx.init(params),
        rng=state_rng, nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
        ema_params=params if config.ema_decay is not None else {},
        noise_scale=grad_stats.init_ema() if config.noise_scale.enabled else {})

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  specs = sharding.specs_for(abstract, param_rules)
  state_shardings = sharding.named(mesh, specs)
  if initialize:
    # Trials of a study share one compiled init (XLA takes seconds for it even for a small CNN);
    # the peak lr is set afterwards.
    init_fn = cache.get('init', CompileCache.init_key(config, mesh, **build_args),
                        lambda: jax.jit(init, out_shardings=state_shardings))
    state = init_fn(rng)
    state = jax.device_put(state.replace(opt_state=optim.set_peak_lr(
        state.opt_state, optimizer.derived.peak_lr)), state_shardings)
  else:
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_shardings)

  batch_sharding = NamedSharding(mesh, sharding.BATCH_SPEC)
  eval_sharding = NamedSharding(mesh, sharding.EVAL_SPEC)
  replicated = NamedSharding(mesh, P())

  def compile_steps():
    step_model = models.build(config.model, task.outputs, axis_name='data')
    per_device = functools.partial(
        step_lib.train_step, loss_fn=task.loss_fn(step_model), tx=optimizer.tx,
        lr_fn=optimizer.lr_fn, axes=task.axes, ema_decay=config.ema_decay,
        noise_scale_decay=(config.noise_scale.ema_decay if config.noise_scale.enabled
                           else None), adascale=optimizer.adascale)
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, sharding.BATCH_SPEC),
                           out_specs=(specs, P()))
    step_fn = jax.jit(mapped, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(task.eval_fn(init_model), in_shardings=(state_shardings, eval_sharding),
                      out_shardings=replicated)
    bn_fn = None
    if config.model.norm == 'batch':
      # Precise BN (config.precise_bn_batches) and sharpness: the same BN code, momentum 0.
      stats_config = ml_collections.ConfigDict(config.model.to_dict())
      stats_config.bn_momentum = 0.0
      stats_model = models.build(stats_config, task.outputs, axis_name='data')
      bn_fn = jax.jit(jax.shard_map(
          functools.partial(step_lib.bn_statistics_step, model=stats_model,
                            backbone=task.backbone),
          mesh=mesh, in_specs=(specs, sharding.BATCH_SPEC), out_specs=specs.batch_stats))
    return step_fn, eval_fn, bn_fn

  step_fn, eval_fn, bn_fn = cache.get(
      'steps', CompileCache.step_key(config, mesh, optimizer.derived, **build_args),
      compile_steps)
  return Setup(state=state, state_specs=specs, train_step=step_fn, eval_step=eval_fn,
                 model=init_model, bn_statistics=bn_fn, optimizer=optimizer, mesh=mesh,
                 batch_sharding=batch_sharding, eval_sharding=eval_sharding, task=task,
                 config=config)


# ----------------------------------------------------------------------------- outside the step


def precise_bn(trainer: Setup, state: step_lib.TrainState, dataset, num_batches: int,
               first_step: int) -> step_lib.TrainState:
  """`state` with BN population statistics recomputed as the plain mean of the statistics of
  `num_batches` training batches (those of steps first_step, first_step + 1, ...), instead of
  the running averages, which lag when the parameters move fast (large lr, large batch)."""
  total = None
  for i in range(num_batches):
    batch = input_pipeline.make_global_batches(dataset, first_step + i, trainer.batch_sharding)
    stats = trainer.bn_statistics(state, batch)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return state.replace(batch_stats=jax.tree.map(lambda t: t / num_batches, total))


def evaluate(trainer: Setup, state: step_lib.TrainState, dataset, *,
             precise_bn_batches: int = 0) -> dict[str, float]:
  """The task's evaluation of the parameters and, with config.ema_decay, of their moving
  average (prefix + '_ema'). With precise_bn_batches, BN statistics are first recomputed over
  that many training batches."""
  if precise_bn_batches and trainer.bn_statistics is not None:
    state = precise_bn(trainer, state, dataset, precise_bn_batches, int(state.step))
  prefix = trainer.task.eval_prefix
  out = trainer.task.evaluate(trainer, state, dataset, prefix)
  if state.ema_params:
    out.update(trainer.task.evaluate(trainer, state.replace(params=state.ema_params), dataset,
                                     f'{prefix}_ema'))
  return out


def model_flops_per_example(trainer: Setup, image_shape) -> float:
  """Training FLOPs per example (3x the forward's convolutions and matrix products), counted
  from the model's own shapes (bigbatch/flops.py): the same number on every backend, where XLA's
  cost analysis has no FLOPs on GPU and leaves out cuDNN convolutions."""
  variables = {'params': trainer.task.backbone(trainer.state.params)}
  if trainer.state.batch_stats:
    variables['batch_stats'] = trainer.state.batch_stats
  return flops.training_flops_per_example(trainer.model, variables, tuple(image_shape))


def init_from_workdir(trainer: Setup, state: step_lib.TrainState, source: str, *,
                      image_shape: tuple[int, ...], num_classes: int) -> step_lib.TrainState:
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
