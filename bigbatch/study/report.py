"""The report of a batch-size study: aggregation, the steps/examples fit, tables and report.md.

Input is one result dict per trial (a line of results.jsonl), with the fields

  trial_id, variant, data, batch_size, lr, lr_index, seed, target {metric, value, mode},
  reached, steps_to_target, examples_to_target, wall_to_target_s, best_metric, final_metric,
  final_train_loss, steps_run, wall_s, eval_curve [[step, value]], noise_scale [[step, B_simple]],
  sharpness [[step, top eigenvalue]], diverged.

Only trial_id, variant, batch_size, lr and seed are required; any other field may be missing,
None or non-finite (a diverged trial's NaN, or the string 'nan' that metrics.jsonl writes), and
is then treated as not measured.

Aggregation follows Shallue et al. 2018. For each (variant, batch size, seed), steps-to-target is
the minimum over the learning-rate trials that reached the target; that trial is the seed's
"best-lr trial" and its lr the seed's best lr. Over seeds we report the mean and a spread: the
sample standard deviation (ddof=1) with 3 or more seeds, the min and max with 2 seeds (a std of
two numbers says little), nothing with one. A (variant, batch) point where some seed reached the
target with no lr is "not reached": the table says so, the plots mark it apart, nothing is dropped.
Final accuracy is the best final_metric over the lr trials of each seed, then mean/spread over
seeds, whether or not the target was reached.
"""
from __future__ import annotations

import collections
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from etils import epath
import numpy as np

from bigbatch import workdir as workdir_lib
from bigbatch.study import figures

# (file stem, title) of each figure, in the order of the report. A figure whose data are missing
# is not drawn: report.md keeps its heading with a line saying why, and no stale PNG is left.
FIGURES = (
    ('steps_to_target', 'Steps to target vs batch size'),
    ('best_lr', 'Best learning rate vs batch size'),
    ('final_accuracy', 'Final accuracy vs batch size'),
    ('steps_vs_examples', 'Steps vs examples to target, with the fitted trade-off'),
    ('noise_scale', 'Gradient noise scale during training'),
    ('sharpness', 'Sharpness at the end of training vs batch size'),
)
NOT_DRAWN = 'Figure not drawn:'  # the start of the line that replaces a missing figure
_REQUIRED = ('trial_id', 'variant', 'batch_size', 'lr', 'seed')


def _num(x) -> float | None:
  """A finite float, or None for None, NaN, inf, 'nan' strings and other non-numbers."""
  if isinstance(x, bool) or x is None:
    return None
  try:
    x = float(x)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def _series(pairs) -> list[tuple[float, float]]:
  """[[step, value], ...] with unmeasured entries dropped."""
  out = []
  for pair in pairs or ():
    if len(pair) != 2:
      continue
    step, value = _num(pair[0]), _num(pair[1])
    if step is not None and value is not None:
      out.append((step, value))
  return out


def _last(pairs) -> float | None:
  series = _series(pairs)
  return series[-1][1] if series else None


def summarize(values: Iterable[Any]) -> dict | None:
  """Mean and spread over seeds of the finite values; None when there are none.

  Returns {'n', 'mean', 'std', 'lo', 'hi', 'kind'} where kind is
    'single'  (n == 1): lo == hi == mean, std None;
    'min-max' (n == 2): lo, hi = min, max, std None;
    'std'     (n >= 3): std is the sample std (ddof=1), lo, hi = mean -/+ std.
  lo and hi are what error bars draw.
  """
  v = np.array([x for x in map(_num, values) if x is not None], dtype=np.float64)
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
  return bool(r.get('reached')) and _num(r.get('steps_to_target')) is not None


def _examples(r: Mapping[str, Any]) -> float | None:
  e = _num(r.get('examples_to_target'))
  if e is None and _reached(r):
    e = _num(r['steps_to_target']) * float(r['batch_size'])
  return e


