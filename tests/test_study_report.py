"""The batch-size study report: aggregation, the steps/examples fit, report.md and its figures."""
import math
import os
import re

import numpy as np
import pytest

from bigbatch.study import aggregate
from bigbatch.study import markdown
from bigbatch.study import render_steps

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TARGET = {'metric': 'eval/top1', 'value': 0.9, 'mode': 'max'}


def trial(variant, batch, lr, seed, steps=None, *, final=0.8, loss=0.5, diverged=False,
          noise=(), sharp=(), data='digits', steps_run=200):
  """One result dict; steps=None means the target was not reached."""
  reached = steps is not None
  return {
      'trial_id': f'{variant}-b{batch}-lr{lr}-s{seed}', 'variant': variant, 'data': data,
      'batch_size': batch, 'lr': lr, 'lr_index': 0, 'seed': seed, 'target': dict(TARGET),
      'reached': reached, 'steps_to_target': steps,
      'examples_to_target': steps * batch if reached else None,
      'wall_to_target_s': steps * 0.01 if reached else None,
      'best_metric': 0.95 if reached else 0.5, 'final_metric': final,
      'final_train_loss': loss, 'steps_run': steps_run, 'wall_s': 2.0,
      'eval_curve': [[10, 0.5], [steps_run, final]] if final is not None else [],
      'noise_scale': [list(p) for p in noise], 'sharpness': [list(p) for p in sharp],
      'diverged': diverged,
  }


def hand_made():
  """Batch 8: 2 seeds, the min over lrs differs per seed; batch 16: 3 seeds;
  batch 32: seed 1 never reaches the target (the point is "not reached")."""
  nan = float('nan')
  return [
      # batch 8, seed 0: lr 0.2 is fastest (80); lr 0.4 diverged.
      trial('sgd', 8, 0.1, 0, 100, final=0.91, sharp=[[50, 9.0], [200, 10.0]]),
      trial('sgd', 8, 0.2, 0, 80, final=0.93, loss=0.25, sharp=[[50, 7.0], [200, 8.0]]),
      trial('sgd', 8, 0.4, 0, None, final=nan, loss=nan, diverged=True),
      # batch 8, seed 1: lr 0.4 is fastest (70), at the grid's edge; best final at lr 0.1.
      trial('sgd', 8, 0.1, 1, 90, final=0.95, sharp=[[200, 3.0]]),
      trial('sgd', 8, 0.2, 1, None, final=0.7),
      trial('sgd', 8, 0.4, 1, 70, final=0.92, loss=0.35, sharp=[[200, 12.0]]),
      # batch 16: one lr, three seeds, 40/50/60 steps.
      trial('sgd', 16, 0.2, 0, 40, final=0.90),
      trial('sgd', 16, 0.2, 1, 50, final=0.92),
      trial('sgd', 16, 0.2, 2, 60, final=0.94),
      # batch 32: seed 0 reaches at 30 steps, seed 1 reaches with no lr.
      trial('sgd', 32, 0.4, 0, 30, final=0.91),
      trial('sgd', 32, 0.4, 1, None, final=0.6, steps_run=300),
      trial('sgd', 32, 0.8, 1, None, final=None, diverged=True),
  ]


def rows_by_batch(rows, variant='sgd'):
  return {r['batch_size']: r for r in rows if r['variant'] == variant}


def test_aggregate_min_over_lrs_and_seed_spread():
  rows = rows_by_batch(aggregate.steps_to_target(hand_made()))
  assert sorted(rows) == [8, 16, 32]

  b8 = rows[8]
  assert b8['reached'] and b8['seeds'] == [0, 1] and b8['n_trials'] == 6
  assert b8['n_diverged'] == 1
  # Per seed: min over reached lrs = 80 (seed 0, lr 0.2) and 70 (seed 1, lr 0.4).
  steps = b8['steps_to_target']
  assert steps['kind'] == 'min-max' and steps['n'] == 2
  assert (steps['mean'], steps['lo'], steps['hi']) == (75.0, 70.0, 80.0)
  assert b8['examples_to_target']['mean'] == 75.0 * 8
  assert b8['best_lr']['mean'] == pytest.approx(0.3)
  assert b8['best_lr_at_edge']  # seed 1's best lr is its largest
  assert b8['chosen_trials'] == {0: 'sgd-b8-lr0.2-s0', 1: 'sgd-b8-lr0.4-s1'}
  # Final accuracy: best over lrs per seed (0.93, 0.95; the diverged NaN ignored), not the
  # final metric of the best-lr trial (0.93, 0.92).
  assert b8['final_metric']['mean'] == pytest.approx(0.94)
  # Loss and sharpness come from the best-lr trial; sharpness is the last entry.
  assert b8['final_train_loss']['mean'] == pytest.approx(0.30)
  assert b8['sharpness']['mean'] == pytest.approx(10.0)
  assert b8['noise_scale_end'] is None
  assert b8['not_reached_trials'] == ['sgd-b8-lr0.2-s1', 'sgd-b8-lr0.4-s0']

  b16 = rows[16]
  assert b16['steps_to_target']['kind'] == 'std'
  assert b16['steps_to_target']['mean'] == 50.0
  assert b16['steps_to_target']['std'] == pytest.approx(10.0)  # sample std, ddof=1
  assert b16['best_lr_at_edge']  # one lr tried: no tuning to speak of
  assert b16['final_metric']['std'] == pytest.approx(0.02)

  b32 = rows[32]
  assert not b32['reached'], 'a seed that never reached makes the point not reached'
  assert b32['seeds_reached'] == [0]
  assert b32['steps_to_target']['kind'] == 'single'  # partial: the reached seed only
  assert b32['step_budget'] == 300
  assert b32['chosen_trials'] == {0: 'sgd-b32-lr0.4-s0', 1: 'sgd-b32-lr0.4-s1'}
  assert b32['final_metric']['mean'] == pytest.approx((0.91 + 0.6) / 2)


