"""The fixed-epoch study kind (study.kind='fixed_epochs'): trials that all train the same number
of epochs with no target and no lr search, their aggregation over seeds, report.md and its
figures, and the shipped configs/study_epochs_*.py."""
from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import schedule
from bigbatch.study import aggregate
from bigbatch.study import grid
from bigbatch.study import render_epochs
from bigbatch.study import run

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
SHIPPED = {'study_epochs_digits': 1437, 'study_epochs_synthetic': 4096}  # training examples


def _result(variant, batch, seed, final, *, loss=0.4, diverged=False):
  return {
      'trial_id': f'{variant}-b{batch}-lr0-s{seed}', 'variant': variant, 'data': 'digits',
      'batch_size': batch, 'lr': 0.05 * batch / 32, 'lr_index': 0, 'seed': seed,
      'target': {'metric': 'eval/top1', 'value': None, 'mode': 'max'},
      'reached': False, 'final_metric': final, 'best_metric': final,
      'final_eval_loss': loss, 'best_eval_loss': loss, 'final_train_loss': loss / 2,
      'steps_run': 1437 * 4 // batch, 'epochs_run': (1437 * 4 // batch) * batch / 1437,
      'budget_epochs': 4.0, 'diverged': diverged,
  }


def test_aggregate_fixed_is_mean_std_min_max_over_seeds_and_keeps_diverged_apart(tmp_path):
  results = [_result('linear', 32, s, f) for s, f in enumerate((0.90, 0.94, 0.98))]
  results += [_result('linear', 256, 0, 0.80), _result('linear', 256, 1, 0.70),
              _result('linear', 256, 2, float('nan'), loss=float('nan'), diverged=True)]
  results += [_result('none', 32, s, 0.9) for s in range(3)]
  rows = {(r['variant'], r['batch_size']): r for r in aggregate.fixed_epochs(results)}
  r = rows['linear', 32]
  assert r['final_metric']['mean'] == pytest.approx(0.94)
  assert r['final_metric']['std'] == pytest.approx(np.std([0.90, 0.94, 0.98], ddof=1))
  assert r['final_metric_range'] == pytest.approx((0.90, 0.98))
  assert r['seeds'] == [0, 1, 2] and r['n_diverged'] == 0
  # The diverged seed has no final metric: the point is over the other two, and says so.
  r = rows['linear', 256]
  assert r['n_diverged'] == 1 and r['final_metric']['n'] == 2
  assert r['final_metric']['mean'] == pytest.approx(0.75)
  assert rows['none', 32]['final_metric']['std'] == 0.0

  text = (tmp_path / render_epochs.write(results, str(tmp_path), title='T')
          .split('/')[-1]).read_text()
  # Batch x variant table in percent: mean ± std [min, max].
  assert '| 32 | 94.0 ± 4.0 [90.0, 98.0] | 90.0 ± 0.0 [90.0, 90.0] |' in text
  assert '(1/3 diverged)' in text and '| 256 |' in text and 'not run' in text
  for stem, _ in render_epochs.FIGURES:
    assert f'figures/{stem}.png' in text
    assert (tmp_path / 'figures' / f'{stem}.png').read_bytes()[:8] == PNG_MAGIC


def test_fixed_epochs_refuses_an_lr_search_and_a_step_budget():
  study = importlib.import_module('configs.study_epochs_synthetic').get_config('quick')
  study.lr_search.num_trials = 3
  with pytest.raises(config_lib.ConfigError, match='num_trials is 3, set it to 1'):
    grid.trials(study)
  study = importlib.import_module('configs.study_epochs_synthetic').get_config('quick')
  study.budget.steps = 10
  with pytest.raises(config_lib.ConfigError, match='study.budget.epochs'):
    grid.trials(study)
  study.budget.steps = None
  study.kind = 'fixed_steps'
  with pytest.raises(config_lib.ConfigError, match='study.kind'):
    grid.trials(study)


