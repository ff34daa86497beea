"""Model FLOPs counted from the model itself, and the dense peak of the chip they run on: what
the trainer's perf/* metrics and MFU divide.

The count is analytic (2 x output elements x kernel taps inside the input x input channels per
group for a convolution, 2 x output elements x contracted size for a dot, 3 x forward for a
training step), found by tracing the eval-mode forward to a jaxpr on abstract values. Why not
XLA's cost analysis, how the jaxpr is walked and the padding convention: docs/design.md, "Model
FLOPs".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

# Primitives whose sub-jaxprs run on a per-device shard: their shapes are not the global ones,
# so a count through them would be off by the device count. The model forward has none.
_PER_SHARD = ('shard_map', 'xla_pmap')


@dataclasses.dataclass(frozen=True)
class Count:
  """FLOPs of one traced function, split by primitive (exact integers)."""
  conv: int = 0
  dot: int = 0

  @property
  def total(self) -> int:
    return self.conv + self.dot

  def __add__(self, other: 'Count') -> 'Count':
    return Count(self.conv + other.conv, self.dot + other.dot)

  def __mul__(self, k: int) -> 'Count':
    return Count(self.conv * k, self.dot * k)


def _valid_taps(n_in: int, n_out: int, k: int, stride: int, pad_lo: int, lhs_dilation: int,
                rhs_dilation: int) -> int:
  """(output position, kernel tap) pairs along one spatial axis whose input lands inside the
  (dilated) input, not on padding or on a hole of lhs dilation: XLA's per-axis count."""
  size = (n_in - 1) * lhs_dilation + 1 if n_in else 0
  count = 0
  for o in range(n_out):
    for j in range(k):
      p = o * stride + j * rhs_dilation - pad_lo
      if 0 <= p < size and p % lhs_dilation == 0:
        count += 1
  return count


