"""Sharpness: the largest algebraic eigenvalue of the training-loss Hessian, by Lanczos over
reverse-over-reverse Hessian-vector products (`hvp`, `lanczos_top_eigenvalue`, `top_eigenvalue`).

Why Lanczos and reverse-over-reverse, what the loss must satisfy and the memory it takes are in
docs/design.md, "Sharpness"; the loop hook that measures a run is bigbatch/study/hooks.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np


def _tree_vdot(a, b) -> jax.Array:
  """sum over leaves of <a, b>, in at least float32."""
  parts = [jnp.vdot(x, y).astype(jnp.result_type(x.dtype, jnp.float32))
           for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  return functools.reduce(jnp.add, parts, jnp.zeros((), jnp.float32))


def hvp(loss_fn: Callable[[Any], jax.Array], params, v):
  """H(params) v for the Hessian of the scalar loss_fn at params, reverse-over-reverse.

  v is a pytree with the structure, shapes and dtypes of params; the result is one too.
  Computed as grad_p (grad_p loss_fn(p) . v), which needs only VJPs (works through custom_vjp
  functions whose backward pass is itself differentiable).
  """
  return jax.grad(lambda p: _tree_vdot(jax.grad(loss_fn)(p), v))(params)


def quadratic_form(loss_fn: Callable[[Any], jax.Array], params, v) -> jax.Array:
  """v^T H(params) v for the Hessian of the scalar loss_fn at params (float32 or wider)."""
  return _tree_vdot(v, hvp(loss_fn, params, v))


def _replicated_like(tree) -> jax.sharding.Sharding | None:
  """Replicated over the mesh (or the one device) of the tree's first array, if committed."""
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
      return sharding
    return None
  return None


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _initial_basis(key, rows, n, dtype):
  """[rows, n]: a random unit vector in row 0, zeros below."""
  q0_N = jax.random.normal(key, (n,), dtype)
  return jnp.zeros((rows, n), dtype).at[0].set(q0_N / jnp.linalg.norm(q0_N))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _lanczos_step(hvp_fn, basis_KxN, j, params_like, operands):
  """One Lanczos step with full reorthogonalization on the flattened vector.

  basis_KxN holds the orthonormal Lanczos vectors in rows 0..j (K = num_iters + 1, later rows
  zero). Returns the basis with row j+1 set (zero on breakdown), alpha_j and beta_j. j is traced
  so every step runs the same compiled program.
  """
  _, unravel = ravel_pytree(params_like)
  q_N = basis_KxN[j]
  w_N, _ = ravel_pytree(hvp_fn(unravel(q_N), *operands))
  w_N = w_N.astype(basis_KxN.dtype)
  alpha = jnp.vdot(q_N, w_N)
  # Classical Gram-Schmidt against every stored vector, twice ("twice is enough"): removes
  # alpha q_j and beta q_{j-1} (the three-term recurrence) and the roundoff that would otherwise
  # bring back copies of converged Ritz vectors. Zero rows contribute nothing.
  for _ in range(2):
    w_N = w_N - basis_KxN.T @ (basis_KxN @ w_N)
  beta = jnp.linalg.norm(w_N)
  safe = jnp.where(beta > 0, beta, 1.0)
  basis_KxN = basis_KxN.at[j + 1].set(jnp.where(beta > 0, w_N / safe, 0.0))
  return basis_KxN, alpha, beta


