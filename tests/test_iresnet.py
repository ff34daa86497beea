"""iResNet face embedders: parameter counts against a closed form of the arcface_torch
architecture (43.6M for r50), 112x112 -> 7x7x512 -> 512-d embeddings, every norm option runs
forward and backward, sync BN over 8 devices equals BN over the whole batch, dropout's rng.
Big models are only shape-evaluated; what runs is tiny."""
from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import models
from bigbatch.models import iresnet


def _model(axis_name=None, **fields):
  c = config_lib.base_config()
  c.model.name = 'iresnet'
  c.model.width = 64
  c.model.depth = 50
  c.model.conv_impl = 'xla'  # faster to compile; conv.py's own tests compare the impls
  extra = {k: fields.pop(k) for k in ('embedding_dim', 'dropout') if k in fields}
  for key, value in fields.items():
    c.model[key] = value
  model = models.build(c.model, num_classes=1000, axis_name=axis_name)
  return model.clone(**extra) if extra else model


def _shapes(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _expected_params(blocks, width=64, embedding=512, spatial=7 * 7):
  """arcface_torch iresnet: stem conv3x3(3, w) + bn + prelu; per IBasicBlock(i -> p): bn(i),
  conv3x3(i, p), bn(p), prelu(p), conv3x3(p, p), bn(p), and a conv1x1(i, p) + bn(p) downsample
  in each stage's first block; head bn(8w), fc(8w * 49 -> e) with bias, features bn(e)."""
  n = 27 * width + 2 * width + width
  inplanes = width
  for stage, count in enumerate(blocks):
    planes = width * 2**stage
    for j in range(count):
      i = inplanes if j == 0 else planes
      n += 2 * i + 9 * i * planes + 2 * planes + planes + 9 * planes * planes + 2 * planes
      if j == 0:
        n += i * planes + 2 * planes
    inplanes = planes
  return n + 2 * 8 * width + 8 * width * spatial * embedding + embedding + 2 * embedding


@pytest.mark.parametrize('depth', [18, 50, 100])
def test_parameter_counts_equal_arcface_torch(depth):
  variables = _shapes(_model(depth=depth), (1, 112, 112, 3))
  n = _count(variables['params'])
  assert n == _expected_params(iresnet.STAGE_DEPTHS[depth])
  known = {18: 24.0e6, 50: 43.6e6, 100: 65.2e6}[depth]  # arcface_torch's model table
  assert abs(n - known) < 0.05e6, n


def test_112_input_gives_7x7x512_then_512_embedding():
  model = _model(depth=18)
  variables = _shapes(model, (2, 112, 112, 3))
  out, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=['intermediates']),
      variables, jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32))
  acts = state['intermediates']
  assert out.shape == (2, 512) and out.dtype == jnp.float32
  assert acts['stem_conv']['__call__'][0].shape == (2, 112, 112, 64)
  for stage, (size, channels) in enumerate([(56, 64), (28, 128), (14, 256), (7, 512)]):
    assert acts[f'stage{stage + 1}_block1']['__call__'][0].shape == (2, size, size, channels)
  assert acts['head_norm']['__call__'][0].shape == (2, 7, 7, 512)
  params = variables['params']
  assert params['head_dense']['kernel'].shape == (7 * 7 * 512, 512)
  assert params['stem_prelu']['alpha'].shape == (64,)
  # Every stage's first block projects (stride 2); the others do not.
  assert all('proj_conv' in params[f'stage{s}_block0'] for s in range(1, 5))
  assert 'proj_conv' not in params['stage1_block1']
  assert 'bias' not in params['stage1_block0']['conv1']  # a norm follows every conv


def _jit(f):
  return jax.jit(f, compiler_options={'xla_backend_optimization_level': 0})


TINY = dict(depth=18, width=4, stage_depths=(1, 1, 1, 1), embedding_dim=8, gn_groups=4)
TINY_SHAPE = (8, 16, 16, 3)  # 16 -> stages 8, 4, 2, 1
NORMS = [('batch', None), ('batch', 2), ('group', None), ('none', None)]


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_variables(model, shape, seed=0):
  """Variables of the model's structure with random values, without compiling its init: scales
  and PReLU slopes near their init, small biases, kernels of unit fan-in variance."""
  rng = np.random.default_rng(seed)
  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    if name == 'scale':
      return 1 + 0.2 * rng.normal(size=s.shape)
    if name == 'alpha':
      return 0.25 + 0.05 * rng.normal(size=s.shape)
    if name in ('bias', 'mean'):
      return 0.1 * rng.normal(size=s.shape)
    assert name == 'var', path
    return np.ones(s.shape)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(fill(p, s), jnp.float32), _shapes(model, shape))


