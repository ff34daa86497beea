"""The optimizer: the optax chain of config.optimizer with the learning-rate schedule.

`make` builds the optax transformation from the numbers that `bigbatch.schedule.resolve` works
out for the global batch (peak lr, warmup, decay length, boundaries). The peak lr is a
hyperparameter in the optimizer state (`optax.inject_hyperparams`), not a constant baked into
the compiled step, so runs that differ only in lr share one compilation and `set_peak_lr` can
change it between steps. With optimizer.adascale, the gain and tau are two more (adascale.py).

LARS and LAMB are built from the trust-ratio transform in `bigbatch.trust_ratio` (why not
`optax.lars` / `optax.lamb` is explained there).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ml_collections import config_dict

from bigbatch import adascale as adascale_lib
from bigbatch import fields
from bigbatch import schedule
from bigbatch import trust_ratio
from bigbatch.fields import ConfigError

OPTIMIZERS = ('sgd', 'adamw', 'lars', 'lamb')

# lr_fn(step, peak_lr) -> lr. `peak_lr` may be a traced scalar: it lives in the optimizer state.
LrFn = Callable[[jax.typing.ArrayLike, jax.typing.ArrayLike], jax.Array]


def defaults() -> dict[str, Any]:
  """The config fields of the optimizer and its schedule (optimizer.*, and schedule's lr.*),
  with their defaults."""
  placeholder = config_dict.placeholder
  return {
      **schedule.defaults(),
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
      # AdaScale SGD (Johnson et al. 2020; bigbatch/adascale.py): lr.base_lr at lr.base_batch,
      # scaled in each step by the gain r_t in [1, global_batch / base_batch] from the noise
      # measurement, the schedule stretched by the gains. Needs optimizer.name=sgd,
      # noise_scale.enabled and lr.scaling=none.
      'optimizer.adascale': False,
  }


def validate(config) -> None:
  """The form of optimizer.*, and of lr.* and batch_schedule (`schedule.validate`), before any
  data is read. Raises ConfigError."""
  schedule.validate(config)
  fields.choice(config, 'optimizer.name', OPTIMIZERS)
  fields.finite(config, 'optimizer.weight_decay', low=0.0)
  # eps <= 0 divides by zero in Adam/LAMB; eta <= 0 makes no LARS update.
  for path in ('optimizer.eps', 'optimizer.trust_coefficient'):
    fields.positive(config, path)
  fields.finite(config, 'optimizer.momentum', low=0.0, high=1.0)  # > 1 grows without bound
  for path in ('optimizer.b1', 'optimizer.b2'):  # 1 would divide by 1 - b^t = 0 (bias correction)
    fields.finite(config, path, low=0.0, high=1.0, high_open=True)
  fields.positive(config, 'optimizer.clip_grad_norm', allow_none=True)
  adascale_lib.validate(config)
  for path in ('optimizer.weight_decay_exclude', 'optimizer.trust_ratio_exclude'):
    try:
      re.compile(fields.get(config, path) or '')
    except re.error as e:
      raise ConfigError(f'config.{path}: not a valid regex ({e}); fix the pattern') from None


def lr_schedule(config, derived: schedule.Resolved) -> LrFn:
  """Returns lr_fn(step, peak_lr): linear warmup from lr.warmup_init_lr, then lr.decay.

  The schedule pieces are built inside lr_fn because their values depend on `peak_lr`, which is
  a traced scalar in the update; their step counts come from `derived` (`schedule.resolve`)
  and stay static.
  """
  lr = config.lr
  decay = lr.decay
  warmup = derived.warmup_steps
  phases = derived.phases
  # schedule_steps: the schedule's own length where the run's differs (a batch schedule's
  # initial-batch steps; AdaScale's steps of the global batch, total_steps its upper bound).
  decay_steps = (derived.schedule_steps or derived.total_steps) - warmup
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
      step = schedule.epochs_seen(step, phases) * derived.steps_per_epoch
    peak = jnp.asarray(peak_lr, jnp.float32)
    curve = decay_schedule(peak)
    if warmup:
      curve = optax.join_schedules([optax.linear_schedule(init_lr, peak, warmup), curve],
                                   [warmup])
    value = curve(step)
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
  raise AssertionError(o.name)  # validate() checked the name


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The optax transformation of a config (peak lr in its state), the resolved schedule it was
  built from, and its lr function."""
  tx: optax.GradientTransformation
  derived: schedule.Resolved
  lr_fn: LrFn  # = lr_schedule(config, derived)
  adascale: adascale_lib.Settings | None = None  # config.optimizer.adascale


def make(config, num_train_examples: int) -> Optimizer:
  """Builds the optimizer of `config.optimizer` (a validated config) with the peak lr held
  in its state, for a training set of `num_train_examples`."""
  derived = schedule.resolve(config, num_train_examples)
  lr_fn = lr_schedule(config, derived)
  o = config.optimizer
  clip = o.clip_grad_norm
  ada = adascale_lib.settings(config)

  def chain(lr):
    parts = [optax.clip_by_global_norm(clip)] if clip is not None else []
    return optax.chain(*parts, *_transforms(o, lr))

  def factory(peak_lr):
    return chain(lambda count: lr_fn(count, peak_lr))

  def adascale_factory(peak_lr, adascale_gain, adascale_tau):
    # The step sets the gain before the update and advances tau after it.
    hyperparams = {GAIN: adascale_gain, TAU: adascale_tau}
    return chain(lambda count: _adascale_lr(hyperparams, peak_lr, lr_fn, ada.scale))

  # AdaScale's two extra hyperparameters exist only when it is on, so every other run keeps the
  # state structure (and checkpoints) it had before.
  if ada is None:
    tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(peak_lr=derived.peak_lr)
  else:
    tx = optax.inject_hyperparams(adascale_factory, hyperparam_dtype=jnp.float32)(
        peak_lr=derived.peak_lr, adascale_gain=1.0, adascale_tau=0.0)
  return Optimizer(tx=tx, derived=derived, lr_fn=lr_fn, adascale=ada)


# AdaScale's hyperparameters: the gain r_t of the coming update, and tau, the base-batch
# iterations done (the sum of the gains applied so far).
GAIN, TAU = 'adascale_gain', 'adascale_tau'


def _adascale_lr(hyperparams, peak_lr, lr_fn: LrFn, scale: float) -> jax.Array:
  """r_t lr_base(tau_t): the base batch's schedule at tau base-batch iterations is lr_fn (in
  steps of the global batch) at tau / S."""
  return hyperparams[GAIN] * lr_fn(hyperparams[TAU] / scale, peak_lr)


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
  return _set_hyperparam(opt_state, 'peak_lr', value)


def learning_rate(opt_state, lr_fn: LrFn, adascale: adascale_lib.Settings | None = None
                  ) -> jax.Array:
  """The lr that the next update applies: lr_fn at the state's update count and peak lr; with
  AdaScale (`adascale`: Optimizer.adascale) the gain times lr_fn at tau / S."""
  s = _lr_state(opt_state)
  if TAU in s.hyperparams:
    if adascale is None:
      raise ValueError('an AdaScale optimizer state: pass adascale=Optimizer.adascale')
    return _adascale_lr(s.hyperparams, s.hyperparams['peak_lr'], lr_fn, adascale.scale)
  return lr_fn(s.count, s.hyperparams['peak_lr'])


def _set_hyperparam(opt_state, name: str, value):
  """A new state with hyperparameter `name` = `value`, in its dtype."""
  def replace(s):
    if not _is_lr_state(s):
      return s
    old = s.hyperparams[name]
    return s._replace(hyperparams={**s.hyperparams, name: jnp.asarray(value, old.dtype)})
  _lr_state(opt_state)  # exactly one, or a clear error
  return jax.tree.map(replace, opt_state, is_leaf=_is_lr_state)


def adascale_values(opt_state) -> tuple[jax.Array, jax.Array]:
  """(gain of the last update, tau) of an AdaScale optimizer state."""
  h = _lr_state(opt_state).hyperparams
  return h[GAIN], h[TAU]


def set_adascale_gain(opt_state, gain):
  """The state with the gain of the coming update (the step calls it before tx.update)."""
  return _set_hyperparam(opt_state, GAIN, gain)


def advance_adascale_tau(opt_state):
  """The state after an update: tau + the gain it applied (the step calls it after
  tx.update)."""
  gain, tau = adascale_values(opt_state)
  return _set_hyperparam(opt_state, TAU, tau + gain)
