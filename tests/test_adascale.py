"""AdaScale SGD (bigbatch/adascale.py): the trainer's step against a NumPy implementation of the
paper's Algorithm 1 on a quadratic with known gradient noise, the gain against its analytic
value, the config checks, the run's length (stops at the first tau / S >= T_B) and resume."""
from __future__ import annotations

import json
import os
import sys

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import checkpoint
from bigbatch import config_lib
from bigbatch import hooks
from bigbatch import loop
from bigbatch import optim
from bigbatch import sharding
from bigbatch import step as step_lib
from bigbatch import trainer as trainer_lib
from bigbatch import workdir as workdir_lib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import quickstart  # noqa: E402

D = 16  # parameter dimension of the quadratic
DEVICES, K = 8, 2  # 'data' devices x microbatches: 16 small batches per update
DECAY = 0.9


def _quadratic_config(*, base_lr, base_batch, global_batch, steps, **overrides):
  c = config_lib.base_config()
  return config_lib.override(c, **{
      'optimizer.adascale': True, 'noise_scale.enabled': True,
      'noise_scale.ema_decay': DECAY, 'lr.scaling': 'none', 'lr.base_lr': base_lr,
      'lr.base_batch': base_batch, 'global_batch': global_batch, 'accumulation_steps': K,
      'num_steps': steps, **overrides})


def _loss_fn(params, batch_stats, x, y, key):
  """0.5 |w - x_i|^2 averaged over the examples x_i: gradient w - mean(x), whose per-example
  covariance is that of the x_i."""
  del y, key
  loss = 0.5 * jnp.mean(jnp.sum(jnp.square(params['w'][None] - x), axis=-1))
  return loss, (batch_stats, jnp.zeros((), jnp.float32))


def _stepper(config, w0):
  """The real optimizer and train_step under shard_map over 8 devices: (state, step_fn)."""
  opt = optim.make(config, num_train_examples=config.global_batch * 1000)
  mesh = sharding.make_mesh(config)
  assert mesh.shape['data'] == DEVICES
  params = {'w': jnp.asarray(w0, jnp.float32)}
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
      opt_state=opt.tx.init(params), rng=jax.random.PRNGKey(0),
      nonfinite_streak=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
      ema_params={}, noise_scale={'g2': jnp.zeros(()), 'trace': jnp.zeros(())})

  def per_device(state, batch):
    return step_lib.train_step(state, batch, loss_fn=_loss_fn, tx=opt.tx, lr_fn=opt.lr_fn,
                               noise_scale_decay=DECAY, adascale=opt.adascale)

  specs = jax.tree.map(lambda _: P(), state)
  step_fn = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                  in_specs=(specs, sharding.BATCH_SPEC), out_specs=(specs, P())),
                    in_shardings=(sharding.named(mesh, specs),
                                  jax.NamedSharding(mesh, sharding.BATCH_SPEC)))
  return opt, state, step_fn