def test_aggregate_tie_break_and_unreached_flag_needs_steps():
  results = [
      trial('adam', 64, 0.01, 0, 20),
      trial('adam', 64, 0.02, 0, 20),
      trial('adam', 64, 0.04, 0, 10),
  ]
  results[1]['best_metric'] = 0.99  # the tie 20/20 would go to it, but 10 steps wins
  results[2]['steps_to_target'] = None  # "reached" without a step is not trusted
  (row,) = aggregate.steps_to_target(results)
  assert row['best_lr']['mean'] == 0.02
  assert row['steps_to_target']['mean'] == 20
  assert row['not_reached_trials'] == ['adam-b64-lr0.04-s0']


def test_aggregate_rejects_bad_input():
  with pytest.raises(ValueError, match='no trial results'):
    aggregate.steps_to_target([])
  bad = trial('sgd', 8, 0.1, 0, 10)
  del bad['seed']
  with pytest.raises(ValueError, match='seed'):
    aggregate.steps_to_target([bad])


def test_summarize_kinds():
  assert aggregate.summarize([None, float('nan'), 'nan']) is None
  assert aggregate.summarize([3.0])['kind'] == 'single'
  s = aggregate.summarize([1.0, 2.0, 3.0, 'inf'])
  assert s['kind'] == 'std' and s['n'] == 3 and s['std'] == pytest.approx(1.0)
  assert (s['lo'], s['hi']) == pytest.approx((1.0, 3.0))


def curve_points(s_min, e_min, batches, noise=None):
  steps = np.array([s_min + e_min / b for b in batches])
  if noise is not None:
    steps = steps * noise
  return [(s, s * b) for s, b in zip(steps, batches)]


def test_fit_recovers_exact_points():
  batches = [2.0**k for k in range(3, 15)]
  fit = aggregate.fit_steps_examples(curve_points(500.0, 500.0 * 256, batches))
  assert fit['S_min'] == pytest.approx(500.0, rel=1e-2)
  assert fit['E_min'] == pytest.approx(128_000.0, rel=1e-2)
  assert fit['B_crit'] == pytest.approx(256.0, rel=1e-2)
  assert fit['n_points'] == 12 and fit['rel_rms'] < 1e-6
  # Each point satisfies the fitted curve (S/S_min - 1)(E/E_min - 1) = 1.
  for s, e in curve_points(500.0, 128_000.0, batches):
    assert (s / fit['S_min'] - 1) * (e / fit['E_min'] - 1) == pytest.approx(1.0, rel=2e-2)


def test_fit_with_noise_is_sane():
  batches = [2.0**k for k in range(3, 15)]
  rng = np.random.default_rng(0)
  for _ in range(5):
    noise = np.exp(rng.normal(0.0, 0.05, len(batches)))  # 5% multiplicative seed noise
    fit = aggregate.fit_steps_examples(curve_points(500.0, 128_000.0, batches, noise))
    assert fit['S_min'] == pytest.approx(500.0, rel=0.15)
    assert fit['E_min'] == pytest.approx(128_000.0, rel=0.15)
    assert fit['B_crit'] == pytest.approx(256.0, rel=0.3)
    assert 0.01 < fit['rel_rms'] < 0.1


def test_fit_edge_cases():
  # Perfect scaling everywhere (S * B constant): no plateau seen, S_min = 0, B_crit infinite.
  fit = aggregate.fit_steps_examples([(1000.0 / b, 1000.0) for b in (1, 2, 4, 8)])
  assert fit['S_min'] == pytest.approx(0.0, abs=1e-9)
  assert fit['E_min'] == pytest.approx(1000.0) and math.isinf(fit['B_crit'])
  # A plateau everywhere: steps do not depend on the batch, E_min = 0.
  fit = aggregate.fit_steps_examples([(100.0, 100.0 * b) for b in (1, 2, 4, 8)])
  assert fit['S_min'] == pytest.approx(100.0) and fit['E_min'] == pytest.approx(0.0, abs=1e-6)
  # Steps growing with the batch would need E_min < 0: constrained to 0, not negative.
  fit = aggregate.fit_steps_examples([(100.0 * b, 100.0 * b * b) for b in (1, 2, 4)])
  assert fit['E_min'] >= 0 and fit['S_min'] > 0
  with pytest.raises(ValueError, match='two distinct batch sizes'):
    aggregate.fit_steps_examples([(10.0, 80.0), (20.0, 160.0)])
  with pytest.raises(ValueError, match='positive'):
    aggregate.fit_steps_examples([(10.0, 80.0), (0.0, 160.0)])


