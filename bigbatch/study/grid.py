"""The trials of a batch-size study: one validated experiment config per (variant, batch size,
lr, seed), built from the study config (its fields: docs/design.md, "The study config").
Pure: nothing runs and nothing is written here."""
from __future__ import annotations

import copy
import dataclasses
import math

import jax
import ml_collections

from bigbatch import config_lib
from bigbatch import fields
from bigbatch import sharding
from bigbatch.fields import ConfigError

KINDS = ('steps_to_target', 'fixed_epochs')


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of the sweep: its id, its (variant, batch, lr, seed) cell and its config."""
  trial_id: str
  variant: str
  batch_size: int
  lr_index: int
  seed: int
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)


def _halton(i: int, base: int = 2) -> float:
  """The i-th (1-based) element of the van der Corput sequence in `base`: quasi-random in (0,1)."""
  f, r = 1.0, 0.0
  while i > 0:
    f /= base
    r += f * (i % base)
    i //= base
  return r


def lr_values(search) -> list[float]:
  """The lr values (factors or absolute) of one search, in trial order."""
  lo, hi = search.range
  n = search.num_trials
  if not 0 < lo <= hi or n < 1:
    raise ConfigError(f'study.lr_search: range={tuple(search.range)} num_trials={n}; give '
                      f'0 < low <= high and num_trials >= 1')
  if n == 1:
    return [math.sqrt(lo * hi)]
  if search.mode == 'grid':
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
  if search.mode == 'quasirandom':
    return [lo * (hi / lo) ** _halton(i + 1) for i in range(n)]
  raise ConfigError(f'study.lr_search.mode={search.mode!r}; choose grid or quasirandom')


def _data_devices(config) -> int:
  """The size of the config's 'data' mesh axis on this machine's devices."""
  return sharding.mesh_shape(config, _num_devices())[0]


def _num_devices() -> int:
  return jax.device_count()


def trials(study: ml_collections.ConfigDict) -> list[Trial]:
  """Every trial of the study, in a fixed order (variant, batch, lr, seed), each with a
  validated config. A bad field raises ConfigError before anything runs."""
  out = []
  if not study.batch_sizes or not study.variants:
    raise ConfigError('study.batch_sizes and study.variants must be non-empty')
  kind = study.get('kind', 'steps_to_target')
  if kind not in KINDS:
    raise ConfigError(f'study.kind={kind!r}; choose one of {", ".join(KINDS)}')
  if kind == 'fixed_epochs' and (study.budget.epochs is None or study.budget.steps is not None):
    raise ConfigError('study.kind=fixed_epochs compares batch sizes at one number of epochs: set '
                      'study.budget.epochs and leave study.budget.steps unset')
  for variant, overrides in study.variants.items():
    overrides = ml_collections.ConfigDict(overrides.to_dict() if hasattr(overrides, 'to_dict')
                                          else overrides)
    search = ml_collections.ConfigDict(study.lr_search.to_dict())
    if 'lr_search' in overrides:
      fields.overlay(search, overrides.lr_search, f'study.variants.{variant}.lr_search')
      del overrides['lr_search']
    batch_sizes = study.batch_sizes
    if 'batch_sizes' in overrides:  # a variant run at some of the batch sizes only
      batch_sizes = tuple(overrides.batch_sizes)
      del overrides['batch_sizes']
      if not batch_sizes or not set(batch_sizes) <= set(study.batch_sizes):
        raise ConfigError(f'study.variants.{variant}.batch_sizes={batch_sizes}: give a non-empty '
                          f'subset of study.batch_sizes {tuple(study.batch_sizes)}')
    if kind == 'fixed_epochs' and search.num_trials != 1:
      raise ConfigError(f'study.variants.{variant}: study.kind=fixed_epochs runs one lr per '
                        f'variant (the rule\'s, no search); lr_search.num_trials is '
                        f'{search.num_trials}, set it to 1')
    for batch in batch_sizes:
      for lr_index, value in enumerate(lr_values(search)):
        for seed in range(study.num_seeds):
          c = copy.deepcopy(study.base)
          fields.overlay(c, overrides, f'study.variants.{variant}')
          _trial_fields(study, c, batch, search, value, seed, set(fields.flatten(overrides)))
          trial_id = f'{variant}-b{batch}-lr{lr_index}-s{seed}'
          try:
            config_lib.validate(c, _num_devices())
          except ConfigError as e:
            raise ConfigError(f'study trial {trial_id}: {e}') from None
          out.append(Trial(trial_id, variant, batch, lr_index, seed, c))
  return out


def _trial_fields(study, c, batch: int, search, value: float, seed: int,
                  pinned: set[str] = frozenset()) -> None:
  """The fields the study sets in every trial; `pinned`: those the variant sets itself, of
  which accumulation_steps and noise_scale.enabled stay as the variant says (AdaScale needs
  both)."""
  c.global_batch = batch
  c.seed = seed
  if search.relative_to == 'rule':
    c.lr.base_lr = c.lr.base_lr * value
  elif search.relative_to == 'absolute':
    c.lr.scaling = 'none'
    c.lr.base_lr = value
  else:
    raise ConfigError(f'study.lr_search.relative_to={search.relative_to!r}; choose rule or '
                      f'absolute')
  data_parallel = _data_devices(c)
  k = 1
  if 'accumulation_steps' in pinned:
    k = c.accumulation_steps
  elif study.microbatch:
    per_step = study.microbatch * data_parallel
    k = batch // per_step if batch % per_step == 0 and batch > per_step else 1
  c.accumulation_steps = k
  per_device = batch // (data_parallel * k) if batch % (data_parallel * k) == 0 else None
  g = c.model.bn_group_size
  if g is not None and per_device is not None and per_device < g:
    c.model.bn_group_size = per_device  # a small batch is one ghost group
  c.num_epochs, c.num_steps = study.budget.epochs, study.budget.steps
  c.target.metric, c.target.value, c.target.mode = (study.target.metric, study.target.value,
                                                    study.target.mode)
  c.target.stop = True
  if study.get('kind') == 'fixed_epochs':
    # The whole budget runs; the final evaluation is the result. A target value, if the study
    # gives one, is only recorded (the first evaluation that meets it: steps to target).
    c.target.stop = False
    if c.lr.epoch_steps == 'floor_per_epoch':
      # Equal epochs must mean equal examples: floor(N/B) steps per epoch would drop up to a
      # batch per epoch (29% of the digits at batch 1,024), so count total examples / batch.
      c.lr.epoch_steps = 'total_examples_floor'
  c.eval_every_epochs, c.eval_every_steps = study.eval_every_epochs, None
  if 'noise_scale.enabled' not in pinned:
    c.noise_scale.enabled = bool(study.noise_scale) and data_parallel * k >= 2
  c.sharpness.at_end = bool(study.sharpness)
  c.checkpoint_every_steps = 1 << 30  # trials are short: a checkpoint at the end (or stop)
  c.log_every_steps = study.log_every_steps