def _train_grads(model, variables, x):
  def loss(params):
    out, state = model.apply({**variables, 'params': params}, x, train=True,
                             mutable=['batch_stats'])
    return jnp.sum(jnp.square(out[:, :4])), (out, state)
  return jax.grad(loss, has_aux=True)(variables['params'])


@pytest.mark.parametrize('norm, group_size', NORMS)
def test_every_norm_builds_forward_and_backward(norm, group_size):
  # Shapes only (no compile): the structure, float32 embeddings and gradients.
  model = _model(norm=norm, bn_group_size=group_size, **TINY)
  variables = _shapes(model, TINY_SHAPE)
  grads, (out, state) = jax.eval_shape(functools.partial(_train_grads, model), variables,
                                       jax.ShapeDtypeStruct(TINY_SHAPE, jnp.float32))
  assert out.shape == (8, 8) and out.dtype == jnp.float32
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])
  params = variables['params']
  if norm == 'none':
    assert 'bias' in params['stem_conv'] and 'batch_stats' not in variables
    assert not any('norm' in k or k == 'features' for k in params)
  else:
    assert 'scale' in params['features'] and 'bias' not in params['stem_conv']
  assert ('batch_stats' in state) == (norm == 'batch')


def _check_trains(norm, group_size):
  model = _model(norm=norm, bn_group_size=group_size, **TINY)
  variables = _random_variables(model, TINY_SHAPE)
  grads, (out, state) = _jit(functools.partial(_train_grads, model))(
      variables, _images(TINY_SHAPE))
  assert np.all(np.isfinite(np.asarray(out)))
  assert float(jnp.std(out[:, 0])) > 0  # examples differ
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  # Every layer, the first conv and the PReLU slopes included, gets a gradient.
  for g in (grads['stem_conv']['kernel'], grads['stem_prelu']['alpha'],
            grads['stage4_block0']['prelu']['alpha'], grads['head_dense']['kernel']):
    assert float(jnp.max(jnp.abs(g))) > 0
  if norm == 'batch':
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         state['batch_stats'], variables['batch_stats'])
    assert min(jax.tree.leaves(moved)) > 0


def test_ghost_bn_trains_forward_and_backward():
  _check_trains('batch', 2)


@pytest.mark.slow
@pytest.mark.parametrize('norm, group_size', [n for n in NORMS if n != ('batch', 2)])
def test_other_norms_train_forward_and_backward(norm, group_size):
  _check_trains(norm, group_size)


@pytest.mark.slow
def test_sync_bn_over_8_devices_equals_bn_over_the_whole_batch():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  shape = (16,) + TINY_SHAPE[1:]
  x = _images(shape)
  local = _model(norm='batch', **TINY)
  synced = _model(norm='batch', axis_name='data', **TINY)
  variables = _random_variables(local, shape)
  apply = lambda m, x: m.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  want = _jit(functools.partial(apply, local))(x)
  got = _jit(jax.shard_map(functools.partial(apply, synced), mesh=mesh, in_specs=P('data'),
                           out_specs=P('data')))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_dropout_uses_the_dropout_rng_only_when_training():
  model = _model(dropout=0.5, **TINY)
  shape = (2,) + TINY_SHAPE[1:]
  x = _images(shape)
  variables = _random_variables(model, shape)
  assert 'dropout' not in str(jax.tree.structure(variables))  # no parameters of its own
  train = lambda x, key: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                     rngs={'dropout': key})[0]
  # Training without a 'dropout' rng fails at trace time; evaluation and dropout=0 need none.
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda x: model.apply(variables, x, train=True, mutable=['batch_stats']), x)
  jax.eval_shape(lambda x: _model(**TINY).apply(variables, x, train=True,
                                                mutable=['batch_stats']), x)
  a, b, c, d = _jit(lambda x: (train(x, jax.random.key(1)), train(x, jax.random.key(2)),
                               model.apply(variables, x, train=False),
                               model.apply(variables, x, train=False)))(x)
  assert float(jnp.max(jnp.abs(a - b))) > 0
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_rejects_unknown_depth():
  with pytest.raises(ValueError, match='depth 101'):
    _shapes(_model(depth=101), (1, 32, 32, 3))