def lanczos_top_eigenvalue(hvp_fn: Callable[..., Any], params_like, *, num_iters: int = 20,
                           key: jax.Array, operands: tuple = (),
                           breakdown_tol: float | None = None) -> tuple[float, dict[str, Any]]:
  """Largest algebraic eigenvalue of the symmetric operator v -> hvp_fn(v, *operands).

  Args:
    hvp_fn: maps a pytree shaped like params_like (plus operands) to one of the same shape;
      must be linear and symmetric in v. It is traced into one jitted step, compiled once per
      (hvp_fn, shapes): pass the same function object to reuse the compilation across calls.
    params_like: a pytree giving the vector's structure, shapes and dtypes (values unused).
    num_iters: Lanczos steps (capped at the dimension); the top Ritz value converges fast when
      the top eigenvalue is separated from the rest relative to the spectrum's width.
    key: PRNG key for the random start vector.
    operands: arrays hvp_fn needs (params, a batch), passed to the jitted step as ARGUMENTS:
      arrays captured in a closure would instead be baked into the compiled program as constants.
    breakdown_tol: stop when beta_j <= breakdown_tol * (largest |alpha|, beta seen so far), i.e.
      the Krylov space is invariant and its Ritz values are exact. Default 100 * float eps.
  Returns:
    (top, info): top is the largest Ritz value, a Python float. info has 'ritz_values' (all,
    ascending, numpy), 'num_iters' (steps done), 'residual' (|A y - top y| of the top Ritz pair,
    = beta_last * |last component of its eigenvector of T|, ~0 on breakdown), 'breakdown' (bool),
    'alphas', 'betas' (the tridiagonal matrix T).
  """
  # Shapes only: ravel_pytree itself would concatenate (copy) all parameters.
  flat = jax.eval_shape(lambda p: ravel_pytree(p)[0], params_like)
  n = int(flat.size)
  if n == 0:
    raise ValueError('lanczos_top_eigenvalue: the parameter vector is empty')
  if num_iters < 1:
    raise ValueError(f'lanczos_top_eigenvalue: num_iters must be >= 1, got {num_iters}')
  dtype = jnp.result_type(flat.dtype, jnp.float32)
  k = min(int(num_iters), n)
  if breakdown_tol is None:
    breakdown_tol = 100.0 * float(jnp.finfo(dtype).eps)

  basis_KxN = _initial_basis(key, k + 1, n, dtype)
  # Put the basis where the parameters live, explicitly: jit would otherwise copy it from the
  # default device on every step (an implicit transfer, refused under a transfer guard).
  placement = _replicated_like(params_like)
  if placement is not None:
    basis_KxN = jax.device_put(basis_KxN, placement)
  alphas, betas = [], []
  breakdown = False
  scale = 0.0
  for j in range(k):
    # Explicit transfers only (device_put in, device_get out): the trainer may run under
    # jax.transfer_guard('disallow').
    j_dev = jax.device_put(np.int32(j), placement)
    basis_KxN, alpha, beta = _lanczos_step(hvp_fn, basis_KxN, j_dev, params_like,
                                           tuple(operands))
    alpha, beta = (float(x) for x in jax.device_get((alpha, beta)))
    alphas.append(alpha)
    betas.append(beta)
    scale = max(scale, abs(alpha), beta)
    if beta <= breakdown_tol * scale:
      breakdown = True
      break
  del basis_KxN

  m = len(alphas)
  t_MxM = (np.diag(np.asarray(alphas, np.float64)) + np.diag(np.asarray(betas[:-1]), 1) +
           np.diag(np.asarray(betas[:-1]), -1))
  ritz_M, vecs_MxM = np.linalg.eigh(t_MxM)
  top = float(ritz_M[-1])
  residual = abs(betas[-1] * float(vecs_MxM[-1, -1]))
  info = {'ritz_values': ritz_M, 'num_iters': m, 'residual': 0.0 if breakdown else residual,
          'breakdown': breakdown, 'alphas': np.asarray(alphas), 'betas': np.asarray(betas)}
  return top, info


@dataclasses.dataclass(frozen=True)
class _LossHvp:
  """v, params, *args -> H v of loss_fn(., *args); hashable by loss_fn so the jitted Lanczos
  step is reused across calls with the same loss_fn."""
  loss_fn: Callable[..., jax.Array]

  def __call__(self, v, params, *args):
    return hvp(lambda p: self.loss_fn(p, *args), params, v)


def top_eigenvalue(loss_fn: Callable[..., jax.Array], params, *args, num_iters: int = 20,
                   key: jax.Array, breakdown_tol: float | None = None
                   ) -> tuple[float, dict[str, Any]]:
  """Largest algebraic Hessian eigenvalue of loss_fn(params, *args) at params (see Lanczos).

  args (e.g. a fixed batch, frozen batch-norm statistics) are passed to the compiled step as
  arguments rather than closed over. The same loss_fn object compiles once.
  """
  return lanczos_top_eigenvalue(_LossHvp(loss_fn), params, num_iters=num_iters, key=key,
                                operands=(params,) + tuple(args), breakdown_tol=breakdown_tol)

