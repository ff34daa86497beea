"""Tests for bigbatch.schedule, bigbatch.optim and bigbatch.trust_ratio: resolved numbers, lr
schedules, masks and the reference LARS/LAMB."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import optim
from bigbatch import schedule
from bigbatch import trust_ratio

IMAGENET_TRAIN = 1_281_167


def _config(**overrides):
  """base_config() with dotted overrides: _config(**{'lr.decay': 'step'})."""
  c = config_lib.base_config()
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _goyal_8k(**overrides):
  return _config(**{
      'global_batch': 8192, 'num_epochs': 90.0, 'lr.base_lr': 0.1, 'lr.base_batch': 256,
      'lr.scaling': 'linear', 'lr.warmup_epochs': 5.0, 'lr.warmup_init_lr': 0.1,
      'lr.decay': 'step', 'lr.boundaries_epochs': (30, 60, 80), 'lr.decay_factor': 0.1,
      **overrides})


def _params():
  # numpy, not jax.random: a random-key compile would cost more than the tests it feeds.
  rng = np.random.default_rng(0)
  shapes = {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)}, 'bn': {'scale': (4,), 'bias': (4,)},
            'dense': {'kernel': (4, 10), 'bias': (10,)}}
  return jax.tree.map(lambda shape: jnp.asarray(rng.normal(size=shape) + 0.5, jnp.float32),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


# --- Resolved numbers and the schedule -------------------------------------------------------

def test_goyal_8k_derived():
  d = schedule.resolve(_goyal_8k(), IMAGENET_TRAIN)
  assert (d.steps_per_epoch, d.total_steps, d.warmup_steps) == (156, 14040, 780)
  assert d.boundaries_steps == (4680, 9360, 12480)
  assert d.peak_lr == pytest.approx(3.2)
  assert json.loads(json.dumps(d.as_dict())) == d.as_dict()


def test_goyal_8k_schedule():
  c = _goyal_8k()
  d = schedule.resolve(c, IMAGENET_TRAIN)
  lr_fn = jax.jit(optim.lr_schedule(c, d))  # one compile is faster than many eager ops
  epochs = (0, 2.5, 5, 29.9, 30, 60, 80)
  got = [float(lr_fn(round(e * 156), d.peak_lr)) for e in epochs]
  np.testing.assert_allclose(got, [0.1, 1.65, 3.2, 3.2, 0.32, 0.032, 0.0032], rtol=1e-5)
  # The boundary step itself is already decayed; the step before is not.
  np.testing.assert_allclose(float(lr_fn(4679, d.peak_lr)), 3.2, rtol=1e-6)


@pytest.mark.parametrize('rule, factor', [('linear', 32.0), ('sqrt', math.sqrt(32.0)),
                                          ('none', 1.0)])
def test_scaling_rules(rule, factor):
  d = schedule.resolve(_goyal_8k(**{'lr.scaling': rule}), IMAGENET_TRAIN)
  assert d.peak_lr == pytest.approx(0.1 * factor)


def _schedule(decay, **overrides):
  c = _config(**{'global_batch': 256, 'num_steps': 110, 'lr.base_lr': 2.0, 'lr.base_batch': 256,
                 'lr.warmup_steps': 10, 'lr.warmup_init_lr': 0.0, 'lr.decay': decay,
                 'lr.end_lr': 0.01, 'lr.power': 2.0, **overrides})
  d = schedule.resolve(c, 10_000)
  lr_fn = jax.jit(optim.lr_schedule(c, d))
  return lambda step: float(lr_fn(step, d.peak_lr))


@pytest.mark.parametrize('decay, mid', [
    ('cosine', 0.01 + (2.0 - 0.01) * 0.5),  # cos(pi/2) = 0
    ('polynomial', 0.01 + (2.0 - 0.01) * 0.25),  # (1 - 1/2)^2
    ('linear', (2.0 + 0.01) / 2),
    ('constant', 2.0),
])
def test_decay_endpoints(decay, mid):
  lr = _schedule(decay)
  end = 2.0 if decay == 'constant' else 0.01
  np.testing.assert_allclose(
      [lr(0), lr(5), lr(10), lr(60), lr(110), lr(500)], [0.0, 1.0, 2.0, mid, end, end],
      rtol=1e-5, atol=1e-7)


def test_no_warmup_starts_at_peak():
  lr = _schedule('cosine', **{'lr.warmup_steps': None})
  np.testing.assert_allclose([lr(0), lr(110)], [2.0, 0.01], rtol=1e-6)


def test_warmup_equal_to_total_steps_is_allowed():
  lr = _schedule('cosine', **{'lr.warmup_steps': 110})
  np.testing.assert_allclose([lr(55), lr(110)], [1.0, 2.0], rtol=1e-6)


def test_lr_fn_takes_a_traced_peak():
  c = _goyal_8k()
  d = schedule.resolve(c, IMAGENET_TRAIN)
  lr_fn = jax.jit(optim.lr_schedule(c, d))
  np.testing.assert_allclose(float(lr_fn(390, jnp.float32(6.4))), 0.1 + (6.4 - 0.1) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(lr_fn(5000, jnp.float32(6.4))), 0.64, rtol=1e-6)


def test_durations_in_steps_and_epochs():
  c = _config(**{'global_batch': 100, 'num_steps': 50, 'lr.warmup_steps': 7,
                 'lr.decay': 'step', 'lr.boundaries_steps': (20, 40)})
  d = schedule.resolve(c, 1050)
  assert (d.steps_per_epoch, d.total_steps, d.warmup_steps, d.boundaries_steps) == (
      10, 50, 7, (20, 40))
  c = _config(**{'global_batch': 100, 'num_epochs': 2.5, 'lr.warmup_epochs': 0.25,
                 'lr.boundaries_epochs': (1.0,)})
  d = schedule.resolve(c, 1050)
  # Boundaries only describe the step decay; under cosine they are not used.
  assert (d.total_steps, d.warmup_steps, d.boundaries_steps) == (25, 2, ())
  assert schedule.resolve(_config(num_steps=5), 1050).warmup_steps == 0


@pytest.mark.parametrize('overrides, n, field', [
    ({'global_batch': 2048, 'num_steps': 10}, 1000, 'global_batch'),
    ({'num_steps': 10, 'lr.warmup_steps': 11}, 10_000, 'lr.warmup_steps'),
    ({'num_epochs': 2.0, 'lr.warmup_epochs': 3.0}, 10_000, 'lr.warmup_epochs'),
    ({'num_steps': 10, 'lr.decay': 'step'}, 10_000, 'lr.decay'),
    ({'num_steps': 10, 'lr.decay': 'step', 'lr.boundaries_steps': (0, 5)}, 10_000,
     'lr.boundaries_steps'),
    ({'num_steps': 10, 'lr.decay': 'step', 'lr.boundaries_steps': (5, 11)}, 10_000,
     'lr.boundaries_steps'),
    ({'num_epochs': 3.0, 'lr.decay': 'step', 'lr.boundaries_epochs': (2.0, 1.0)}, 1280,
     'lr.boundaries_epochs'),
    ({'num_epochs': 3.0, 'lr.decay': 'step', 'lr.boundaries_epochs': (4.0,)}, 1280,
     'lr.boundaries_epochs'),
])
def test_config_errors(overrides, n, field):
  c = _config(**overrides)
  with pytest.raises(config_lib.ConfigError, match=f'config.{field}') as e:
    optim.validate(c)  # the form, before the data
    optim.make(c, n)  # what depends on the training set's size
  assert '\n' not in str(e.value)


def test_unknown_optimizer():
  with pytest.raises(config_lib.ConfigError, match='optimizer.name'):
    optim.validate(_config(**{'num_steps': 10, 'optimizer.name': 'adagrad'}))


@pytest.mark.parametrize('overrides, match', [
    ({'lr.scaling': 'table'}, 'needs config.lr.table'),
    ({'lr.scaling': 'table', 'lr.table': ((64, 0.1, None),)}, 'above every row'),
    ({'lr.scaling': 'table', 'lr.table': ((64, 0.1),)}, r'row \(64, 0.1\)'),
    ({'lr.scaling': 'table', 'lr.table': ((1024, 1e39, None),)}, 'not finite in float32'),
    ({'lr.base_lr': 1e38, 'lr.base_batch': 16}, 'not finite in float32'),
])
def test_the_lr_rule_is_checked_before_the_data(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    optim.validate(_config(**{'num_steps': 10, **overrides}))


def test_a_table_gives_the_peak_and_the_warmup():
  c = _config(**{'num_epochs': 10.0, 'lr.scaling': 'table', 'lr.warmup_steps': 3,
                 'lr.table': ((64, 0.1, None), (256, 0.4, 2.0), (1024, 1.6, None))})
  optim.validate(c)
  d = schedule.resolve(c, 1280)  # global batch 128: the second row, 10 steps per epoch
  assert (d.peak_lr, d.warmup_steps, d.total_steps) == (0.4, 20, 100)
  assert schedule.table_row(c) == (256, 0.4, 2.0)


# --- Masks -----------------------------------------------------------------------------------

def test_path_mask():
  mask = trust_ratio.path_mask(_params(), r'(^|/)(bias|scale)$')
  assert mask == {'conv': {'kernel': True, 'bias': False}, 'bn': {'scale': False, 'bias': False},
                  'dense': {'kernel': True, 'bias': False}}
  assert all(jax.tree.leaves(trust_ratio.path_mask(_params(), None)))
  assert all(jax.tree.leaves(trust_ratio.path_mask(_params(), '')))


def _make(name, **overrides):
  c = _config(**{'global_batch': 32, 'num_steps': 100, 'lr.base_lr': 0.1, 'lr.base_batch': 32,
                 'lr.decay': 'constant', 'optimizer.name': name, **overrides})
  return optim.make(c, 1000)


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lars', 'lamb'])
def test_weight_decay_and_trust_ratio_only_on_kernels(name):
  opt = _make(name, **{'optimizer.weight_decay': 0.1})
  params = _params()
  state = opt.tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(opt.tx.update)
  new = params
  for _ in range(3):
    u, state = update(zeros, state, new)
    new = jax.tree.map(lambda p, d: p + d, new, u)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
  assert moved == {'conv': {'kernel': True, 'bias': False}, 'bn': {'scale': False, 'bias': False},
                   'dense': {'kernel': True, 'bias': False}}
  stats = trust_ratio.trust_ratio_stats(state)
  if name in ('sgd', 'adamw'):
    assert stats == {}
    return
  [tr] = [s for s in state.inner_state if isinstance(s, trust_ratio.TrustRatioState)]
  assert tr.trust_ratios['bn']['scale'] == 1 and tr.trust_ratios['conv']['bias'] == 1
  kernels = np.array([tr.trust_ratios['conv']['kernel'], tr.trust_ratios['dense']['kernel']])
  if name == 'lars':
    np.testing.assert_array_equal(kernels, 1.0)  # ||g|| = 0: ratio 1 by the reference rule
  else:
    assert not np.allclose(kernels, 1.0)  # else the 1s of the excluded leaves would not show
  np.testing.assert_allclose(
      [stats['trust_ratio_min'], stats['trust_ratio_mean'], stats['trust_ratio_max']],
      [kernels.min(), kernels.mean(), kernels.max()], rtol=1e-6)


# --- LARS and LAMB against numpy references --------------------------------------------------

def _grads(params, steps, zero=()):
  """Per-step random float64 gradients; leaves named in `zero` (module, name) get zeros."""
  rng = np.random.default_rng(1)
  out = []
  for _ in range(steps):
    g = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    for module, name in zero:
      g[module][name] = np.zeros_like(g[module][name])
    out.append(g)
  return out


def _run(opt, params, grads):
  state = opt.tx.init(params)
  update = jax.jit(opt.tx.update)
  lrs = []
  for g in grads:
    lrs.append(float(optim.learning_rate(state, opt.lr_fn)))
    u, state = update(jax.tree.map(jnp.float32, g), state, params)
    params = jax.tree.map(lambda p, d: p + d, params, u)
  return params, state, lrs


def _excluded(module, name):
  return name in ('bias', 'scale')


@pytest.mark.parametrize('nesterov', [False, True])
def test_lars_matches_reference(nesterov):
  eta, wd, mom = 0.02, 0.01, 0.9
  # Warmup makes the lr change between steps, which is where lr-inside-momentum differs.
  opt = _make('lars', **{'lr.warmup_steps': 4, 'lr.warmup_init_lr': 0.05,
                         'optimizer.weight_decay': wd, 'optimizer.momentum': mom,
                         'optimizer.nesterov': nesterov, 'optimizer.trust_coefficient': eta})
  params = _params()
  grads = _grads(params, 3, zero=[('dense', 'kernel')])
  got, state, lrs = _run(opt, params, grads)
  np.testing.assert_allclose(lrs, [0.05, 0.0625, 0.075], rtol=1e-6)

  w = {m: {n: np.asarray(v, np.float64) for n, v in leaves.items()} for m, leaves in params.items()}
  buf = {m: {n: np.zeros_like(v) for n, v in leaves.items()} for m, leaves in w.items()}
  ratios = {}
  for lr, g in zip(lrs, grads):
    for m, leaves in w.items():
      for n, p in leaves.items():
        gl = g[m][n]
        if _excluded(m, n):
          ratio, d = 1.0, gl
        else:
          wn, gn = np.linalg.norm(p), np.linalg.norm(gl)
          ratio = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
          d = gl + wd * p
        ratios[m, n] = ratio
        buf[m][n] = mom * buf[m][n] + lr * ratio * d
        step = lr * ratio * d + mom * buf[m][n] if nesterov else buf[m][n]
        w[m][n] = p - step
  assert ratios['dense', 'kernel'] == 1.0  # ||g|| = 0
  [tr] = [s for s in state.inner_state if isinstance(s, trust_ratio.TrustRatioState)]
  for (m, n), ratio in ratios.items():
    np.testing.assert_allclose(tr.trust_ratios[m][n], ratio, rtol=1e-5)
  stats = trust_ratio.trust_ratio_stats(state)
  kernels = [ratios['conv', 'kernel'], ratios['dense', 'kernel']]
  np.testing.assert_allclose(
      [stats['trust_ratio_min'], stats['trust_ratio_mean'], stats['trust_ratio_max']],
      [min(kernels), np.mean(kernels), max(kernels)], rtol=1e-5)
  for (m, n) in ratios:
    np.testing.assert_allclose(got[m][n], w[m][n], rtol=1e-5, atol=1e-6)


def test_lamb_matches_reference():
  b1, b2, eps, wd = 0.9, 0.999, 1e-6, 0.01
  opt = _make('lamb', **{'lr.warmup_steps': 4, 'lr.warmup_init_lr': 0.05,
                         'optimizer.weight_decay': wd, 'optimizer.b1': b1, 'optimizer.b2': b2,
                         'optimizer.eps': eps})
  params = _params()
  grads = _grads(params, 3)
  got, state, lrs = _run(opt, params, grads)

  w = {m: {n: np.asarray(v, np.float64) for n, v in leaves.items()} for m, leaves in params.items()}
  mu = {m: {n: np.zeros_like(v) for n, v in leaves.items()} for m, leaves in w.items()}
  nu = {m: {n: np.zeros_like(v) for n, v in leaves.items()} for m, leaves in w.items()}
  ratios = {}
  for t, (lr, g) in enumerate(zip(lrs, grads), start=1):
    for m, leaves in w.items():
      for n, p in leaves.items():
        gl = g[m][n]
        mu[m][n] = b1 * mu[m][n] + (1 - b1) * gl
        nu[m][n] = b2 * nu[m][n] + (1 - b2) * gl**2
        r = (mu[m][n] / (1 - b1**t)) / (np.sqrt(nu[m][n] / (1 - b2**t)) + eps)
        if _excluded(m, n):
          ratio, d = 1.0, r
        else:
          d = r + wd * p
          wn, dn = np.linalg.norm(p), np.linalg.norm(d)
          ratio = wn / dn if wn > 0 and dn > 0 else 1.0
        ratios[m, n] = ratio
        w[m][n] = p - lr * ratio * d
  stats = trust_ratio.trust_ratio_stats(state)
  kernels = [ratios['conv', 'kernel'], ratios['dense', 'kernel']]
  np.testing.assert_allclose(
      [stats['trust_ratio_min'], stats['trust_ratio_mean'], stats['trust_ratio_max']],
      [min(kernels), np.mean(kernels), max(kernels)], rtol=1e-5)
  for m, leaves in w.items():
    for n, p in leaves.items():
      np.testing.assert_allclose(got[m][n], p, rtol=1e-5, atol=1e-6)


# --- The peak lr in the state ----------------------------------------------------------------

def test_learning_rate_follows_the_state_count():
  opt = _make('sgd', **{'lr.warmup_steps': 10, 'lr.warmup_init_lr': 0.0,
                        'optimizer.momentum': 0.0})
  params = {'w': jnp.ones((3,))}
  g = {'w': jnp.full((3,), 2.0)}
  state = opt.tx.init(params)
  update = jax.jit(opt.tx.update)
  for n in range(4):
    lr = optim.learning_rate(state, opt.lr_fn)
    np.testing.assert_allclose(lr, opt.lr_fn(n, opt.derived.peak_lr), rtol=1e-6)
    np.testing.assert_allclose(lr, 0.1 * n / 10, rtol=1e-6)
    u, state = update(g, state, params)
    np.testing.assert_allclose(u['w'], -lr * 2.0, rtol=1e-6)  # what it said is what it applied


def test_set_peak_lr_changes_the_applied_lr_without_retracing():
  opt = _make('sgd', **{'optimizer.momentum': 0.0})
  params = {'w': jnp.ones((3,))}
  g = {'w': jnp.full((3,), 2.0)}
  traces = []

  @jax.jit
  def update(state):
    traces.append(1)
    return opt.tx.update(g, state, params)

  state = opt.tx.init(params)
  np.testing.assert_allclose(optim.peak_lr(state), 0.1, rtol=1e-6)
  other = optim.set_peak_lr(state, 0.5)
  assert optim.peak_lr(other).dtype == jnp.float32
  np.testing.assert_allclose(optim.peak_lr(other), 0.5)
  np.testing.assert_allclose(optim.peak_lr(state), 0.1, rtol=1e-6)  # the old state is untouched
  assert jax.tree.structure(other) == jax.tree.structure(state)
  aval = lambda x: (x.shape, x.dtype, x.weak_type)
  assert jax.tree.map(aval, other) == jax.tree.map(aval, state)
  u, _ = update(state)
  np.testing.assert_allclose(u['w'], -0.1 * 2.0, rtol=1e-6)
  u, after = update(other)
  np.testing.assert_allclose(u['w'], -0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(optim.peak_lr(after), 0.5)
  assert len(traces) == 1


def test_clipping_comes_first():
  opt = _make('sgd', **{'optimizer.momentum': 0.0, 'optimizer.clip_grad_norm': 1.0})
  params = {'w': jnp.ones((4,))}
  u, _ = jax.jit(opt.tx.update)({'w': jnp.full((4,), 5.0)}, opt.tx.init(params), params)  # norm 10
  np.testing.assert_allclose(u['w'], -0.1 * 0.5, rtol=1e-6)


# --- Epochs counted in passes or in examples (config.lr.epoch_steps) -------------------------

@pytest.mark.parametrize('rule, steps', [('floor_per_epoch', (25, 2, 10)),
                                         ('total_examples_floor', (26, 2, 10)),
                                         ('total_examples_ceil', (27, 3, 11))])
def test_epoch_steps_rules(rule, steps):
  # N = 1,050, B = 100: 10 whole batches per pass, 10.5 batches of examples per epoch.
  c = _config(**{'global_batch': 100, 'num_epochs': 2.5, 'lr.warmup_epochs': 0.25,
                 'lr.decay': 'step', 'lr.boundaries_epochs': (1.0,), 'lr.epoch_steps': rule})
  optim.validate(c)
  d = schedule.resolve(c, 1050)
  assert (d.total_steps, d.warmup_steps, d.boundaries_steps[0]) == steps
  # The data position is the input pipeline's whatever the rule: 10 steps per pass.
  assert d.steps_per_epoch == 10 and d.epoch_steps == rule
  assert json.loads(json.dumps(d.as_dict()))['epoch_steps'] == rule


def test_epoch_steps_default_is_floor_per_epoch():
  """The default keeps every config that does not choose a rule on today's step counts."""
  assert optim.defaults()['lr.epoch_steps'] == 'floor_per_epoch'
  assert config_lib.base_config().lr.epoch_steps == 'floor_per_epoch'
  d = schedule.resolve(_goyal_8k(), IMAGENET_TRAIN)
  assert (d.total_steps, d.warmup_steps, d.epoch_steps) == (14040, 780, 'floor_per_epoch')