def _batches(rng, steps, global_batch, w_star, sigma):
  """[steps, K, global_batch / K, D] targets x_i ~ N(w*, sigma^2 I)."""
  shape = (steps, K, global_batch // K, D)
  return (w_star + sigma * rng.standard_normal(shape)).astype(np.float32)


def _base_lr(s, *, peak, warmup, total):
  """The base schedule in steps of the global batch, written out: linear warmup from 0, then
  cosine decay to 0 at `total` (optax's, continued at fractional steps)."""
  if s < warmup:
    return peak * s / warmup
  t = min(s - warmup, total - warmup) / (total - warmup)
  return peak * 0.5 * (1 + np.cos(np.pi * t))


def _reference(w0, xs, *, base_lr, base_batch, warmup, total, momentum):
  """Algorithm 1 of Johnson et al. 2020 in float64, with bigbatch's estimator of |G|^2 and
  tr(Sigma) (each device's microbatch against the update) and its bias-corrected moving
  averages: per step, (w after it, gain, tau after it)."""
  global_batch = xs.shape[1] * xs.shape[2]
  scale = global_batch / base_batch
  b = xs.shape[2] // DEVICES
  w, m, tau, ema = np.asarray(w0, np.float64), np.zeros(D), 0.0, np.zeros(2)
  out = []
  for t, x in enumerate(xs.astype(np.float64), start=1):
    small = [w - x[k, d * b:(d + 1) * b].mean(0) for k in range(K) for d in range(DEVICES)]
    g = np.mean(small, axis=0)
    small_sq, big_sq = np.mean([s @ s for s in small]), g @ g
    g2 = (global_batch * big_sq - b * small_sq) / (global_batch - b)
    trace = (small_sq - big_sq) * b * global_batch / (global_batch - b)
    ema = DECAY * ema + (1 - DECAY) * np.array([g2, trace])
    mu2, var = ema / (1 - DECAY ** t)
    sigma2 = max(var, 0.0) / base_batch
    mu2 = max(mu2, 0.0)
    r = (sigma2 + mu2) / (sigma2 / scale + mu2) if sigma2 / scale + mu2 > 0 else 1.0
    r = float(np.clip(r, 1.0, scale))
    lr = r * _base_lr(tau / scale, peak=base_lr, warmup=warmup, total=total)
    m = g + momentum * m
    w = w - lr * m
    tau += r
    out.append((w.copy(), r, tau))
  return out


def test_step_equals_algorithm_1_in_numpy():
  rng = np.random.default_rng(0)
  w_star, w0 = rng.standard_normal(D), np.zeros(D)
  steps, total, warmup = 12, 6, 1
  config = _quadratic_config(base_lr=0.3, base_batch=8, global_batch=64, steps=total,
                             **{'lr.warmup_steps': warmup, 'optimizer.momentum': 0.5})
  opt, state, step_fn = _stepper(config, w0)
  assert opt.adascale.scale == 8 and opt.derived.schedule_steps == total
  assert opt.derived.total_steps == 8 * total  # the data budget: every gain 1
  xs = _batches(rng, steps, 64, w_star, sigma=1.5)
  want = _reference(w0, xs, base_lr=0.3, base_batch=8, warmup=warmup, total=total,
                    momentum=0.5)
  gains = []
  for x, (w, r, tau) in zip(xs, want):
    lr_before = float(optim.learning_rate(
        optim.set_adascale_gain(state.opt_state, r), opt.lr_fn, opt.adascale))
    state, metrics = step_fn(state, {'image': x, 'label': np.zeros(x.shape[:2], np.int32)})
    np.testing.assert_allclose(metrics['adascale/gain'], r, rtol=1e-5)
    np.testing.assert_allclose(metrics['adascale/tau'], tau, rtol=1e-5)
    np.testing.assert_allclose(state.params['w'], w, rtol=1e-5, atol=1e-6)
    # train/lr is the lr applied: the gain times the base schedule at tau / S before the update.
    np.testing.assert_allclose(metrics['lr'], lr_before, rtol=1e-5)
    gains.append(r)
  # As w nears w*, noise dominates the gradient: the gain grows from near 1 toward S, and the
  # schedule's position tau / S passed the warmup.
  assert 1.0 <= gains[0] < 1.5 < gains[-1] <= 8.0
  assert want[-1][2] / 8 > warmup


def test_gain_averages_to_the_analytic_value():
  # w stays at w0 (lr 1e-9): mu2 = |w0 - w*|^2 = 8, sigma2 = D sigma^2 / base_batch = 8, so
  # r = (8 + 8) / (8 / S + 8) = 16 / 9 at S = 8.
  rng = np.random.default_rng(1)
  w_star = np.full(D, np.sqrt(8 / D))
  config = _quadratic_config(base_lr=1e-9, base_batch=8, global_batch=64, steps=400,
                             **{'lr.decay': 'constant'})
  _, state, step_fn = _stepper(config, np.zeros(D))
  gains = []
  for x in _batches(rng, 200, 64, w_star, sigma=2.0):
    state, metrics = step_fn(state, {'image': x, 'label': np.zeros(x.shape[:2], np.int32)})
    gains.append(float(metrics['adascale/gain']))
  assert np.mean(gains[40:]) == pytest.approx(16 / 9, rel=0.05)
  assert all(1.0 <= g <= 8.0 for g in gains)


@pytest.mark.parametrize('overrides,field', [
    ({'optimizer.name': 'adamw'}, 'optimizer.name'),
    ({'optimizer.name': 'lars'}, 'optimizer.name'),
    ({'noise_scale.enabled': False}, 'noise_scale.enabled'),
    ({'lr.scaling': 'linear'}, 'lr.scaling'),
    ({'lr.base_batch': 128}, 'lr.base_batch'),  # S = 64 / 128 < 1
    ({'num_epochs': 4, 'num_steps': None, 'batch_schedule': ((2, 2),)}, 'batch_schedule'),
])
def test_config_errors_name_the_field(overrides, field):
  config = _quadratic_config(base_lr=0.1, base_batch=8, global_batch=64, steps=10, **overrides)
  with pytest.raises(config_lib.ConfigError, match=rf'config\.{field}'):
    config_lib.validate(config, num_devices=8)
  ok = _quadratic_config(base_lr=0.1, base_batch=8, global_batch=64, steps=10)
  config_lib.validate(ok, num_devices=8)


def test_other_runs_keep_their_optimizer_state_and_old_workdirs_resume(tmp_path):
  plain = config_lib.base_config()
  plain.num_steps = 10
  params = {'w': jnp.zeros(3)}
  state = optim.make(plain, 1000).tx.init(params)
  assert set(state.hyperparams) == {'peak_lr'}
  assert jax.tree.structure(state) == jax.tree.structure(
      optim.make(plain, 1000).tx.init(params))
  ada = _quadratic_config(base_lr=0.1, base_batch=8, global_batch=64, steps=10)
  assert set(optim.make(ada, 1000).tx.init(params).hyperparams) == {
      'peak_lr', 'adascale_gain', 'adascale_tau'}
  with pytest.raises(ValueError, match='adascale'):  # its lr needs S
    optim.learning_rate(optim.make(ada, 1000).tx.init(params), optim.make(ada, 1000).lr_fn)
  # A config recorded before the field existed resumes under the default.
  old = json.loads(plain.to_json_best_effort())
  del old['optimizer']['adascale']
  workdir_lib.check_compatible(str(tmp_path), plain, num_train=1000, resume_step=5,
                               checkpoint_config=(5, old))
  with pytest.raises(workdir_lib.WorkdirError, match='optimizer.adascale'):
    workdir_lib.check_compatible(str(tmp_path), config_lib.override(
        config_lib.base_config(), num_steps=10, **{'optimizer.adascale': True}),
        num_train=1000, resume_step=5, checkpoint_config=(5, old))


def _digits_config():
  """The quickstart CNN at width 8 on the digits, batch 128 at base batch 32 (S = 4), a
  schedule of T_B = 8 steps: between 8 (every gain S) and 32 (every gain 1) updates."""
  c = quickstart.get_config('steps=8')
  c.model.width = 8
  c.log_every_steps = 1
  c.eval_every_epochs = None
  c.checkpoint_every_steps = 3
  c.optimizer.adascale = True
  c.noise_scale.enabled = True
  c.lr.scaling = 'none'
  c.lr.base_batch = 32
  c.lr.base_lr = 0.4
  c.lr.warmup_steps = None
  return c


class _StopAt(hooks.Hook):
  """Ends the run after update `at` (its checkpoint written), as a preemption would."""
  order = 1

  def __init__(self, at):
    self.at = at

  def after_step(self, run, done):
    if done == self.at:
      run.should_stop = True


def _train_records(workdir):
  drop = lambda r: {k: v for k, v in r.items() if 'per_sec' not in k and not k.startswith('perf/')}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [drop(r) for r in rows if 'train/loss' in r]


def test_run_stops_when_tau_reaches_the_schedule_and_resumes_exactly(tmp_path):
  straight, restarted = str(tmp_path / 'a'), str(tmp_path / 'b')
  loop.train_and_evaluate(_digits_config(), straight)
  records = _train_records(straight)
  taus = [r['train/adascale/tau'] / 4 for r in records]
  last = records[-1]['step']
  assert [r['step'] for r in records] == list(range(1, last + 1))
  assert taus[-1] >= 8 > taus[-2]  # the first update with tau / S >= T_B, and no other
  assert 8 < last < 32  # some gains were below S (9 on this machine)
  assert all(1.0 <= r['train/adascale/gain'] <= 4.0 for r in records)
  assert checkpoint.Checkpointer(os.path.join(straight, 'checkpoints')).latest_step() == last
  derived = json.load(open(os.path.join(straight, 'derived.json')))['derived']
  assert derived['total_steps'] == 32 and derived['schedule_steps'] == 8
  assert derived['adascale_scale'] == 4.0

  loop.train_and_evaluate(_digits_config(), restarted, hooks=[_StopAt(4)])
  assert [r['step'] for r in _train_records(restarted)] == [1, 2, 3, 4]
  loop.train_and_evaluate(_digits_config(), restarted)  # resumes from 4 (the stop's checkpoint)
  assert _train_records(restarted) == records
  config = _digits_config()
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                              image_shape=(8, 8, 1), num_classes=10)
  a = checkpoint.Checkpointer(os.path.join(straight, 'checkpoints')).restore(last, trainer.state)
  b = checkpoint.Checkpointer(os.path.join(restarted, 'checkpoints')).restore(last, trainer.state)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A rerun of the finished run trains nothing more.
  loop.train_and_evaluate(_digits_config(), straight)
  assert _train_records(straight) == records
  assert checkpoint.Checkpointer(os.path.join(straight, 'checkpoints')).latest_step() == last


def test_gain_safeguards():
  from bigbatch import adascale  # pylint: disable=g-import-not-at-top
  s = adascale.Settings(scale=8.0, base_batch=4.0)
  gain = lambda g2, trace: float(adascale.gain(g2, trace, s))
  assert gain(1.0, 4.0) == pytest.approx(2 / (1 / 8 + 1))  # sigma2 = 4 / 4 = 1
  assert gain(-1.0, 4.0) == gain(0.0, 4.0) == 8.0  # only noise measured: the pure-noise limit
  assert gain(1.0, -4.0) == gain(1.0, 0.0) == 1.0  # no noise: the base-batch step
  assert gain(0.0, 0.0) == gain(-1.0, -1.0) == 1.0
  assert gain(float('nan'), 4.0) == gain(1.0, float('inf')) == 1.0