def _conv_flops(eqn, count_padding: bool) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  # Specs list (batch/out-feature, feature/in-feature, spatial...) axes of each operand.
  lhs_spatial = [lhs.shape[a] for a in dn.lhs_spec[2:]]
  rhs_in = rhs.shape[dn.rhs_spec[1]]  # input channels per feature group
  rhs_spatial = [rhs.shape[a] for a in dn.rhs_spec[2:]]
  out_spatial = [out.shape[a] for a in dn.out_spec[2:]]
  out_other = math.prod(out.shape) // max(math.prod(out_spatial), 1)  # batch x out features
  if count_padding:
    taps = math.prod(out_spatial) * math.prod(rhs_spatial)
  else:
    nd = len(rhs_spatial)
    lhs_dil = eqn.params['lhs_dilation'] or (1,) * nd
    rhs_dil = eqn.params['rhs_dilation'] or (1,) * nd
    taps = math.prod(
        _valid_taps(lhs_spatial[i], out_spatial[i], rhs_spatial[i],
                    eqn.params['window_strides'][i], eqn.params['padding'][i][0], lhs_dil[i],
                    rhs_dil[i]) for i in range(nd))
  return 2 * out_other * taps * rhs_in


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = math.prod(lhs.shape[a] for a in lhs_contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _jaxprs_of(value):
  """The jaxprs held by one eqn parameter (a jaxpr, a closed one, or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _jaxprs_of(v)]
  return []


def count_jaxpr(jaxpr, count_padding: bool = False) -> Count:
  """FLOPs of the convolutions and matrix products in a jaxpr, sub-jaxprs included."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = Count()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += Count(conv=_conv_flops(eqn, count_padding))
    elif name == 'dot_general':
      total += Count(dot=_dot_flops(eqn))
    elif name in _PER_SHARD:
      raise ValueError(f'count_jaxpr: {name} runs its body per shard, whose shapes are not the '
                       f'global ones; count the function it wraps instead')
    elif name == 'cond':
      # One branch runs: count the costliest.
      branches = [count_jaxpr(b, count_padding) for b in eqn.params['branches']]
      total += max(branches, key=lambda c: c.total)
    elif name == 'while':
      # The trip count is a runtime value; nothing in a model forward loops this way.
      raise ValueError('count_jaxpr: a while loop has no static trip count to count FLOPs by')
    else:
      inner = Count()
      for sub in (j for v in eqn.params.values() for j in _jaxprs_of(v)):
        inner += count_jaxpr(sub, count_padding)
      # A scan runs its body `length` times; every other call primitive (pjit, custom_vjp_call,
      # custom_jvp_call, remat, closed_call) runs its jaxpr once.
      total += inner * int(eqn.params.get('length', 1)) if name == 'scan' else inner
  return total


def _abstract(tree):
  """ShapeDtypeStructs (no sharding) for arrays or ShapeDtypeStructs: tracing needs no data."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def count_fn(fn: Callable, *args, count_padding: bool = False) -> Count:
  """FLOPs of fn(*args) (arrays or ShapeDtypeStructs), traced abstractly, not run."""
  return count_jaxpr(jax.make_jaxpr(fn)(*_abstract(args)), count_padding)


def forward_count(model, variables, image_shape, *, batch: int = 1,
                  count_padding: bool = False) -> Count:
  """FLOPs of model.apply(variables, x, train=False) for x of [batch, *image_shape] float32.

  Eval mode: BN uses its running statistics and dropout is off, so no collective axis or rng is
  needed to trace it, and the counted products are the same as in training mode.
  """
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  return count_fn(lambda v, x: model.apply(v, x, train=False), variables, x,
                  count_padding=count_padding)


def forward_flops_per_example(model, variables, image_shape, *,
                              count_padding: bool = False) -> float:
  """Model FLOPs of one eval-mode forward pass of one example (`forward_count` at batch 1)."""
  return float(forward_count(model, variables, image_shape, count_padding=count_padding).total)


def training_flops_per_example(model, variables, image_shape, *,
                               count_padding: bool = False) -> float:
  """Model FLOPs of one training step per example: 3x the forward (docs/design.md, "Model FLOPs").

  model: a flax module called as model.apply(variables, x, train=...); variables: its
  {'params': ..., 'batch_stats': ...} as arrays or ShapeDtypeStructs; image_shape: (H, W, C).
  """
  return 3.0 * forward_flops_per_example(model, variables, image_shape,
                                         count_padding=count_padding)


# ---------------------------------------------------------------------------------------------
# Dense peak per device.
#
# Published dense (no structured sparsity) peaks, FLOP/s per jax device, by compute type:
# NVIDIA datasheets (H100/H200 SXM5, H100 PCIe, A100 SXM4/PCIe, V100 SXM2/PCIe/V100S); Google
# Cloud TPU system architecture pages (per chip; v4, v5e, v5p and v6e show one jax device per
# chip). 'tf32' is the tensor-core path; 'fp32' the plain CUDA-core one.
_TFLOPS = 1e12
_PEAKS: tuple[tuple[Callable[[str], bool], dict[str, float]], ...] = (
    (lambda k: 'H100' in k and 'PCIE' in k, {'bf16': 756.5, 'fp16': 756.5, 'tf32': 378.0,
                                              'fp32': 51.2}),
    (lambda k: ('H100' in k or 'H200' in k) and 'NVL' not in k,  # SXM ("NVIDIA H100 80GB HBM3")
     {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),
    (lambda k: 'A100' in k, {'bf16': 312.0, 'fp16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
    (lambda k: 'V100S' in k, {'fp16': 130.0, 'fp32': 16.4}),
    (lambda k: 'V100' in k and 'PCIE' in k, {'fp16': 112.0, 'fp32': 14.0}),
    (lambda k: 'V100' in k, {'fp16': 125.0, 'fp32': 15.7}),  # SXM2 / SXM3
    # TPU device_kind strings as jax names them (pallas' tpu_info: "TPU v5 lite" is v5e, "TPU
    # v5" is v5p, "TPU v6 lite" is v6e). The MXU multiplies bf16; fp32 at full precision is
    # several bf16 passes and has no published peak.
    (lambda k: k == 'TPU V4', {'bf16': 275.0}),
    (lambda k: k in ('TPU V5 LITE', 'TPU V5E'), {'bf16': 197.0}),
    (lambda k: k in ('TPU V5', 'TPU V5P'), {'bf16': 459.0}),
    (lambda k: k in ('TPU V6 LITE', 'TPU V6E'), {'bf16': 918.0}),
)

# jax_default_matmul_precision values that keep float32 products at full float32.
_FULL_FP32 = ('highest', 'float32', 'F32_F32_F32')


def _compute_type(platform: str, dtype, precision: str | None) -> str | None:
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    return 'bf16'
  if dtype == jnp.float16:
    return 'fp16'
  if dtype != jnp.float32:
    return None
  if precision in _FULL_FP32:
    return 'fp32'
  # jax's default precision computes float32 products in bf16 on TPU and in TF32 on NVIDIA
  # tensor cores from Ampere on; chips without TF32 (V100) have no 'tf32' entry and use fp32.
  return 'bf16' if platform == 'tpu' else 'tf32'


def peak_flops_per_device(device, dtype=jnp.bfloat16, precision: str | None = None
                          ) -> float | None:
  """Dense peak FLOP/s of one jax device for matrix products in `dtype`, or None where no peak
  is published for it (CPU, unknown chips, bf16 on V100, full-precision fp32 on TPU).

  precision: jax_default_matmul_precision (None: read the current config), which decides what
  a float32 product runs as: TF32 on A100/H100/H200 and bf16 on TPU at the default, true fp32
  with 'highest'. MFU = model FLOP/s / (peak_flops_per_device(...) x devices).
  """
  platform = getattr(device, 'platform', '')
  if platform not in ('gpu', 'cuda', 'tpu'):
    return None
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  kind = str(getattr(device, 'device_kind', '')).upper()
  compute = _compute_type('tpu' if platform == 'tpu' else 'gpu', dtype, precision)
  if compute is None:
    return None
  for matches, peaks in _PEAKS:
    if matches(kind):
      peak = peaks.get(compute)
      if peak is None and compute == 'tf32':  # no tensor-core fp32 (V100): plain fp32
        peak = peaks.get('fp32')
      return None if peak is None else peak * _TFLOPS
  return None


def mfu(flops_per_step: float, steps_per_sec: float, devices, dtype,
        precision: str | None = None) -> float | None:
  """Model FLOP utilization of `devices` (all of one kind): achieved model FLOP/s over their
  summed dense peak; None where the peak is unknown (CPU)."""
  devices = list(devices)
  peak = peak_flops_per_device(devices[0], dtype, precision) if devices else None
  if not peak:
    return None
  return flops_per_step * steps_per_sec / (peak * len(devices))

