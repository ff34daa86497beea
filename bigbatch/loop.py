"""The training loop: restore, then steps with hooks (bigbatch/hooks.py), then the final
evaluation. What runs periodically is a hook; what a task computes is in bigbatch/tasks/; the
update itself is bigbatch/step.py."""
from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from bigbatch import checkpoint as checkpoint_lib
from bigbatch import core_config
from bigbatch import data
from bigbatch import derive as derive_lib
from bigbatch import distributed
from bigbatch import fields
from bigbatch import hooks as hooks_lib
from bigbatch import input_pipeline
from bigbatch import lock as lock_lib
from bigbatch import metrics as metrics_lib
from bigbatch import sharding
from bigbatch import signals
from bigbatch import trainer as trainer_lib
from bigbatch import workdir as workdir_lib
from bigbatch.data import common as data_common


class Preempted(Exception):
  """SIGTERM (SIGHUP, SIGINT) arrived; a checkpoint of `step` was written. main exits with
  EXIT_PREEMPTED (EXIT_INTERRUPTED for SIGINT)."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    what = ('interrupted (SIGINT)' if signum == signal.SIGINT else
            f'preempted ({signals.name(signum)})')
    super().__init__(f'{what}{signals.context()}: checkpoint written at step {step}; rerun the '
                     f'same command to resume')
    self.step, self.signum = step, signum


# The data set cannot be read (missing or corrupt files): main exits 6 with its one line. The
# data sources raise it themselves when their message names the files and the fix.
DataError = data_common.DataError


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss, gradient or update, or a state holding a
  non-finite value where it would be checkpointed or returned."""


def load_dataset(config):
  """The config's data set, with read failures reported as DataError naming the data."""
  try:
    return data.create(config)
  except (fields.ConfigError, DataError):
    raise  # a source's own DataError names its files and the fix (the face sets' do)
  except Exception as e:  # pylint: disable=broad-except  (TF/TFDS raise many kinds)
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ''
    where = data.prepared_dir(config)
    if where is None:
      raise DataError(f'the {config.data.name} data set cannot be read ({type(e).__name__}: '
                      f'{detail[:200]}); check config.data') from e
    raise DataError(
        f'the {config.data.name} data set under {where} cannot be read ({type(e).__name__}: '
        f'{detail[:200]}); delete its prepared files there so it is rebuilt, or point '
        f'config.data.data_dir at a good copy') from e


class PhasedBatches:
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
    """Seconds the loop has waited for input over all phases so far."""
    return self._waited + (self._current.wait_seconds if self._current else 0.0)

  def __iter__(self):
    for p in self.phases:
      lo, hi = max(self.start, p.start_step), min(p.end_step, self.end)
      if lo >= hi:
        continue
      ds = self.dataset
      if p.global_batch != ds.global_batch:
        phase_config = ml_collections.ConfigDict(self.config.to_dict())
        phase_config.global_batch = p.global_batch
        phase_config.accumulation_steps = p.accumulation_steps
        ds = load_dataset(phase_config)
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
    """Stops the current phase's prefetcher."""
    if self._current is not None:
      self._current.close()


