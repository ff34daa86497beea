"""2-D convolution whose backward pass is fast on XLA:CPU, and a drop-in `nn.Conv` built on it.

`conv2d` computes exactly `lax.conv_general_dilated` in NHWC/HWIO; impl='matmul' gives it a
custom backward pass (kernel gradient as chunked im2col matrix products, input gradient as
polyphase stride-1 convolutions) that stays differentiable, so Hessian-vector products work;
impl='auto' is 'matmul' on CPU and XLA's own elsewhere. How and why: docs/design.md,
"Convolution gradients on CPU"; timings: benchmarks/conv_grad.py, docs/performance.md.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
# Bytes of one chunk's patch matrix in the kernel gradient: big enough for an efficient matrix
# product, small enough to stay in cache between being written and being multiplied.
_PATCH_CHUNK_BYTES = 4 * 2**20
_MIN_CHUNKED_PATCH_ROWS = 128

IMPLS = ('auto', 'xla', 'matmul')


def resolve_impl(impl: str) -> str:
  """'auto' -> 'matmul' on the CPU backend, 'xla' on GPU/TPU; 'xla' and 'matmul' unchanged."""
  if impl not in IMPLS:
    raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _pair(v, name: str) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    return (int(v), int(v))
  v = tuple(int(e) for e in v)
  if len(v) != 2:
    raise ValueError(f'conv2d {name} must be an int or a pair, got {v}')
  return v


def _explicit_pads(x_shape, k_shape, strides, padding) -> tuple[tuple[int, int], ...]:
  """Padding as ((lo, hi), (lo, hi)), resolved exactly as lax does (SAME with stride 2 and an even
  input is asymmetric: lax.padtype_to_pads puts the extra row/column at the end)."""
  if isinstance(padding, str):
    return tuple(tuple(int(p) for p in pair) for pair in
                 lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding))
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f'conv2d padding needs 2 (lo, hi) pairs, got {padding}')
  return pads


def _xla_conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMENSION_NUMBERS)


def conv2d(x_NHWC, kernel_HWIO, strides=(1, 1), padding='SAME', impl: str = 'auto', *,
           lhs_dilation=None, rhs_dilation=None, feature_group_count: int = 1):
  """`lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO',
  'NHWC'))`, with the backward pass chosen by impl ('auto' | 'xla' | 'matmul', docs/design.md).

  strides: int or pair; padding: 'SAME' | 'VALID' | 'SAME_LOWER' | ((lo, hi), (lo, hi)).
  Dilation and grouped convolution are not implemented (the arguments exist to say so).
  """
  impl = resolve_impl(impl)
  if lhs_dilation not in (None, 1, (1, 1)) or rhs_dilation not in (None, 1, (1, 1)):
    raise NotImplementedError('conv2d: dilated convolution is not implemented; use '
                              'lax.conv_general_dilated')
  if feature_group_count != 1:
    raise NotImplementedError('conv2d: feature_group_count != 1 is not implemented; use '
                              'lax.conv_general_dilated')
  if x_NHWC.ndim != 4 or kernel_HWIO.ndim != 4:
    raise ValueError(f'conv2d wants x [N,H,W,C] and kernel [H,W,I,O], got shapes '
                     f'{x_NHWC.shape} and {kernel_HWIO.shape}')
  if x_NHWC.shape[3] != kernel_HWIO.shape[2]:
    raise ValueError(f'conv2d: x has {x_NHWC.shape[3]} channels but the kernel expects '
                     f'{kernel_HWIO.shape[2]}')
  strides = _pair(strides, 'strides')
  pads = _explicit_pads(x_NHWC.shape, kernel_HWIO.shape, strides, padding)
  if impl == 'xla':
    return _xla_conv(x_NHWC, kernel_HWIO, strides, pads)
  return _conv_matmul(x_NHWC, kernel_HWIO, strides, pads)


# ---------------------------------------------------------------------------------------------
# impl='matmul': XLA forward, matrix-product backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul(x, kernel, strides, pads):
  return _xla_conv(x, kernel, strides, pads)


def _conv_matmul_fwd(x, kernel, strides, pads):
  return _xla_conv(x, kernel, strides, pads), (x, kernel)


def _conv_matmul_bwd(strides, pads, res, dy):
  x, kernel = res
  dx = _input_grad(dy, kernel, x.shape, strides, pads)
  dw = _kernel_grad(x, dy, kernel.shape, strides, pads)
  return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_matmul.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


def _phase_1d(n_in: int, n_out: int, k: int, s: int, lo: int, p: int):
  """The input positions i = s*a + p (a = 0..size-1) receive dy[a + c - m] * w[k0 + s*m] for
  m = 0..taps-1 (from i + lo = s*o + tap). Returns (size, k0, taps, pad_lo, pad_hi): the stride-1
  correlation of dy, padded by (pad_lo, pad_hi), with the flipped taps w[k0::s][::-1]."""
  size = max(0, -(-(n_in - p) // s))
  k0 = (p + lo) % s
  taps = max(0, -(-(k - k0) // s))
  c = (p + lo - k0) // s
  pad_lo = taps - 1 - c
  pad_hi = size + taps - 1 - n_out - pad_lo
  return size, k0, taps, pad_lo, pad_hi


def _input_grad(dy, kernel, x_shape, strides, pads):
  """d(conv)/dx applied to dy: per output phase (p, q) of the stride, one stride-1 convolution of
  dy with the sub-kernel of the taps that land on that phase, flipped and with I/O swapped."""
  n, h, w, c = x_shape
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  ho, wo = dy.shape[1:3]
  rows = [_phase_1d(h, ho, kh, sh, pads[0][0], p) for p in range(sh)]
  cols = [_phase_1d(w, wo, kw, sw, pads[1][0], q) for q in range(sw)]
  phases = []
  for (size_h, k0h, taps_h, lo_h, hi_h) in rows:
    row = []
    for (size_w, k0w, taps_w, lo_w, hi_w) in cols:
      if size_h == 0 or size_w == 0 or taps_h == 0 or taps_w == 0:
        # No tap lands here (e.g. odd positions of a 1x1 stride-2 conv): the gradient is zero.
        row.append(jnp.zeros((n, size_h, size_w, c), dy.dtype))
        continue
      sub = kernel[k0h::sh, k0w::sw][::-1, ::-1].transpose(0, 1, 3, 2)
      # Negative padding (padding wider than the kernel) crops dy; the conv takes the rest.
      g = dy
      if min(lo_h, hi_h, lo_w, hi_w) < 0:
        g = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (min(lo_h, 0), min(hi_h, 0), 0),
                                                (min(lo_w, 0), min(hi_w, 0), 0), (0, 0, 0)))
      phase_pads = ((max(lo_h, 0), max(hi_h, 0)), (max(lo_w, 0), max(hi_w, 0)))
      # Recursive: this convolution's own gradient (needed for Hessian-vector products) takes
      # the fast path too.
      row.append(_conv_matmul(g, sub, (1, 1), phase_pads))
    phases.append(row)
  if sh == 1 and sw == 1:
    return phases[0][0]
  # Interleave: phase (p, q) holds dx[:, p::sh, q::sw]. Phases are ceil(size / s) long or one
  # shorter; pad them to a common size, interleave by stack+reshape, and crop.
  a, b = rows[0][0], cols[0][0]
  def padded(t):
    return jnp.pad(t, ((0, 0), (0, a - t.shape[1]), (0, b - t.shape[2]), (0, 0)))
  dx = jnp.stack([jnp.stack([padded(t) for t in row], axis=3).reshape(n, a, b * sw, c)
                  for row in phases], axis=2).reshape(n, a * sh, b * sw, c)
  return dx[:, :h, :w]


def _kernel_grad(x, dy, k_shape, strides, pads):
  """dW[i, j, c, o] = sum_{n, y, x} xpad[n, s*y + i, s*x + j, c] dy[n, y, x, o], as
  patches @ dy over chunks of the batch, accumulated in float32.

  The patches are built transposed, [(i, j, c), (n, y, x)], from a channels-first copy of x: a
  product whose contraction runs along both operands' rows in memory (patches^T @ dy with
  natural NHWC patches) is ~2x slower in XLA:CPU's matmul than this plain [M,K] @ [K,N] one.
  """
  kh, kw, c, o = k_shape
  n, ho, wo, _ = dy.shape
  sh, sw = strides
  (lo_h, hi_h), (lo_w, hi_w) = pads

  def chunk_grad(xc, gc):
    # xc: [c, b, h, w] channels-first chunk of x; gc: [b, ho, wo, o].
    b = xc.shape[1]
    # lax.pad: negative padding crops, as in lax.conv.
    xp = lax.pad(xc, jnp.zeros((), xc.dtype),
                 ((0, 0, 0), (0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0)))
    taps = [lax.slice(xp, (0, 0, i, j), (c, b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1),
                      (1, 1, sh, sw))
            for i in range(kh) for j in range(kw)]
    # Row order (i, j, c) is the HWIO kernel's, so the result reshapes directly.
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=0)
    return lax.dot(patches.reshape(kh * kw * c, b * ho * wo), gc.reshape(b * ho * wo, o),
                   preferred_element_type=jnp.float32)

  per_image = ho * wo * kh * kw * c * x.dtype.itemsize
  chunk = _PATCH_CHUNK_BYTES // max(per_image, 1)
  if kh * kw * c < _MIN_CHUNKED_PATCH_ROWS:
    # Few patch rows (e.g. a 3-channel stem): the product is memory-bound anyway and the loop
    # only costs, so take the batch in one product.
    chunk = n
  chunk = int(max(1, min(n, chunk)))
  steps, rest = divmod(n, chunk)
  full = steps * chunk
  dw = jnp.zeros((kh * kw * c, o), jnp.float32)
  if steps:
    # [steps, c, chunk, h, w]: one transpose of x up front, chunks sliced by the scan.
    xs = x[:full].reshape((steps, chunk) + x.shape[1:]).transpose(0, 4, 1, 2, 3)
    gs = dy[:full].reshape((steps, chunk) + dy.shape[1:])
    if steps == 1:
      dw = chunk_grad(xs[0], gs[0])
    else:
      # Checkpointed body: differentiating the scan (Hessian-vector products) then saves the
      # chunk inputs, which exist anyway, instead of every chunk's patch matrix. The first
      # chunk starts the carry, so the carry has the inputs' type: under shard_map a zeros
      # carry is device-invariant while the chunk products are device-varying.
      body = jax.checkpoint(lambda acc, xg: (acc + chunk_grad(*xg), None), prevent_cse=False)
      dw, _ = lax.scan(body, chunk_grad(xs[0], gs[0]), (xs[1:], gs[1:]))
  if rest:
    dw = dw + chunk_grad(x[full:].transpose(3, 0, 1, 2), dy[full:])
  return dw.reshape(kh, kw, c, o)


# ---------------------------------------------------------------------------------------------
# Flax module.


class Conv(nn.Module):
  """`flax.linen.Conv` for NHWC 2-D convolutions (same fields, parameter names, shapes and
  initializers for this subset) computed by `conv2d(..., impl=impl)`. Swapping `nn.Conv` for it
  keeps checkpoints loadable."""
  features: int
  kernel_size: int | Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: Any = 'SAME'
  use_bias: bool = True
  dtype: Any = None  # computation dtype; None: promote inputs and params, as flax does
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = 'auto'

  @nn.compact
  def __call__(self, inputs):
    # flax reads an int kernel_size as a 1-D kernel (k,); this module is 2-D only.
    kernel_size = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(
        self.kernel_size)
    if len(kernel_size) != 2:
      raise ValueError(f'Conv is 2-D only: kernel_size must be a pair, got {self.kernel_size}')
    strides = _pair(1 if self.strides is None else self.strides, 'strides')
    # Like flax: all leading axes are batch axes, flattened for the convolution.
    batch_shape = inputs.shape[:-3]
    if len(batch_shape) != 1:
      inputs = inputs.reshape((-1,) + inputs.shape[-3:])
    padding = nn.linear.canonicalize_padding(self.padding, 2)
    if padding in ('CIRCULAR', 'REFLECT'):
      pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)]
      inputs = jnp.pad(inputs, pads, mode={'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding])
      padding = 'VALID'
    elif padding == 'CAUSAL':
      raise ValueError('CAUSAL padding is only defined for 1-D convolutions')

    kernel = self.param('kernel', self.kernel_init, kernel_size + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = flax_dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = conv2d(inputs, kernel, strides, padding, impl=self.impl)
    if bias is not None:
      y = y + bias.reshape((1, 1, 1, self.features))
    if len(batch_shape) != 1:
      y = y.reshape(batch_shape + y.shape[1:])
    return y
