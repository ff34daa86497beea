"""The report of a batch-size study: aggregation, the steps/examples fit, tables and figures.

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
from typing import Any, Iterable, Mapping, Sequence

from etils import epath
import numpy as np

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
_DPI = 110
# With more variants than this, the noise-scale figure shows the first variant only.
_MAX_NOISE_PANELS = 4


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


# ---------------------------------------------------------------------------------------------
# Figures. matplotlib's object API with the Agg canvas: no pyplot, no global backend switch,
# nothing needs a display.


def _save(fig, path: str) -> None:
  """PNG to a local path or an object-store URL (etils.epath)."""
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png')


def _new_figure(ncols: int = 1, nrows: int = 1):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4 * ncols, 4.6 * nrows), dpi=_DPI, layout='constrained')
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(ncols * nrows)]
  return fig, axes


def _colors(n: int):
  from matplotlib import colormaps
  cmap = colormaps['tab10'] if n <= 10 else colormaps['viridis']
  return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def _yerr(summaries: Sequence[dict], log: bool):
  """Asymmetric error bars [below, above]; on a log axis the lower end stays positive."""
  mean = np.array([s['mean'] for s in summaries])
  lo = np.array([s['lo'] for s in summaries])
  hi = np.array([s['hi'] for s in summaries])
  if log:
    lo = np.maximum(lo, mean * 1e-2)
  return np.stack([mean - lo, hi - mean])


def _pad_degenerate(ax):
  """Gives a one-point axis a range (a single batch size or lr), before its scale is set."""
  box = ax.dataLim
  for lo, hi, set_lim in ((box.x0, box.x1, ax.set_xlim), (box.y0, box.y1, ax.set_ylim)):
    if np.isfinite(lo) and np.isfinite(hi) and math.isclose(lo, hi, rel_tol=1e-9):
      set_lim(*((lo / 2, hi * 2) if lo > 0 else (lo - 1, hi + 1)))


def _wide(values) -> bool:
  """Whether positive values span a decade or more: a log axis then, else a linear one."""
  values = [v for v in values if v is not None]
  return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)


def _plot_summary(ax, rows, field, *, color, label, log_y):
  """Mean with seed error bars of rows[field] vs batch size; returns the rows plotted."""
  pts = [r for r in rows if r[field] is not None]
  if not pts:
    return []
  x = [r['batch_size'] for r in pts]
  ax.errorbar(x, [r[field]['mean'] for r in pts], yerr=_yerr([r[field] for r in pts], log_y),
              color=color, marker='o', capsize=3, label=label)
  return pts


def _spread_note(rows) -> str:
  kinds = sorted({r[f]['kind'] for r in rows for f in ('steps_to_target', 'final_metric')
                  if r[f] is not None})
  names = {'std': '±1 sample std (≥3 seeds)', 'min-max': 'min–max (2 seeds)'}
  kinds = [names[k] for k in kinds if k in names]
  return 'error bars: ' + ('; '.join(kinds) if kinds else 'none (1 seed)')


def _fig_steps(by_variant, path) -> str:
  reached = {v: [r for r in rows if r['reached']] for v, rows in by_variant.items()}
  if not any(reached.values()):
    return 'no (variant, batch size) point reached the target for every seed.'
  fig, (ax,) = _new_figure()
  all_rows = [r for rows in by_variant.values() for r in rows]
  for (variant, rows), color in zip(by_variant.items(), _colors(len(by_variant))):
    pts = _plot_summary(ax, reached[variant], 'steps_to_target', color=color, label=variant,
                        log_y=True)
    if pts:
      b0, s0 = pts[0]['batch_size'], pts[0]['steps_to_target']['mean']
      b_N = np.array([b0, max(r['batch_size'] for r in rows)], dtype=np.float64)
      ax.plot(b_N, s0 * b0 / b_N, ls=':', color=color, alpha=0.8)
    missed = [r for r in rows if not r['reached'] and r['step_budget'] is not None]
    if missed:
      ax.scatter([r['batch_size'] for r in missed], [r['step_budget'] for r in missed],
                 marker='x', s=60, color=color, zorder=3)
  ax.plot([], [], ls=':', color='gray', label='perfect scaling (slope −1)')
  if any(not r['reached'] for r in all_rows):
    ax.scatter([], [], marker='x', color='gray', label='not reached (× at the step budget)')
  _pad_degenerate(ax)
  ax.set(xscale='log', yscale='log', xlabel='batch size (examples)', ylabel='steps to target',
         title=f'Steps to {_target_text(all_rows[0]["target"])}\n({_spread_note(all_rows)})')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


def _fig_best_lr(by_variant, path) -> str:
  if not any(r['best_lr'] is not None for rows in by_variant.values() for r in rows):
    return 'no trial reached the target, so no learning rate is best.'
  fig, (ax,) = _new_figure()
  for (variant, rows), color in zip(by_variant.items(), _colors(len(by_variant))):
    pts = _plot_summary(ax, [r for r in rows if r['reached']], 'best_lr', color=color,
                        label=variant, log_y=True)
    partial = [r for r in rows if not r['reached'] and r['best_lr'] is not None]
    if partial:  # some seeds reached: their best lr is real but not the whole point's
      ax.scatter([r['batch_size'] for r in partial], [r['best_lr']['mean'] for r in partial],
                 marker='o', facecolors='none', edgecolors=color, zorder=3)
    ref = pts or partial
    if ref:
      b0, lr0 = ref[0]['batch_size'], ref[0]['best_lr']['mean']
      b_N = np.geomspace(b0, max(r['batch_size'] for r in rows), 32)
      ax.plot(b_N, lr0 * b_N / b0, ls='--', color=color, alpha=0.6)
      ax.plot(b_N, lr0 * np.sqrt(b_N / b0), ls=':', color=color, alpha=0.8)
  ax.plot([], [], ls='--', color='gray', label='linear rule (lr ∝ B)')
  ax.plot([], [], ls=':', color='gray', label='square-root rule (lr ∝ √B)')
  if any(not r['reached'] and r['best_lr'] for rows in by_variant.values() for r in rows):
    ax.scatter([], [], marker='o', facecolors='none', edgecolors='gray',
               label='not reached by every seed')
  _pad_degenerate(ax)
  ax.set(xscale='log', yscale='log', xlabel='batch size (examples)',
         ylabel='best learning rate (peak)', title='Learning rate with fewest steps to target')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


def _fig_final(by_variant, path) -> str:
  all_rows = [r for rows in by_variant.values() for r in rows]
  if not any(r['final_metric'] is not None for r in all_rows):
    return 'no trial recorded a final metric.'
  fig, (ax,) = _new_figure()
  for (variant, rows), color in zip(by_variant.items(), _colors(len(by_variant))):
    _plot_summary(ax, rows, 'final_metric', color=color, label=variant, log_y=False)
  target = all_rows[0]['target'] or {}
  if _num(target.get('value')) is not None:
    ax.axhline(float(target['value']), color='gray', ls='--', lw=1,
               label=f'target {target["value"]}')
  metric = _metric_label(target)
  _pad_degenerate(ax)
  ax.set(xscale='log', xlabel='batch size (examples)', ylabel=f'final {metric}',
         title=f'Final {metric}, best lr per seed\n({_spread_note(all_rows)})')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


def _fig_steps_examples(by_variant, fits, path) -> str:
  if not any(fit for fit, _ in fits.values()):
    return ('no variant has two batch sizes that reached the target, so the steps/examples '
            'trade-off cannot be fitted.')
  fig, (ax,) = _new_figure()
  for (variant, rows), color in zip(by_variant.items(), _colors(len(by_variant))):
    pts = [r for r in rows if r['reached'] and r['examples_to_target'] is not None]
    if not pts:
      continue
    ax.errorbar([r['steps_to_target']['mean'] for r in pts],
                [r['examples_to_target']['mean'] for r in pts],
                xerr=_yerr([r['steps_to_target'] for r in pts], True),
                yerr=_yerr([r['examples_to_target'] for r in pts], True),
                ls='none', marker='o', color=color, capsize=3, label=f'{variant} (measured)')
    fit = fits[variant][0]
    if fit is None:
      continue
    b = np.array([r['batch_size'] for r in pts], dtype=np.float64)
    b_N = np.geomspace(b.min() / 4, b.max() * 4, 128)
    s_N = fit['S_min'] + fit['E_min'] / b_N
    ax.plot(s_N, s_N * b_N, color=color, alpha=0.8,
            label=f'{variant} fit: S_min={fit["S_min"]:.3g}, E_min={fit["E_min"]:.3g}')
    if math.isfinite(fit['B_crit']) and fit['B_crit'] > 0:
      ax.plot([2 * fit['S_min']], [2 * fit['E_min']], marker='*', ms=14, color=color, ls='none',
              label=f'{variant} B_crit = E_min/S_min = {fit["B_crit"]:.3g}')
  _pad_degenerate(ax)
  ax.set(xscale='log', yscale='log', xlabel='steps to target (steps)',
         ylabel='examples to target (examples)',
         title='Steps vs examples: (S/S_min − 1)(E/E_min − 1) = 1\n'
               '(★ at S = 2·S_min, E = 2·E_min, i.e. B = B_crit)')
  ax.legend(fontsize='x-small')
  _save(fig, path)
  return ''


def _fig_noise(by_variant, fits, trials_by_id, path) -> str:
  """One panel per variant with a measured noise scale; the first such variant alone if many."""
  curves = {}
  for variant in by_variant:
    for r in by_variant[variant]:
      for seed in sorted(r['chosen_trials']):  # the first seed with a measured curve
        series = _series(trials_by_id[r['chosen_trials'][seed]].get('noise_scale'))
        if series:
          curves.setdefault(variant, []).append((r['batch_size'], seed, series))
          break
  if not curves:
    return 'no trial recorded the gradient noise scale.'
  variants = list(curves)
  if len(variants) > _MAX_NOISE_PANELS:
    variants = variants[:1]
  fig, axes = _new_figure(min(2, len(variants)), nrows=-(-len(variants) // 2))
  for ax in axes[len(variants):]:
    ax.set_visible(False)
  for ax, variant in zip(axes, variants):
    values_all = []
    for (batch, seed, series), color in zip(curves[variant], _colors(len(curves[variant]))):
      steps, values = zip(*series)
      values_all += values
      ax.plot(steps, values, color=color, label=f'B = {batch} (seed {seed})')
    fit = fits[variant][0]
    if fit and math.isfinite(fit['B_crit']):
      ax.axhline(fit['B_crit'], color='black', ls='--', lw=1,
                 label=f'B_crit from the fit = {fit["B_crit"]:.3g}')
    _pad_degenerate(ax)
    finite = np.asarray([v for v in values_all if math.isfinite(v)])
    if len(finite) > 20 and not _wide(values_all):
      # Single-step estimates at small batches spike (the estimator divides by a small
      # |G|^2): show the 2nd-98th percentile band; the table has the values at the end.
      lo, hi = np.percentile(finite, [2, 98])
      pad = 0.15 * (hi - lo)
      ax.set_ylim(min(0.0, lo - pad), hi + pad)
    ax.set(yscale='log' if _wide(values_all) else 'linear', xlabel='training step (steps)',
           ylabel='B_simple (examples)', title=f'{variant}: noise scale, best-lr trial')
    ax.legend(fontsize='x-small')
  _save(fig, path)
  return ''


def _fig_sharpness(by_variant, path) -> str:
  all_rows = [r for rows in by_variant.values() for r in rows]
  if not any(r['sharpness'] is not None for r in all_rows):
    return 'no trial measured sharpness (the top Hessian eigenvalue).'
  fig, (ax,) = _new_figure()
  log_y = _wide([v for r in all_rows if r['sharpness'] for v in (r['sharpness']['lo'],
                                                                    r['sharpness']['hi'])])
  for (variant, rows), color in zip(by_variant.items(), _colors(len(by_variant))):
    _plot_summary(ax, rows, 'sharpness', color=color, label=variant, log_y=log_y)
  _pad_degenerate(ax)
  ax.set(xscale='log', yscale='log' if log_y else 'linear', xlabel='batch size (examples)',
         ylabel='top Hessian eigenvalue of the training loss',
         title='Sharpness at the end of training, best-lr trial per seed')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


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
  epath.Path(fig_dir).mkdir(parents=True, exist_ok=True)
  paths = {stem: os.path.join(fig_dir, f'{stem}.png') for stem, _ in FIGURES}
  for p in paths.values():
    if epath.Path(p).exists():
      epath.Path(p).unlink()
  why_not = {
      'steps_to_target': _fig_steps(by_variant, paths['steps_to_target']),
      'best_lr': _fig_best_lr(by_variant, paths['best_lr']),
      'final_accuracy': _fig_final(by_variant, paths['final_accuracy']),
      'steps_vs_examples': _fig_steps_examples(by_variant, fits, paths['steps_vs_examples']),
      'noise_scale': _fig_noise(by_variant, fits, trials_by_id, paths['noise_scale']),
      'sharpness': _fig_sharpness(by_variant, paths['sharpness']),
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

  md += ['## Figures', '']
  for stem, fig_title in FIGURES:
    md += [f'### {fig_title}', '']
    if why_not[stem]:
      md += [f'_{NOT_DRAWN} {why_not[stem]}_', '']
    else:
      md += [f'![{fig_title}](figures/{stem}.png)', '']

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
  epath.Path(path).write_text('\n'.join(md))
  return path
