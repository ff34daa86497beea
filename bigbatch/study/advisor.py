"""The batch-size advisor: one probe run at a small batch, its gradient noise scale, and the
steps and examples every larger batch would need (McCandlish et al. 2018), before any sweep.

`probe_study` turns a study config into a one-trial study (the probe); `run` trains it (resumable,
in its own workdir), reads its noise-scale series, measures the Hessian-weighted B_noise at its
end where asked, and `predict` gives S(B) = S_min (1 + B_noise / B) and E(B) = E_min (1 + B /
B_noise) anchored on the probe's own steps to the target. The estimator, its assumptions and the
validation against the measured sweeps are in docs/advisor.md.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bigbatch import grad_stats
from bigbatch import hooks
from bigbatch import input_pipeline
from bigbatch import jsonl
from bigbatch import schedule
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch import workdir as workdir_lib
from bigbatch.fields import ConfigError
from bigbatch.study import grid
from bigbatch.study import noise_scale
from bigbatch.study import sharpness as sharpness_lib

# The late part of the probe whose noise scale predicts B_crit, and the windows it is cut into
# for the spread.
LATE_FRACTION = 0.5
NUM_WINDOWS = 4


@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line chooses (bigbatch/advise.py's flags)."""
  variant: str | None = None  # a study variant's overrides for the probe; None: the base config
  batch: int | None = None  # the probe's batch; None: the study's smallest (>= 2 microbatches)
  lr: float | None = None  # the probe's peak lr; None: the config's rule at the probe batch
  budget_examples: int | None = None  # None: the study's budget
  budget_minutes: float | None = None
  target: float | None = None  # None: the study's target value
  hessian: bool = True  # also the Hessian-weighted B_noise at the probe's end
  hessian_groups: int = 32  # small-batch gradients behind that estimate
  hessian_examples: int = 512  # examples of the Hessian's batch


def _variant_overrides(study, name: str | None) -> dict:
  if name is None:
    return {}
  if name not in study.variants:
    raise ConfigError(f'--variant={name}: not a variant of this study; it has '
                      f'{", ".join(study.variants)}')
  v = study.variants[name]
  out = v.to_dict() if hasattr(v, 'to_dict') else dict(v)
  out.pop('lr_search', None)
  out.pop('batch_sizes', None)
  return out