@pytest.mark.parametrize('name', sorted(SHIPPED))
def test_every_trial_of_the_shipped_studies_sees_the_same_examples(name):
  """Every (variant, batch, seed) trains epochs x N examples to within one batch, with no
  target, one lr per variant and the seeds of the study."""
  study = importlib.import_module(f'configs.{name}').get_config()
  trials = grid.trials(study)
  num_train = SHIPPED[name]
  assert len(trials) == len(study.variants) * len(study.batch_sizes) * study.num_seeds
  assert len(study.variants) == 4 + ('adascale' in study.variants)
  assert study.num_seeds == 3 and min(study.batch_sizes) == 32
  assert max(study.batch_sizes) <= num_train < 2 * max(study.batch_sizes)
  wanted = study.budget.epochs * num_train
  for t in trials:
    assert t.config.target.value is None and t.lr_index == 0
    derived = schedule.resolve(t.config, num_train)
    if t.variant == 'adascale':  # its schedule sees the budget; the run ends within S times it
      scale = t.batch_size / 32
      assert derived.adascale_scale == scale and t.config.noise_scale.enabled
      assert t.config.accumulation_steps == 2
      assert wanted - t.batch_size < derived.schedule_steps * t.batch_size <= wanted
      assert derived.total_steps == math.ceil(scale * derived.schedule_steps)
      continue
    assert wanted - t.batch_size < derived.total_steps * t.batch_size <= wanted
    assert derived.warmup_steps <= derived.total_steps
  # The variants differ in their remedy only: no_remedy keeps the batch-32 lr at every batch.
  lrs = {(t.variant, t.batch_size): schedule.resolve(t.config, num_train).peak_lr for t in trials}
  big = max(study.batch_sizes)
  assert lrs['no_remedy', big] == lrs['no_remedy', 32] == lrs['linear_warmup', 32]
  assert lrs['linear_warmup', big] == pytest.approx(lrs['linear_warmup', 32] * big / 32)


@pytest.mark.slow
def test_quick_fixed_epoch_study_end_to_end(tmp_path):
  """One variant, two batch sizes, three seeds through the trainer (the synthetic :quick study,
  trimmed to one variant to keep it to two compilations)."""
  study = importlib.import_module('configs.study_epochs_synthetic').get_config('quick')
  study.variants = {'no_remedy': study.variants.no_remedy.to_dict()}
  study.num_seeds = 3
  lines = []
  results = run.run_study(study, str(tmp_path), echo=lines.append)
  assert len(results) == 6
  num_train = study.base.data.num_train
  for r in results:
    # Same epochs at both batch sizes: total examples / batch steps, within one batch.
    assert num_train - r['batch_size'] < r['examples_run'] == r['steps_run'] * r['batch_size']
    assert r['examples_run'] <= num_train and r['budget_steps'] == r['steps_run']
    assert 0.0 <= r['final_metric'] <= 1.0 and math.isfinite(r['final_eval_loss'])
    assert r['best_metric'] >= r['final_metric'] and r['reached'] is False
    assert [s for s, _ in r['eval_curve']][-1] == r['steps_run']  # evaluated at the end
    assert r['lr'] == pytest.approx(0.05)  # no_remedy: the batch-32 lr at every batch
  assert any('epochs), final eval/top1' in l for l in lines)
  rows = aggregate.fixed_epochs(results)
  assert [(r['variant'], r['batch_size']) for r in rows] == [('no_remedy', 32),
                                                             ('no_remedy', 256)]
  for row in rows:
    finals = [r['final_metric'] for r in results if r['batch_size'] == row['batch_size']]
    assert row['final_metric']['kind'] == 'std' and row['final_metric']['n'] == 3
    assert row['final_metric']['std'] == pytest.approx(np.std(finals, ddof=1))
  # The seeds are different runs, and with one lr for 8x the batch the large batch loses.
  assert len({r['final_metric'] for r in results if r['batch_size'] == 32}) > 1
  assert rows[0]['final_metric']['mean'] > rows[1]['final_metric']['mean']
  text = (tmp_path / 'report.md').read_text()
  assert '## Final held-out top-1 accuracy (%)' in text
  assert (tmp_path / 'figures' / 'accuracy_vs_batch.png').read_bytes()[:8] == PNG_MAGIC
  assert len((tmp_path / 'results.jsonl').read_text().splitlines()) == 6
  assert json.loads((tmp_path / 'study_config.json').read_text())['kind'] == 'fixed_epochs'


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(SHIPPED))
def test_quick_configs_run_end_to_end(name, tmp_path):
  """The shipped :quick studies as they are (2 variants x 2 batch sizes x 2 seeds)."""
  study = importlib.import_module(f'configs.{name}').get_config('quick')
  results = run.run_study(study, str(tmp_path), echo=lambda *_: None)
  assert len(results) == 8 and not any(r['diverged'] for r in results)
  rows = aggregate.fixed_epochs(results)
  assert all(r['final_metric']['kind'] == 'min-max' for r in rows)
  epochs = {round(r['examples_run'] / r['num_train'], 1) for r in results}
  assert epochs == {study.budget.epochs}
  assert (tmp_path / 'figures' / 'accuracy_vs_batch.png').exists()
