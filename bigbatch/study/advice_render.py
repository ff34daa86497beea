"""What the batch-size advisor (bigbatch/study/advisor.py) shows: the printed table (`lines`)
and the one figure (`figure`): predicted steps and examples to the target against the batch,
with the band of the noise scale's spread and the probe's own measurement, beside the noise
scale measured through the probe."""
from __future__ import annotations

import io
import math

import numpy as np


def _n(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return str(x)
  return f'{x:,.0f}' if abs(x) >= 100 else f'{x:.{digits}g}'


def lines(advice: dict) -> list[str]:
  """The advice as printed lines."""
  p, bs = advice['probe'], advice['b_simple']
  t = p['target']
  if p.get('anchor') == 'final':
    outcome = (f'no target: {p["steps_run"]} steps to its final {t["metric"]} '
               f'{_n(p["final_metric"])}, which the predictions below are for')
  elif p['reached']:
    outcome = (f'target {t["metric"]} {">=" if t["mode"] == "max" else "<="} {t["value"]} '
               f'reached at step {p["steps_to_target"]}')
  else:
    outcome = (f'target {t["metric"]} {t["value"]} NOT reached in {p["steps_run"]} steps '
               f'(best {_n(p["final_metric"])})')
  out = [f'[advise] probe at batch {p["batch"]}: ' + outcome
         + f'; {p["examples_run"]:,} examples, {p["seconds"]:.0f} s',
         f'[advise] B_simple (last half of the probe, steps {bs["from_step"]}-{bs["to_step"]}): '
         f'{_n(bs["value"])} [{_n(bs["low"])}, {_n(bs["high"])}] = predicted B_crit']
  h = advice.get('b_noise_hessian')
  if h:
    out.append(f'[advise] Hessian-weighted B_noise at step {h["step"]}: {_n(h["b_noise"])} '
               f'({h["groups"]} gradients of {h["microbatch"]}, H over {h["hessian_examples"]} '
               f'examples; {h["seconds"]:.0f} s)')
  pred = advice.get('prediction')
  if pred:
    rng = advice.get('prediction_range') or []
    out.append(f'[advise] S_min {_n(pred["S_min"])} steps, E_min {_n(pred["E_min"])} examples')
    goal = 'target' if p.get('anchor') != 'final' else "probe's final metric"
    out.append(f'[advise]   batch | predicted steps to the {goal} | predicted examples to the '
               f'{goal}')
    for i, r in enumerate(pred['per_batch']):
      span = [q['per_batch'][i]['steps'] for q in rng]
      extra = f' [{_n(min(span))}, {_n(max(span))}]' if len(span) == 2 else ''
      out.append(f'[advise]   {r["batch"]:>5,} | {_n(r["steps"]):>10}{extra} | '
                 f'{_n(r["examples"])}')
  else:
    out.append('[advise] no steps or examples prediction: the probe did not reach the target '
               '(raise --budget_examples or lower --target); B_crit above still holds')
  rec = advice['recommendation']
  warm = f', warmup {rec["warmup_steps"]} steps' if rec['warmup_steps'] else ', no warmup'
  out.append(f'[advise] recommended batch {rec["batch"]:,} (the largest power of two within 2x '
             f'of E_min): peak lr {rec["peak_lr"]:.4g} by the config\'s {rec["scaling"]} rule '
             f'(lr {rec["base_lr"]:g} at batch {rec["base_batch"]}){warm}')
  sched = advice.get('batch_schedule', {}).get('schedule')
  if sched:
    out.append(f'[advise] noise-driven batch schedule from batch '
               f'{advice["batch_schedule"]["base_batch"]}: --config.batch_schedule="'
               f'{tuple(tuple(r) for r in sched)}"')
  return out


def figure(advice: dict, path: str) -> None:
  """advice.png: steps and examples to the target against the batch (log-log), predicted, with
  the band of the noise scale's spread and the probe's measurement; the noise scale over the
  probe's steps beside it."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from bigbatch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(11, 3.8), dpi=110)
  ax_s, ax_e, ax_n = fig.subplots(1, 3)
  pred, p = advice.get('prediction'), advice['probe']
  if pred:
    b = np.array([r['batch'] for r in pred['per_batch']], float)
    goal = 'target' if p.get('anchor') != 'final' else "probe's final metric"
    for ax, key, label in ((ax_s, 'steps', f'steps to the {goal}'),
                           (ax_e, 'examples', f'examples to the {goal}')):
      ax.plot(b, [r[key] for r in pred['per_batch']], 'o-', label='predicted (B_simple)')
      rng = advice.get('prediction_range') or []
      if len(rng) == 2:
        lo = np.minimum(*[np.array([r[key] for r in q['per_batch']]) for q in rng])
        hi = np.maximum(*[np.array([r[key] for r in q['per_batch']]) for q in rng])
        ax.fill_between(b, lo, hi, alpha=0.25, label='spread of B_simple')
      if advice.get('prediction_hessian'):
        ax.plot(b, [r[key] for r in advice['prediction_hessian']['per_batch']], 's--',
                label='predicted (Hessian B_noise)')
      anchor = p['steps_to_target'] if p['reached'] else p['steps_run']
      measured = anchor * (1 if key == 'steps' else p['batch'])
      ax.plot([p['batch']], [measured], 'k*', ms=12, label='probe (measured)')
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_xlabel('batch size')
      ax.set_ylabel(label)
      ax.grid(True, which='both', alpha=0.3)
    ax_s.legend(fontsize=7)
  else:
    for ax in (ax_s, ax_e):
      ax.text(0.5, 0.5, 'target not reached:\nno prediction', ha='center', transform=ax.transAxes)
  series = [(s, v) for s, v in advice['b_simple_series'] if v is not None and v > 0]
  if series:
    ax_n.plot(*zip(*series), lw=1)
    ax_n.set_yscale('log')
  bs = advice['b_simple']
  ax_n.axhline(bs['value'], color='k', ls='--', lw=1, label=f'late B_simple {bs["value"]:.3g}')
  ax_n.axvspan(bs['from_step'], bs['to_step'], alpha=0.15)
  ax_n.set_xlabel('probe step')
  ax_n.set_ylabel('B_simple (smoothed)')
  ax_n.legend(fontsize=7)
  fig.suptitle(f'{advice["study"]}: probe at batch {p["batch"]}', fontsize=9)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png')
  workdir_lib.write_text(path, png.getvalue())
