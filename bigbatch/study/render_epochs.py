"""The report of a fixed-epochs study (study.kind='fixed_epochs', the face study's too): report.md
and its figures from the trial results, through `aggregate.fixed_epochs`: the held-out metric and
loss after one epoch budget, across batch sizes."""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

from bigbatch.study import aggregate
from bigbatch.study import figures
from bigbatch.study import markdown

# (file stem, title) of the report's figures, in its order; extra metrics and a target add more.
FIGURES = (
    ('accuracy_vs_batch', 'Final held-out accuracy vs batch size at a fixed epoch budget'),
    ('eval_loss_vs_batch', 'Final held-out loss vs batch size at a fixed epoch budget'),
)

_HOW = (
    'Each trial trains one (variant, batch size, seed) for the whole budget and is evaluated on '
    'the held-out split during training and at the end. "Final" is the last evaluation, "best" '
    'the best one. Over seeds: `mean ± std [min, max]` (sample std, ddof=1, with 3 or more '
    'seeds; the range with 2 or more); accuracies in percent. A diverged trial has no final '
    'metric: its point is the mean of the seeds that finished and the table says how many '
    'diverged.')


def write(results: Sequence[Mapping[str, Any]], workdir: str, *, title: str, notes: str = '',
          extra_metrics: Sequence[str] = ()) -> str:
  """Writes workdir/report.md and its figures under workdir/figures/; returns report.md's path.

  report.md holds the title, the notes, a batch x variant table of the final held-out metric
  (mean ± std [min, max] over seeds, in percent for an accuracy), the same for the held-out
  loss, a table (and figure) of each of `extra_metrics` (final value over seeds), with a target
  value a table of steps and examples to it, a detailed table per variant (best metric, losses,
  epochs and steps run, lr, diverged trials) and the figures. As in render_steps, a figure
  without data is replaced by a line starting with markdown.NOT_DRAWN and no stale PNG is left.
  """
  rows = aggregate.fixed_epochs(results)
  by_variant = aggregate.by_variant(rows)
  batches = sorted({r['batch_size'] for r in rows})
  cells = {(r['variant'], r['batch_size']): r for r in rows}
  target = rows[0]['target'] or {}
  label = markdown.metric_label(target)
  percent = (target.get('metric') or 'final metric').endswith(('top1', 'top5', 'accuracy'))
  unit = ' (%)' if percent else ''
  target_value = aggregate.measured(target.get('value'))
  for r in rows:  # the extra metrics as fields metric_vs_batch can draw
    for name in extra_metrics:
      r[f'final:{name}'], r[f'final:{name}:range'] = r['final_metrics'].get(name, (None, None))
  epochs = aggregate.summarize(r.get('budget_epochs') for r in results)
  budget = f'{epochs["mean"]:g} epochs' if epochs else 'a fixed budget'
  all_figures = FIGURES + tuple(
      (_stem(name), f'Final {name} vs batch size at a fixed epoch budget')
      for name in extra_metrics)
  if target_value is not None:
    all_figures += (('steps_to_target', 'Steps to the target vs batch size'),)
  why_not = _draw(workdir, all_figures, by_variant, extra_metrics, target, label=label,
                  percent=percent, budget=budget)

  md = [f'# {title}', '']
  if notes:
    md += [notes.strip(), '']
  seeds = sorted({r['seed'] for r in results})
  goal = ('no target' if target_value is None else
          f'target {markdown.target_text(target)} recorded, not stopped at')
  md += [f'Fixed budget: {budget}, {goal}, one lr per variant (no search). '
         f'{len(results)} trials, {len(by_variant)} variant(s), {len(batches)} batch size(s), '
         f'{len(seeds)} seed(s).', '']
  if any('synthetic' in r['data'] for r in rows):
    md += ['**Note:** rows on `synthetic` data are a model of a generated teacher task, not '
           'of real data.', '']
  md += ['## How the numbers are made', '', _HOW, '']

  def table(heading: str, text: Callable[[str, int], str], intro: Sequence[str] = ()):
    return _batch_table(heading, by_variant, batches, text, intro)

  md += table(f'Final held-out {label}{unit}',
              _spread_or_not_run(cells, 'final_metric', None if percent else 3))
  if any(r['final_eval_loss'] is not None for r in rows):  # a face run has no held-out loss
    md += table('Final held-out loss (nats)', _spread_or_not_run(cells, 'final_eval_loss', 3))
  for name in extra_metrics:
    md += table(f'Final {name}', _extra_metric(cells, name))
  if target_value is not None:
    md += table(f'Steps to the target ({markdown.target_text(target)})',
                lambda v, b: _to_target(cells.get((v, b))),
                intro=['The first evaluation that meets the target (recorded, training went on '
                       'to the budget): steps, mean over the seeds that reached it, and how many '
                       'did.', ''])
  md += _variant_tables(by_variant, label, unit, percent)
  md += markdown.figures_section(all_figures, why_not)
  return markdown.write(workdir, md)


