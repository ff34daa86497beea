"""Optimizers and learning-rate schedules, with every batch-dependent number derived once.

`derive` turns the config (base_lr at base_batch, durations in epochs or steps) into absolute
numbers for one global batch; `make` builds the optax transformation from them. The peak lr is a
hyperparameter in the optimizer state (`optax.inject_hyperparams`), not a constant baked into
the compiled step, so runs that differ only in lr share one compilation and `set_peak_lr` can
change it between steps.

LARS and LAMB are built from the trust-ratio transform in `bigbatch.trust_ratio` (why not
`optax.lars` / `optax.lamb` is explained there).
"""
from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ml_collections import config_dict

from bigbatch import fields
from bigbatch import trust_ratio
from bigbatch.fields import ConfigError

OPTIMIZERS = ('sgd', 'adamw', 'lars', 'lamb')
SCALING_RULES = ('linear', 'sqrt', 'none', 'table')
DECAYS = ('cosine', 'polynomial', 'step', 'linear', 'constant')
# How a duration in epochs (num_epochs, warmup, step boundaries, the lr.table warmup) becomes
# steps; see `epochs_to_steps`.
EPOCH_STEPS = ('floor_per_epoch', 'total_examples_floor', 'total_examples_ceil')

# lr_fn(step, peak_lr) -> lr. `peak_lr` may be a traced scalar: it lives in the optimizer state.
LrFn = Callable[[jax.typing.ArrayLike, jax.typing.ArrayLike], jax.Array]