def test_epochs_in_examples_are_exact_decimals():
  # 0.3 * 1,000 / 100 is 2.9999999999999996 in floats: floor would lose a step that 3 whole
  # batches of the 300 examples do fill.
  assert schedule.epochs_to_steps(0.3, 1000, 100, 'total_examples_floor') == 3
  assert schedule.epochs_to_steps(0.3, 1000, 100, 'total_examples_ceil') == 3
  assert schedule.epochs_to_steps(0.7, 1000, 100, 'total_examples_ceil') == 7
  # ImageNet at 64k, the TPU reference's own expressions.
  assert schedule.epochs_to_steps(16, IMAGENET_TRAIN, 65536, 'total_examples_floor') == (
      16 * IMAGENET_TRAIN // 65536) == 312
  assert schedule.epochs_to_steps(90, IMAGENET_TRAIN, 65536, 'total_examples_floor') == 1759
  assert schedule.epochs_to_steps(90, IMAGENET_TRAIN, 65536, 'total_examples_ceil') == 1760
  assert schedule.epochs_to_steps(90, IMAGENET_TRAIN, 65536, 'floor_per_epoch') == 1710


def test_epoch_steps_errors():
  with pytest.raises(config_lib.ConfigError, match='lr.epoch_steps'):
    optim.validate(_config(**{'lr.epoch_steps': 'examples'}))
  # A batch schedule counts epochs in passes of the pipeline; examples cannot apply to it.
  c = _config(**{'global_batch': 100, 'num_epochs': 4.0, 'batch_schedule': ((2, 2),),
                 'lr.epoch_steps': 'total_examples_floor'})
  with pytest.raises(config_lib.ConfigError, match='batch_schedule'):
    optim.validate(c)
  c.lr.epoch_steps = 'floor_per_epoch'
  optim.validate(c)
  assert schedule.resolve(c, 1050).total_steps == 20 + 10  # 2 epochs of 10, then 2 of 5
  with pytest.raises(config_lib.ConfigError, match='batch 200 from epoch 2 is larger'):
    schedule.resolve(c, 150)  # the data set's size: checked by resolve
