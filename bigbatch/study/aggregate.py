"""A study's trial results reduced to one row per (variant, batch size), and the steps/examples
fit: pure functions (no files, no figures), which the reports render and unit tests check.

The input is one result dict per trial (a line of results.jsonl); its fields, which are
required and how a missing or non-finite one is treated are in docs/design.md, "Trials,
results and reports".
"""
from __future__ import annotations

import collections
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

_REQUIRED = ('trial_id', 'variant', 'batch_size', 'lr', 'seed')


def measured(x) -> float | None:
  """A finite float, or None for None, NaN, inf, 'nan' strings and other non-numbers."""
  if isinstance(x, bool) or x is None:
    return None
  try:
    x = float(x)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def series(pairs) -> list[tuple[float, float]]:
  """[[step, value], ...] with unmeasured entries dropped."""
  out = []
  for pair in pairs or ():
    if len(pair) != 2:
      continue
    step, value = measured(pair[0]), measured(pair[1])
    if step is not None and value is not None:
      out.append((step, value))
  return out


def _last(pairs) -> float | None:
  points = series(pairs)
  return points[-1][1] if points else None


def summarize(values: Iterable[Any]) -> dict | None:
  """Mean and spread over seeds of the finite values; None when there are none.

  Returns {'n', 'mean', 'std', 'lo', 'hi', 'kind'} where kind is
    'single'  (n == 1): lo == hi == mean, std None;
    'min-max' (n == 2): lo, hi = min, max, std None;
    'std'     (n >= 3): std is the sample std (ddof=1), lo, hi = mean -/+ std.
  lo and hi are what error bars draw.
  """
  v = np.array([x for x in map(measured, values) if x is not None], dtype=np.float64)
  if v.size == 0:
    return None
  mean = float(v.mean())
  if v.size == 1:
    return dict(n=1, mean=mean, std=None, lo=mean, hi=mean, kind='single')
  if v.size == 2:
    return dict(n=2, mean=mean, std=None, lo=float(v.min()), hi=float(v.max()), kind='min-max')
  std = float(v.std(ddof=1)) if v.max() > v.min() else 0.0  # no 1e-17 from rounding
  return dict(n=int(v.size), mean=mean, std=std, lo=mean - std, hi=mean + std, kind='std')


def _check(results: Sequence[Mapping[str, Any]]) -> None:
  if not results:
    raise ValueError('no trial results to report')
  for i, r in enumerate(results):
    missing = [k for k in _REQUIRED if r.get(k) is None]
    if missing:
      raise ValueError(f'result #{i} ({r.get("trial_id", "no trial_id")}) lacks {missing}')


def _reached(r: Mapping[str, Any]) -> bool:
  """Reached means the trial says so and gives the step; either alone is not trusted."""
  return bool(r.get('reached')) and measured(r.get('steps_to_target')) is not None


def _examples(r: Mapping[str, Any]) -> float | None:
  e = measured(r.get('examples_to_target'))
  if e is None and _reached(r):
    e = measured(r['steps_to_target']) * float(r['batch_size'])
  return e


def _best_lr_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The trial with fewest steps to target; ties go to the higher best_metric, then lower lr."""
  reached = [r for r in trials if _reached(r)]
  if not reached:
    return None
  def key(r):
    best = measured(r.get('best_metric'))
    mode = (r.get('target') or {}).get('mode', 'max')
    best = -math.inf if best is None else (best if mode == 'max' else -best)
    return (measured(r['steps_to_target']), -best, float(r['lr']))
  return min(reached, key=key)


def _best_final_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The trial with the best final_metric (by the target's mode); None if none measured it."""
  with_final = [r for r in trials if measured(r.get('final_metric')) is not None]
  if not with_final:
    return None
  mode = (with_final[0].get('target') or {}).get('mode', 'max')
  pick = max if mode == 'max' else min
  return pick(with_final, key=lambda r: measured(r['final_metric']))


def _at_edge(best: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]) -> bool:
  lrs = [float(r['lr']) for r in trials]
  return float(best['lr']) in (min(lrs), max(lrs))


