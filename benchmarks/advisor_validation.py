"""The batch-size advisor against the sweeps it is meant to replace: its predicted B_crit and
steps to the target per batch beside the shipped studies' measured ones, and its cost beside
theirs.

  python benchmarks/advisor_validation.py [--workdir=/tmp/bb_advisor] [--studies=digits,...]

For each study (configs/study_*.py) the advisor's probe runs with its defaults (resumable in
WORKDIR/NAME), and its advice is compared with the study's results in docs/study_NAME/
results.jsonl: the fitted B_crit of every variant (the report's trade-off fit), the mean steps
to the target of every (variant, batch) point that reached it, and the sweep's examples and
trial wall time. Writes docs/advisor/report.md and docs/advisor/NAME.png (the advisor's figure).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report as report_lib
from bigbatch.study import advisor
from bigbatch.study import aggregate

STUDIES = {
    # name: (config module, the study's docs directory)
    'digits': ('configs.study_digits', 'docs/study_digits'),
    'synthetic': ('configs.study_synthetic', 'docs/study_synthetic'),
    'faces': ('configs.study_faces', 'docs/study_faces'),
    # Fixed-epoch studies without a target: the probe runs the budget, and the prediction is the
    # examples each batch needs to match the probe's final accuracy, beside the accuracy each
    # batch measured at the same epochs.
    'epochs_digits': ('configs.study_epochs_digits', 'docs/study_epochs_digits'),
    'epochs_synthetic': ('configs.study_epochs_synthetic', 'docs/study_epochs_synthetic'),
}
OUT = os.path.join(ROOT, 'docs', 'advisor')
# Variants left out of the comparison: their batch is not one fixed size.
EXCLUDE = ('noise_schedule',)


def _f(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return '—' if x is None else str(x)
  return f'{x:,.0f}' if abs(x) >= 100 else f'{x:.{digits}g}'


def _pct(x) -> str:
  return '—' if x is None else f'{100 * x:+.0f}%'


def _results(docs_dir: str) -> list[dict]:
  with open(os.path.join(ROOT, docs_dir, 'results.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def validate(name: str, workdir: str) -> dict:
  """The advice for study `name` and its comparison with the study's measured results."""
  import importlib
  module, docs_dir = STUDIES[name]
  study = importlib.import_module(module).get_config()
  started = time.monotonic()
  advice = advisor.advise(study, os.path.join(workdir, name), advisor.Options(),
                          echo=lambda line: print(f'{name}: {line}', flush=True))
  results = _results(docs_dir)
  if advice['probe'].get('anchor') == 'final':
    return _fixed_epochs(name, module, advice, results, started)
  rows = aggregate.steps_to_target(results)
  by_variant = aggregate.by_variant(rows)
  pred = advice.get('prediction')
  pred_h = advice.get('prediction_hessian')
  variants = {}
  for variant, vrows in by_variant.items():
    if variant in EXCLUDE:
      continue
    fit, why = aggregate.fit_variant(vrows)
    points = []
    for r in vrows:
      if not r['reached']:
        continue
      measured = r['steps_to_target']['mean']
      b = r['batch_size']
      p = next((q for q in (pred or {}).get('per_batch', []) if q['batch'] == b), None)
      ph = next((q for q in (pred_h or {}).get('per_batch', []) if q['batch'] == b), None)
      points.append({'batch': b, 'measured': measured,
                     'predicted': p['steps'] if p else None,
                     'error': p['steps'] / measured - 1 if p else None,
                     'predicted_hessian': ph['steps'] if ph else None,
                     'error_hessian': ph['steps'] / measured - 1 if ph else None})
    variants[variant] = {'fit': fit, 'why_no_fit': why, 'points': points}
  return {
      'name': name, 'config': module.replace('.', '/') + '.py', 'advice': advice,
      'variants': variants,
      'sweep': _sweep(results),
      'command_seconds': time.monotonic() - started,
  }


def _sweep(results: list[dict]) -> dict:
  return {'trials': len(results),
          # Rows written before examples_run existed: steps x batch (no batch schedule).
          'examples': sum(r.get('examples_run') or r['steps_run'] * r['batch_size']
                          for r in results),
          'seconds': sum(r.get('wall_s') or 0 for r in results)}