@jax.jit
def _finite_leaves(tree) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def nonfinite_paths(tree) -> list[str]:
  """The '/'-joined paths of `tree`'s float leaves that hold a non-finite value."""
  paths = [jax.tree_util.keystr(path, simple=True, separator='/')
           for path, x in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  flags = jax.device_get(_finite_leaves(tree))
  return [p for p, ok in zip(paths, flags) if not ok]


class RunState:
  """The state of one training run that hooks read and act on: the trainer and its state, the
  data, the writers and the checkpointer, the latest step's device metrics, and whether a hook
  asked the run to stop."""

  def __init__(self, *, config, workdir: str, trainer, dataset, state, start: int, ckpt,
               writer, batches, flops_per_step: float):
    self.config, self.workdir, self.trainer, self.dataset = config, workdir, trainer, dataset
    self.state, self.start, self.ckpt, self.writer = state, start, ckpt, writer
    self.batches, self.flops_per_step = batches, flops_per_step
    self.derived = trainer.optimizer.derived
    self.total = self.derived.total_steps
    self.is_main = jax.process_index() == 0
    self.ckpt_dir = ckpt.directory
    self.last_good = start or None  # the newest checkpoint written or restored
    self.metrics = None  # device metrics of the latest update
    self.previous = None  # (step, device metrics) of the latest update, for the finite check
    self.pending = None  # (step, device metrics) to log once the device is done with them
    self.write_logs: Callable[[int, Any], None] = lambda step, metrics: None
    self.eval_metrics: dict[str, float] = {}
    self.evaluated_at = None
    self.should_stop = False
    self.started = time.monotonic()
    self.nonfinite_limit = 1 if config.nonfinite == 'stop' else config.max_nonfinite_steps

  def check_finite(self) -> None:
    """Raises NonFiniteError once the latest update ends a streak of non-finite steps."""
    if self.previous is None:
      return
    step, device_metrics = self.previous
    streak = int(device_metrics['nonfinite_streak'])
    if streak >= self.nonfinite_limit:
      lr = float(device_metrics['lr'])
      last = f'step {self.last_good} in {self.ckpt_dir}' if self.last_good else 'none'
      raise NonFiniteError(
          f'step {step}: the loss, gradients or update were not finite for {streak} '
          f'consecutive step(s) (lr {lr:.4g}); none of them was applied. Last good checkpoint: '
          f'{last}. Lower the lr, add warmup or clipping (optimizer.clip_grad_norm), then resume '
          f'or start over')

  def flush_logs(self) -> None:
    """Writes the metrics the Log hook held back one step (their values are ready by now)."""
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self.write_logs(*pending)

  def check_state_finite(self, step: int, what: str) -> None:
    """Raises NonFiniteError if the state holds a non-finite value. train_step never applies a
    non-finite update, so this is the last line: a restored or fine-tuned start (init_from), or
    an overflow the step's check could not see, stops the run instead of being checkpointed or
    reported as a result."""
    bad = nonfinite_paths(self.state)
    if bad:
      last = f'step {self.last_good} in {self.ckpt_dir}' if self.last_good else 'none'
      raise NonFiniteError(
          f'step {step}: the state holds non-finite values ({", ".join(bad[:3])}'
          f'{", ..." if len(bad) > 3 else ""}), so it was not {what}. Last good checkpoint: '
          f'{last}. Lower the lr, add warmup or clipping (optimizer.clip_grad_norm), then resume '
          f'or start over')

  def save(self, step: int) -> None:
    """Checkpoints the state as the checkpoint of `step`; NonFiniteError instead if the state
    holds a non-finite value."""
    self.check_state_finite(step, 'checkpointed')  # never a checkpoint with a non-finite value
    self.ckpt.save(step, self.state, config=self.config)
    self.last_good = step

  def evaluate(self, step: int) -> dict[str, float]:
    """Evaluates the current state (after precise BN, if configured), writes and logs the
    metrics as those of `step`, and returns them."""
    self.eval_metrics = trainer_lib.evaluate(self.trainer, self.state, self.dataset,
                                             precise_bn_batches=self.config.precise_bn_batches)
    self.evaluated_at = step
    self.writer.write_scalars(step, self.eval_metrics)
    logging.info('eval at step %d (epoch %.1f): %s', step, self.epoch_at(step),
                 _metrics_line(self.eval_metrics))
    return self.eval_metrics

  def epoch_at(self, step: int) -> float:
    """The epochs seen after `step` updates (batch-size phases included)."""
    if self.derived.phases:
      return hooks_lib.epochs_at(step, self.derived.phases)
    return step / self.derived.steps_per_epoch


def _metrics_line(values: dict[str, float]) -> str:
  """`top1 0.9861 | loss 0.0476 | 360 examples`: names without their common prefix, counts
  (examples, verification pairs) as counts."""
  parts = []
  for k, v in values.items():
    name = k.split('/', 1)[1] if k.startswith('eval/') else k
    count = name.rsplit('/', 1)[-1] in metrics_lib.COUNTS
    parts.append(f'{int(v):,} {name}' if count else f'{name} {v:.4f}')
  return ' | '.join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart_from_scratch: bool = False, hooks: Sequence[Any] = (),
                       cache: trainer_lib.CompileCache | None = None) -> dict[str, float]:
  """Trains and evaluates as the config says, resuming from the latest good checkpoint.

  `hooks` run beside the standard ones (bigbatch/hooks.py), e.g. a study's (the target stop,
  sharpness: bigbatch/study/hooks.py); `cache` shares compiled steps with
  earlier runs in this process (a study's trials). Returns the final evaluation metrics. Raises
  Preempted after writing a checkpoint on SIGTERM, NonFiniteError, workdir.WorkdirError (also
  when another trainer holds the workdir) and checkpoint.CheckpointError with actionable
  messages.
  """
  core_config.validate(config, jax.device_count())
  # The workdir's lock, before anything is written there and before minutes of data loading and
  # compiling, so a second trainer is refused at once. Process 0 holds it for all processes. An
  # evaluation (mode=eval) only reads checkpoints and writes eval-<step>.json: it may run beside
  # the trainer, so it takes no lock.
  lock = None
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  created, had_checkpoints = distributed.from_process_0(
      [not workdir_lib.exists(workdir), workdir_lib.isdir(ckpt_dir)])
  if config.mode == 'eval':
    # Checked before anything is created or loaded; an evaluation moves nothing (the workdir
    # may be a live trainer's).
    if restart_from_scratch:
      raise workdir_lib.WorkdirError(
          f'--restart_from_scratch with config.mode=eval: an evaluation only reads the '
          f'checkpoints in {workdir} and sets nothing aside; drop --restart_from_scratch')
    if not had_checkpoints:
      raise checkpoint_lib.CheckpointError(
          f'no checkpoint in {ckpt_dir} to evaluate; train first, or point --workdir at a run')

  def release():
    # A run that stopped before it wrote anything (a config error that needed the data set's
    # size, an unusable init_from, a signal during setup) leaves no directory it created.
    if not had_checkpoints and jax.process_index() == 0:
      workdir_lib.remove_if_empty(ckpt_dir)
    if lock is not None:
      lock.release()
    if created and jax.process_index() == 0:
      workdir_lib.remove_if_empty(workdir)

  # A signal before the first update stops the run at once (bigbatch/signals.py); the lock is
  # taken whole (critical) and released on the way out (at_exit), so a rerun finds it free.
  with signals.phase(signals.SETUP), signals.at_exit(release):
    if config.mode == 'train':
      with signals.critical():
        lock = _on_process_0(functools.partial(_lock_workdir, workdir,
                                               check_layout=not restart_from_scratch))
    try:
      return _train_and_evaluate(config, workdir, lock,
                                 restart_from_scratch=restart_from_scratch, hooks=hooks,
                                 cache=cache)
    finally:
      with signals.critical():
        release()
        lock = None