def _stem(metric: str) -> str:
  """A figure's file stem for a metric name: 'verify/synthetic/tar_at_far_1e-3' ->
  'final_verify_synthetic_tar_at_far_1e-3'."""
  return 'final_' + re.sub(r'[^A-Za-z0-9.-]+', '_', metric)


def _draw(workdir: str, all_figures, by_variant, extra_metrics: Sequence[str], target, *,
          label: str, percent: bool, budget: str) -> dict[str, str]:
  """Draws `all_figures`; returns {stem: '' or why it was not drawn}."""
  paths = figures.prepare(workdir, [stem for stem, _ in all_figures])
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
  if 'steps_to_target' in paths:
    why_not['steps_to_target'] = figures.metric_vs_batch(
        by_variant, 'steps_to_target', paths['steps_to_target'],
        ylabel='steps to target (seeds that reached it)',
        title=f'Steps until {markdown.target_text(target)}', scale=1.0, log_y=True)
  return why_not


def _spread(s: dict | None, rng: tuple[float, float] | None, digits: int | None = 3) -> str:
  """'mean ± std [min, max]' (std with 3+ seeds; the range with 2+), as percentages when the
  values are accuracies (digits None: one decimal of a percent) or plain numbers (digits:
  significant digits)."""
  if s is None:
    return '—'
  f = (lambda x: f'{100 * x:.1f}') if digits is None else (lambda x: f'{x:.{digits}g}')
  text = f(s['mean'])
  if s['std'] is not None:
    text += f' ± {f(s["std"])}'
  if s['n'] > 1 and rng is not None:
    text += f' [{f(rng[0])}, {f(rng[1])}]'
  return text


def _spread_or_not_run(cells: dict, field: str, digits: int | None) -> Callable[[str, int], str]:
  """The text of (variant, batch)'s `field` over seeds, with how many diverged."""
  def text(variant: str, batch: int) -> str:
    r = cells.get((variant, batch))
    if r is None:
      return 'not run'
    out = _spread(r[field], r[f'{field}_range'], digits)
    if r['n_diverged']:
      out += f' ({r["n_diverged"]}/{r["n_trials"]} diverged)'
    return out
  return text


def _extra_metric(cells: dict, name: str) -> Callable[[str, int], str]:
  """The text of (variant, batch)'s final `name` (an extra metric) over seeds."""
  def text(variant: str, batch: int) -> str:
    r = cells.get((variant, batch))
    if r is None:
      return 'not run'
    return _spread(r[f'final:{name}'], r[f'final:{name}:range'], 3)
  return text


def _to_target(r: dict | None) -> str:
  """Steps and examples to the target over the seeds that reached it, and how many did."""
  if r is None:
    return 'not run'
  if not r['n_reached']:
    return f'not reached (0/{r["n_trials"]})'
  return (f'{markdown.summary(r["steps_to_target"], "int")} steps, '
          f'{markdown.summary(r["examples_to_target"], "int")} examples '
          f'({r["n_reached"]}/{r["n_trials"]})')


def _batch_table(heading: str, by_variant, batches: Sequence[int],
                 text: Callable[[str, int], str], intro: Sequence[str] = ()) -> list[str]:
  """A batch x variant table under `heading`: text(variant, batch) in each cell."""
  md = [f'## {heading}', '', *intro,
        '| batch | ' + ' | '.join(f'`{markdown.cell(v)}`' for v in by_variant) + ' |',
        '|---|' + '---|' * len(by_variant)]
  for b in batches:
    md.append(f'| {b} | ' + ' | '.join(markdown.cell(text(v, b)) for v in by_variant) + ' |')
  return md + ['']


def _variant_tables(by_variant, label: str, unit: str, percent: bool) -> list[str]:
  """Per variant: the peak lr, epochs and steps run, metrics, losses and diverged trials."""
  def pct(s):  # the per-variant tables show accuracies in percent too
    if s is None or not percent:
      return s
    return {k: v * 100 if k in ('mean', 'std', 'lo', 'hi') and v is not None else v
            for k, v in s.items()}

  summary = markdown.summary
  md = ['## Per variant', '']
  for variant, vrows in by_variant.items():
    md += [f'### `{variant}`', '',
           f'| batch | peak lr | epochs run | steps run | final {label}{unit} | best {label}{unit} '
           f'| final held-out loss | best held-out loss | final train loss | diverged |',
           '|---|---|---|---|---|---|---|---|---|---|']
    for r in vrows:
      md.append('| ' + ' | '.join(markdown.cell(c) for c in (
          r['batch_size'], ', '.join(f'{lr:.3g}' for lr in r['lrs']),
          summary(r['epochs_run']), summary(r['steps_run'], 'int'),
          summary(pct(r['final_metric'])), summary(pct(r['best_metric'])),
          summary(r['final_eval_loss']), summary(r['best_eval_loss']),
          summary(r['final_train_loss']), f'{r["n_diverged"]}/{r["n_trials"]}')) + ' |')
    md.append('')
  return md