def full_study():
  """Two variants over five batch sizes, two seeds, with noise scale and sharpness."""
  results = []
  for variant, s_min, e_min in (('sgd-linear-warmup', 200.0, 200.0 * 64),
                                ('sgd-sqrt', 300.0, 300.0 * 32)):
    for batch in (8, 16, 32, 64, 128):
      for seed in (0, 1):
        for i, lr in enumerate((0.05, 0.1, 0.2)):
          steps = int((s_min + e_min / batch) * (1 + 0.1 * i + 0.02 * seed))
          noise = [[s, 40.0 + 10 * seed + s / 50] for s in range(0, steps, max(1, steps // 8))]
          results.append(trial(variant, batch, lr, seed, steps, final=0.95 - 0.01 * i,
                               noise=noise, sharp=[[steps, 5.0 + batch / 16 + seed]],
                               steps_run=steps + 50))
    results.append(trial(variant, 256, 0.2, 0, None, final=0.6, steps_run=500))
  return results


def read(path):
  with open(path) as f:
    return f.read()


def figure_links(text):
  return re.findall(r'!\[[^\]]*\]\((figures/[^)]+\.png)\)', text)


def test_write_report_writes_every_figure(tmp_path):
  path = render_steps.write(full_study(), str(tmp_path), title='Study of batch sizes',
                             notes='Hand-made numbers.')
  assert path == os.path.join(str(tmp_path), 'report.md')
  text = read(path)
  assert text.startswith('# Study of batch sizes\n') and 'Hand-made numbers.' in text
  links = figure_links(text)
  assert links == [f'figures/{stem}.png' for stem, _ in render_steps.FIGURES]
  for link in links:
    data = (tmp_path / link).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, link
  assert markdown.NOT_DRAWN not in text
  # A table per variant, the not-reached point in it, the fit, and the missed trials listed.
  assert '## Variant `sgd-linear-warmup`' in text and '## Variant `sgd-sqrt`' in text
  assert text.count('| **not reached**') == 2
  # The fit of the made-up curve S = 200 + 200*64/B: the seed offsets (0, +2%) scale S and E
  # alike, so B_crit stays 64 and S_min, E_min come out 1% high.
  fit_line = next(l for l in text.splitlines() if l.startswith('| sgd-linear-warmup | 5 |'))
  s_min, e_min, b_crit = (float(c.replace(',', '')) for c in fit_line.split('|')[3:6])
  assert s_min == pytest.approx(202, rel=0.01) and e_min == pytest.approx(12_928, rel=0.01)
  assert b_crit == pytest.approx(64, rel=0.01)
  assert 'sgd-sqrt-b256-lr0.2-s0' in text.split('## Trials that did not reach')[1]


def test_write_report_missing_data(tmp_path):
  # One batch size per variant, no noise scale, no sharpness: the fit, the noise-scale and the
  # sharpness figures are not drawn, each says why; stale PNGs from an earlier run go away.
  (tmp_path / 'figures').mkdir()
  (tmp_path / 'figures' / 'sharpness.png').write_bytes(PNG_MAGIC + b'stale')
  results = [trial('sgd', 8, 0.1, 0, 100, final=0.92), trial('sgd', 8, 0.2, 0, None, final=0.5)]
  text = read(render_steps.write(results, str(tmp_path), title='t'))
  drawn = {link.split('/')[1][:-4] for link in figure_links(text)}
  assert drawn == {'steps_to_target', 'best_lr', 'final_accuracy'}
  for stem, fig_title in render_steps.FIGURES:
    section = text.split(f'### {fig_title}\n')[1].split('###')[0]
    exists = (tmp_path / 'figures' / f'{stem}.png').exists()
    assert exists == (stem in drawn), stem
    assert (markdown.NOT_DRAWN in section) == (stem not in drawn), stem
  assert 'not fitted' in text
  assert 'sgd-b8-lr0.2-s0' in text.split('## Trials that did not reach')[1]


def test_write_report_nothing_reached(tmp_path):
  results = [trial('sgd', b, 0.1, 0, None, final=0.3, diverged=b == 16) for b in (8, 16)]
  text = read(render_steps.write(results, str(tmp_path), title='t'))
  assert figure_links(text) == ['figures/final_accuracy.png']
  assert text.count('| **not reached**') == 2
  assert text.count(markdown.NOT_DRAWN) == len(render_steps.FIGURES) - 1