def steps_to_target(results: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One row per (variant, batch_size) of a steps-to-target study, sorted by variant then batch.

  As Shallue et al. 2018: for each (variant, batch size, seed), steps-to-target is the minimum
  over the learning-rate trials that reached the target; that trial is the seed's "best-lr
  trial" and its lr the seed's best lr. Over seeds, summarize(): the mean and a spread. A
  (variant, batch) point where some seed reached the target with no lr is "not reached": the
  table says so, the plots mark it apart, nothing is dropped. Final accuracy is the best
  final_metric over the lr trials of each seed, then summarized over seeds, whether or not the
  target was reached.

  Each row holds
    variant, batch_size;
    data: sorted data sources of its trials ('digits', 'synthetic');
    target: the target dict of its first trial;
    n_trials, n_diverged; lrs: sorted distinct lrs tried;
    seeds: sorted seeds; seeds_reached: the seeds where some lr reached the target;
    reached: True iff every seed reached it (otherwise the point is "not reached");
    steps_to_target, examples_to_target, wall_to_target_s, best_lr: summarize() over the seeds
      that reached, of their best-lr trial (None when no seed reached). With reached False these
      are partial: the figures leave them out or mark them apart;
    best_lr_at_edge: some seed's best lr is the smallest or largest lr that seed tried (the lr
      grid may be too narrow there);
    final_metric: summarize() over seeds of the best final_metric over that seed's lr trials;
    final_train_loss, sharpness (last entry of 'sharpness'), noise_scale_end (last entry of
      'noise_scale'): summarize() over seeds of the seed's chosen trial, which is its best-lr
      trial, or the trial with the best final_metric where no lr reached the target;
    chosen_trials: {seed: trial_id of that chosen trial};
    step_budget: the most steps any of its trials ran (a lower bound where not reached);
    not_reached_trials: ids of its trials that did not reach the target.
  Raises ValueError on an empty list or a result lacking trial_id, variant, batch_size, lr, seed.
  """
  _check(results)
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in results:
    groups[(str(r['variant']), int(r['batch_size']))][r['seed']].append(r)

  rows = []
  for (variant, batch), by_seed in sorted(groups.items()):
    trials = [r for seed_trials in by_seed.values() for r in seed_trials]
    best_lr = {s: _best_lr_trial(ts) for s, ts in by_seed.items()}
    best_final = {s: _best_final_trial(ts) for s, ts in by_seed.items()}
    chosen = {s: best_lr[s] or best_final[s] for s in by_seed}
    won = [t for t in best_lr.values() if t is not None]
    at_edge = any(_at_edge(best_lr[s], ts) for s, ts in by_seed.items() if best_lr[s])
    steps_run = [measured(r.get('steps_run')) for r in trials]
    steps_run = [s for s in steps_run if s is not None]
    rows.append(dict(
        variant=variant,
        batch_size=batch,
        data=sorted({str(r.get('data')) for r in trials if r.get('data') is not None}),
        target=trials[0].get('target'),
        n_trials=len(trials),
        n_diverged=sum(bool(r.get('diverged')) for r in trials),
        lrs=sorted({float(r['lr']) for r in trials}),
        seeds=sorted(by_seed),
        seeds_reached=sorted(s for s, t in best_lr.items() if t is not None),
        reached=len(won) == len(by_seed),
        steps_to_target=summarize(t['steps_to_target'] for t in won),
        examples_to_target=summarize(_examples(t) for t in won),
        wall_to_target_s=summarize(t.get('wall_to_target_s') for t in won),
        best_lr=summarize(t['lr'] for t in won),
        best_lr_at_edge=at_edge,
        final_metric=summarize(t['final_metric'] for t in best_final.values() if t is not None),
        final_train_loss=summarize(t.get('final_train_loss') for t in chosen.values() if t),
        sharpness=summarize(_last(t.get('sharpness')) for t in chosen.values() if t),
        noise_scale_end=summarize(_last(t.get('noise_scale')) for t in chosen.values() if t),
        chosen_trials={s: str(t['trial_id']) for s, t in sorted(chosen.items()) if t is not None},
        step_budget=max(steps_run) if steps_run else None,
        not_reached_trials=sorted(str(r['trial_id']) for r in trials if not _reached(r)),
    ))
  return rows


def fit_steps_examples(points: Iterable[Sequence[float]]) -> dict:
  """Fits (S/S_min - 1)(E/E_min - 1) = 1 to (steps, examples) points of one variant.

  With B = E/S each point's batch size, the curve is S = S_min + E_min / B (McCandlish et al.
  2018, eq. 2.11 solved for S), which is linear in (S_min, E_min). We minimize the squared
  relative residuals sum_i ((S_min + E_min/B_i - S_i) / S_i)^2 subject to S_min, E_min >= 0:
  steps span orders of magnitude across batch sizes, and relative residuals (log-space least
  squares to first order) keep the small-batch points from outweighing the plateau. The
  two-variable nonnegative problem is solved exactly: the unconstrained optimum if it is
  nonnegative, else the better of the two one-variable boundary solutions.

  Args:
    points: (steps, examples) pairs, both positive, from at least two distinct batch sizes.
  Returns:
    dict(S_min, E_min, B_crit, n_points, rel_rms): B_crit = E_min / S_min (inf when S_min is 0:
    no plateau seen); rel_rms is the root mean square relative residual of the steps.
  Raises:
    ValueError: a nonpositive or non-finite point, or fewer than two distinct batch sizes.
  """
  pts = np.array([[float(s), float(e)] for s, e in points], dtype=np.float64).reshape(-1, 2)
  if not np.all(np.isfinite(pts)) or np.any(pts <= 0):
    raise ValueError(f'steps and examples must be positive and finite, got {pts.tolist()}')
  steps, batch = pts[:, 0], pts[:, 1] / pts[:, 0]
  if np.unique(np.round(batch, 9)).size < 2:
    raise ValueError('the fit needs points from at least two distinct batch sizes')
  # Weighted design: row i is [1, 1/B_i] / S_i, target 1. Columns scaled to unit norm so that
  # lstsq sees a well-conditioned matrix whatever the batch range.
  a_Nx2 = np.stack([1.0 / steps, 1.0 / (batch * steps)], axis=1)
  scale_2 = np.linalg.norm(a_Nx2, axis=0)
  u_Nx2 = a_Nx2 / scale_2
  ones_N = np.ones_like(steps)

  def cost(x_2):
    return float(np.sum((u_Nx2 @ x_2 - ones_N) ** 2))

  candidates = []
  x_2 = np.linalg.lstsq(u_Nx2, ones_N, rcond=None)[0]
  if np.all(x_2 >= 0):
    candidates.append(x_2)
  for j in range(2):  # boundaries: the other variable held at 0
    x_2 = np.zeros(2)
    x_2[j] = max(0.0, float(u_Nx2[:, j] @ ones_N) / float(u_Nx2[:, j] @ u_Nx2[:, j]))
    candidates.append(x_2)
  s_min, e_min = min(candidates, key=cost) / scale_2
  b_crit = e_min / s_min if s_min > 0 else math.inf
  rel = (s_min + e_min / batch - steps) / steps
  return dict(S_min=float(s_min), E_min=float(e_min), B_crit=float(b_crit),
              n_points=int(steps.size), rel_rms=float(np.sqrt(np.mean(rel**2))))


def fit_variant(rows: Sequence[dict]) -> tuple[dict | None, str]:
  """The fit over a variant's reached points, or None and why not."""
  pts = [(r['steps_to_target']['mean'], r['examples_to_target']['mean'])
         for r in rows if r['reached'] and r['examples_to_target'] is not None]
  if len({round(e / s, 9) for s, e in pts}) < 2:
    return None, f'needs two batch sizes that reached the target, has {len(pts)}'
  try:
    return fit_steps_examples(pts), ''
  except ValueError as e:
    return None, str(e)