def _best_lr_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The trial with fewest steps to target; ties go to the higher best_metric, then lower lr."""
  reached = [r for r in trials if _reached(r)]
  if not reached:
    return None
  def key(r):
    best = _num(r.get('best_metric'))
    mode = (r.get('target') or {}).get('mode', 'max')
    best = -math.inf if best is None else (best if mode == 'max' else -best)
    return (_num(r['steps_to_target']), -best, float(r['lr']))
  return min(reached, key=key)


def _best_final_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The trial with the best final_metric (by the target's mode); None if none measured it."""
  measured = [r for r in trials if _num(r.get('final_metric')) is not None]
  if not measured:
    return None
  mode = (measured[0].get('target') or {}).get('mode', 'max')
  pick = max if mode == 'max' else min
  return pick(measured, key=lambda r: _num(r['final_metric']))


def _at_edge(best: Mapping[str, Any], trials: Sequence[Mapping[str, Any]]) -> bool:
  lrs = [float(r['lr']) for r in trials]
  return float(best['lr']) in (min(lrs), max(lrs))


def aggregate(results: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One row per (variant, batch_size), sorted by variant then batch size.

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
    steps_run = [_num(r.get('steps_run')) for r in trials]
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


def _fit_variant(rows: Sequence[dict]) -> tuple[dict | None, str]:
  """The fit over a variant's reached points, or None and why not."""
  pts = [(r['steps_to_target']['mean'], r['examples_to_target']['mean'])
         for r in rows if r['reached'] and r['examples_to_target'] is not None]
  if len({round(e / s, 9) for s, e in pts}) < 2:
    return None, f'needs two batch sizes that reached the target, has {len(pts)}'
  try:
    return fit_steps_examples(pts), ''
  except ValueError as e:
    return None, str(e)


# ---------------------------------------------------------------------------------------------
# Formatting.


def _fmt(x: float | None, kind: str = 'g') -> str:
  if x is None:
    return '—'
  if math.isinf(x):
    return '∞'
  if kind == 'int':
    return f'{x:,.0f}' if abs(x) < 1e7 else f'{x:.3g}'
  if kind == 'wall':
    return f'{x:.1f}'
  return f'{x:.3g}'


def _fmt_summary(s: dict | None, kind: str = 'g') -> str:
  if s is None:
    return '—'
  if s['kind'] == 'single':
    return _fmt(s['mean'], kind)
  if s['kind'] == 'min-max':
    return f'{_fmt(s["mean"], kind)} [{_fmt(s["lo"], kind)}, {_fmt(s["hi"], kind)}]'
  return f'{_fmt(s["mean"], kind)} ± {_fmt(s["std"], kind)}'


def _cell(text: str) -> str:
  return str(text).replace('|', '\\|').replace('\n', ' ')


def _metric_label(target: Mapping[str, Any] | None) -> str:
  metric = (target or {}).get('metric') or 'final metric'
  if metric.endswith('top1'):
    return 'top-1 accuracy'
  if metric.endswith('loss'):
    return f'{metric} (nats)'
  return metric


def _target_text(target: Mapping[str, Any] | None) -> str:
  if not target:
    return 'not recorded'
  op = '≥' if target.get('mode', 'max') == 'max' else '≤'
  return f'{target.get("metric")} {op} {target.get("value")}'


def _variant_table(rows: Sequence[dict]) -> list[str]:
  metric = _metric_label(rows[0]['target'])
  head = ['batch', 'data', 'trials (diverged)', 'reached/seeds', 'steps to target',
          'examples to target', 'wall to target (s)', 'best lr', f'final {metric}',
          'final train loss', 'sharpness (end)', 'noise scale (end)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    steps = _fmt_summary(r['steps_to_target'], 'int')
    if not r['reached']:
      steps = '**not reached**' + (f' (reached seeds: {steps})' if r['seeds_reached'] else '')
    best_lr = _fmt_summary(r['best_lr'])
    if r['best_lr_at_edge']:
      best_lr += ' (grid edge)'
    cells = [
        str(r['batch_size']), '+'.join(r['data']) or '—', f'{r["n_trials"]} ({r["n_diverged"]})',
        f'{len(r["seeds_reached"])}/{len(r["seeds"])}', steps,
        _fmt_summary(r['examples_to_target'], 'int'), _fmt_summary(r['wall_to_target_s'], 'wall'),
        best_lr, _fmt_summary(r['final_metric']), _fmt_summary(r['final_train_loss']),
        _fmt_summary(r['sharpness']), _fmt_summary(r['noise_scale_end'])]
    lines.append('| ' + ' | '.join(_cell(c) for c in cells) + ' |')
  return lines


def _noise_curves(by_variant, trials_by_id) -> dict[str, list]:
  """{variant: [(batch_size, seed, [(step, B_simple), ...]), ...]}: per batch size, the chosen
  trial of the first seed with a measured noise scale; variants without one are left out."""
  curves = {}
  for variant in by_variant:
    for r in by_variant[variant]:
      for seed in sorted(r['chosen_trials']):  # the first seed with a measured curve
        series = _series(trials_by_id[r['chosen_trials'][seed]].get('noise_scale'))
        if series:
          curves.setdefault(variant, []).append((r['batch_size'], seed, series))
          break
  return curves


def _figures_section(figures, why_not: dict) -> list[str]:
  """The report's figure links, or why a figure was not drawn."""
  md = ['## Figures', '']
  for stem, fig_title in figures:
    md += [f'### {fig_title}', '']
    if why_not[stem]:
      md += [f'_{NOT_DRAWN} {why_not[stem]}_', '']
    else:
      md += [f'![{fig_title}](figures/{stem}.png)', '']
  return md


def write_report(results: Sequence[Mapping[str, Any]], workdir: str, *, title: str,
                 notes: str = '') -> str:
  """Writes workdir/report.md and the PNG figures under workdir/figures/; returns report.md's path.

  report.md holds the title, the notes, the target, a table per variant (aggregate()'s rows),
  the steps/examples fit per variant, the six FIGURES embedded as ![title](figures/<stem>.png),
  and the trials that did not reach the target. A figure whose data are missing is not drawn:
  its heading stays, followed by a line starting with NOT_DRAWN that says why, and any PNG of
  that name from an earlier report is removed so the directory matches the report.
  """
  rows = aggregate(results)
  trials_by_id = {str(r['trial_id']): r for r in results}
  by_variant = collections.OrderedDict()
  for r in rows:
    by_variant.setdefault(r['variant'], []).append(r)
  fits = {v: _fit_variant(vrows) for v, vrows in by_variant.items()}

  fig_dir = os.path.join(workdir, 'figures')
  with workdir_lib.storage(fig_dir):
    epath.Path(fig_dir).mkdir(parents=True, exist_ok=True)
  paths = {stem: os.path.join(fig_dir, f'{stem}.png') for stem, _ in FIGURES}
  for p in paths.values():
    if epath.Path(p).exists():
      epath.Path(p).unlink()
  target = rows[0]['target'] or {}
  target_value = _num(target.get('value'))
  why_not = {
      'steps_to_target': figures.steps_to_target(
          by_variant, paths['steps_to_target'], target=_target_text(rows[0]['target'])),
      'best_lr': figures.best_lr(by_variant, paths['best_lr']),
      'final_accuracy': figures.final_accuracy(
          by_variant, paths['final_accuracy'], metric=_metric_label(target),
          target_line=None if target_value is None else (target_value,
                                                         f'target {target["value"]}')),
      'steps_vs_examples': figures.steps_vs_examples(by_variant, fits,
                                                     paths['steps_vs_examples']),
      'noise_scale': figures.noise_scale(_noise_curves(by_variant, trials_by_id), fits,
                                         paths['noise_scale']),
      'sharpness': figures.sharpness(by_variant, paths['sharpness']),
  }

  targets = {_target_text(r.get('target')) for r in results}
  md = [f'# {title}', '']
  if notes:
    md += [notes.strip(), '']
  md += [f'Target: {" / ".join(sorted(targets))} (first evaluation that reaches it). '
         f'{len(results)} trials, {len(by_variant)} variant(s).', '']
  if len(targets) > 1:
    md += ['**Warning:** the trials do not share one target; steps to target are not comparable '
           'across them.', '']
  if any('synthetic' in r['data'] for r in rows):
    md += ['**Note:** rows on `synthetic` data measure the code and the pipeline, not a model '
           'on real data.', '']
  md += [
      '## How the numbers are made', '',
      'Per (variant, batch size, seed): steps to target = the fewest steps over the learning-rate '
      'trials that reached the target (Shallue et al. 2018); that trial is the seed\'s best-lr '
      'trial, and its examples and wall time to target, its final train loss, its sharpness and '
      'its noise scale at the end are the ones reported. Final accuracy = the best final metric '
      'over the seed\'s lr trials. Over seeds: `mean ± std` (sample std) with 3 or more seeds, '
      '`mean [min, max]` with 2 seeds, the value alone with 1. A point where some seed reached '
      'the target with no lr is **not reached**; figures mark it apart. "grid edge": some '
      'seed\'s best lr is the smallest or largest it tried, so the lr grid may be too narrow.', '']
  for variant, vrows in by_variant.items():
    md += [f'## Variant `{variant}`', ''] + _variant_table(vrows) + ['']

  md += ['## Steps/examples trade-off', '',
         'Fit of (S/S_min − 1)(E/E_min − 1) = 1 (McCandlish et al. 2018) to the mean steps and '
         'examples of the reached points, as S = S_min + E_min/B by nonnegative least squares '
         'on relative residuals. B_crit = E_min/S_min.', '',
         '| variant | points | S_min (steps) | E_min (examples) | B_crit (examples) | rel. RMS '
         'residual |', '|---|---|---|---|---|---|']
  for variant, (fit, why) in fits.items():
    if fit is None:
      md.append(f'| {_cell(variant)} | — | not fitted: {_cell(why)} | | | |')
    else:
      md.append(f'| {_cell(variant)} | {fit["n_points"]} | {_fmt(fit["S_min"], "int")} | '
                f'{_fmt(fit["E_min"], "int")} | {_fmt(fit["B_crit"], "int")} | '
                f'{fit["rel_rms"]:.2%} |')
  md.append('')

  md += _figures_section(FIGURES, why_not)

  missed = [trials_by_id[t] for r in rows for t in r['not_reached_trials']]
  md += ['## Trials that did not reach the target', '']
  if not missed:
    md += ['None.', '']
  else:
    md += ['| trial | variant | batch | seed | lr | best metric | steps run | diverged |',
           '|---|---|---|---|---|---|---|---|']
    for t in missed:
      md.append('| ' + ' | '.join(_cell(c) for c in (
          t['trial_id'], t['variant'], t['batch_size'], t['seed'], _fmt(_num(t['lr'])),
          _fmt(_num(t.get('best_metric'))), _fmt(_num(t.get('steps_run')), 'int'),
          'yes' if t.get('diverged') else 'no')) + ' |')
    md.append('')

  path = os.path.join(workdir, 'report.md')
  workdir_lib.write_text(path, '\n'.join(md))  # whole; StorageError when it cannot be written
  return path


# ---------------------------------------------------------------------------------------------
# Fixed-epoch studies (study.kind = 'fixed_epochs'): the held-out metric after one epoch budget.

# (file stem, title) of the fixed-epoch report's figures, in its order.
FIXED_EPOCHS_FIGURES = (
    ('accuracy_vs_batch', 'Final held-out accuracy vs batch size at a fixed epoch budget'),
    ('eval_loss_vs_batch', 'Final held-out loss vs batch size at a fixed epoch budget'),
)


def _stem(metric: str) -> str:
  """A figure's file stem for a metric name: 'verify/synthetic/tar_at_far_1e-3' ->
  'final_verify_synthetic_tar_at_far_1e-3'."""
  return 'final_' + re.sub(r'[^A-Za-z0-9.-]+', '_', metric)


def _min_max(values: Iterable[Any]) -> tuple[float, float] | None:
  v = [x for x in map(_num, values) if x is not None]
  return (min(v), max(v)) if v else None


def aggregate_fixed(results: Sequence[Mapping[str, Any]]) -> list[dict]:
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


def _fmt_spread(s: dict | None, rng: tuple[float, float] | None, digits: int = 3) -> str:
  """'mean ± std [min, max]' (std with 3+ seeds; the range with 2+), as percentages when the
  values are accuracies (digits = percent decimals) or plain numbers (digits = None)."""
  if s is None:
    return '—'
  f = (lambda x: f'{100 * x:.1f}') if digits is None else (lambda x: f'{x:.{digits}g}')
  text = f(s['mean'])
  if s['std'] is not None:
    text += f' ± {f(s["std"])}'
  if s['n'] > 1 and rng is not None:
    text += f' [{f(rng[0])}, {f(rng[1])}]'
  return text


def write_fixed_epochs_report(results: Sequence[Mapping[str, Any]], workdir: str, *, title: str,
                              notes: str = '', extra_metrics: Sequence[str] = ()) -> str:
  """Writes workdir/report.md and FIXED_EPOCHS_FIGURES under workdir/figures/ for a fixed-epoch
  study; returns report.md's path.

  report.md holds the title, the notes, a batch x variant table of the final held-out metric
  (mean ± std [min, max] over seeds, in percent for an accuracy), the same for the held-out
  loss, a detailed table per variant (best metric, losses, epochs and steps run, lr, diverged
  trials) and the figures; a table (and figure) of each of `extra_metrics` (final value over
  seeds); with a target value, a table of steps and examples to it. As in write_report, a
  figure without data is replaced by a line starting with NOT_DRAWN and no stale PNG is left.
  """
  rows = aggregate_fixed(results)
  by_variant = collections.OrderedDict()
  for r in rows:
    by_variant.setdefault(r['variant'], []).append(r)
  batches = sorted({r['batch_size'] for r in rows})
  cell = {(r['variant'], r['batch_size']): r for r in rows}
  target = rows[0]['target'] or {}
  metric = target.get('metric') or 'final metric'
  label = _metric_label(target)
  percent = metric.endswith(('top1', 'top5', 'accuracy'))

  target_value = _num(target.get('value'))
  for r in rows:  # the extra metrics as fields metric_vs_batch can draw
    for name in extra_metrics:
      r[f'final:{name}'], r[f'final:{name}:range'] = r['final_metrics'].get(name, (None, None))
  extra_figures = tuple((_stem(name), f'Final {name} vs batch size at a fixed epoch budget')
                        for name in extra_metrics)
  if target_value is not None:
    extra_figures += (('steps_to_target', 'Steps to the target vs batch size'),)
  all_figures = FIXED_EPOCHS_FIGURES + extra_figures
  fig_dir = os.path.join(workdir, 'figures')
  with workdir_lib.storage(fig_dir):
    epath.Path(fig_dir).mkdir(parents=True, exist_ok=True)
  paths = {stem: os.path.join(fig_dir, f'{stem}.png') for stem, _ in all_figures}
  for p in paths.values():
    if epath.Path(p).exists():
      epath.Path(p).unlink()
  epochs = summarize(r.get('budget_epochs') for r in results)
  budget = f'{epochs["mean"]:g} epochs' if epochs else 'a fixed budget'
  why_not = {
      'accuracy_vs_batch': figures.metric_vs_batch(
          by_variant, 'final_metric', paths['accuracy_vs_batch'],
          ylabel=f'final held-out {label}' + (' (%)' if percent else ''),
          title=f'Final held-out {label} after {budget}', scale=100.0 if percent else 1.0),
      'eval_loss_vs_batch': figures.metric_vs_batch(
          by_variant, 'final_eval_loss', paths['eval_loss_vs_batch'],
          ylabel='final held-out loss (nats)', title=f'Final held-out loss after {budget}',
          scale=1.0),
  }
  for name in extra_metrics:
    why_not[_stem(name)] = figures.metric_vs_batch(
        by_variant, f'final:{name}', paths[_stem(name)], ylabel=f'final {name}',
        title=f'Final {name} after {budget}', scale=1.0)
  if target_value is not None:
    why_not['steps_to_target'] = figures.metric_vs_batch(
        by_variant, 'steps_to_target', paths['steps_to_target'],
        ylabel='steps to target (seeds that reached it)',
        title=f'Steps until {_target_text(target)}', scale=1.0, log_y=True)

  md = [f'# {title}', '']
  if notes:
    md += [notes.strip(), '']
  seeds = sorted({r['seed'] for r in results})
  goal = ('no target' if target_value is None else
          f'target {_target_text(target)} recorded, not stopped at')
  md += [f'Fixed budget: {budget}, {goal}, one lr per variant (no search). '
         f'{len(results)} trials, {len(by_variant)} variant(s), {len(batches)} batch size(s), '
         f'{len(seeds)} seed(s).', '']
  if any('synthetic' in r['data'] for r in rows):
    md += ['**Note:** rows on `synthetic` data are a model of a generated teacher task, not '
           'of real data.', '']
  unit = ' (%)' if percent else ''
  md += ['## How the numbers are made', '',
         'Each trial trains one (variant, batch size, seed) for the whole budget and is '
         'evaluated on the held-out split during training and at the end. "Final" is the last '
         'evaluation, "best" the best one. Over seeds: `mean ± std [min, max]` (sample std, '
         'ddof=1, with 3 or more seeds; the range with 2 or more); accuracies in percent. A '
         'diverged trial has no final metric: its point is the mean of the seeds that finished '
         'and the table says how many diverged.', '']
  tables = [(f'Final held-out {label}{unit}', 'final_metric', 'final_metric_range',
             None if percent else 3)]
  if any(r['final_eval_loss'] is not None for r in rows):  # a face run has no held-out loss
    tables.append(('Final held-out loss (nats)', 'final_eval_loss', 'final_eval_loss_range', 3))
  for heading, field, rng, digits in tables:
    md += [f'## {heading}', '', '| batch | ' + ' | '.join(f'`{_cell(v)}`' for v in by_variant)
           + ' |', '|---|' + '---|' * len(by_variant)]
    for b in batches:
      cells = []
      for v in by_variant:
        r = cell.get((v, b))
        text = _fmt_spread(r[field], r[rng], digits) if r else 'not run'
        if r and r['n_diverged']:
          text += f' ({r["n_diverged"]}/{r["n_trials"]} diverged)'
        cells.append(text)
      md.append(f'| {b} | ' + ' | '.join(_cell(c) for c in cells) + ' |')
    md.append('')
  for name in extra_metrics:
    md += [f'## Final {name}', '', '| batch | ' + ' | '.join(f'`{_cell(v)}`' for v in by_variant)
           + ' |', '|---|' + '---|' * len(by_variant)]
    for b in batches:
      md.append(f'| {b} | ' + ' | '.join(
          _cell(_fmt_spread(cell[(v, b)][f'final:{name}'], cell[(v, b)][f'final:{name}:range'], 3)
                if (v, b) in cell else 'not run') for v in by_variant) + ' |')
    md.append('')
  if target_value is not None:
    md += [f'## Steps to the target ({_target_text(target)})', '',
           'The first evaluation that meets the target (recorded, training went on to the '
           'budget): steps, mean over the seeds that reached it, and how many did.', '',
           '| batch | ' + ' | '.join(f'`{_cell(v)}`' for v in by_variant) + ' |',
           '|---|' + '---|' * len(by_variant)]
    for b in batches:
      cells = []
      for v in by_variant:
        r = cell.get((v, b))
        if r is None:
          cells.append('not run')
        elif not r['n_reached']:
          cells.append(f'not reached (0/{r["n_trials"]})')
        else:
          cells.append(f'{_fmt_summary(r["steps_to_target"], "int")} steps, '
                       f'{_fmt_summary(r["examples_to_target"], "int")} examples '
                       f'({r["n_reached"]}/{r["n_trials"]})')
      md.append(f'| {b} | ' + ' | '.join(_cell(c) for c in cells) + ' |')
    md.append('')

  def pct(summary):  # the per-variant tables show accuracies in percent too
    if summary is None or not percent:
      return summary
    return {k: v * 100 if k in ('mean', 'std', 'lo', 'hi') and v is not None else v
            for k, v in summary.items()}

  md += ['## Per variant', '']
  for variant, vrows in by_variant.items():
    md += [f'### `{variant}`', '',
           f'| batch | peak lr | epochs run | steps run | final {label}{unit} | best {label}{unit} '
           f'| final held-out loss | best held-out loss | final train loss | diverged |',
           '|---|---|---|---|---|---|---|---|---|---|']
    for r in vrows:
      md.append('| ' + ' | '.join(_cell(c) for c in (
          r['batch_size'], ', '.join(f'{lr:.3g}' for lr in r['lrs']),
          _fmt_summary(r['epochs_run']), _fmt_summary(r['steps_run'], 'int'),
          _fmt_summary(pct(r['final_metric'])), _fmt_summary(pct(r['best_metric'])),
          _fmt_summary(r['final_eval_loss']), _fmt_summary(r['best_eval_loss']),
          _fmt_summary(r['final_train_loss']), f'{r["n_diverged"]}/{r["n_trials"]}')) + ' |')
    md.append('')

  md += _figures_section(all_figures, why_not)
  path = os.path.join(workdir, 'report.md')
  workdir_lib.write_text(path, '\n'.join(md))  # whole; StorageError when it cannot be written
  return path