def probe_study(study: ml_collections.ConfigDict, opts: Options) -> ml_collections.ConfigDict:
  """The one-trial study of the probe: the study's base config (with `opts.variant`'s overrides)
  at the probe batch, one seed, one lr, the noise scale on, the study's kind and budget.
  Raises ConfigError on a choice that cannot give a prediction."""
  p = copy.deepcopy(study)
  microbatch = study.get('microbatch')
  batch = opts.batch or min(study.batch_sizes)
  if not microbatch:
    microbatch = max(1, batch // 4)
  if batch < 2 * microbatch or batch % microbatch:
    raise ConfigError(
        f'the probe batch {batch} must be a multiple of the microbatch {microbatch} and hold at '
        f'least two of them (the noise scale compares the microbatch gradients with their mean); '
        f'pass --batch={2 * microbatch} or larger')
  p.microbatch = microbatch
  p.batch_sizes = (batch,)
  p.num_seeds = 1
  name = opts.variant or 'probe'
  p.variants = ml_collections.ConfigDict({name: _variant_overrides(study, opts.variant)})
  if opts.lr is not None:
    if not opts.lr > 0:
      raise ConfigError(f'--lr={opts.lr}: give a positive peak learning rate')
    p.lr_search = ml_collections.ConfigDict(
        {'mode': 'grid', 'num_trials': 1, 'range': (opts.lr, opts.lr), 'relative_to': 'absolute'})
  else:
    p.lr_search = ml_collections.ConfigDict(
        {'mode': 'grid', 'num_trials': 1, 'range': (1.0, 1.0), 'relative_to': 'rule'})
  if opts.target is not None:
    p.target.value = float(opts.target)
  if opts.budget_examples is not None:
    if opts.budget_examples < batch:
      raise ConfigError(f'--budget_examples={opts.budget_examples} is less than one probe batch '
                        f'({batch}); give more')
    p.budget.epochs, p.budget.steps = None, int(opts.budget_examples // batch)
  p.noise_scale = True
  p.sharpness = False
  return p


def probe_trial(study: ml_collections.ConfigDict, opts: Options) -> grid.Trial:
  """The probe's trial (validated config), from `probe_study`."""
  (trial,) = grid.trials(probe_study(study, opts))
  # Stopped at the target, whatever the study's kind (a fixed-epoch study only records it); with
  # no target the probe runs the study's budget and its final metric is the quality matched.
  trial.config.target.stop = trial.config.target.value is not None
  if not trial.config.noise_scale.enabled:
    raise ConfigError(f'the probe at batch {trial.batch_size} has one microbatch on one device: '
                      f'no small batch to measure the noise scale with; pass a larger --batch')
  return trial


class TimeBudget(hooks.Hook):
  """Stops the run (checkpointed: a rerun resumes) once `minutes` of wall time have passed."""
  order = 35

  def __init__(self, minutes: float):
    self.minutes, self.started = minutes, time.monotonic()

  def after_step(self, run, done: int) -> None:
    if time.monotonic() - self.started >= 60.0 * self.minutes:
      logging.warning('The probe used its --budget_minutes=%g at step %d; stopping (a rerun '
                      'resumes it).', self.minutes, done)
      run.should_stop = True


def hessian_noise_scale(trainer, state, dataset, config, *, groups: int, num_examples: int,
                        microbatch: int) -> dict[str, float]:
  """B_noise = tr(H Sigma) / (G^T H G) at `state`'s parameters (McCandlish et al., eq. 2.8).

  H is the Hessian of the task's objective over the first `num_examples` examples of the epoch-0
  order (BN frozen at those examples' statistics, as for the sharpness); `groups` gradients of
  `microbatch` examples each come from the examples after them. With q_i = g_i^T H g_i and q of
  their mean, E[q_i] = G^T H G + tr(H Sigma) / b and E[q] = G^T H G + tr(H Sigma) / (groups b):
  the same two-batch-size estimator as B_simple's (grad_stats.estimates) with H-weighted norms.
  """
  need = num_examples + groups * microbatch
  batches, have, i = [], 0, 0
  while have < need:
    batches.append(input_pipeline.make_global_batches(dataset, i, trainer.batch_sharding))
    have += config.global_batch
    i += 1
  if trainer.bn_statistics is not None:
    state = trainer_lib.precise_bn(trainer, state, dataset, len(batches), first_step=0)
  flat = lambda key: jnp.concatenate([b[key].reshape(-1, *b[key].shape[2:]) for b in batches])
  images, labels = flat('image'), flat('label')
  if images.shape[0] < need:
    raise ConfigError(f'the Hessian B_noise needs {need} training examples, the data has '
                      f'{images.shape[0]} in its first batches; lower --hessian_examples')
  loss = trainer.task.objective(trainer.model)
  h_images, h_labels = images[:num_examples], labels[:num_examples]
  grad = jax.jit(jax.grad(loss))
  quad = jax.jit(lambda p, s, x, y, v: sharpness_lib.quadratic_form(
      lambda q: loss(q, s, x, y), p, v))
  gs, qs = [], []
  for g in range(groups):
    lo = num_examples + g * microbatch
    gi = grad(state.params, state.batch_stats, images[lo:lo + microbatch],
              labels[lo:lo + microbatch])
    gs.append(gi)
    qs.append(float(quad(state.params, state.batch_stats, h_images, h_labels, gi)))
  mean_g = jax.tree.map(lambda *xs: sum(xs) / len(xs), *gs)
  q_big = float(quad(state.params, state.batch_stats, h_images, h_labels, mean_g))
  gHg, tr_hsigma = grad_stats.estimates(float(np.mean(qs)), q_big, microbatch,
                                        groups * microbatch)
  gHg, tr_hsigma = float(gHg), float(tr_hsigma)
  return {'gHg': gHg, 'trace_h_sigma': tr_hsigma,
          'b_noise': tr_hsigma / gHg if gHg > 0 else math.inf,
          'groups': groups, 'microbatch': microbatch, 'hessian_examples': num_examples}


class HessianAtEnd(hooks.Hook):
  """Measures `hessian_noise_scale` once the probe stops (target, budget or end), into
  `self.result` and workdir/hessian_noise.json (read back when a rerun has nothing to train)."""
  order = 45

  def __init__(self, workdir: str, opts: Options, microbatch: int):
    self.path = os.path.join(workdir, 'hessian_noise.json')
    self.opts, self.microbatch = opts, microbatch
    self.result = workdir_lib.read_json(self.path) if workdir_lib.exists(self.path) else None

  def end(self, run) -> None:
    if self.result is not None and self.result.get('step') == int(run.state.step):
      return
    started = time.monotonic()
    out = hessian_noise_scale(run.trainer, run.state, run.dataset, run.config,
                              groups=self.opts.hessian_groups,
                              num_examples=self.opts.hessian_examples,
                              microbatch=self.microbatch)
    out['step'] = int(run.state.step)
    out['seconds'] = time.monotonic() - started
    self.result = out
    if run.is_main:
      workdir_lib.write_json(self.path, out, indent=1)


# ----------------------------------------------------------------------------- estimates


def noise_series(metrics_path: str) -> list[tuple[int, float, float]]:
  """(step, smoothed |G|^2, smoothed tr(Sigma)) of every logged step of a run (gns/*)."""
  read = jsonl.read(metrics_path, 'step')
  if read.damaged:
    logging.warning('%s.', jsonl.describe_damage(metrics_path, read.damaged))
  out = []
  for r in read.rows:
    if 'train/gns/g2' in r and 'train/gns/trace_sigma' in r:
      out.append((int(r['step']), float(r['train/gns/g2']), float(r['train/gns/trace_sigma'])))
  return out


def _ratio(rows) -> float:
  """B_simple of (step, |G|^2, tr(Sigma)) rows: the ratio of the means."""
  return noise_scale.b_simple_from_series((g2, tr) for _, g2, tr in rows)


def b_simple_late(series, end_step: int, fraction: float = LATE_FRACTION,
                  windows: int = NUM_WINDOWS) -> dict:
  """B_simple over the last `fraction` of the steps up to `end_step`: the ratio of the mean
  smoothed tr(Sigma) to the mean smoothed |G|^2 there, and its spread (the lowest and highest
  of the same ratio in `windows` consecutive windows of those steps). Raises ValueError when
  fewer than `windows` logged steps fall there."""
  late = [r for r in series if end_step * (1 - fraction) < r[0] <= end_step]
  if len(late) < windows:
    raise ValueError(f'{len(late)} logged noise-scale steps in the last {fraction:.0%} of the '
                     f'probe (steps up to {end_step}); need {windows}: log more often '
                     f'(study.log_every_steps) or train longer')
  parts = [_ratio(w) for w in np.array_split(np.array(late, dtype=np.float64), windows)]
  finite = [v for v in parts if math.isfinite(v) and v > 0]
  value = _ratio(late)
  return {'value': value, 'low': min(finite) if finite else math.nan,
          'high': max(finite) if finite else math.nan, 'windows': parts,
          'from_step': late[0][0], 'to_step': late[-1][0], 'num_logged': len(late)}


def powers_of_two(low: int, high: int) -> list[int]:
  """low, 2 low, 4 low, ... up to high (and high itself if it is not one of them)."""
  out, b = [], int(low)
  while b <= high:
    out.append(b)
    b *= 2
  if out[-1] != high and high > low:
    out.append(int(high))
  return out


def predict(b_noise: float, probe_batch: int, probe_steps: float, batches) -> dict:
  """S_min, E_min and S(B), E(B) per batch from the noise scale and the probe's steps to the
  target at its batch: S_probe = S_min (1 + B_noise / b), E_min = S_min B_noise."""
  s_min = probe_steps / (1.0 + b_noise / probe_batch)
  e_min = s_min * b_noise
  rows = [{'batch': int(b), 'steps': s_min * (1 + b_noise / b),
           'examples': e_min * (1 + b / b_noise)} for b in batches]
  return {'S_min': s_min, 'E_min': e_min, 'B_crit': b_noise, 'per_batch': rows}


def recommend(b_noise: float, batches) -> int:
  """The largest batch whose examples to the target stay within 2x of E_min (B <= B_noise);
  the smallest batch when none is."""
  within = [b for b in batches if 1 + b / b_noise <= 2.0]
  return max(within) if within else min(batches)


def lr_at(config, batch: int) -> tuple[float, float]:
  """The peak lr and warmup steps that the config's own rule gives at `batch`."""
  c = copy.deepcopy(config)
  c.global_batch = int(batch)
  c.accumulation_steps = 1
  c.batch_schedule = ()
  n = _num_train(config)
  r = schedule.resolve(c, n)
  return r.peak_lr, r.warmup_steps


def _num_train(config) -> int:
  from bigbatch.study import run as run_lib  # pylint: disable=g-import-not-at-top
  return run_lib.num_train_of(config)


def noise_schedule(series, *, base_batch: int, steps_per_epoch: float, num_epochs: float,
                   max_batch: int, num_train: int) -> tuple[tuple[int, int], ...]:
  """A batch-size schedule ((epoch, multiplier), ...) for config.batch_schedule that grows the
  batch with the probe's noise scale: at each whole epoch e, the largest power-of-two multiple
  of `base_batch` not above B_simple measured over the probe's epoch e (its last epoch's value
  from then on), never shrinking, at most `max_batch` and num_train. `steps_per_epoch` is the
  probe's, to place its logged steps in epochs."""
  by_epoch: dict[int, list] = {}
  for step, g2, tr in series:
    by_epoch.setdefault(int(step / steps_per_epoch), []).append((step, g2, tr))
  rows, mult = [], 1
  last = None
  for epoch in range(1, int(math.ceil(num_epochs))):
    measured = by_epoch.get(epoch - 1)
    if measured:
      last = _ratio(measured)
    if last is None or not math.isfinite(last) or last <= base_batch:
      continue
    want = 1
    while (base_batch * want * 2 <= min(last, max_batch, num_train)):
      want *= 2
    if want > mult:
      rows.append((epoch, want))
      mult = want
  return tuple(rows)


# ----------------------------------------------------------------------------- the command


def _finite_or_none(x):
  return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def advise(study: ml_collections.ConfigDict, workdir: str, opts: Options, echo=print) -> dict:
  """Runs (or resumes) the probe in workdir/probe and returns the advice (also written to
  workdir/advice.json, with workdir/advice.png). Raises loop.NonFiniteError as ProbeError."""
  # pylint: disable=g-import-not-at-top  (TensorFlow-importing modules; flag errors need none)
  from bigbatch import loop
  from bigbatch.study import advice_render
  from bigbatch.study import hooks as study_hooks
  from bigbatch.study import run as run_lib
  workdir = workdir_lib.absolute(workdir)
  trial = probe_trial(study, opts)
  c = trial.config
  trial_dir = os.path.join(workdir, 'probe')
  with workdir_lib.storage(trial_dir):
    epath.Path(trial_dir).mkdir(parents=True, exist_ok=True)
  devices = sharding.mesh_shape(c, jax.device_count())[0]  # the 'data' axis
  microbatch = trial.batch_size // c.accumulation_steps // devices
  extra = [TimeBudget(opts.budget_minutes)] if opts.budget_minutes else []
  hessian = HessianAtEnd(trial_dir, opts, microbatch) if opts.hessian else None
  cost_path = os.path.join(trial_dir, 'probe_seconds.json')
  before = workdir_lib.read_json(cost_path)['seconds'] if workdir_lib.exists(cost_path) else 0.0
  resolved = schedule.resolve(c, _num_train(c))
  goal = (f'target {c.target.metric} {">=" if c.target.mode == "max" else "<="} '
          f'{c.target.value}' if c.target.value is not None else
          f'no target: its final {c.target.metric} is the quality to match')
  echo(f'[advise] probe: batch {trial.batch_size} ({c.accumulation_steps} microbatch(es) of '
       f'{microbatch} on each of {devices} device(s)), peak lr {resolved.peak_lr:.4g}, {goal}, '
       f'at most {resolved.total_steps} steps; in {trial_dir}')
  metrics_path = os.path.join(trial_dir, 'metrics.jsonl')
  steps_before = max((r[0] for r in noise_series(metrics_path)), default=0) if (
      workdir_lib.exists(metrics_path)) else 0
  started = time.monotonic()
  try:
    loop.train_and_evaluate(c, trial_dir, hooks=[*study_hooks.hooks_for(c, trial_dir), *extra,
                                                 *([hessian] if hessian else [])])
  except loop.NonFiniteError as e:
    raise ProbeError(f'the probe diverged ({e}); pass a lower --lr or a smaller --batch',
                     code=3) from e
  series = noise_series(metrics_path)
  seconds = before
  if max((r[0] for r in series), default=0) > steps_before:  # a rerun with nothing to train
    seconds += time.monotonic() - started                    # costs the probe nothing
    workdir_lib.write_json(cost_path, {'seconds': seconds})
  row = run_lib.collect(trial, trial_dir, seconds)
  end_step = row['steps_to_target'] if row['reached'] else row['steps_run']
  try:
    late = b_simple_late(series, end_step)
  except ValueError as e:
    raise ProbeError(f'no noise-scale estimate: {e}') from None
  batches = powers_of_two(trial.batch_size, max(study.batch_sizes))
  advice = {
      'study': study.title, 'probe': {
          'batch': trial.batch_size, 'microbatch': microbatch, 'lr': row['lr'],
          'variant': opts.variant, 'reached': row['reached'], 'steps_run': row['steps_run'],
          'steps_to_target': row['steps_to_target'], 'examples_run': row['examples_run'],
          'seconds': seconds, 'target': row['target'], 'final_metric': row['final_metric']},
      'b_simple': late,
      'b_simple_series': [[s, tr / g2 if g2 > 0 else None] for s, g2, tr in series],
      'b_noise_hessian': hessian.result if hessian else None,
  }
  b_noise = late['value']
  if not (math.isfinite(b_noise) and b_noise > 0):
    raise ProbeError(f'the measured noise scale is {b_noise:.4g} (|G|^2 not resolved above the '
                     f'noise in the probe\'s last part): train the probe longer '
                     f'(--budget_examples) or toward a harder target')
  # The anchor: the probe's steps to the target, or with no target its whole run (to match
  # its final metric); none when it missed the target.
  anchor = 'target' if c.target.value is not None else 'final'
  advice['probe']['anchor'] = anchor
  steps = end_step if row['reached'] or anchor == 'final' else None
  advice['prediction'] = None
  if steps:
    advice['prediction'] = predict(b_noise, trial.batch_size, steps, batches)
    advice['prediction_range'] = [
        predict(late[k], trial.batch_size, steps, batches)
        for k in ('low', 'high') if _finite_or_none(late[k])]
    h = hessian.result if hessian else None
    if h and _finite_or_none(h['b_noise']) and h['b_noise'] > 0:
      advice['prediction_hessian'] = predict(h['b_noise'], trial.batch_size, steps, batches)
  best = recommend(b_noise, batches)
  lr, warmup_steps = lr_at(c, best)
  advice['recommendation'] = {
      'batch': best, 'peak_lr': lr, 'warmup_steps': warmup_steps,
      'scaling': c.lr.scaling, 'base_lr': c.lr.base_lr, 'base_batch': c.lr.base_batch,
      'warmup_epochs': c.lr.warmup_epochs}
  num_train = _num_train(c)
  advice['batch_schedule'] = {
      'base_batch': trial.batch_size,
      'schedule': noise_schedule(series, base_batch=trial.batch_size,
                                 steps_per_epoch=num_train / trial.batch_size,
                                 num_epochs=study.budget.epochs or c.num_epochs or 1.0,
                                 max_batch=max(study.batch_sizes), num_train=num_train)}
  workdir_lib.write_json(os.path.join(workdir, 'advice.json'), advice, indent=1)
  advice_render.figure(advice, os.path.join(workdir, 'advice.png'))
  for line in advice_render.lines(advice):
    echo(line)
  return advice


class ProbeError(RuntimeError):
  """The probe gives no usable estimate: it diverged (exit code 3, as the trainer's), or it
  logged too little or resolved no gradient above the noise (2: change the probe's settings)."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code