def _on_process_0(fn: Callable[[], Any]) -> Any:
  """fn() on process 0 (None elsewhere), with its outcome on every process: an error there stops
  all of them at once with its message (a WorkdirError elsewhere), instead of leaving the others
  waiting for process 0 in their next collective until the heartbeat timeout."""
  result, failure, message = None, None, ''
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      failure = e
      message = str(e) if isinstance(e, workdir_lib.WorkdirError) else (
          f'process 0 failed to prepare the workdir ({type(e).__name__}: {e})')
  message = bytes(distributed.from_process_0(list(message.encode()))).decode()
  if failure is not None:
    raise failure
  if message:
    raise workdir_lib.WorkdirError(message)
  return result


def _lock_workdir(workdir: str, *, check_layout: bool) -> lock_lib.WorkdirLock:
  """Creates the workdir and takes its lock; then checks that nothing of the wrong kind sits
  where bigbatch writes (not before --restart_from_scratch, which sets all of it aside)."""
  workdir_lib.ensure_writable(workdir)
  lock = lock_lib.WorkdirLock.acquire(workdir)
  try:
    if check_layout:
      workdir_lib.check_layout(workdir)
  except BaseException:
    lock.release()
    raise
  return lock


def _train_and_evaluate(config, workdir: str, lock: lock_lib.WorkdirLock | None, *,
                        restart_from_scratch: bool, hooks: Sequence[Any],
                        cache: trainer_lib.CompileCache | None) -> dict[str, float]:
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.compilation_cache_dir))
  signals.guard_jax_cache_writes()  # a signal never leaves a torn entry in that cache
  mesh = sharding.make_mesh(config)
  distributed.log_topology(config, mesh)
  dataset = load_dataset(config)
  signals.check()  # without a watcher thread (in-process runs), setup stops at these points
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  ckpt, steps = None, []
  if not restart_from_scratch:  # (that workdir is set aside below: nothing to check)
    # Resume is checked against the config the newest checkpoint was written under (config.json
    # only when no checkpoint records one), so a missing config.json does not let another
    # experiment resume; and before the model is built and compiled, so a refusal is quick.
    if distributed.from_process_0(workdir_lib.isdir(ckpt_dir)):
      ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
      steps = distributed.from_process_0(ckpt.all_steps())
    _on_process_0(lambda: workdir_lib.check_compatible(
        workdir, config, num_train=dataset.num_train, resume_step=steps[-1] if steps else 0,
        checkpoint_config=ckpt.recorded_config(steps) if ckpt else None))
  trainer = trainer_lib.build(config, mesh, num_train=dataset.num_train,
                              image_shape=dataset.image_shape,
                              num_classes=dataset.num_classes, cache=cache)
  trainer.task.check_startup()
  signals.check()
  derived = trainer.optimizer.derived
  is_main = jax.process_index() == 0

  # Nothing is written before the config, the derived values and the workdir have been checked.
  def prepare():
    if restart_from_scratch:  # with the lock held, so no other trainer starts in it meanwhile
      moved = lock_lib.restart(lock) if lock else workdir_lib.set_aside(workdir)
      if moved:
        logging.warning('--restart_from_scratch: the previous run in %s was moved to %s.',
                        workdir, moved)
    workdir_lib.ensure_writable(workdir)
  with signals.critical():  # a workdir set aside whole, or not at all
    _on_process_0(prepare)
  # Multi-host: nobody looks at the workdir before process 0 has set it aside or created it, and
  # all act on process 0's view of it (a shared directory may lag on some hosts); acting on
  # different views would run different collectives.
  distributed.sync('workdir ready')
  if ckpt is None:
    ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
  state, start = distributed.restore_latest(ckpt, trainer.state)
  signals.check()
  if start is None and config.init_from and config.mode == 'train':
    state = trainer_lib.init_from_workdir(trainer, state, config.init_from,
                                          image_shape=dataset.image_shape,
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
  info = derive_lib.run_info(config, derived, mesh)  # what --print_derived shows, too
  d = info['derived']
  logging.info('Schedule: %d steps of batch %d (%d per epoch of %d examples), %d warmup, peak lr '
               '%.4g; all derived values in %s/derived.json (--print_derived shows them before '
               'a run).', d['total_steps'], d['global_batch'], d['steps_per_epoch'],
               d['num_train_examples'], d['warmup_steps'], d['peak_lr'], workdir)
  with signals.critical():  # metrics.jsonl is cut back to the checkpoint here
    if is_main:
      workdir_lib.record(workdir, config)
      workdir_lib.write_json(os.path.join(workdir, 'derived.json'), info)
    writer = metrics_lib.create_writer(workdir, is_main=is_main, resume_step=start)

  total = derived.total_steps
  if derived.phases:
    batches = PhasedBatches(config, dataset, derived.phases, trainer.batch_sharding, start,
                            total)
  else:
    batches = input_pipeline.Prefetcher(
        functools.partial(input_pipeline.make_global_batches, dataset,
                          sharding=trainer.batch_sharding),
        start, total, dataset.prefetch)
  flops_per_step = (trainer_lib.model_flops_per_example(trainer, dataset.image_shape)
                    * config.global_batch)
  logging.info('Model FLOPs per step: %.3g (3x the forward\'s convolutions and matrix products, '
               '%d examples).', flops_per_step, config.global_batch)
  run = RunState(config=config, workdir=workdir, trainer=trainer, dataset=dataset, state=state,
            start=start, ckpt=ckpt, writer=writer, batches=batches,
            flops_per_step=flops_per_step)
  all_hooks = [*hooks_lib.standard(run, sigterm_received=signals.received,
                                   preempt_sync=distributed.PreemptionSync(),
                                   preempted=Preempted),
               *hooks]
  all_hooks.sort(key=lambda h: h.order)  # stable: equal orders keep the list's order
  try:
    for h in all_hooks:
      h.start(run)
    signals.check()
    if run.should_stop:  # a hook found nothing left to do (a target reached before)
      return trainer_lib.evaluate(trainer, state, dataset,
                                  precise_bn_batches=config.precise_bn_batches)
    # Until the first update of this process is dispatched (its compilation can take minutes)
    # there is nothing new to checkpoint: a signal stops the run at once. From then on it is
    # recorded, and the Preemption hook checkpoints at the next step boundary and stops.
    signals.set_phase(signals.FIRST_UPDATE)
    first = True
    for step, batch in batches:
      done = step + 1
      for h in all_hooks:
        batch = h.before_step(run, done, batch)
      run.state, run.metrics = trainer.train_step(run.state, batch)
      if first:  # compiled and dispatched: a signal now checkpoints
        signals.set_phase(None)
        first = False
      # The device is busy with this step: read what the previous one left behind.
      run.check_finite()
      run.previous = (done, run.metrics)
      for h in all_hooks:
        h.after_step(run, done)
      if run.should_stop:
        break
    run.check_finite()
    # A run never ends in success with non-finite parameters (or BN statistics, EMA, ...).
    run.check_state_finite(int(run.state.step), 'returned as the result')
    for h in all_hooks:
      h.end(run)
  finally:
    batches.close()
    ckpt.close()  # the last asynchronous save is finished before any line is written
    writer.flush()
    writer.close()
  # The last update's checkpoint is written: a signal that came after the last step boundary
  # (or comes from now on) stops the run here, with 75 or 130 as anywhere else.
  signals.set_phase(signals.AFTER_TRAINING)
  if not run.eval_metrics:  # resumed at the end: nothing ran
    run.eval_metrics = trainer_lib.evaluate(trainer, run.state, dataset,
                                            precise_bn_batches=config.precise_bn_batches)
  return run.eval_metrics


def _evaluate_checkpoint(trainer, state, step, dataset, workdir, ckpt, is_main,
                         precise_bn_batches: int):
  """config.mode=eval: the latest good checkpoint, evaluated; results in workdir/eval-<step>.json.
  Nothing else in the workdir changes."""
  ckpt.close()
  if step is None:
    raise checkpoint_lib.CheckpointError(
        f'no checkpoint in {ckpt.directory} to evaluate; train first, or point --workdir at a run')
  result = trainer_lib.evaluate(trainer, state, dataset, precise_bn_batches=precise_bn_batches)
  logging.info('Evaluated the checkpoint at step %d: %s', step, _metrics_line(result))
  if is_main:
    workdir_lib.write_json(os.path.join(workdir, f'eval-{step}.json'), {'step': step, **result})
  return result
