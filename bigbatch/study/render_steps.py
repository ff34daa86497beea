"""The report of a steps-to-target study (study.kind='steps_to_target'): report.md and its
figures from the trial results, through `aggregate.steps_to_target` and the steps/examples fit."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from bigbatch.study import aggregate
from bigbatch.study import figures
from bigbatch.study import markdown

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

_HOW = (
    'Per (variant, batch size, seed): steps to target = the fewest steps over the learning-rate '
    'trials that reached the target (Shallue et al. 2018); that trial is the seed\'s best-lr '
    'trial, and its examples and wall time to target, its final train loss, its sharpness and '
    'its noise scale at the end are the ones reported. Final accuracy = the best final metric '
    'over the seed\'s lr trials. Over seeds: `mean ± std` (sample std) with 3 or more seeds, '
    '`mean [min, max]` with 2 seeds, the value alone with 1. A point where some seed reached '
    'the target with no lr is **not reached**; figures mark it apart. "grid edge": some '
    'seed\'s best lr is the smallest or largest it tried, so the lr grid may be too narrow.')


def write(results: Sequence[Mapping[str, Any]], workdir: str, *, title: str,
          notes: str = '') -> str:
  """Writes workdir/report.md and the PNG figures under workdir/figures/; returns report.md's path.

  report.md holds the title, the notes, the target, a table per variant
  (aggregate.steps_to_target's rows), the steps/examples fit per variant, the six FIGURES
  embedded as ![title](figures/<stem>.png), and the trials that did not reach the target. A
  figure whose data are missing is not drawn: its heading stays, followed by a line starting
  with markdown.NOT_DRAWN that says why, and any PNG of that name from an earlier report is
  removed so the directory matches the report.
  """
  rows = aggregate.steps_to_target(results)
  trials_by_id = {str(r['trial_id']): r for r in results}
  by_variant = aggregate.by_variant(rows)
  fits = {v: aggregate.fit_variant(vrows) for v, vrows in by_variant.items()}
  why_not = _draw(workdir, rows, by_variant, fits, trials_by_id)

  targets = {markdown.target_text(r.get('target')) for r in results}
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
  md += ['## How the numbers are made', '', _HOW, '']
  for variant, vrows in by_variant.items():
    md += [f'## Variant `{variant}`', ''] + _variant_table(vrows) + ['']
  md += _fit_table(fits)
  md += markdown.figures_section(FIGURES, why_not)
  md += _missed_table([trials_by_id[t] for r in rows for t in r['not_reached_trials']])
  return markdown.write(workdir, md)


def _draw(workdir: str, rows, by_variant, fits, trials_by_id) -> dict[str, str]:
  """Draws the FIGURES; returns {stem: '' or why it was not drawn}."""
  paths = figures.prepare(workdir, [stem for stem, _ in FIGURES])
  target = rows[0]['target'] or {}
  target_value = aggregate.measured(target.get('value'))
  return {
      'steps_to_target': figures.steps_to_target(
          by_variant, paths['steps_to_target'], target=markdown.target_text(rows[0]['target'])),
      'best_lr': figures.best_lr(by_variant, paths['best_lr']),
      'final_accuracy': figures.final_accuracy(
          by_variant, paths['final_accuracy'], metric=markdown.metric_label(target),
          target_line=None if target_value is None else (target_value,
                                                         f'target {target["value"]}')),
      'steps_vs_examples': figures.steps_vs_examples(by_variant, fits,
                                                     paths['steps_vs_examples']),
      'noise_scale': figures.noise_scale(_noise_curves(by_variant, trials_by_id), fits,
                                         paths['noise_scale']),
      'sharpness': figures.sharpness(by_variant, paths['sharpness']),
  }


def _variant_table(rows: Sequence[dict]) -> list[str]:
  metric = markdown.metric_label(rows[0]['target'])
  head = ['batch', 'data', 'trials (diverged)', 'reached/seeds', 'steps to target',
          'examples to target', 'wall to target (s)', 'best lr', f'final {metric}',
          'final train loss', 'sharpness (end)', 'noise scale (end)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  summary = markdown.summary
  for r in rows:
    steps = summary(r['steps_to_target'], 'int')
    if not r['reached']:
      steps = '**not reached**' + (f' (reached seeds: {steps})' if r['seeds_reached'] else '')
    best_lr = summary(r['best_lr'])
    if r['best_lr_at_edge']:
      best_lr += ' (grid edge)'
    cells = [
        str(r['batch_size']), '+'.join(r['data']) or '—', f'{r["n_trials"]} ({r["n_diverged"]})',
        f'{len(r["seeds_reached"])}/{len(r["seeds"])}', steps,
        summary(r['examples_to_target'], 'int'), summary(r['wall_to_target_s'], 'wall'),
        best_lr, summary(r['final_metric']), summary(r['final_train_loss']),
        summary(r['sharpness']), summary(r['noise_scale_end'])]
    lines.append('| ' + ' | '.join(markdown.cell(c) for c in cells) + ' |')
  return lines


def _fit_table(fits: dict) -> list[str]:
  """The steps/examples fit of each variant (aggregate.fit_variant), or why it was not made."""
  number, cell = markdown.number, markdown.cell
  md = ['## Steps/examples trade-off', '',
        'Fit of (S/S_min − 1)(E/E_min − 1) = 1 (McCandlish et al. 2018) to the mean steps and '
        'examples of the reached points, as S = S_min + E_min/B by nonnegative least squares '
        'on relative residuals. B_crit = E_min/S_min.', '',
        '| variant | points | S_min (steps) | E_min (examples) | B_crit (examples) | rel. RMS '
        'residual |', '|---|---|---|---|---|---|']
  for variant, (fit, why) in fits.items():
    if fit is None:
      md.append(f'| {cell(variant)} | — | not fitted: {cell(why)} | | | |')
    else:
      md.append(f'| {cell(variant)} | {fit["n_points"]} | {number(fit["S_min"], "int")} | '
                f'{number(fit["E_min"], "int")} | {number(fit["B_crit"], "int")} | '
                f'{fit["rel_rms"]:.2%} |')
  return md + ['']


def _missed_table(missed: Sequence[Mapping[str, Any]]) -> list[str]:
  """The trials that did not reach the target."""
  md = ['## Trials that did not reach the target', '']
  if not missed:
    return md + ['None.', '']
  number, measured = markdown.number, aggregate.measured
  md += ['| trial | variant | batch | seed | lr | best metric | steps run | diverged |',
         '|---|---|---|---|---|---|---|---|']
  for t in missed:
    md.append('| ' + ' | '.join(markdown.cell(c) for c in (
        t['trial_id'], t['variant'], t['batch_size'], t['seed'], number(measured(t['lr'])),
        number(measured(t.get('best_metric'))), number(measured(t.get('steps_run')), 'int'),
        'yes' if t.get('diverged') else 'no')) + ' |')
  return md + ['']


def _noise_curves(by_variant, trials_by_id) -> dict[str, list]:
  """{variant: [(batch_size, seed, [(step, B_simple), ...]), ...]}: per batch size, the chosen
  trial of the first seed with a measured noise scale; variants without one are left out."""
  curves = {}
  for variant in by_variant:
    for r in by_variant[variant]:
      for seed in sorted(r['chosen_trials']):  # the first seed with a measured curve
        series = aggregate.series(trials_by_id[r['chosen_trials'][seed]].get('noise_scale'))
        if series:
          curves.setdefault(variant, []).append((r['batch_size'], seed, series))
          break
  return curves
