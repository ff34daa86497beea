"""ResNets: torchvision's parameter counts, zero-init blocks start as the identity, bf16 compute
over float32 parameters, every normalization option trains, and both conv backward passes agree.
Big models are only shape-evaluated; anything run is tiny."""
from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import models
from bigbatch.models import layers
from bigbatch.models import resnet

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model(name, num_classes=10, axis_name=None, **model_fields):
  c = config_lib.base_config()
  c.model.name = name
  c.model.width = 64 if name == 'resnet' else 16
  c.model.depth = 50 if name == 'resnet' else 20
  for key, value in model_fields.items():
    c.model[key] = value
  return models.build(c.model, num_classes, axis_name=axis_name)


# Tiny models: ImageNet ResNets with one block per stage on 16x16 images (16 -> stem 8 -> pool 4
# -> stages 4, 2, 1, 1: stride-2 layers see even, odd and 1x1 inputs), CIFAR ResNet-8 on 8x8.
TINY = {'resnet': (dict(depth=18, width=8, stage_depths=(1, 1, 1, 1)), (8, 16, 16, 3)),
        'cifar_resnet': (dict(depth=8, width=16), (4, 8, 8, 3))}


def _tiny(name, **fields):
  base, shape = TINY[name]
  return _model(name, **{**base, **fields}), shape


def _jit(f):
  # Each test runs a tiny model once or twice: XLA's backend optimizations would cost more
  # compile time than they save, and this file must stay fast on 2 cores.
  return jax.jit(f, compiler_options={'xla_backend_optimization_level': 0})


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _shapes(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _init(model, shape):
  # rbg keys: the real initializers, without compiling a threefry hash per parameter.
  return _jit(lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False))(
      _images(shape))


def _random_variables(model, shape, seed=0):
  """Variables of the model's structure, filled with random values without compiling its init:
  scales near 1 (never 0, so every residual branch gets a gradient), small biases, He-scaled
  kernels, running statistics (0, 1)."""
  rng = np.random.default_rng(seed)
  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
    if name == 'scale':
      return 1 + 0.2 * rng.normal(size=s.shape)
    if name in ('bias', 'mean'):
      return 0.1 * rng.normal(size=s.shape)
    assert name == 'var', path
    return np.ones(s.shape)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(fill(p, s), jnp.float32), _shapes(model, shape))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(k.key for k in path): leaf for path, leaf in flat}


def _assert_trees_close(got, expected):
  """float32 agreement, leaf by leaf; the absolute tolerance scales with each leaf's largest
  entry, so summation-order noise in a large gradient does not fail a tiny entry of it."""
  got, expected = _paths(got), _paths(expected)
  assert got.keys() == expected.keys()
  for k, e in expected.items():
    scale = float(jnp.max(jnp.abs(e)))
    np.testing.assert_allclose(got[k], e, rtol=1e-4, atol=1e-5 * scale, err_msg=k)


def _loss_fn(model, variables, x):
  """Loss of the logits in train mode, its aux (logits, new batch_stats)."""
  def loss(params):
    logits, state = model.apply({**variables, 'params': params}, x, train=True,
                                mutable=['batch_stats'])
    return jnp.sum(jnp.sin(logits)), (logits, state.get('batch_stats', {}))
  return loss


def _train_grads(name, **fields):
  """(grads, logits, batch_stats, variables) of one train-mode step of a tiny model (sync BN,
  conv_impl='xla' unless overridden), cached: several tests share one compilation."""
  fields = {'norm': 'batch', 'bn_group_size': None, 'conv_impl': 'xla', **fields}
  return _train_grads_cached(name, tuple(sorted(fields.items())))


@functools.lru_cache(maxsize=None)
def _train_grads_cached(name, fields):
  model, shape = _tiny(name, **dict(fields))
  variables = _random_variables(model, shape)
  grads, (logits, stats) = _jit(jax.grad(_loss_fn(model, variables, _images(shape, seed=1)),
                                         has_aux=True))(variables['params'])
  return grads, logits, stats, variables


@pytest.mark.parametrize('depth, expected', [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160),
    (152, 60_192_808)])
def test_imagenet_parameter_counts_equal_torchvision(depth, expected):
  model = _model('resnet', num_classes=1000, depth=depth)
  assert _count(_shapes(model, (1, 224, 224, 3))['params']) == expected


