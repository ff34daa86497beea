"""The study's in-run measurements, as loop hooks (bigbatch/hooks.py): the target stop and the
top Hessian eigenvalue (sharpness). `hooks_for(config, workdir)` gives those the config asks
for; main.train and the study runner pass them to `loop.train_and_evaluate`, which knows no study.

Target: the first evaluated step at which config.target's metric is met is recorded in
workdir/target.json ({step, examples, wall_s, metric, value, achieved}) and read back on resume;
with target.stop, training ends there.
"""
from __future__ import annotations

import functools
import os
import time

from absl import logging
import jax
import jax.numpy as jnp

from bigbatch import fields
from bigbatch import hooks
from bigbatch import input_pipeline
from bigbatch import schedule
from bigbatch import trainer as trainer_lib
from bigbatch import workdir as workdir_lib
from bigbatch.study import sharpness as sharpness_lib


class Target(hooks.Hook):
  """Runs after each evaluation (Evaluate's order is 20). wall_s counts from the start of the
  training loop of the process that reached it."""
  order = 30

  def __init__(self, config, workdir: str):
    self.config = config.target
    self.path = os.path.join(workdir, 'target.json')
    self.reached = None
    if workdir_lib.exists(self.path):
      self.reached = workdir_lib.read_json(self.path)

  def start(self, run) -> None:
    if self.reached and self.config.stop and self.reached['step'] <= run.start:
      logging.info('The target was reached at step %d (workdir/target.json); nothing to train.',
                   self.reached['step'])
      run.should_stop = True

  def after_step(self, run, done: int) -> None:
    if run.evaluated_at != done or self.reached is not None:
      return
    c = self.config
    if c.metric not in run.eval_metrics:
      raise fields.ConfigError(
          f'config.target.metric={c.metric!r} is not an evaluation metric of this run; it has '
          f'{", ".join(sorted(run.eval_metrics))}')
    achieved = run.eval_metrics[c.metric]
    if not (achieved >= c.value if c.mode == 'max' else achieved <= c.value):
      return
    examples = schedule.examples_seen(done, run.config.global_batch,
                                      run.trainer.optimizer.derived.phases)
    self.reached = {'step': done, 'examples': examples,
                    'wall_s': time.monotonic() - run.started, 'metric': c.metric,
                    'value': c.value, 'achieved': achieved}
    if run.is_main:
      workdir_lib.write_json(self.path, self.reached)
    run.writer.write_scalars(done, {'target/steps': done, 'target/examples': examples})
    if c.stop:
      logging.info('Target %s %s %g reached at step %d; stopping (config.target.stop).',
                   c.metric, '>=' if c.mode == 'max' else '<=', c.value, done)
      run.should_stop = True


def measure_sharpness(trainer, state, dataset, config) -> float:
  """The top eigenvalue of the training loss's Hessian w.r.t. the parameters of `state`.

  The loss is the task's objective (Task.objective: the classification cross-entropy with the
  run's label smoothing, the face task's full margin softmax) over the first
  config.sharpness.num_examples examples of the epoch-0 training order: the same examples for
  every batch size of a study. BN is frozen: its statistics are those of these examples as the
  training step's BN computes them (sync or ghost groups), held constant, so the Hessian is of a
  fixed function of the parameters."""
  n = config.sharpness.num_examples
  num_batches = -(-n // config.global_batch)
  batches = [input_pipeline.make_global_batches(dataset, i, trainer.batch_sharding)
             for i in range(num_batches)]
  if trainer.bn_statistics is not None:
    state = trainer_lib.precise_bn(trainer, state, dataset, num_batches, first_step=0)
  images, labels = _first_examples(batches, n)
  loss = trainer.task.objective(trainer.model)
  key = jax.random.fold_in(state.rng, int(state.step))
  value, _ = sharpness_lib.top_eigenvalue(loss, state.params, state.batch_stats, images, labels,
                                            num_iters=config.sharpness.num_iters, key=key)
  return float(value)


@functools.partial(jax.jit, static_argnums=1)
def _first_examples(batches: list[dict], n: int):
  flat = lambda key: jnp.concatenate([b[key].reshape(-1, *b[key].shape[2:]) for b in batches])
  return flat('image')[:n], flat('label')[:n]


class Sharpness(hooks.Hook):
  """config.sharpness: the top Hessian eigenvalue every N steps and/or at the end (after the
  target hook, so a run stopped at its target is measured there), logged as sharpness/*."""
  order = 40

  def __init__(self, every: hooks.Every):
    self.every = every

  def after_step(self, run, done: int) -> None:
    if self.every(run, done):
      value = measure_sharpness(run.trainer, run.state, run.dataset, run.config)
      run.writer.write_scalars(done, {'sharpness/top_eigenvalue': value})
      logging.info('sharpness at step %d: top Hessian eigenvalue %.4g', done, value)


def hooks_for(config, workdir: str) -> list[hooks.Hook]:
  """The study hooks the config asks for."""
  out: list[hooks.Hook] = []
  if config.target.value is not None:
    out.append(Target(config, workdir))
  s = config.sharpness
  if s.every_steps or s.at_end:
    out.append(Sharpness(hooks.Every(steps=s.every_steps, at_end=s.at_end)))
  return out