@dataclasses.dataclass(frozen=True)
class Derived:
  """Every batch-dependent number of a run, computed once from the config by `derive`."""
  num_train_examples: int
  global_batch: int
  steps_per_epoch: int  # floor(num_train_examples / global_batch): a partial batch is dropped
  total_steps: int
  warmup_steps: int
  peak_lr: float
  boundaries_steps: tuple[int, ...]  # step decay only, absolute steps from step 0; () otherwise
  # config.batch_schedule: the phases of the run, () without one. The lr schedule (warmup,
  # decay, boundaries above) is then counted in steps of the initial batch, and each update's
  # position in it is the epochs it has seen times steps_per_epoch: a function of the data seen,
  # not of the update count. total_steps counts the updates actually made.
  phases: tuple['Phase', ...] = ()
  schedule_steps: int = 0  # the lr schedule's length in initial-batch steps (phases only)
  epoch_steps: str = 'floor_per_epoch'  # config.lr.epoch_steps: how epochs became steps above

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['boundaries_steps'] = list(self.boundaries_steps)
    d['phases'] = [dataclasses.asdict(p) for p in self.phases]
    return d


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of a batch-size schedule (Smith et al. 2017): from `start_epoch`, updates
  [start_step, end_step) use `global_batch` examples in `accumulation_steps` microbatches (the
  microbatch, and so memory and BN groups, stay as configured)."""
  start_epoch: int
  global_batch: int
  accumulation_steps: int
  steps_per_epoch: int
  start_step: int
  end_step: int


def defaults() -> dict[str, Any]:
  """The config fields this module owns (lr.*, optimizer.*), with their defaults."""
  placeholder = config_dict.placeholder
  return {
      'lr.base_lr': 0.1,
      'lr.base_batch': 256,
      'lr.scaling': 'linear',  # linear | sqrt | none: peak = base_lr * rule(batch / base_batch)
      # scaling=table: a published per-batch recipe, rows (max_batch, peak_lr, warmup_epochs or
      # None); the first row with max_batch >= global_batch gives the peak lr (and the warmup,
      # if not None).
      'lr.table': placeholder(tuple),
      # Gradual linear warmup from warmup_init_lr (absolute) to the peak: at most one of the two.
      'lr.warmup_epochs': placeholder(float),
      'lr.warmup_steps': placeholder(int),
      'lr.warmup_init_lr': 0.0,
      'lr.decay': 'cosine',  # cosine | polynomial | step | linear | constant (after warmup)
      'lr.end_lr': 0.0,  # cosine/polynomial/linear end value
      'lr.power': 2.0,  # polynomial decay power
      # step decay: multiply by decay_factor at each boundary, counted from step 0 (warmup
      # included).
      'lr.boundaries_epochs': placeholder(tuple),
      'lr.boundaries_steps': placeholder(tuple),
      'lr.decay_factor': 0.1,
      # How durations in epochs become steps (`epochs_to_steps`): floor_per_epoch counts an
      # epoch as floor(N / B) steps, one pass of the input pipeline's permutation;
      # total_examples_floor / _ceil count e epochs as e * N examples, floor or ceil of e N / B
      # steps, as the TPU ImageNet recipes do (configs/r50_*.py say which source rounds how).
      # The default stays floor_per_epoch because the digits, synthetic and CIFAR configs and
      # the shipped studies were run with it: their step budgets and the results in docs/ are
      # in those steps, and at small N / B the conventions differ a lot (digits at batch 512:
      # 3 or 3.5 steps per epoch).
      'lr.epoch_steps': 'floor_per_epoch',
      'optimizer.name': 'sgd',  # sgd | adamw | lars | lamb
      'optimizer.momentum': 0.9,  # sgd, lars
      'optimizer.nesterov': False,  # sgd, lars
      'optimizer.weight_decay': 0.0,
      'optimizer.b1': 0.9,  # adamw, lamb
      'optimizer.b2': 0.999,
      'optimizer.eps': 1e-6,
      'optimizer.trust_coefficient': 0.001,  # LARS eta
      # Regexes over '/'-joined parameter paths. Matching leaves get neither weight decay nor a
      # trust ratio (the reference LARS/LAMB skip list: biases and normalization parameters).
      'optimizer.weight_decay_exclude': r'(^|/)(bias|scale)$',
      'optimizer.trust_ratio_exclude': r'(^|/)(bias|scale)$',
      'optimizer.clip_grad_norm': placeholder(float),  # global-norm clipping
  }


def validate(config) -> None:
  """The form of lr.*, optimizer.* and batch_schedule, before any data is read (what depends on
  the data set's size is checked by `derive`). Raises ConfigError."""
  fields.choice(config, 'optimizer.name', OPTIMIZERS)
  fields.choice(config, 'lr.scaling', SCALING_RULES)
  fields.choice(config, 'lr.decay', DECAYS)
  fields.choice(config, 'lr.epoch_steps', EPOCH_STEPS)
  fields.positive(config, 'lr.base_lr')
  fields.positive(config, 'lr.base_batch')
  if config.lr.scaling != 'table':  # the peak lr, known before the data set (derive rechecks)
    _check_peak_lr(config.lr.base_lr * _scaling(config.lr.scaling,
                                                 config.global_batch / config.lr.base_batch),
                   config.global_batch)
  for path in ('lr.warmup_init_lr', 'lr.end_lr', 'optimizer.weight_decay'):
    fields.finite(config, path, low=0.0)
  # A power <= 0 makes polynomial decay constant or infinite at the end; a decay factor <= 0 a
  # negative or zero lr; eps <= 0 a division by zero in Adam/LAMB; eta <= 0 no LARS update.
  for path in ('lr.power', 'lr.decay_factor', 'optimizer.eps', 'optimizer.trust_coefficient'):
    fields.positive(config, path)
  fields.finite(config, 'optimizer.momentum', low=0.0, high=1.0)  # > 1 grows without bound
  for path in ('optimizer.b1', 'optimizer.b2'):  # 1 would divide by 1 - b^t = 0 (bias correction)
    fields.finite(config, path, low=0.0, high=1.0, high_open=True)
  fields.positive(config, 'optimizer.clip_grad_norm', allow_none=True)
  fields.finite(config, 'lr.warmup_epochs', low=0.0, allow_none=True)
  fields.finite(config, 'lr.warmup_steps', low=0, allow_none=True)
  for a, b in (('lr.warmup_epochs', 'lr.warmup_steps'),
               ('lr.boundaries_epochs', 'lr.boundaries_steps')):
    if fields.get(config, a) is not None and fields.get(config, b) is not None:
      raise ConfigError(f'config.{a} and config.{b} are both set; set only one of them')
  for path in ('lr.boundaries_epochs', 'lr.boundaries_steps'):
    given = fields.get(config, path)
    if given is not None and not all(_number(b) and b > 0 for b in given):
      raise ConfigError(f'config.{path}={tuple(given)}: expected finite numbers > 0, e.g. '
                        f'(30, 60, 80)')
  if config.lr.table:
    for row in config.lr.table:
      if not (isinstance(row, (tuple, list)) and len(row) == 3 and _number(row[0])
              and row[0] > 0 and _number(row[1]) and row[1] > 0
              and (row[2] is None or _number(row[2]) and row[2] >= 0)):
        shown = tuple(row) if isinstance(row, (tuple, list)) else row
        raise ConfigError(f'config.lr.table row {shown!r}: expected (max_batch, peak_lr, '
                          f'warmup_epochs or None) with finite numbers, max_batch and peak_lr '
                          f'> 0, warmup_epochs >= 0')
  if config.lr.decay == 'step' and not (config.lr.boundaries_epochs or config.lr.boundaries_steps):
    raise ConfigError('config.lr.decay=step needs boundaries; set --config.lr.boundaries_epochs='
                      '"(30,60,80)" or lr.boundaries_steps')
  for path in ('optimizer.weight_decay_exclude', 'optimizer.trust_ratio_exclude'):
    try:
      re.compile(fields.get(config, path) or '')
    except re.error as e:
      raise ConfigError(f'config.{path}: not a valid regex ({e}); fix the pattern') from None
  if config.batch_schedule:
    batch_phases(config, 1 << 62)  # the schedule's form; batch vs data size comes later


def _check_peak_lr(peak_lr: float, batch: int) -> None:
  if not peak_lr <= float(jnp.finfo(jnp.float32).max):  # the lr lives in float32 opt state
    raise ConfigError(f'config.lr: the peak lr {peak_lr:.4g} at batch {batch} is not finite in '
                      f'float32; lower config.lr.base_lr')


def _number(x) -> bool:
  """A finite int or float (not a bool, a string or None)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def batch_phases(config, num_train_examples: int) -> tuple[Phase, ...]:
  """The phases of config.batch_schedule ((epoch, multiplier), ...); () without one."""
  schedule = config.get('batch_schedule') or ()
  if not schedule:
    return ()
  field = 'config.batch_schedule'
  if config.num_epochs is None:
    raise ConfigError(f'{field} needs the run length in epochs: set config.num_epochs (not '
                      f'num_steps)')
  rows = [(0, 1)]
  for row in schedule:
    if (not isinstance(row, (tuple, list)) or len(row) != 2 or not all(map(_number, row))
        or int(row[0]) != row[0] or int(row[1]) != row[1]
        or not rows[-1][0] < row[0] < config.num_epochs or not row[1] > rows[-1][1]):
      raise ConfigError(
          f'{field}={tuple(schedule)}: expected ((epoch, multiplier), ...) with whole epochs '
          f'increasing inside (0, num_epochs={config.num_epochs}) and whole multipliers of '
          f'global_batch increasing above 1, e.g. ((30, 5), (60, 25))')
    rows.append((int(row[0]), int(row[1])))
  n = int(num_train_examples)
  phases, step = [], 0
  for i, (epoch, mult) in enumerate(rows):
    batch = config.global_batch * mult
    per_epoch = n // batch
    if per_epoch == 0:
      raise ConfigError(f'{field}: the batch {batch} from epoch {epoch} is larger than the {n} '
                        f'training examples; lower the multiplier {mult}')
    end_epoch = rows[i + 1][0] if i + 1 < len(rows) else config.num_epochs
    steps = round((end_epoch - epoch) * per_epoch)
    phases.append(Phase(epoch, batch, config.accumulation_steps * mult, per_epoch, step,
                        step + steps))
    step += steps
  return tuple(phases)


def epochs_seen(step, phases: tuple[Phase, ...]) -> jax.Array:
  """Epochs of data consumed after `step` updates under a batch schedule (jnp; traceable)."""
  step = jnp.asarray(step, jnp.float32)
  value = jnp.zeros_like(step)
  for p in phases:  # later phases overwrite earlier ones
    value = jnp.where(step >= p.start_step,
                      p.start_epoch + (step - p.start_step) / p.steps_per_epoch, value)
  return value


def phase_at(step: int, phases: tuple[Phase, ...]) -> Phase:
  """The phase that update `step` (0-based) belongs to."""
  for p in reversed(phases):
    if step >= p.start_step:
      return p
  raise ValueError(step)


def _scaling(rule: str, ratio: float) -> float:
  if rule == 'linear':
    return ratio
  if rule == 'sqrt':
    return math.sqrt(ratio)
  if rule == 'none':
    return 1.0
  raise ConfigError(f'config.lr.scaling={rule!r} is unknown; choose one of linear, sqrt, none, '
                    f'table')


def epochs_to_steps(epochs: float, num_train_examples: int, global_batch: int,
                    rule: str = 'floor_per_epoch') -> int:
  """The steps of a duration of `epochs` epochs at `global_batch`, by config.lr.epoch_steps:

    floor_per_epoch       round(epochs * floor(N / B)): epochs counted in passes of the input
                          pipeline, whose remainder of N mod B examples each pass drops
    total_examples_floor  floor(epochs * N / B): the whole batches of epochs * N examples
                          (tensorflow/tpu lars_util.py: w_epochs * num_train_images // batch)
    total_examples_ceil   ceil(epochs * N / B): at least epochs * N examples (the LAMB
                          authors' runs: 3,519 steps for 90 epochs at 32k, 1,760 at 64k)

  Either way the data stays where the input pipeline puts it: step s reads batch s mod
  floor(N / B) of epoch s // floor(N / B)'s permutation, so a run counted in examples makes
  more steps than epochs * floor(N / B) and goes on into the next permutation.
  """
  n, batch = int(num_train_examples), int(global_batch)
  if rule == 'floor_per_epoch':
    return round(epochs * (n // batch))
  # Exact rational arithmetic from the decimal the config wrote: 0.1 epochs is 1/10, not the
  # binary float just above it, so an exact whole number of steps never rounds the wrong way.
  examples = fractions.Fraction(repr(float(epochs))) * n
  if rule == 'total_examples_floor':
    return math.floor(examples / batch)
  if rule == 'total_examples_ceil':
    return math.ceil(examples / batch)
  raise ConfigError(f'config.lr.epoch_steps={rule!r} is unknown; choose one of '
                    f'{", ".join(EPOCH_STEPS)}')


def _boundaries(config, to_steps: Callable[[float], int], steps_per_epoch: int,
                total_steps: int) -> tuple[int, ...]:
  lr = config.lr
  if lr.decay != 'step':
    # Boundaries of another decay would not be used; leaving them out keeps the logged
    # Derived a description of the schedule that actually runs.
    return ()
  if lr.boundaries_steps:
    field, given = 'lr.boundaries_steps', tuple(lr.boundaries_steps)
    steps = tuple(int(b) for b in given)
  elif lr.boundaries_epochs:
    field, given = 'lr.boundaries_epochs', tuple(lr.boundaries_epochs)
    steps = tuple(to_steps(e) for e in given)
  else:
    raise ConfigError('config.lr.decay=step needs boundaries; set --config.lr.boundaries_epochs='
                      '"(30,60,80)" or lr.boundaries_steps')
  for b in steps:
    if not 0 < b <= total_steps:
      raise ConfigError(
          f'config.{field}={given}: boundary at step {b} is outside (0, {total_steps}] (total '
          f'steps at {steps_per_epoch} steps/epoch); choose boundaries within the run')
  if any(a >= b for a, b in zip(steps, steps[1:])):
    # Two epochs rounding to one step would silently drop a factor in a {step: scale} dict.
    raise ConfigError(f'config.{field}={given} gives steps {steps}, not strictly increasing; '
                      f'list distinct boundaries in increasing order')
  return steps


def _table_row(config) -> tuple[int, float, float | None]:
  """The row of config.lr.table ((max_batch, peak_lr, warmup_epochs or None), ...) for the global
  batch: the first whose max_batch is >= the batch."""
  table = config.lr.table
  if not table:
    raise ConfigError('config.lr.scaling=table needs config.lr.table = ((max_batch, peak_lr, '
                      'warmup_epochs), ...); set it or choose another scaling rule')
  for row in table:
    if len(row) != 3:
      raise ConfigError(f'config.lr.table row {row!r}: expected (max_batch, peak_lr, '
                        f'warmup_epochs or None)')
    if config.global_batch <= row[0]:
      return int(row[0]), float(row[1]), None if row[2] is None else float(row[2])
  raise ConfigError(f'config.global_batch={config.global_batch} is above every row of '
                    f'config.lr.table (largest {table[-1][0]}); add a row for it')


def derive(config, num_train_examples: int) -> Derived:
  """Derives steps, warmup, peak lr and boundaries for `config.global_batch`. Raises ConfigError."""
  n = int(num_train_examples)
  batch = int(config.global_batch)
  if batch <= 0:
    raise ConfigError(f'config.global_batch={batch}: must be a positive number; '
                      f'set --config.global_batch=...')
  steps_per_epoch = n // batch
  if steps_per_epoch == 0:
    raise ConfigError(f'config.global_batch={batch} is larger than the {n} training examples '
                      f'(0 steps per epoch); set --config.global_batch to at most {n}')

  lr = config.lr
  # A config recorded before lr.epoch_steps existed counted epochs the one way there was.
  rule = lr.get('epoch_steps', 'floor_per_epoch')
  if rule not in EPOCH_STEPS:
    raise ConfigError(f'config.lr.epoch_steps={rule!r} is unknown; choose one of '
                      f'{", ".join(EPOCH_STEPS)}')
  if rule != 'floor_per_epoch' and config.get('batch_schedule'):
    # Phases start at whole passes of the input pipeline and the schedule under them is a
    # function of the passes seen (epochs_seen), so there an epoch is floor(N / B) steps.
    raise ConfigError(f'config.batch_schedule counts epochs as passes of the input pipeline; '
                      f'config.lr.epoch_steps={rule!r} cannot apply to it: set '
                      f'lr.epoch_steps=floor_per_epoch or drop the batch schedule')
  to_steps = functools.partial(epochs_to_steps, num_train_examples=n, global_batch=batch,
                               rule=rule)

  if config.num_steps is not None:
    field, total_steps = 'num_steps', int(config.num_steps)
  elif config.num_epochs is not None:
    field, total_steps = 'num_epochs', to_steps(config.num_epochs)
  else:
    raise ConfigError('config.num_epochs and config.num_steps are both unset; '
                      'set --config.num_epochs=... or --config.num_steps=...')
  if total_steps <= 0:
    raise ConfigError(f'config.{field}={config[field]} gives {total_steps} steps at '
                      f'{steps_per_epoch} steps/epoch; train for at least one step')

  row = _table_row(config) if lr.scaling == 'table' else None
  if row is not None and row[2] is not None:
    field, warmup_steps = 'lr.table', to_steps(row[2])
  elif lr.warmup_steps is not None:
    field, warmup_steps = 'lr.warmup_steps', int(lr.warmup_steps)
  elif lr.warmup_epochs is not None:
    field, warmup_steps = 'lr.warmup_epochs', to_steps(lr.warmup_epochs)
  else:
    field, warmup_steps = None, 0
  if warmup_steps < 0:
    raise ConfigError(f'config.{field} is negative; set it to 0 or more')
  if warmup_steps > total_steps:
    raise ConfigError(f'config.{field} gives {warmup_steps} warmup steps, more than the '
                      f'{total_steps} total steps; shorten the warmup or train longer')

  # The linear scaling rule (Goyal et al.): lr grows with the batch. Sweep if sweeping batch.
  if row is not None:  # a published per-batch table (e.g. the TPU LARS recipe): not a rule
    peak_lr = float(row[1])
  else:
    peak_lr = float(lr.base_lr) * _scaling(lr.scaling, batch / lr.base_batch)
  _check_peak_lr(peak_lr, batch)
  phases = batch_phases(config, n)
  return Derived(
      num_train_examples=n,
      global_batch=batch,
      steps_per_epoch=steps_per_epoch,
      total_steps=phases[-1].end_step if phases else total_steps,
      warmup_steps=warmup_steps,
      peak_lr=peak_lr,
      boundaries_steps=_boundaries(config, to_steps, steps_per_epoch, total_steps),
      phases=phases,
      schedule_steps=total_steps if phases else 0,
      epoch_steps=rule,
  )


def lr_schedule(config, derived: Derived) -> LrFn:
  """Returns lr_fn(step, peak_lr): linear warmup from lr.warmup_init_lr, then lr.decay.

  The schedule pieces are built inside lr_fn because their values depend on `peak_lr`, which is
  a traced scalar in the update; their step counts come from `derived` and stay static.
  """
  lr = config.lr
  decay = lr.decay
  if decay not in ('cosine', 'polynomial', 'step', 'linear', 'constant'):
    raise ConfigError(f'config.lr.decay={decay!r} is unknown; choose one of cosine, polynomial, '
                      f'step, linear, constant')
  warmup = derived.warmup_steps
  phases = derived.phases
  decay_steps = (derived.schedule_steps if phases else derived.total_steps) - warmup
  init_lr, end_lr, power = float(lr.warmup_init_lr), float(lr.end_lr), float(lr.power)
  # Step boundaries count from step 0, so the factor multiplies the whole schedule at the
  # absolute step (as in Goyal et al.: lr = warmup factor x step schedule); a boundary inside the
  # warmup scales the rest of the warmup too.
  step_factor = None
  if decay == 'step':
    step_factor = optax.piecewise_constant_schedule(
        1.0, {b: float(lr.decay_factor) for b in derived.boundaries_steps})

  def decay_schedule(peak):
    if decay in ('constant', 'step') or decay_steps <= 0:
      return optax.constant_schedule(peak)
    if decay == 'cosine':
      # Shifted by end_lr rather than optax's alpha (a fraction of the peak): end_lr is absolute,
      # and warmup_cosine_decay_schedule's Python `peak_value == 0.0` test fails on a traced peak.
      cosine = optax.cosine_decay_schedule(peak - end_lr, decay_steps)
      return lambda count: cosine(count) + end_lr
    if decay == 'polynomial':
      return optax.polynomial_schedule(peak, end_lr, power, decay_steps)
    return optax.linear_schedule(peak, end_lr, decay_steps)

  def lr_fn(step, peak_lr):
    if phases:  # the schedule is a function of the data seen, in initial-batch steps
      step = epochs_seen(step, phases) * derived.steps_per_epoch
    peak = jnp.asarray(peak_lr, jnp.float32)
    schedule = decay_schedule(peak)
    if warmup:
      schedule = optax.join_schedules(
          [optax.linear_schedule(init_lr, peak, warmup), schedule], [warmup])
    value = schedule(step)
    if step_factor is not None:
      value = value * step_factor(step)
    return jnp.asarray(value, jnp.float32)

  return lr_fn


def _transforms(o, lr: Callable) -> list[optax.GradientTransformation]:
  """The chain of `config.optimizer` o, given the schedule lr(count), clipping excluded."""
  decay = optax.add_decayed_weights(o.weight_decay, mask=functools.partial(
      trust_ratio.path_mask, exclude_regex=o.weight_decay_exclude))
  if o.name == 'sgd':
    # PyTorch form: decay added to the gradient, lr applied outside the momentum.
    return [decay, optax.trace(o.momentum, o.nesterov), optax.scale_by_learning_rate(lr)]
  if o.name == 'adamw':
    return [optax.scale_by_adam(o.b1, o.b2, o.eps), decay, optax.scale_by_learning_rate(lr)]
  if o.name == 'lars':
    # Reference form: the lr (times the trust ratio) goes into the momentum buffer, so an lr
    # change takes effect gradually, as in tensorflow/tpu's LARSOptimizer (ApplyMomentum).
    return [trust_ratio.scale_by_masked_trust_ratio(
                trust_ratio.lars_ratio(o.trust_coefficient), o.trust_ratio_exclude,
                o.weight_decay, o.weight_decay_exclude),
            optax.scale_by_schedule(lr), optax.trace(o.momentum, o.nesterov), optax.scale(-1.0)]
  if o.name == 'lamb':
    return [optax.scale_by_adam(o.b1, o.b2, o.eps), decay,
            trust_ratio.scale_by_masked_trust_ratio(trust_ratio.lamb_ratio,
                                                    o.trust_ratio_exclude),
            optax.scale_by_learning_rate(lr)]
  raise AssertionError(o.name)  # make() checked the name


@dataclasses.dataclass(frozen=True)
class Optimizer:
  tx: optax.GradientTransformation
  derived: Derived
  lr_fn: LrFn  # = lr_schedule(config, derived)


def make(config, num_train_examples: int) -> Optimizer:
  """Builds the optimizer of `config.optimizer` with the peak lr held in its state."""
  derived = derive(config, num_train_examples)
  lr_fn = lr_schedule(config, derived)
  o = config.optimizer
  clip = o.clip_grad_norm
  fields.choice(config, 'optimizer.name', OPTIMIZERS)  # now, not at the first init in a jit

  def factory(peak_lr):
    parts = [optax.clip_by_global_norm(clip)] if clip is not None else []
    return optax.chain(*parts, *_transforms(o, lambda count: lr_fn(count, peak_lr)))

  tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(peak_lr=derived.peak_lr)
  return Optimizer(tx=tx, derived=derived, lr_fn=lr_fn)


def _is_lr_state(x) -> bool:
  return (isinstance(x, optax.InjectStatefulHyperparamsState)
          and 'peak_lr' in x.hyperparams)


def _lr_state(opt_state) -> optax.InjectStatefulHyperparamsState:
  # Searched for rather than assumed at the root, so a wrapper (e.g. optax.MultiSteps) still works.
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_lr_state) if _is_lr_state(s)]
  if len(found) != 1:
    raise ValueError(f'expected one optimizer state with a peak_lr hyperparameter (from '
                     f'bigbatch.optim.make), found {len(found)}')
  return found[0]


def peak_lr(opt_state) -> jax.Array:
  """The peak lr stored in the optimizer state."""
  return _lr_state(opt_state).hyperparams['peak_lr']


def set_peak_lr(opt_state, value):
  """A new state with peak lr `value`; same structure and dtype, so a jitted step won't retrace."""
  def replace(s):
    if not _is_lr_state(s):
      return s
    old = s.hyperparams['peak_lr']
    return s._replace(hyperparams={**s.hyperparams,
                                   'peak_lr': jnp.asarray(value, dtype=old.dtype)})
  _lr_state(opt_state)  # exactly one, or a clear error
  return jax.tree.map(replace, opt_state, is_leaf=_is_lr_state)


def learning_rate(opt_state, lr_fn: LrFn) -> jax.Array:
  """The lr that the next update applies: lr_fn at the state's update count and peak lr."""
  s = _lr_state(opt_state)
  return lr_fn(s.count, s.hyperparams['peak_lr'])