def _cifar_count(n, width=16, classes=10, channels=3):
  """Stem 3x3 conv + norm; per stage of c channels, n blocks of two 3x3 convs and two norms;
  a 1x1 conv + norm projection where the width changes; a dense head."""
  total = 9 * channels * width + 2 * width
  c_in = width
  for c in (width, 2 * width, 4 * width):
    total += 9 * c_in * c + 9 * c * c + 4 * c + (c_in * c + 2 * c if c_in != c else 0)
    total += (n - 1) * (18 * c * c + 4 * c)
    c_in = c
  return total + c_in * classes + classes


@pytest.mark.parametrize('depth, expected', [(8, 78_042), (20, 272_474), (56, 855_770)])
def test_cifar_parameter_counts(depth, expected):
  assert _cifar_count((depth - 2) // 6) == expected  # the formula agrees with the stated numbers
  model = _model('cifar_resnet', depth=depth)
  assert _count(_shapes(model, (1, 32, 32, 3))['params']) == expected


def test_parameter_names_and_weight_decay_exclusion():
  params = _paths(_shapes(_model('resnet', depth=50), (1, 64, 64, 3))['params'])
  for name in ('stem_conv/kernel', 'stem_norm/scale', 'stage1_block0/conv1/kernel',
               'stage1_block0/proj_conv/kernel', 'stage2_block0/norm3/scale',
               'stage4_block2/conv3/kernel', 'head/kernel', 'head/bias'):
    assert name in params
  assert 'stage2_block1/proj_conv/kernel' not in params  # identity shortcut
  # The optimizer's exclusion regex must catch every norm parameter and the head bias, nothing
  # else; convs followed by a norm have no bias.
  excluded = re.compile(config_lib.base_config().optimizer.weight_decay_exclude)
  for name in params:
    is_norm = re.search(r'norm\d?/', name) is not None
    assert bool(excluded.search(name)) == (is_norm or name == 'head/bias'), name
    assert not re.search(r'conv\d?/bias', name), name

  model, shape = _tiny('cifar_resnet', norm='none')
  no_norm = _paths(_shapes(model, shape)['params'])
  assert 'stem_conv/bias' in no_norm and 'stage2_block0/proj_conv/bias' in no_norm
  assert not any('norm' in name for name in no_norm)


def test_zero_init_last_gamma_sets_only_the_last_norm_of_each_block():
  for (name, fields), zero_init, last, blocks in [
      (('resnet', {'depth': 50}), True, 'norm3', 4),
      (('cifar_resnet', {}), False, 'norm2', 3)]:
    model, shape = _tiny(name, zero_init_last_gamma=zero_init, **fields)
    params = _paths(_init(model, shape)['params'])
    scales = [k for k in params if k.endswith('/scale')]
    assert sum(f'/{last}/' in k for k in scales) == blocks
    for k in scales:
      want = 0.0 if zero_init and f'/{last}/' in k else 1.0
      np.testing.assert_array_equal(params[k], want, err_msg=k)


@pytest.mark.parametrize('block_cls, c_in, strides, norm', [
    (resnet.BasicBlock, 8, 1, layers.Norm('batch')),  # identity shortcut
    (resnet.BasicBlock, 8, 2, layers.Norm('batch', group_size=2)),  # projection (stride)
    (resnet.BottleneckBlock, 8, 1, layers.Norm('group', gn_groups=4)),  # projection (width)
    (resnet.BottleneckBlock, 32, 1, layers.Norm('batch')),  # identity
    (resnet.BottleneckBlock, 32, 2, layers.Norm('group', gn_groups=4)),  # projection
])
def test_fresh_zero_init_block_is_relu_of_its_shortcut(block_cls, c_in, strides, norm):
  block = block_cls(norm=norm, features=8, strides=strides, zero_init_last_gamma=True)
  x = _images((4, 8, 8, c_in))

  @_jit
  def run(x):
    variables = block.init(jax.random.key(1, impl='rbg'), x, train=False)
    y, state = block.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                           capture_intermediates=True)
    return variables['params'], y, state['intermediates']

  params, y, acts = run(x)
  if c_in == 8 * block_cls.expansion and strides == 1:
    assert 'proj_conv' not in params
    shortcut = x
  else:
    shortcut = acts['proj_norm']['__call__'][0]
  assert y.shape == shortcut.shape == (4, 8 // strides, 8 // strides, 8 * block_cls.expansion)
  np.testing.assert_allclose(y, nn.relu(shortcut), rtol=1e-6, atol=1e-6)
  assert float(jnp.max(y)) > 0


def test_bfloat16_activations_over_float32_parameters():
  # Dtypes are exact from shapes alone; compiling a bf16 backward pass on CPU is slow.
  model, shape = _tiny('resnet', depth=50, dtype='bfloat16')
  variables = _shapes(model, shape)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))

  def loss(params, batch_stats, x):
    logits, state = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                mutable=['batch_stats', 'intermediates'],
                                capture_intermediates=True)
    return jnp.sum(logits), (logits, state)

  grads, (logits, state) = jax.eval_shape(
      jax.grad(loss, has_aux=True), variables['params'], variables['batch_stats'],
      jax.ShapeDtypeStruct(shape, jnp.float32))
  assert logits.dtype == jnp.float32
  acts = state['intermediates']
  for path in (('stem_conv',), ('stem_norm',), ('stage2_block0', 'conv2'),
               ('stage2_block0', 'proj_norm'), ('stage4_block0', 'norm3'), ('stage4_block0',)):
    node = acts
    for p in path:
      node = node[p]
    assert node['__call__'][0].dtype == jnp.bfloat16, path
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state['batch_stats']))

  # And it runs: bf16 logits of a tiny CIFAR ResNet track the float32 ones.
  f32, shape = _tiny('cifar_resnet')
  bf16, _ = _tiny('cifar_resnet', dtype='bfloat16')
  variables = _random_variables(f32, shape)
  x = _images(shape)
  want = _jit(lambda x: f32.apply(variables, x, train=False))(x)
  got = _jit(lambda x: bf16.apply(variables, x, train=False))(x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1 * float(jnp.max(jnp.abs(want))))


