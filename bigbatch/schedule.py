"""The run's batch-dependent numbers, resolved once from the config.

The config states the lr as base_lr at base_batch with a scaling rule (or a per-batch table) and
durations in epochs or steps. `resolve(config, num_train_examples)` turns them into absolute
numbers for the global batch: the peak lr, steps per epoch, total steps, warmup, step-decay
boundaries and the phases of a batch-size schedule (`Resolved`). The optimizer
(bigbatch/optim.py), the loop, the hooks and `main --print_derived` all read that one result.

`validate` checks the lr.* fields and the batch schedule's form before any data is read;
`resolve` checks only what depends on the training set's size, on a validated config.
"""
from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from bigbatch import fields
from bigbatch.fields import ConfigError

# peak lr = base_lr * factor(global_batch / base_batch); 'table' reads a per-batch table instead.
_FACTORS: dict[str, Callable[[float], float]] = {
    'linear': lambda ratio: ratio,
    'sqrt': math.sqrt,
    'none': lambda ratio: 1.0,
}
SCALING_RULES = (*_FACTORS, 'table')
DECAYS = ('cosine', 'polynomial', 'step', 'linear', 'constant')


def _floor_per_epoch(epochs: float, n: int, batch: int) -> int:
  return round(epochs * (n // batch))


def _examples(epochs: float, n: int) -> fractions.Fraction:
  # Exact rational arithmetic from the decimal the config wrote: 0.1 epochs is 1/10, not the
  # binary float just above it, so an exact whole number of steps never rounds the wrong way.
  return fractions.Fraction(repr(float(epochs))) * n


# How a duration in epochs (num_epochs, warmup, step boundaries, the lr.table warmup) becomes
# steps; see `epochs_to_steps`.
_EPOCH_RULES: dict[str, Callable[[float, int, int], int]] = {
    'floor_per_epoch': _floor_per_epoch,
    'total_examples_floor': lambda e, n, batch: math.floor(_examples(e, n) / batch),
    'total_examples_ceil': lambda e, n, batch: math.ceil(_examples(e, n) / batch),
}
EPOCH_STEPS = tuple(_EPOCH_RULES)


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


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Every batch-dependent number of a run, computed once from the config by `resolve`."""
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
  phases: tuple[Phase, ...] = ()
  # The lr schedule's length where it differs from total_steps, else 0: in initial-batch steps
  # under a batch schedule; with AdaScale, in steps of global_batch (T_B: the run ends at the
  # first step with tau / S >= T_B, total_steps = ceil(S T_B) its upper bound).
  schedule_steps: int = 0
  epoch_steps: str = 'floor_per_epoch'  # config.lr.epoch_steps: how epochs became steps above
  adascale_scale: float = 0.0  # AdaScale's S = global_batch / lr.base_batch; 0: off

  def as_dict(self) -> dict:
    """The numbers as JSON-ready values (what derived.json and --print_derived show)."""
    d = dataclasses.asdict(self)
    d['boundaries_steps'] = list(self.boundaries_steps)
    d['phases'] = [dataclasses.asdict(p) for p in self.phases]
    return d


# The peak lr is a value in the optimizer state (set after initialization), not a constant of the
# compiled step: trials that differ in it share one compilation.
fields.declare_host_only('lr.base_lr')


def defaults() -> dict[str, Any]:
  """The lr.* config fields, with their defaults."""
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
  }


def validate(config) -> None:
  """The form of lr.* and config.batch_schedule, and the peak lr at config.global_batch: all
  that is known before the data set (what depends on its size is checked by `resolve`).
  Raises ConfigError."""
  fields.choice(config, 'lr.scaling', SCALING_RULES)
  fields.choice(config, 'lr.decay', DECAYS)
  fields.choice(config, 'lr.epoch_steps', EPOCH_STEPS)
  fields.positive(config, 'lr.base_lr')
  fields.positive(config, 'lr.base_batch')
  for path in ('lr.warmup_init_lr', 'lr.end_lr'):
    fields.finite(config, path, low=0.0)
  # A power <= 0 makes polynomial decay constant or infinite at the end; a decay factor <= 0 a
  # negative or zero lr.
  for path in ('lr.power', 'lr.decay_factor'):
    fields.positive(config, path)
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
  if config.lr.decay == 'step' and not (config.lr.boundaries_epochs or config.lr.boundaries_steps):
    raise ConfigError('config.lr.decay=step needs boundaries; set --config.lr.boundaries_epochs='
                      '"(30,60,80)" or lr.boundaries_steps')
  _check_table(config)
  peak_lr = _peak_lr(config)
  if not peak_lr <= float(jnp.finfo(jnp.float32).max):  # the lr lives in float32 opt state
    raise ConfigError(f'config.lr: the peak lr {peak_lr:.4g} at batch {config.global_batch} is '
                      f'not finite in float32; lower config.lr.base_lr')
  _check_batch_schedule(config)


def _number(x) -> bool:
  """A finite int or float (not a bool, a string or None)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_table(config) -> None:
  """config.lr.table's rows, and that one of them holds config.global_batch (scaling=table)."""
  table = config.lr.table
  for row in table or ():
    if not (isinstance(row, (tuple, list)) and len(row) == 3 and _number(row[0])
            and row[0] > 0 and _number(row[1]) and row[1] > 0
            and (row[2] is None or _number(row[2]) and row[2] >= 0)):
      shown = tuple(row) if isinstance(row, (tuple, list)) else row
      raise ConfigError(f'config.lr.table row {shown!r}: expected (max_batch, peak_lr, '
                        f'warmup_epochs or None) with finite numbers, max_batch and peak_lr '
                        f'> 0, warmup_epochs >= 0')
  if config.lr.scaling != 'table':
    return
  if not table:
    raise ConfigError('config.lr.scaling=table needs config.lr.table = ((max_batch, peak_lr, '
                      'warmup_epochs), ...); set it or choose another scaling rule')
  largest = max(row[0] for row in table)
  if config.global_batch > largest:
    raise ConfigError(f'config.global_batch={config.global_batch} is above every row of '
                      f'config.lr.table (largest {largest}); add a row for it')


def _check_batch_schedule(config) -> None:
  """config.batch_schedule ((epoch, multiplier), ...): whole epochs increasing inside the run,
  whole multipliers increasing above 1, epochs counted in passes of the input pipeline."""
  schedule = config.get('batch_schedule') or ()
  if not schedule:
    return
  field = 'config.batch_schedule'
  if config.num_epochs is None:
    raise ConfigError(f'{field} needs the run length in epochs: set config.num_epochs (not '
                      f'num_steps)')
  previous = (0, 1)
  for row in schedule:
    if (not isinstance(row, (tuple, list)) or len(row) != 2 or not all(map(_number, row))
        or int(row[0]) != row[0] or int(row[1]) != row[1]
        or not previous[0] < row[0] < config.num_epochs or not row[1] > previous[1]):
      raise ConfigError(
          f'{field}={tuple(schedule)}: expected ((epoch, multiplier), ...) with whole epochs '
          f'increasing inside (0, num_epochs={config.num_epochs}) and whole multipliers of '
          f'global_batch increasing above 1, e.g. ((30, 5), (60, 25))')
    previous = row
  rule = config.lr.epoch_steps
  if rule != 'floor_per_epoch':
    # Phases start at whole passes of the input pipeline and the schedule under them is a
    # function of the passes seen (epochs_seen), so there an epoch is floor(N / B) steps.
    raise ConfigError(f'{field} counts epochs as passes of the input pipeline; '
                      f'config.lr.epoch_steps={rule!r} cannot apply to it: set '
                      f'lr.epoch_steps=floor_per_epoch or drop the batch schedule')


def scaling_factor(rule: str, ratio: float) -> float:
  """The factor of scaling rule `rule` (linear, sqrt, none) at `ratio` = batch / base_batch."""
  return _FACTORS[rule](ratio)


def table_row(config) -> tuple[int, float, float | None]:
  """The row (max_batch, peak_lr, warmup_epochs or None) of config.lr.table for the global
  batch: the first whose max_batch is >= the batch (`validate` checked that there is one)."""
  row = next(r for r in config.lr.table if config.global_batch <= r[0])
  return int(row[0]), float(row[1]), None if row[2] is None else float(row[2])


def _peak_lr(config) -> float:
  """The peak lr at config.global_batch: lr.table's, or base_lr by the scaling rule (Goyal et
  al.'s linear rule: the lr grows with the batch)."""
  lr = config.lr
  if lr.scaling == 'table':  # a published per-batch table (e.g. the TPU LARS recipe): no rule
    return table_row(config)[1]
  return float(lr.base_lr) * scaling_factor(lr.scaling, int(config.global_batch) / lr.base_batch)


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
  return _EPOCH_RULES[rule](epochs, int(num_train_examples), int(global_batch))


def batch_phases(config, num_train_examples: int) -> tuple[Phase, ...]:
  """The phases of config.batch_schedule ((epoch, multiplier), ...); () without one. The
  schedule's form was checked by `validate`; ConfigError if a phase's batch is larger than
  the training set."""
  schedule = config.get('batch_schedule') or ()
  if not schedule:
    return ()
  rows = [(0, 1)] + [(int(epoch), int(mult)) for epoch, mult in schedule]
  n = int(num_train_examples)
  phases, step = [], 0
  for i, (epoch, mult) in enumerate(rows):
    batch = config.global_batch * mult
    per_epoch = n // batch
    if per_epoch == 0:
      raise ConfigError(f'config.batch_schedule: the batch {batch} from epoch {epoch} is larger '
                        f'than the {n} training examples; lower the multiplier {mult}')
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


def examples_seen(step: int, global_batch: int, phases: tuple[Phase, ...] = ()) -> int:
  """Training examples consumed by the first `step` updates: step x global_batch, or under a
  batch schedule the sum over its phases of their updates x their batch."""
  if not phases:
    return int(step) * int(global_batch)
  return sum(max(0, min(int(step), p.end_step) - p.start_step) * p.global_batch
             for p in phases)


def phase_at(step: int, phases: tuple[Phase, ...]) -> Phase:
  """The phase that update `step` (0-based) belongs to."""
  for p in reversed(phases):
    if step >= p.start_step:
      return p
  raise ValueError(step)


def _boundaries(config, to_steps: Callable[[float], int], steps_per_epoch: int,
                total_steps: int) -> tuple[int, ...]:
  """The step decay's boundaries in steps, each inside the run and strictly increasing."""
  lr = config.lr
  if lr.decay != 'step':
    # Boundaries of another decay would not be used; leaving them out keeps the logged
    # Resolved a description of the schedule that actually runs.
    return ()
  if lr.boundaries_steps:
    field, given = 'lr.boundaries_steps', tuple(lr.boundaries_steps)
    steps = tuple(int(b) for b in given)
  else:
    field, given = 'lr.boundaries_epochs', tuple(lr.boundaries_epochs)
    steps = tuple(to_steps(e) for e in given)
  for b in steps:
    if not 0 < b <= total_steps:  # an epoch boundary may round to step 0 or past the end
      raise ConfigError(
          f'config.{field}={given}: boundary at step {b} is outside (0, {total_steps}] (total '
          f'steps at {steps_per_epoch} steps/epoch); choose boundaries within the run')
  if any(a >= b for a, b in zip(steps, steps[1:])):
    # Two epochs rounding to one step would silently drop a factor in a {step: scale} dict.
    raise ConfigError(f'config.{field}={given} gives steps {steps}, not strictly increasing; '
                      f'list distinct boundaries in increasing order')
  return steps


def resolve(config, num_train_examples: int) -> Resolved:
  """The steps, warmup, peak lr, boundaries and phases of a validated `config` on a training
  set of `num_train_examples`. Raises ConfigError where the set's size does not fit them."""
  n = int(num_train_examples)
  batch = int(config.global_batch)
  steps_per_epoch = n // batch
  if steps_per_epoch == 0:
    raise ConfigError(f'config.global_batch={batch} is larger than the {n} training examples '
                      f'(0 steps per epoch); set --config.global_batch to at most {n}')
  lr = config.lr
  # A config recorded before lr.epoch_steps existed counted epochs the one way there was.
  rule = lr.get('epoch_steps', 'floor_per_epoch')
  to_steps = functools.partial(epochs_to_steps, num_train_examples=n, global_batch=batch,
                               rule=rule)

  if config.num_steps is not None:
    field, total_steps = 'num_steps', int(config.num_steps)
  else:
    field, total_steps = 'num_epochs', to_steps(config.num_epochs)
  if total_steps <= 0:
    raise ConfigError(f'config.{field}={config[field]} gives {total_steps} steps at '
                      f'{steps_per_epoch} steps/epoch; train for at least one step')

  row = table_row(config) if lr.scaling == 'table' else None
  if row is not None and row[2] is not None:
    field, warmup_steps = 'lr.table', to_steps(row[2])
  elif lr.warmup_steps is not None:
    field, warmup_steps = 'lr.warmup_steps', int(lr.warmup_steps)
  elif lr.warmup_epochs is not None:
    field, warmup_steps = 'lr.warmup_epochs', to_steps(lr.warmup_epochs)
  else:
    field, warmup_steps = None, 0
  if warmup_steps > total_steps:
    raise ConfigError(f'config.{field} gives {warmup_steps} warmup steps, more than the '
                      f'{total_steps} total steps; shorten the warmup or train longer')

  phases = batch_phases(config, n)
  run_steps, schedule_steps = (phases[-1].end_step, total_steps) if phases else (total_steps, 0)
  scale = 0.0
  if config.optimizer.get('adascale', False):
    # At most S T_B updates (every gain 1), the run's data budget; the AdaScaleStop hook ends it
    # when tau / S reaches T_B.
    ratio = fractions.Fraction(batch) / fractions.Fraction(lr.base_batch)
    scale, run_steps, schedule_steps = float(ratio), math.ceil(ratio * total_steps), total_steps
  return Resolved(
      num_train_examples=n,
      global_batch=batch,
      steps_per_epoch=steps_per_epoch,
      total_steps=run_steps,
      warmup_steps=warmup_steps,
      peak_lr=_peak_lr(config),
      boundaries_steps=_boundaries(config, to_steps, steps_per_epoch, total_steps),
      phases=phases,
      schedule_steps=schedule_steps,
      epoch_steps=rule,
      adascale_scale=scale,
  )
