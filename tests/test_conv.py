"""bigbatch.models.conv: the matmul backward equals XLA's convolution gradients, to every order
the Hessian-vector products need, and the flax module is a drop-in nn.Conv."""
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from bigbatch.models import conv

DN = ('NHWC', 'HWIO', 'NHWC')


def rel_err(ref, got):
  """Max abs difference relative to the reference's scale (max abs)."""
  ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
  assert ref.shape == got.shape
  return float(np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-30))


def lax_conv(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN)


def value_and_vjp(f, x, w, g):
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(g)


def random_case(seed, x_shape, w_shape, stride, padding, dtype=jnp.float32):
  # numpy draws: eager jax.random ops would each compile, a good part of this file's time.
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape, np.float32), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape, np.float32), dtype)
  out = jax.eval_shape(lambda x, w: lax_conv(x, w, stride, padding), x, w)
  g = jnp.asarray(rng.standard_normal(out.shape, np.float32), dtype)
  return x, w, g


# H odd and W even in every case, so both parities are covered; SAME with stride 2 on the even
# W is lax's asymmetric padding.
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('kernel', [1, 3, 7])
@pytest.mark.parametrize('padding', ['SAME', 'VALID'])
def test_matmul_value_and_gradients_equal_lax(stride, kernel, padding):
  x, w, g = random_case(kernel * 10 + stride, (3, 9, 8, 5), (kernel, kernel, 5, 4), stride,
                        padding)
  f = jax.jit(lambda x, w, g: (
      value_and_vjp(lambda x, w: lax_conv(x, w, stride, padding), x, w, g),
      value_and_vjp(lambda x, w: conv.conv2d(x, w, stride, padding, impl='matmul'), x, w, g)))
  ref, got = f(x, w, g)
  for name, r, o in zip(('y', 'dx', 'dW'), ref, got):
    assert rel_err(r, o) < 1e-5, name


@pytest.mark.parametrize('stride,padding', [
    (2, ((2, 0), (0, 3))),     # explicit, asymmetric
    (3, 'SAME_LOWER'),         # stride 3: three phases in the input gradient
    (2, ((4, -1), (-1, 5))),   # padding wider than the kernel, and negative (cropping)
])
def test_matmul_explicit_and_odd_paddings(stride, padding):
  x, w, g = random_case(7, (2, 9, 10, 3), (3, 3, 3, 4), stride, padding)
  f = jax.jit(lambda x, w, g: (
      value_and_vjp(lambda x, w: lax_conv(x, w, stride, padding), x, w, g),
      value_and_vjp(lambda x, w: conv.conv2d(x, w, stride, padding, impl='matmul'), x, w, g)))
  ref, got = f(x, w, g)
  for name, r, o in zip(('y', 'dx', 'dW'), ref, got):
    assert rel_err(r, o) < 1e-5, name


def test_kernel_gradient_chunked_over_the_batch(monkeypatch):
  # Chunks of 2 images over a batch of 5: a scan of 2 steps plus a remainder chunk.
  x, w, g = random_case(3, (5, 8, 8, 16), (3, 3, 16, 8), 1, 'SAME')
  monkeypatch.setattr(conv, '_PATCH_CHUNK_BYTES', 2 * 8 * 8 * 9 * 16 * 4)
  def kernel_grads(x, w, g):
    return tuple(jax.vjp(lambda w: f(x, w, 1, 'SAME'), w)[1](g)[0] for f in (
        lax_conv, lambda x, w, s, p: conv.conv2d(x, w, s, p, impl='matmul')))
  assert 'scan' in str(jax.make_jaxpr(kernel_grads)(x, w, g))
  ref, got = jax.jit(kernel_grads)(x, w, g)
  assert rel_err(ref, got) < 1e-5


class TwoConvs(nn.Module):
  impl: str

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(conv.Conv(6, (3, 3), strides=2, impl=self.impl, name='c0')(x))
    x = conv.Conv(4, (3, 3), padding='VALID', impl=self.impl, name='c1')(x)
    return jnp.mean(jnp.tanh(x) ** 2)