def _min_max(values: Iterable[Any]) -> tuple[float, float] | None:
  v = [x for x in map(measured, values) if x is not None]
  return (min(v), max(v)) if v else None


def fixed_epochs(results: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One row per (variant, batch_size) of a fixed-epoch study, sorted by variant then batch.

  Each trial is one (variant, batch, seed) with one lr, so nothing is chosen: every field is
  summarize() over the seeds (mean, and the sample std with 3+ seeds), plus the min and max.
  A diverged trial counts with what it measured before it diverged (usually nothing: its final
  metric is NaN and drops out), and n_diverged says how many there were.

  Each row holds variant, batch_size, data, target (the metric's name), seeds, n_trials,
  n_diverged, lrs (the peak lrs used), final_metric / best_metric / final_eval_loss /
  best_eval_loss / final_train_loss / epochs_run / steps_run: summarize() dicts or None, and
  final_metric_range, final_eval_loss_range: (min, max) over seeds or None.
  Raises ValueError on an empty list or a result lacking the required fields.
  """
  _check(results)
  groups = collections.defaultdict(list)
  for r in results:
    groups[(str(r['variant']), int(r['batch_size']))].append(r)
  rows = []
  for (variant, batch), trials in sorted(groups.items()):
    trials = sorted(trials, key=lambda r: r['seed'])
    def field(name, trials=trials):
      return summarize(r.get(name) for r in trials)
    rows.append(dict(
        variant=variant,
        batch_size=batch,
        data=sorted({str(r.get('data')) for r in trials if r.get('data') is not None}),
        target=trials[0].get('target'),
        seeds=[r['seed'] for r in trials],
        n_trials=len(trials),
        n_diverged=sum(bool(r.get('diverged')) for r in trials),
        lrs=sorted({float(r['lr']) for r in trials}),
        final_metric=field('final_metric'),
        final_metric_range=_min_max(r.get('final_metric') for r in trials),
        best_metric=field('best_metric'),
        final_eval_loss=field('final_eval_loss'),
        final_eval_loss_range=_min_max(r.get('final_eval_loss') for r in trials),
        best_eval_loss=field('best_eval_loss'),
        final_train_loss=field('final_train_loss'),
        epochs_run=field('epochs_run'),
        steps_run=field('steps_run'),
        # Steps and examples to the target (if the study set one) over the seeds that reached it.
        n_reached=sum(bool(r.get('reached')) for r in trials),
        steps_to_target=field('steps_to_target'),
        examples_to_target=field('examples_to_target'),
        # Every metric of the last evaluation, by name (e.g. a face run's TAR@FAR).
        final_metrics={name: (summarize((r.get('final_metrics') or {}).get(name)
                                        for r in trials),
                              _min_max((r.get('final_metrics') or {}).get(name)
                                       for r in trials))
                       for name in sorted({k for r in trials
                                           for k in (r.get('final_metrics') or {})})},
    ))
  return rows


def by_variant(rows: Sequence[dict]) -> dict[str, list[dict]]:
  """The rows of steps_to_target() or fixed_epochs() grouped by variant, in their order."""
  out = {}
  for r in rows:
    out.setdefault(r['variant'], []).append(r)
  return out
