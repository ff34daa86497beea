"""bigbatch.flops: the analytic count against hand counts and XLA:CPU's cost analysis, and the
dense-peak table."""
from __future__ import annotations

import types

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import pytest

from bigbatch import config_lib
from bigbatch import flops
from bigbatch import models
from bigbatch.models import conv


def xla_flops(fn, *args) -> float:
  """XLA's cost analysis of the lowered (uncompiled) module on CPU: convolutions and dots count
  their valid taps, elementwise ops one FLOP per element."""
  return float(jax.jit(fn).lower(*args).cost_analysis()['flops'])


def build_model(name: str, depth: int, width: int, outputs: int, **fields):
  """The model as the trainer builds it: bigbatch.models.build on config.model."""
  c = config_lib.base_config()
  c.model.name, c.model.depth, c.model.width = name, depth, width
  for k, v in fields.items():
    c.model[k] = v
  return models.build(c.model, outputs, axis_name=None)


def abstract_variables(model, image_shape):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, *image_shape)), train=False))


class Tiny(nn.Module):
  """conv 3x3/2 SAME (bigbatch's custom_vjp conv) -> relu -> conv 1x1 (flax's) -> dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = conv.Conv(4, (3, 3), strides=2, padding='SAME', use_bias=False, impl='matmul')(x)
    x = nn.Conv(6, (1, 1), use_bias=False)(nn.relu(x))
    return nn.Dense(5, use_bias=False)(x.reshape(x.shape[0], -1))


def test_tiny_model_by_hand():
  shape = (8, 8, 3)
  model = Tiny()
  variables = abstract_variables(model, shape)
  # conv1: 8x8x3 -> 4x4x4, 3x3 stride 2, SAME pads (0, 1) per axis. Per axis the 4 outputs see
  # 3, 3, 3 and 2 input taps (the last tap of the last output is padding): 11 of 12.
  conv1_valid = 2 * 4 * (11 * 11) * 3
  conv1_full = 2 * (4 * 4 * 4) * 9 * 3
  conv2 = 2 * (4 * 4 * 6) * 1 * 4  # 1x1: no padding
  dense = 2 * (4 * 4 * 6) * 5
  count = flops.forward_count(model, variables, shape)
  assert (count.conv, count.dot) == (conv1_valid + conv2, dense)
  full = flops.forward_count(model, variables, shape, count_padding=True)
  assert (full.conv, full.dot) == (conv1_full + conv2, dense)
  assert flops.training_flops_per_example(model, variables, shape) == 3.0 * count.total
  # Per example: a batch of 3 counts 3x.
  assert flops.forward_count(model, variables, shape, batch=3).total == 3 * count.total
  # Exactly XLA's count but for the relu (one FLOP per element of conv1's output).
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  xla = xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert xla == 2 * count.total + 2 * 4 * 4 * 4


@pytest.mark.parametrize('lhs_shape, rhs_shape, kw', [
    ((2, 9, 7, 3), (3, 3, 3, 5), dict(window_strides=(2, 1), padding=((1, 1), (1, 1)))),
    ((2, 8, 8, 3), (7, 7, 3, 4), dict(window_strides=(2, 2), padding=((3, 3), (3, 3)))),
    ((1, 6, 6, 2), (3, 3, 2, 4), dict(window_strides=(1, 1), padding=((2, 0), (0, 2)),
                                      rhs_dilation=(2, 1))),
    ((1, 5, 5, 4), (3, 3, 4, 2), dict(window_strides=(1, 1), padding=((2, 2), (2, 2)),
                                      lhs_dilation=(2, 2))),  # transposed conv
    ((2, 6, 6, 8), (3, 3, 2, 8), dict(window_strides=(1, 1), padding='SAME',
                                      feature_group_count=4)),
    ((4, 6, 6, 3), (3, 3, 3, 8), dict(window_strides=(1, 1), padding='VALID',
                                      batch_group_count=2)),  # a kernel-gradient form
])
def test_single_convolutions_equal_xla(lhs_shape, rhs_shape, kw):
  lhs = jax.ShapeDtypeStruct(lhs_shape, jnp.float32)
  rhs = jax.ShapeDtypeStruct(rhs_shape, jnp.float32)
  f = lambda a, b: lax.conv_general_dilated(a, b, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                            **kw)
  count = flops.count_fn(f, lhs, rhs)
  assert count.conv == xla_flops(f, lhs, rhs) and count.dot == 0


def test_dot_general_scan_and_cond():
  a = jax.ShapeDtypeStruct((3, 4, 5), jnp.float32)
  b = jax.ShapeDtypeStruct((3, 5, 6), jnp.float32)
  batched = lambda a, b: jnp.einsum('bij,bjk->bik', a, b)
  assert flops.count_fn(batched, a, b).dot == 2 * 3 * 4 * 6 * 5 == xla_flops(batched, a, b)

  w = jax.ShapeDtypeStruct((5, 5), jnp.float32)
  x = jax.ShapeDtypeStruct((2, 5), jnp.float32)
  scanned = lambda w, x: lax.scan(lambda h, _: (h @ w, None), x, None, length=7)[0]
  assert flops.count_fn(scanned, w, x).dot == 7 * 2 * 2 * 5 * 5
  # cond: the costlier branch (one branch runs).
  branchy = lambda w, x: lax.cond(x[0, 0] > 0, lambda: x @ w @ w, lambda: x @ w)
  assert flops.count_fn(branchy, w, x).dot == 2 * (2 * 2 * 5 * 5)
  with pytest.raises(ValueError, match='while'):
    flops.count_fn(lambda w, x: lax.while_loop(lambda h: h[0, 0] < 1, lambda h: h @ w, x), w, x)


@pytest.mark.parametrize('name, depth, width, outputs, size', [
    ('resnet', 18, 64, 10, 64),
    ('resnet', 50, 64, 10, 64),
    ('iresnet', 18, 64, 512, 112),
])
def test_models_within_2_percent_of_xla(name, depth, width, outputs, size):
  model = build_model(name, depth, width, outputs)
  shape = (size, size, 3)
  variables = abstract_variables(model, shape)
  batch = 2
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  xla = xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x) / batch
  ours = flops.forward_flops_per_example(model, variables, shape)
  # XLA adds one FLOP per element of the elementwise ops (BN, relu, residual adds): ours is
  # below it by that, ~1%.
  assert 0.98 * xla <= ours <= xla, (ours, xla)


def test_resnet50_224_published_count():
  """ResNet-50 v1.5 at 224x224: 4.09 G multiply-adds (torchvision's and fvcore's figure, which
  count every kernel tap) = 8.18 GFLOP forward; 3x = 24.5 GFLOP per example per training step.
  Without the padded taps (the default, XLA's convention): 7.90 GFLOP forward."""
  model = build_model('resnet', 50, 64, 1000)
  shape = (224, 224, 3)
  variables = abstract_variables(model, shape)
  full = flops.forward_flops_per_example(model, variables, shape, count_padding=True)
  assert full / 2 == pytest.approx(4.09e9, rel=2e-3)
  assert 3 * full == pytest.approx(24.5e9, rel=3e-3)
  valid = flops.forward_flops_per_example(model, variables, shape)
  assert valid == pytest.approx(7.90e9, rel=2e-3)
  # bf16 compute and the conv backward impl change nothing counted.
  bf16 = build_model('resnet', 50, 64, 1000, dtype='bfloat16', conv_impl='xla')
  assert flops.forward_flops_per_example(bf16, variables, shape) == valid


@pytest.mark.slow
@pytest.mark.parametrize('name, depth, outputs, size', [
    ('resnet', 50, 1000, 224),
    ('iresnet', 100, 512, 112),
    ('cifar_resnet', 20, 10, 32),
])
def test_full_size_models_within_2_percent_of_xla(name, depth, outputs, size):
  model = build_model(name, depth, 16 if name == 'cifar_resnet' else 64, outputs)
  shape = (size, size, 3)
  variables = abstract_variables(model, shape)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  xla = xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
  ours = flops.forward_flops_per_example(model, variables, shape)
  assert 0.98 * xla <= ours <= xla, (ours, xla)


def test_per_shard_bodies_are_refused():
  mesh = jax.make_mesh((1,), ('d',), devices=jax.devices()[:1])
  f = jax.shard_map(lambda a: a @ a, mesh=mesh, in_specs=jax.P(), out_specs=jax.P())
  with pytest.raises(ValueError, match='shard'):
    flops.count_fn(f, jax.ShapeDtypeStruct((4, 4), jnp.float32))


def device(platform: str, kind: str):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize('kind, dtype, precision, tflops', [
    ('NVIDIA H100 80GB HBM3', jnp.bfloat16, None, 989.4),
    ('NVIDIA H100 80GB HBM3', jnp.float32, None, 494.7),  # TF32 at jax's default precision
    ('NVIDIA H100 80GB HBM3', jnp.float32, 'highest', 66.9),
    ('NVIDIA H100 PCIe', jnp.bfloat16, None, 756.5),
    ('NVIDIA H200', jnp.bfloat16, None, 989.4),
    ('NVIDIA A100-SXM4-80GB', jnp.bfloat16, None, 312.0),
    ('NVIDIA A100-SXM4-40GB', jnp.float32, 'float32', 19.5),
    ('Tesla V100-SXM2-16GB', jnp.float16, None, 125.0),
    ('Tesla V100-SXM2-16GB', jnp.float32, None, 15.7),  # no TF32 on Volta
    ('Tesla V100-SXM2-16GB', jnp.bfloat16, None, None),  # no bf16 tensor cores
    ('NVIDIA H100 NVL', jnp.bfloat16, None, None),  # not in the table: unknown, not guessed
    ('NVIDIA GeForce RTX 4090', jnp.bfloat16, None, None),
])
def test_gpu_peaks(kind, dtype, precision, tflops):
  peak = flops.peak_flops_per_device(device('gpu', kind), dtype, precision)
  assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


@pytest.mark.parametrize('kind, tflops', [
    ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5', 459.0),
    ('TPU v5p', 459.0), ('TPU v6 lite', 918.0), ('TPU v4 lite', None), ('TPU v3', None),
])
def test_tpu_peaks(kind, tflops):
  tpu = device('tpu', kind)
  want = None if tflops is None else pytest.approx(tflops * 1e12)
  assert flops.peak_flops_per_device(tpu, jnp.bfloat16) == want
  # float32 at the default precision is one bf16 pass on the MXU; at full precision: unknown.
  assert flops.peak_flops_per_device(tpu, jnp.float32, 'default') == want
  assert flops.peak_flops_per_device(tpu, jnp.float32, 'highest') is None


def test_cpu_has_no_peak_and_mfu():
  assert flops.peak_flops_per_device(jax.devices()[0], jnp.float32) is None
  assert flops.mfu(1e12, 1.0, jax.devices()[:2], jnp.float32) is None
  h100s = [device('gpu', 'NVIDIA H100 80GB HBM3')] * 8
  # 24.5 GFLOP x 256 examples per step, 2 steps/s on 8 chips.
  assert flops.mfu(24.5e9 * 256, 2.0, h100s, jnp.bfloat16) == pytest.approx(
      24.5e9 * 256 * 2 / (8 * 989.4e12))
