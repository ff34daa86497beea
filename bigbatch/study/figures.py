"""The figure files of the study reports, drawn from `bigbatch.study.aggregate`'s rows for the
renderers (render_steps.py, render_epochs.py).

Each figure function writes one PNG with matplotlib's Agg canvas (no pyplot, no display) and
returns '' or, when its data are missing, why. Its arguments (by_variant, fits, path) and the
split of work with aggregate.py are in docs/design.md, "Trials, results and reports".
"""
from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np

_DPI = 110
# With more variants than this, the noise-scale figure shows the first variant only.
_MAX_NOISE_PANELS = 6


def _save(fig, path: str) -> None:
  """PNG to a local path or an object-store URL (etils.epath), replaced whole;
  workdir.StorageError when it cannot be written."""
  from bigbatch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  png = io.BytesIO()
  fig.savefig(png, format='png')
  workdir_lib.write_text(path, png.getvalue())


def prepare(workdir: str, stems: Sequence[str]) -> dict[str, str]:
  """Creates workdir/figures and removes the PNGs named `stems` there (a figure not drawn this
  time leaves no stale file); returns {stem: the PNG's path}."""
  from bigbatch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  fig_dir = os.path.join(workdir, 'figures')
  with workdir_lib.storage(fig_dir):
    epath.Path(fig_dir).mkdir(parents=True, exist_ok=True)
  paths = {stem: os.path.join(fig_dir, f'{stem}.png') for stem in stems}
  for p in paths.values():
    if epath.Path(p).exists():
      epath.Path(p).unlink()
  return paths


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


def steps_to_target(by_variant, path, *, target: str) -> str:
  """Steps to target vs batch size per variant; `target` names it in the title."""
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
         title=f'Steps to {target}\n({_spread_note(all_rows)})')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


def best_lr(by_variant, path) -> str:
  """Best lr vs batch size per variant, with the linear and square-root rules beside it."""
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


def final_accuracy(by_variant, path, *, metric: str,
                   target_line: tuple[float, str] | None) -> str:
  """Final `metric` vs batch size per variant; target_line = (value, legend label) or None."""
  all_rows = [r for rows in by_variant.values() for r in rows]
  if not any(r['final_metric'] is not None for r in all_rows):
    return 'no trial recorded a final metric.'
  fig, (ax,) = _new_figure()
  for (variant, rows), color in zip(by_variant.items(), _colors(len(by_variant))):
    _plot_summary(ax, rows, 'final_metric', color=color, label=variant, log_y=False)
  if target_line is not None:
    ax.axhline(target_line[0], color='gray', ls='--', lw=1, label=target_line[1])
  _pad_degenerate(ax)
  ax.set(xscale='log', xlabel='batch size (examples)', ylabel=f'final {metric}',
         title=f'Final {metric}, best lr per seed\n({_spread_note(all_rows)})')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


def steps_vs_examples(by_variant, fits, path) -> str:
  """The measured (steps, examples) points per variant and its fit {variant: (fit or None,
  why)}."""
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


def noise_scale(curves, fits, path) -> str:
  """One panel per variant with a measured noise scale; the first such variant alone if many.

  curves: {variant: [(batch_size, seed, [(step, B_simple), ...]), ...]}, variants with no
  measured curve left out.
  """
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


def sharpness(by_variant, path) -> str:
  """Sharpness at the end of training vs batch size per variant."""
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


def metric_vs_batch(by_variant, field: str, path, *, ylabel: str, title: str,
                    scale: float = 1.0, log_y: bool = False) -> str:
  """rows[field] (a summarize() dict) vs batch size, one line per variant with seed error bars,
  values multiplied by `scale` (100: percent). The variants' points are nudged apart along the
  log batch axis so that their error bars do not hide each other."""
  all_rows = [r for rows in by_variant.values() for r in rows]
  if not any(r[field] is not None for r in all_rows):
    return f'no trial recorded {field}.'
  fig, (ax,) = _new_figure()
  n = len(by_variant)
  for i, ((variant, rows), color) in enumerate(zip(by_variant.items(), _colors(n))):
    pts = [r for r in rows if r[field] is not None]
    if not pts:
      continue
    nudge = 2 ** (0.06 * (i - (n - 1) / 2))
    x = np.array([r['batch_size'] for r in pts], dtype=np.float64) * nudge
    s = [{k: (v * scale if isinstance(v, float) else v) for k, v in r[field].items()}
         for r in pts]
    ax.errorbar(x, [p['mean'] for p in s], yerr=_yerr(s, False), color=color, marker='o',
                capsize=3, label=variant)
  _pad_degenerate(ax)
  batches = sorted({r['batch_size'] for r in all_rows})
  ax.set_xscale('log', base=2)
  if log_y:
    ax.set_yscale('log', base=2)
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.set(xlabel='batch size (examples)', ylabel=ylabel,
         title=f'{title}\n(mean over seeds; {_spread_note_fixed(all_rows, field)})')
  ax.legend(fontsize='small')
  _save(fig, path)
  return ''


def _spread_note_fixed(rows, field: str) -> str:
  kinds = sorted({r[field]['kind'] for r in rows if r[field] is not None})
  names = {'std': '±1 sample std (≥3 seeds)', 'min-max': 'min–max (2 seeds)'}
  kinds = [names[k] for k in kinds if k in names]
  return 'error bars: ' + ('; '.join(kinds) if kinds else 'none (1 seed)')
