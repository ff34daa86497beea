"""The batch-size advisor: its prediction agrees with the study's own trade-off fit, its noise
scale and Hessian B_noise are the estimators they claim to be, its batch schedule follows the
measured noise scale, and the command runs a probe end to end, resumes, and fails clearly."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import data as data_lib
from bigbatch import input_pipeline
from bigbatch import schedule
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch.study import advice_render
from bigbatch.study import advisor
from bigbatch.study import aggregate
from configs import study_digits

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_the_prediction_lies_on_the_curve_the_study_fits():
  # The advisor's S(B) and E(B) are the curve the study report fits to measured points: fitting
  # it to the predicted points gives back S_min, E_min and B_crit = B_noise.
  pred = advisor.predict(300.0, 16, 500.0, advisor.powers_of_two(16, 4096))
  assert pred['per_batch'][0]['steps'] == pytest.approx(500.0)  # anchored on the probe
  assert pred['S_min'] * (1 + 300 / 16) == pytest.approx(500.0)
  for r in pred['per_batch']:
    s, e, b = r['steps'], r['examples'], r['batch']
    assert e == pytest.approx(s * b)
    assert (s / pred['S_min'] - 1) * (e / pred['E_min'] - 1) == pytest.approx(1.0)
  fit = aggregate.fit_steps_examples([(r['steps'], r['examples']) for r in pred['per_batch']])
  assert fit['B_crit'] == pytest.approx(300.0, rel=1e-6)
  assert fit['S_min'] == pytest.approx(pred['S_min'], rel=1e-6)


def test_powers_of_two_and_the_recommended_batch():
  assert advisor.powers_of_two(16, 1024) == [16, 32, 64, 128, 256, 512, 1024]
  assert advisor.powers_of_two(64, 16384)[-1] == 16384
  assert advisor.powers_of_two(256, 1000) == [256, 512, 1000]
  batches = advisor.powers_of_two(16, 1024)
  # E(B) = E_min (1 + B / B_noise) <= 2 E_min  <=>  B <= B_noise.
  assert advisor.recommend(300.0, batches) == 256
  assert advisor.recommend(256.0, batches) == 256
  assert advisor.recommend(5.0, batches) == 16  # none within 2x: the smallest
  assert advisor.recommend(1e9, batches) == 1024


def test_late_noise_scale_is_the_ratio_of_means_over_the_last_half_with_its_spread():
  series = [(s, 1.0, 1e6) for s in range(5, 50, 5)]  # an early part that must be ignored
  late = [(s, 2.0 if s < 80 else 1.0, 200.0) for s in range(50, 105, 5)]
  est = advisor.b_simple_late(series + late, 100)
  rows = [r for r in series + late if 50 < r[0] <= 100]
  assert est['value'] == pytest.approx(np.mean([r[2] for r in rows]) / np.mean([r[1] for r in rows]))
  assert est['from_step'] == 55 and est['to_step'] == 100 and est['num_logged'] == 10
  assert est['low'] == pytest.approx(100.0) and est['high'] == pytest.approx(200.0)
  with pytest.raises(ValueError, match='log more often'):
    advisor.b_simple_late(series[:3], 15)


def test_the_noise_driven_schedule_follows_the_measured_noise_scale():
  # 10 steps per epoch; B_simple 40 in epoch 0, 70 in epoch 1, 30 in epoch 2 (never shrinks),
  # 300 from epoch 3 on (capped by max_batch 128).
  values = [40, 70, 30, 300, 300]
  series = [(e * 10 + i, 1.0, float(v)) for e, v in enumerate(values) for i in range(1, 10)]
  rows = advisor.noise_schedule(series, base_batch=16, steps_per_epoch=10, num_epochs=8,
                                max_batch=128, num_train=10_000)
  assert rows == ((1, 2), (2, 4), (4, 8))
  config = config_lib.base_config()
  config.global_batch, config.num_epochs, config.batch_schedule = 16, 8.0, rows
  schedule.validate(config)  # what a study variant can pass to config.batch_schedule
  phases = schedule.batch_phases(config, 10_000)
  assert [p.global_batch for p in phases] == [16, 32, 64, 128]


def test_examples_seen_under_a_batch_schedule():
  config = config_lib.base_config()
  config.global_batch, config.num_epochs, config.batch_schedule = 16, 4.0, ((1, 2), (3, 4))
  phases = schedule.batch_phases(config, 160)  # 10, 5, 5, then 2 steps per epoch
  assert [(p.start_step, p.end_step) for p in phases] == [(0, 10), (10, 20), (20, 22)]
  assert schedule.examples_seen(10, 16, phases) == 160
  assert schedule.examples_seen(12, 16, phases) == 160 + 64
  assert schedule.examples_seen(22, 16, phases) == 160 + 320 + 128
  assert schedule.examples_seen(7, 16) == 112


def test_the_hessian_noise_scale_equals_the_formula_on_dense_hessian_and_gradients():
  config = config_lib.base_config()
  config.data.name = 'digits'
  config.model.name, config.model.width, config.model.norm = 'mlp', 6, 'none'
  config.global_batch, config.num_steps = 64, 1
  mesh = sharding.make_mesh(config)
  dataset = data_lib.create(config)
  trainer = trainer_lib.build(config, mesh, num_train=dataset.num_train,
                              image_shape=dataset.image_shape, num_classes=dataset.num_classes)
  state = trainer.state
  out = advisor.hessian_noise_scale(trainer, state, dataset, config, groups=6, num_examples=40,
                                    microbatch=4)
  # Reference: the dense Hessian of the same objective over the same first 40 examples, and the
  # gradients of the next 6 groups of 4.
  batches = [input_pipeline.make_global_batches(dataset, i, trainer.batch_sharding)
             for i in range(2)]
  x = np.concatenate([np.asarray(b['image']).reshape(-1, 8, 8, 1) for b in batches])
  y = np.concatenate([np.asarray(b['label']).reshape(-1) for b in batches])
  flat, unravel = ravel_pytree(jax.device_get(state.params))
  loss = trainer.task.objective(trainer.model)
  f = lambda v, xs, ys: loss(unravel(v), {}, xs, ys)
  h = np.asarray(jax.hessian(f)(flat, x[:40], y[:40]), np.float64)
  gs = np.stack([np.asarray(jax.grad(f)(flat, x[40 + 4 * i:44 + 4 * i], y[40 + 4 * i:44 + 4 * i]))
                 for i in range(6)]).astype(np.float64)
  q_small = np.mean([g @ h @ g for g in gs])
  g_big = gs.mean(0)
  q_big = g_big @ h @ g_big
  b, B = 4, 24
  ghg = (B * q_big - b * q_small) / (B - b)
  tr = (q_small - q_big) * b * B / (B - b)
  assert out['gHg'] == pytest.approx(ghg, rel=2e-3)
  assert out['trace_h_sigma'] == pytest.approx(tr, rel=2e-3)
  assert out['b_noise'] == pytest.approx(tr / ghg, rel=5e-3)


def _quick_study():
  s = study_digits.get_config('quick')
  s.batch_sizes = (16, 64, 256)
  s.target.value = 0.6
  s.log_every_steps = 1
  return s


def test_a_probe_end_to_end_writes_the_advice_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
  study = _quick_study()
  opts = advisor.Options(hessian_groups=4, hessian_examples=64)
  lines = []
  advice = advisor.advise(study, str(tmp_path), opts, echo=lines.append)
  saved = json.loads((tmp_path / 'advice.json').read_text())
  assert saved['probe']['batch'] == 16 and saved['probe']['reached']
  steps = saved['probe']['steps_to_target']
  pred = saved['prediction']
  assert [r['batch'] for r in pred['per_batch']] == [16, 32, 64, 128, 256]
  assert pred['per_batch'][0]['steps'] == pytest.approx(steps)  # anchored on the probe
  assert pred['B_crit'] == pytest.approx(saved['b_simple']['value'])
  assert saved['b_simple']['low'] <= saved['b_simple']['value'] * 1.0001
  h = saved['b_noise_hessian']
  assert h['step'] == steps and math.isfinite(h['gHg']) and h['groups'] == 4
  rec = saved['recommendation']
  assert rec['batch'] == advisor.recommend(saved['b_simple']['value'],
                                           [r['batch'] for r in pred['per_batch']])
  assert rec['peak_lr'] == pytest.approx(0.05 * rec['batch'] / 32)  # the config's linear rule
  assert (tmp_path / 'advice.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert any('recommended batch' in l for l in lines)
  assert lines[0].startswith('[advise] probe: batch 16 (1 microbatch(es) of 2 on each of 8 ')
  assert lines[1:] == advice_render.lines(advice)
  # A rerun resumes: the probe is at its target, nothing trains, the advice is the same.
  from bigbatch import loop  # pylint: disable=g-import-not-at-top
  train = loop.train_and_evaluate
  def no_training(config, workdir, **kw):
    metrics = os.path.join(workdir, 'metrics.jsonl')
    before = open(metrics).read()
    out = train(config, workdir, **kw)
    assert open(metrics).read() == before
    return out
  monkeypatch.setattr(loop, 'train_and_evaluate', no_training)
  again = advisor.advise(study, str(tmp_path), opts, echo=lambda *_: None)
  assert again['prediction'] == advice['prediction']
  assert again['b_noise_hessian'] == advice['b_noise_hessian']


@pytest.mark.slow
def test_a_probe_stopped_by_its_budgets_resumes_to_the_advice_of_a_straight_probe(tmp_path):
  study = _quick_study()
  study.target.value = 0.9  # not met at the end of 20 updates
  opts = advisor.Options(hessian=False)
  straight = advisor.advise(study, str(tmp_path / 'straight'), opts, echo=lambda *_: None)
  wd = str(tmp_path / 'stopped')
  # Out of time after the first update: no estimate yet, and a clear error (exit code 2).
  with pytest.raises(advisor.ProbeError, match='log more often') as e:
    advisor.advise(study, wd, advisor.Options(hessian=False, budget_minutes=1e-9),
                   echo=lambda *_: None)
  assert e.value.code == 2
  # Out of examples before the target: the noise scale and the batch, but no steps prediction.
  short = advisor.advise(study, wd, advisor.Options(hessian=False, budget_examples=16 * 20),
                         echo=lambda *_: None)
  assert not short['probe']['reached'] and short['probe']['steps_run'] == 20
  assert short['prediction'] is None and math.isfinite(short['b_simple']['value'])
  assert any('NOT reached' in l for l in advice_render.lines(short))
  # Without a budget it resumes to the target, as the straight probe got there.
  resumed = advisor.advise(study, wd, opts, echo=lambda *_: None)
  assert resumed['probe']['steps_to_target'] == straight['probe']['steps_to_target']
  assert resumed['b_simple'] == straight['b_simple']
  assert resumed['prediction'] == straight['prediction']


@pytest.mark.parametrize('change, message', [
    (dict(variant='nope'), r'--variant=nope: not a variant'),
    (dict(batch=12), r'probe batch 12 must be a multiple of the microbatch 8'),
    (dict(batch=8), r'hold at least two of them'),
    (dict(lr=-1.0), r'--lr=-1.0'),
    (dict(budget_examples=4), r'--budget_examples=4 is less than one probe batch'),
])
def test_bad_probe_choices_are_refused_before_anything_runs(tmp_path, change, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    advisor.advise(_quick_study(), str(tmp_path), advisor.Options(**change))
  assert not (tmp_path / 'probe').exists()


def test_a_study_without_a_target_probes_its_budget_and_matches_its_final_metric(tmp_path):
  study = _quick_study()
  study.target.value = None
  study.budget.epochs = 1.0
  p = advisor.probe_trial(study, advisor.Options())
  assert p.config.target.value is None and not p.config.target.stop
  assert advisor.probe_trial(study, advisor.Options(target=0.5)).config.target.stop
  advice = advisor.advise(study, str(tmp_path), advisor.Options(hessian=False),
                          echo=lambda *_: None)
  probe = advice['probe']
  assert probe['anchor'] == 'final' and probe['steps_run'] == 1437 // 16
  assert advice['prediction']['per_batch'][0]['steps'] == pytest.approx(probe['steps_run'])
  assert 'which the predictions below are for' in advice_render.lines(advice)[0]


# docs/errors.md rows tested here (the `advise-*` rows).
DOC_ROWS = ('advise-not-a-study', 'advise-bad-probe', 'advise-probe-diverged')
CLI_ROWS = {
    'advise-not-a-study': (['--config=configs/quickstart.py'], 1,
                           'bigbatch.advise: flag error: configs/quickstart.py is not a study '
                           'config'),
    'advise-bad-probe': (['--config=configs/study_digits.py:quick', '--batch=12'], 2,
                         'bigbatch.advise: config error: the probe batch 12 must be a multiple '
                         'of the microbatch 8'),
    'advise-probe-diverged': (['--config=configs/study_digits.py:quick', '--lr=1e9',
                               '--nohessian'], 3,
                              'bigbatch.advise: probe error: the probe diverged'),
}


@pytest.mark.parametrize('row', [
    'advise-not-a-study', 'advise-bad-probe',
    pytest.param('advise-probe-diverged', marks=pytest.mark.slow)])
def test_the_command_fails_in_one_line_with_the_trainers_exit_codes(row, tmp_path):
  args, code, line = CLI_ROWS[row]
  proc = subprocess.run([sys.executable, '-m', 'bigbatch.advise', *args,
                         f'--workdir={tmp_path / "wd"}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == code, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(line), last
  assert 'Traceback' not in proc.stderr
  if row == 'advise-bad-probe':  # refused before anything is written
    assert not (tmp_path / 'wd' / 'probe').exists()