# Every norm trains; with conv_impl='xla', the faster compile here (the matmul backward is
# checked against it below).
@pytest.mark.parametrize('name', ['resnet', 'cifar_resnet'])
@pytest.mark.parametrize('norm, group_size', [
    ('batch', None), ('batch', 2), ('group', None), ('none', None)])
def test_each_norm_trains_forward_and_backward(name, norm, group_size):
  grads, logits, stats, variables = _train_grads(name, norm=norm, bn_group_size=group_size)
  assert logits.shape == (TINY[name][1][0], 10) and logits.dtype == jnp.float32
  assert jax.tree.structure(grads) == jax.tree.structure(variables['params'])
  for k, g in _paths(grads).items():
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, k
  if norm == 'batch':
    # Running statistics moved towards this batch's, in every norm layer.
    assert jax.tree.structure(stats) == jax.tree.structure(variables['batch_stats'])
    for k, v in _paths(stats).items():
      assert not np.allclose(v, _paths(variables['batch_stats'])[k]), k
  else:
    assert 'batch_stats' not in variables and not stats


def _sync_grads(model, variables):
  """The summed gradient of a sync-BN model over 8 devices, as the trainer computes it: a jitted
  shard_map and the sharding of its batch."""
  def per_device(x):
    # As in the trainer: device-varying parameters keep each gradient local (that of this
    # device's loss, through the cross-device BN statistics) until the one explicit psum.
    params = jax.tree.map(lambda p: jax.lax.pcast(p, 'data', to='varying'), variables['params'])
    grads, _ = jax.grad(_loss_fn(model, variables, x), has_aux=True)(params)
    return jax.lax.psum(grads, 'data')

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  return (_jit(jax.shard_map(per_device, mesh=mesh, in_specs=P('data'), out_specs=P())),
          NamedSharding(mesh, P('data')))


def test_sync_bn_over_8_devices_equals_bn_over_the_whole_batch():
  expected, _, _, variables = _train_grads('resnet')
  model, shape = _tiny('resnet', conv_impl='xla', axis_name='data')
  assert shape[0] == 8
  grads_fn, sharding = _sync_grads(model, variables)
  got = grads_fn(jax.device_put(_images(shape, seed=1), sharding))
  _assert_trees_close(got, expected)