def _fixed_epochs(name, module, advice, results, started) -> dict:
  rows = aggregate.by_variant(aggregate.fixed_epochs(results))
  budget = advice['probe']['examples_run']
  pred = {r['batch']: r for r in advice['prediction']['per_batch']}
  table = []
  for batch in sorted({r['batch_size'] for vrows in rows.values() for r in vrows}):
    p = pred.get(batch)
    table.append({'batch': batch, 'needed': p['examples'] / budget if p else None,
                  'measured': {v: next((r['final_metric']['mean'] for r in vrows
                                        if r['batch_size'] == batch and r['final_metric']),
                                       None) for v, vrows in rows.items()}})
  return {'name': name, 'config': module.replace('.', '/') + '.py', 'advice': advice,
          'variants': {}, 'fixed_epochs': table, 'sweep': _sweep(results),
          'command_seconds': time.monotonic() - started}


def _ratio(a, b):
  return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else None


def render(vals: list[dict]) -> str:
  out = ['# The batch-size advisor against the measured sweeps', '',
         'Written by `python benchmarks/advisor_validation.py`; the method and what it gets wrong '
         'are in [docs/advisor.md](../advisor.md).', '',
         f'Machine: {report_lib.machine()}', '',
         'Each probe ran `python -m bigbatch.advise --config=configs/study_NAME.py` with its '
         'defaults: the base config (no variant) at the study\'s smallest batch, the lr of the '
         'config\'s own rule, stopped at the study\'s target. B_simple is the ratio of the '
         'smoothed tr(Σ) to the smoothed |G|² over the last half of the probe, with the lowest '
         'and highest of four windows there; B_noise is the Hessian-weighted estimate at the '
         'probe\'s end. The sweep\'s B_crit is the fit in the study\'s report.', '',
         '## Critical batch: predicted vs fitted', '']
  rows = []
  for v in vals:
    a = v['advice']
    bs, h = a['b_simple'], a.get('b_noise_hessian') or {}
    if 'fixed_epochs' in v:
      rows.append([v['name'], '(fixed epochs: no fit)', '—',
                   f'{_f(bs["value"])} [{_f(bs["low"])}, {_f(bs["high"])}]', '—',
                   _f(h.get('b_noise')), '—'])
    for variant, d in v['variants'].items():
      fit = d['fit']
      b_crit = fit['B_crit'] if fit else None
      rows.append([v['name'], variant, _f(b_crit) if fit else f'no fit ({d["why_no_fit"]})',
                   f'{_f(bs["value"])} [{_f(bs["low"])}, {_f(bs["high"])}]',
                   _f(_ratio(bs['value'], b_crit), 2), _f(h.get('b_noise')),
                   _f(_ratio(h.get('b_noise'), b_crit), 2)])
  out.append(report_lib.table(
      ['study', 'variant', 'fitted B_crit (sweep)', 'B_simple (probe) [spread]',
       'ratio', 'Hessian B_noise (probe)', 'ratio'], rows))
  out += ['', 'Goal: the ratio within [0.5, 2].', '',
          '## Steps to the target per batch: predicted vs measured', '',
          'Predicted: S(B) = S_min (1 + B_noise / B) through the probe\'s own steps to the '
          'target. Measured: the mean over seeds of the study\'s steps to the target (for tuned '
          'variants, the best lr\'s). Error = predicted / measured − 1.', '']
  for v in vals:
    a = v['advice']
    p = a['probe']
    if 'fixed_epochs' in v:
      continue
    out += [f'### {v["name"]} (`{v["config"]}`)', '',
            f'Probe: batch {p["batch"]}, lr {_f(p["lr"])}, '
            + (f'target reached at step {p["steps_to_target"]}' if p['reached']
               else f'target not reached in {p["steps_run"]} steps: no steps prediction')
            + f'. Recommended batch {a["recommendation"]["batch"]:,} at lr '
            f'{_f(a["recommendation"]["peak_lr"])}.', '',
            f'![advisor figure]({v["name"]}.png)', '']
    if not p['reached']:
      continue
    rows = []
    for variant, d in v['variants'].items():
      errs = [abs(q['error']) for q in d['points'] if q['error'] is not None]
      for q in d['points']:
        rows.append([variant, f'{q["batch"]:,}', _f(q['measured']), _f(q['predicted']),
                     _pct(q['error']), _f(q['predicted_hessian']), _pct(q['error_hessian'])])
      if errs:
        rows.append([f'**{variant}**', 'median abs. error', '', '',
                     f'{100 * sorted(errs)[len(errs) // 2]:.0f}%', '', ''])
    out.append(report_lib.table(['variant', 'batch', 'measured steps', 'predicted (B_simple)',
                                 'error', 'predicted (Hessian B_noise)', 'error'], rows))
    out.append('')
  fixed = [v for v in vals if 'fixed_epochs' in v]
  if fixed:
    out += ['## Fixed-epoch studies: examples needed vs accuracy kept', '',
            'With no target, the probe trains the study\'s whole budget at its smallest batch, '
            'and the advisor predicts the examples E(B) each batch needs to match the probe\'s '
            'final accuracy; "needed" is E(B) over the budget (1.0: the budget suffices). Beside '
            'it, the final accuracy each variant measured at that batch with the budget (mean over '
            'seeds). The prediction is for a well-tuned lr at each batch, so it is a floor on '
            'what a rule-set lr needs.', '']
    for v in fixed:
      a, p = v['advice'], v['advice']['probe']
      variants = sorted({k for r in v['fixed_epochs'] for k in r['measured']})
      out += [f'### {v["name"]} (`{v["config"]}`)', '',
              f'Probe: batch {p["batch"]}, lr {_f(p["lr"])}, {p["steps_run"]} steps '
              f'({p["examples_run"]:,} examples), final {p["target"]["metric"]} '
              f'{_f(p["final_metric"])}; B_simple {_f(a["b_simple"]["value"])}.', '',
              f'![advisor figure]({v["name"]}.png)', '']
      rows = [[f'{r["batch"]:,}', _f(r['needed'], 3)]
              + [_f(r['measured'].get(k), 3) for k in variants] for r in v['fixed_epochs']]
      out.append(report_lib.table(['batch', 'needed / budget (predicted)']
                                  + [f'`{k}` final' for k in variants], rows))
      out.append('')
  out += ['## Cost: the probe vs the sweep', '',
          'Examples trained and wall time: the probe (with the Hessian estimate) against the '
          'sum over the sweep\'s trials (their own recorded wall time; the studies ran on the '
          'same kind of machine, some beside another study).', '']
  rows = []
  for v in vals:
    p, s = v['advice']['probe'], v['sweep']
    h = v['advice'].get('b_noise_hessian') or {}
    probe_s = p['seconds']
    rows.append([v['name'], f'{p["examples_run"]:,}', f'{probe_s:.0f} s (Hessian '
                 f'{h.get("seconds", 0):.0f} s)', f'{s["trials"]}', f'{s["examples"]:,}',
                 f'{s["seconds"] / 60:.1f} min', f'{s["examples"] / max(1, p["examples_run"]):,.0f}x',
                 f'{s["seconds"] / max(1e-9, probe_s):,.0f}x'])
  out.append(report_lib.table(['study', 'probe examples', 'probe wall', 'sweep trials',
                               'sweep examples', 'sweep wall (sum)', 'examples ratio',
                               'wall ratio'], rows))
  return '\n'.join(out) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='/tmp/bb_advisor')
  parser.add_argument('--studies', default=','.join(STUDIES))
  args = parser.parse_args()
  names = [n for n in args.studies.split(',') if n]
  vals = [validate(n, args.workdir) for n in names]
  os.makedirs(OUT, exist_ok=True)
  for v in vals:
    shutil.copy(os.path.join(args.workdir, v['name'], 'advice.png'),
                os.path.join(OUT, f'{v["name"]}.png'))
    with open(os.path.join(OUT, f'{v["name"]}_advice.json'), 'w') as f:
      json.dump(v['advice'], f, indent=1)
  with open(os.path.join(OUT, 'report.md'), 'w') as f:
    f.write(render(vals))
  print(f'wrote {os.path.join(OUT, "report.md")}')


if __name__ == '__main__':
  main()