def test_hessian_vector_product_reverse_over_reverse(monkeypatch):
  # Small chunks so that the kernel gradient's scan is differentiated too.
  monkeypatch.setattr(conv, '_PATCH_CHUNK_BYTES', 2 * 5 * 5 * 9 * 6 * 4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 9, 10, 3), np.float32))
  params = jax.jit(TwoConvs('xla').init)(jax.random.PRNGKey(0), x)
  v = jax.tree.map(lambda l: jnp.asarray(rng.standard_normal(l.shape, np.float32)), params)

  def hvp(impl):
    # d/dp <grad L(p, x), v>, also w.r.t. x: reverse over reverse, no jvp.
    def inner(p, x):
      gp, gx = jax.grad(lambda p, x: TwoConvs(impl).apply(p, x), argnums=(0, 1))(p, x)
      return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(v))) + \
          jnp.vdot(gx, x)
    return jax.jit(jax.grad(inner, argnums=(0, 1)))(params, x)

  ref, got = hvp('xla'), hvp('matmul')
  for r, o in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    assert rel_err(r, o) < 1e-5


@pytest.mark.parametrize('kwargs', [
    dict(features=6, kernel_size=(3, 3), strides=2),
    dict(features=5, kernel_size=(1, 1), use_bias=False, padding='VALID'),
    dict(features=4, kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3))),
    dict(features=4, kernel_size=(3, 3), padding=1, dtype=jnp.bfloat16),
])
def test_module_is_a_drop_in_nn_conv(kwargs):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 8, 3), np.float32))
  key = jax.random.PRNGKey(1)
  ref_params = jax.jit(nn.Conv(**kwargs).init)(key, x)
  params = jax.jit(conv.Conv(**kwargs, impl='matmul').init)(key, x)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for r, p in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
    assert r.shape == p.shape and r.dtype == p.dtype
    np.testing.assert_array_equal(r, p)
  ref = jax.jit(nn.Conv(**kwargs).apply)(ref_params, x)
  for impl in ('xla', 'matmul'):
    y = jax.jit(conv.Conv(**kwargs, impl=impl).apply)(ref_params, x)  # loads nn.Conv's params
    assert y.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-6, atol=1e-6)


def test_auto_is_matmul_on_cpu():
  assert jax.default_backend() == 'cpu'
  assert conv.resolve_impl('auto') == 'matmul'
  assert conv.resolve_impl('xla') == 'xla'
  x, w, _ = random_case(0, (1, 4, 4, 2), (3, 3, 2, 2), 1, 'SAME')
  assert 'custom_vjp' in str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w))(x, w))
  assert 'custom_vjp' not in str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, impl='xla'))(x, w))


def test_bfloat16_runs_and_is_close():
  stride = 2
  x, w, g = random_case(5, (4, 8, 8, 16), (3, 3, 16, 8), stride, 'SAME', jnp.bfloat16)
  f32 = lambda t: t.astype(jnp.float32)
  f = jax.jit(lambda x, w, g: (
      value_and_vjp(lambda x, w: lax_conv(x, w, stride, 'SAME'), f32(x), f32(w), f32(g)),
      value_and_vjp(lambda x, w: conv.conv2d(x, w, stride, 'SAME', impl='matmul'), x, w, g)))
  ref, got = f(x, w, g)
  for name, r, o in zip(('y', 'dx', 'dW'), ref, got):
    assert o.dtype == jnp.bfloat16, name
    assert rel_err(r, o) < 2e-2, name


def test_unsupported_arguments_raise():
  x, w, _ = random_case(0, (1, 5, 5, 2), (3, 3, 2, 2), 1, 'SAME')
  with pytest.raises(NotImplementedError, match='dilat'):
    conv.conv2d(x, w, rhs_dilation=(2, 2))
  with pytest.raises(NotImplementedError, match='feature_group_count'):
    conv.conv2d(x, w, feature_group_count=2)
  with pytest.raises(ValueError, match='impl'):
    conv.conv2d(x, w, impl='cudnn')
  with pytest.raises(ValueError, match='channels'):
    conv.conv2d(x, jnp.zeros((3, 3, 3, 2)))


def test_chunked_weight_gradient_inside_shard_map():
  """The trainer differentiates under shard_map, where the chunk products are device-varying:
  the chunked (scan) weight gradient must compile there and equal XLA's."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(0)
  # 64 channels at 16x16: several batch chunks of patches per device.
  x = jnp.asarray(rng.normal(size=(8 * 32, 16, 16, 64)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(3, 3, 64, 64)).astype(np.float32) * 0.05)

  def grads(impl):
    def per_device(k, x):
      kv = jax.lax.pcast(k, 'data', to='varying')
      g = jax.grad(lambda kk: jnp.sum(conv.conv2d(x, kk, impl=impl) ** 2))(kv)
      return jax.lax.psum(g, 'data')
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data')),
                                 out_specs=P()))(k, x)

  np.testing.assert_allclose(grads('matmul'), grads('xla'), rtol=2e-4, atol=1e-2)
