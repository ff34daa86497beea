"""The face-recognition batch-size study (configs/study_faces.py): its trials, the fixed-epoch
report's extra metrics and steps to target, and (slow) a quick sweep through the trainer."""
from __future__ import annotations

import importlib
import math

import pytest

from bigbatch import config_lib
from bigbatch import schedule
from bigbatch.study import aggregate
from bigbatch.study import grid
from bigbatch.study import render_epochs
from bigbatch.study import run

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TAR = 'verify/synthetic/tar_at_far_1e-3'


def _study(arg=None):
  return importlib.import_module('configs.study_faces').get_config(arg)


def test_face_study_trials_are_the_stated_comparison():
  study = _study()
  trials = grid.trials(study)
  cells = {(t.variant, t.batch_size) for t in trials}
  # Three optimizers at every batch, Partial FC 0.1 only at the large end; 2 seeds each.
  assert cells == ({(v, b) for v in ('sgd_linear', 'lamb_sqrt', 'lars') for b in (256, 1024, 4096)}
                   | {('sgd_linear_pfc', 1024), ('sgd_linear_pfc', 4096)})
  assert len(trials) == len(cells) * 2
  num_train = 4000 * 4
  lrs = {}
  for t in trials:
    c = t.config
    assert c.task == 'face' and c.data.num_identities == 4000  # thousands of classes
    assert c.target.value == 0.85 and c.target.stop is False  # recorded, the budget runs
    derived = schedule.resolve(c, num_train)
    wanted = study.budget.epochs * num_train
    assert wanted - t.batch_size < derived.total_steps * t.batch_size <= wanted
    assert c.face.sample_rate == (0.1 if t.variant == 'sgd_linear_pfc' else 1.0)
    lrs[t.variant, t.batch_size] = derived.peak_lr
    if c.optimizer.name in ('lars', 'lamb'):
      assert 'centers' in c.optimizer.trust_ratio_exclude
  assert lrs['sgd_linear', 4096] == pytest.approx(0.025 * 16)  # linear
  assert lrs['lamb_sqrt', 4096] == pytest.approx(0.005 * 4)  # square root
  assert lrs['lars', 4096] == pytest.approx(0.5 * 16)
  assert lrs['sgd_linear_pfc', 4096] == lrs['sgd_linear', 4096]


def test_variant_batch_sizes_must_be_a_subset():
  study = _study()
  study.variants.sgd_linear_pfc.batch_sizes = (4096, 8192)
  with pytest.raises(config_lib.ConfigError, match='sgd_linear_pfc.batch_sizes'):
    grid.trials(study)


def _result(variant, batch, seed, final, tar, steps_to_target):
  steps = 16000 * 6 // batch
  return {
      'trial_id': f'{variant}-b{batch}-lr0-s{seed}', 'variant': variant,
      'data': 'face_synthetic', 'batch_size': batch, 'lr': 0.1, 'lr_index': 0, 'seed': seed,
      'target': {'metric': 'verify/synthetic/accuracy', 'value': 0.85, 'mode': 'max'},
      'reached': steps_to_target is not None, 'steps_to_target': steps_to_target,
      'examples_to_target': None if steps_to_target is None else steps_to_target * batch,
      'final_metric': final, 'best_metric': final,
      'final_metrics': {'verify/synthetic/accuracy': final, TAR: tar},
      'final_eval_loss': None, 'best_eval_loss': None, 'final_train_loss': 5.0,
      'steps_run': steps, 'epochs_run': steps * batch / 16000, 'budget_epochs': 6.0,
      'diverged': False,
  }


def test_fixed_epochs_report_tabulates_extra_metrics_and_steps_to_target(tmp_path):
  results = [_result('sgd', 256, 0, 0.90, 0.40, 124), _result('sgd', 256, 1, 0.92, 0.50, 62),
             _result('sgd', 4096, 0, 0.80, 0.10, None), _result('sgd', 4096, 1, 0.86, 0.20, 18)]
  rows = {r['batch_size']: r for r in aggregate.fixed_epochs(results)}
  assert rows[256]['n_reached'] == 2 and rows[256]['steps_to_target']['mean'] == 93
  assert rows[4096]['n_reached'] == 1 and rows[4096]['steps_to_target']['mean'] == 18
  tar, tar_range = rows[256]['final_metrics'][TAR]
  assert tar['mean'] == pytest.approx(0.45) and tar_range == (0.40, 0.50)
  path = render_epochs.write(results, str(tmp_path), title='T',
                                          extra_metrics=(TAR,))
  text = open(path).read()
  assert f'## Final {TAR}' in text and '| 256 | 0.45 [0.4, 0.5] |' in text
  assert '## Steps to the target (verify/synthetic/accuracy ≥ 0.85)' in text
  assert '| 256 | 93 [62, 124] steps' in text and '(1/2) |' in text
  assert 'target verify/synthetic/accuracy ≥ 0.85 recorded, not stopped at' in text
  for stem in ('final_verify_synthetic_tar_at_far_1e-3', 'steps_to_target', 'accuracy_vs_batch'):
    assert f'figures/{stem}.png' in text
    assert (tmp_path / 'figures' / f'{stem}.png').read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_quick_face_study_end_to_end(tmp_path):
  """The :quick face study through the trainer: 3 trials, every one with its verification
  accuracy and TAR@FAR at the end, the budget run in full (the target does not stop it)."""
  study = _study('quick')
  study.target.value = 0.5  # reached at the first evaluation: recorded, training goes on
  results = run.run_study(study, str(tmp_path), echo=lambda *_: None)
  assert sorted(r['trial_id'] for r in results) == [
      'sgd_linear-b256-lr0-s0', 'sgd_linear-b64-lr0-s0', 'sgd_linear_pfc-b256-lr0-s0']
  for r in results:
    assert r['steps_run'] == r['budget_steps'] and not r['diverged']
    assert 0.5 <= r['final_metric'] <= 1.0 and math.isfinite(r['final_metrics'][TAR])
    assert r['reached'] and r['steps_to_target'] < r['steps_run']
  text = (tmp_path / 'report.md').read_text()
  assert f'## Final {TAR}' in text and '## Steps to the target' in text


def test_pixel_baseline_is_the_verification_protocol_on_raw_pixels():
  """benchmarks/face_pixel_baseline.py (the floor the face study's report quotes): raw pixels
  carry identity, but far from what a trained model reaches, and the result is deterministic."""
  from benchmarks import face_pixel_baseline  # pylint: disable=g-import-not-at-top
  config = _study('quick').base
  first = face_pixel_baseline.pixel_baseline(config)['synthetic']
  assert first['pairs'] == 600 and 0.55 < first['accuracy'] < 0.9
  assert 0.0 <= first['tar_at_far_1e-3'] <= 1.0
  assert face_pixel_baseline.pixel_baseline(config)['synthetic'] == first