def _all_reduce_operands(lowered_text: str) -> list[str]:
  """The operand types of each all-reduce in lowered StableHLO, e.g. 'tensor<2x1x1x1x8xf32>'."""
  return re.findall(r'"stablehlo\.all_reduce"\(.*?\}\) : \(([^)]*)\)', lowered_text, re.S)


@pytest.mark.parametrize('group_size', [None, 2])
def test_one_collective_per_bn_layer_forward_and_backward(group_size):
  """Sync BN reduces both moments in one all-reduce per layer in the forward pass and one in the
  backward pass (their cotangents); ghost BN needs none. The rest are the gradients' psum."""
  model, _ = _tiny('resnet', conv_impl='xla', axis_name='data', bn_group_size=group_size)
  shape = (16, 16, 16, 3)  # 2 examples per device: a ghost group of 2
  variables = _random_variables(model, shape)
  grads_fn, sharding = _sync_grads(model, variables)
  text = grads_fn.lower(jax.device_put(_images(shape), sharding)).as_text()
  operands = _all_reduce_operands(text)
  params = _paths(variables['params'])
  num_norms = sum(1 for k in params if re.search(r'norm\d?/scale$', k))
  # [2 moments, G=1 group, 1 example, 1, 1, channels] (always grouped: models/layers.py).
  moments = [o for o in operands if re.fullmatch(r'tensor<2(x1)+x\d+xf32>', o)]
  assert len(moments) == (2 * num_norms if group_size is None else 0)
  # Everything else all-reduced is a gradient (one psum per parameter, or fewer if combined).
  param_types = {f'tensor<{"x".join(map(str, p.shape))}xf32>' for p in params.values()}
  rest = [t.strip() for o in operands if o not in moments for t in o.split(', ')]
  assert rest and set(rest) <= param_types


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('group_size', [None, 4])
def test_batch_norm_is_flax_batch_norm_and_near_float64(dtype, group_size):
  """One-pass statistics: the output and running statistics of flax's two-pass nn.BatchNorm (on
  each ghost group), and float32-accurate statistics where E[x^2] - E[x]^2 would cancel."""
  rng = np.random.default_rng(0)
  # Channel means up to 100x their spread (most of E[x^2] cancels), and a constant channel.
  loc = np.array([0.0, -2.0, 5.0, 30.0, 100.0, 7.0])
  spread = np.array([1.0, 0.5, 3.0, 1.0, 1.0, 0.0])
  c, n = len(loc), 16
  x = jnp.asarray(rng.normal(size=(n, 5, 5, c)) * spread + loc, dtype)  # as a conv hands it on
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  variables = {'params': {'scale': f32(1 + 0.1 * rng.normal(size=c)),
                          'bias': f32(0.1 * rng.normal(size=c))},
               'batch_stats': {'mean': f32(rng.normal(size=c)), 'var': f32(1 + rng.random(c))}}
  ours = layers.BatchNorm(use_running_average=False, group_size=group_size, momentum=0.75,
                          dtype=dtype)
  y, stats = _jit(lambda v, x: ours.apply(v, x, mutable=['batch_stats']))(variables, x)
  stats = stats['batch_stats']
  assert y.dtype == jnp.dtype(dtype) and bool(jnp.all(jnp.isfinite(y)))

  # Flax's E[(x - mean)^2] (its default E[x^2] - E[x]^2 loses the variance of channel 4).
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.75, dtype=dtype,
                         use_fast_variance=False)
  g = group_size or n
  flax_y, flax_stats = [], []
  for i in range(0, n, g):
    yi, si = _jit(lambda v, x: flax_bn.apply(v, x, mutable=['batch_stats']))(variables, x[i:i + g])
    flax_y.append(yi)
    flax_stats.append(si['batch_stats'])
  # Flax's statistics; the output differs by rounding only: a unit of the output, and x * a + b
  # against flax's (x - mean) * a + bias rounds float32 terms of size |x| a before they cancel.
  ulp = 2**-23 if dtype == 'float32' else 2**-7
  x64 = np.asarray(f32(x), np.float64).reshape(n // g, -1, c)
  mean64, var64 = x64.mean(1), x64.var(1)
  a = np.abs(np.asarray(variables['params']['scale'])) / np.sqrt(var64.min(0) + 1e-5)
  rounding = 2**-21 * (4 + np.abs(loc) * a)  # float32 rounding of x * a and b, in y
  flax_y = f32(jnp.concatenate(flax_y))
  for ch in range(c):
    np.testing.assert_allclose(f32(y)[..., ch], flax_y[..., ch], rtol=ulp,
                               atol=ulp + rounding[ch], err_msg=f'channel {ch}')
  for k in ('mean', 'var'):  # ghost BN: the mean of the groups' updates
    want = np.mean([s[k] for s in flax_stats], axis=0)
    np.testing.assert_allclose(stats[k], want, rtol=1e-5, atol=1e-6, err_msg=k)

  # Against float64: each statistic within float32 summation error over its group (the bound
  # for any summation order), which float32 accumulation meets and bf16 would miss by 2^16.
  # The variance's error scales with the spread, not with E[x^2]: E[x^2] - E[x]^2 in float32
  # misses this bound by up to E[x^2] / (4 max (x - mean)^2), 300x on channel 4.
  batch = lambda k, old: (np.asarray(stats[k], np.float64) - 0.75 * np.asarray(old)) / 0.25
  bound = lambda m: x64.shape[1] * 2**-24 * np.mean(m, axis=0) + 1e-6
  assert np.all(np.abs(batch('mean', variables['batch_stats']['mean']) - mean64.mean(0))
                <= bound(np.abs(x64).mean(1)))
  spread2 = np.square(x64 - mean64[:, None]).max(1)
  var_error = np.abs(batch('var', variables['batch_stats']['var']) - var64.mean(0))
  assert np.all(var_error <= bound(4 * spread2)), var_error / bound(4 * spread2)
  # The output matches float64 to the output's precision plus what that variance error makes.
  scale, bias = (np.asarray(variables['params'][k], np.float64) for k in ('scale', 'bias'))
  want = ((x64 - mean64[:, None]) / np.sqrt(var64[:, None] + 1e-5) * scale + bias).reshape(x.shape)
  # (The mean's error shifts the output by up to its bound over the spread.)
  var_rel = bound(4 * spread2) / np.maximum(var64.mean(0), 1e-30)
  shift = bound(np.abs(x64).mean(1)) / np.sqrt(np.maximum(var64.mean(0), 1e-30)) * np.abs(scale)
  for ch in range(c - 1):
    np.testing.assert_allclose(f32(y)[..., ch], want[..., ch], rtol=ulp + var_rel[ch],
                               atol=2 * ulp + shift[ch] + rounding[ch], err_msg=f'channel {ch}')
  # A constant channel: the variance clips at 0 and the output is its bias.
  np.testing.assert_allclose(f32(y)[..., -1], bias[-1], atol=1e-3)


def test_stem_pool_padding_keeps_torchvision_windows():
  """The stem's max pool drops the trailing padding no window reaches: same output."""
  for size in (1, 2, 7, 8, 16, 17, 112, 113):
    x = _images((1, size, size, 2), seed=size)
    pads = tuple(resnet.pool_padding(size, 3, 2, 1) for _ in range(2))
    want = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(nn.max_pool(x, (3, 3), strides=(2, 2), padding=pads), want)
    assert sum(pads[0]) <= 2


@pytest.mark.parametrize('name', ['resnet', 'cifar_resnet'])
def test_conv_impls_give_the_same_gradients(name):
  _assert_trees_close(_train_grads(name, conv_impl='matmul')[0],
                      _train_grads(name, conv_impl='xla')[0])


def test_build_passes_model_fields_only_to_models_that_declare_them():
  model, _ = _tiny('cifar_resnet', conv_impl='xla', zero_init_last_gamma=False,
                   stage_depths=(1, 2, 1))
  assert (model.conv_impl, model.zero_init_last_gamma, model.stage_depths) == (
      'xla', False, (1, 2, 1))
  assert _model('cnn', conv_impl='matmul').conv_impl == 'matmul'
  assert not hasattr(_model('mlp'), 'depth')


@pytest.mark.parametrize('name, field, value, message', [
    ('resnet', 'depth', 20, 'model.depth=20 for resnet'),
    ('cifar_resnet', 'depth', 50, 'model.depth=50 for cifar_resnet'),
    ('resnet', 'stage_depths', (1, 1, 1), 'model.stage_depths'),
    ('cifar_resnet', 'stage_depths', (1, 1, 1, 1), 'model.stage_depths'),
    ('resnet', 'stage_depths', (1, 0, 1, 1), 'model.stage_depths'),
    ('resnet', 'conv_impl', 'cudnn', 'model.conv_impl'),
])
def test_config_rejects_bad_resnet_fields(name, field, value, message):
  c = config_lib.base_config()
  c.model.name = name
  c.model.depth = 50 if name == 'resnet' else 20
  c.num_steps = 1
  config_lib.validate(c, 8)
  c.model[field] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(c, 8)


@pytest.mark.slow
def test_bytes_accessed_not_above_the_flax_example():
  """The CPU stand-in for benchmarks/accelerator.py: XLA's cost analysis of the compiled
  flax-style bf16 train step touches no more bytes with bigbatch's ResNet (sync BN, ghost BN)
  than with flax's example network and its nn.BatchNorm, at the same FLOPs."""
  if str(ROOT) not in sys.path:  # benchmarks/ is not a package of the install
    sys.path.insert(0, str(ROOT))
  from benchmarks import bytes_accessed  # pylint: disable=g-import-not-at-top
  net = dict(width=16, stage_depths=(1, 1, 1, 1))
  shape, batch = (32, 32, 3), 8
  reference = bytes_accessed.step_cost(bytes_accessed.reference(18, 10, **net), shape, batch)
  # Ghost BN's fixed summation order (per-example sums, then a fixed tree over a group's
  # examples: models/layers.py, Layouts) costs bytes that do not grow with the image, likely the
  # per-example sums written out (batch x channels per layer): 0.5% of this small step
  # (35,140,236 bytes vs flax's 35,012,408; 34,951,840 with one XLA reduction per group, which
  # rounds differently per layout), 0.1% at ResNet-50 224x224 batch 32.
  for ghost, allowance in ((None, 1.0), (4, 1.005)):
    ours = bytes_accessed.step_cost(bytes_accessed.ours(18, 10, ghost=ghost, **net), shape, batch)
    assert ours['bytes accessed'] <= allowance * reference['bytes accessed'], (
        ghost, ours, reference)
    # The same network (XLA's count includes elementwise work, which differs a little).
    assert ours['flops'] == pytest.approx(reference['flops'], rel=0.03), ghost


_NO_TENSORFLOW = """
import sys
class NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      raise ImportError(f'No module named {name!r} (blocked by the test)')
    return None
sys.meta_path.insert(0, NoTensorFlow())
sys.path.insert(0, '.')
"""


def _run_without_tensorflow(code: str, timeout: int):
  """Runs `code` in a process where importing tensorflow fails, on 2 CPU devices."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  proc = subprocess.run([sys.executable, '-c', _NO_TENSORFLOW + textwrap.dedent(code)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_accelerator_benchmark_imports_without_tensorflow():
  """benchmarks/accelerator.py must run where TensorFlow is not installed, as on a fresh GPU
  machine (clu's metric writers import it at import time): nothing it imports may need it."""
  _run_without_tensorflow("""
      from benchmarks import accelerator
      from benchmarks import bytes_accessed
      assert 'tensorflow' not in sys.modules
      assert 'clu.metric_writers' not in sys.modules
  """, timeout=300)


@pytest.mark.slow
def test_accelerator_benchmark_runs_without_tensorflow():
  """And it runs there: its smoke mode (tiny ResNet-18) through the flax reference, our network
  in the same step and the trainer step, over 2 devices."""
  _run_without_tensorflow("""
      from benchmarks import accelerator
      results = accelerator.main(['--smoke', '--batch=4', '--steps=1', '--warmup=0',
                                  '--rows=reference,ours-flax-step,trainer-sgd'])
      assert sorted(results) == ['ours-flax-step', 'reference', 'trainer-sgd'], results
      assert all(r['img_s'] > 0 for r in results.values())
      assert 'tensorflow' not in sys.modules
  """, timeout=1800)
