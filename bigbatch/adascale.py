"""AdaScale SGD (Johnson et al. 2020): the gain ratio r_t and its config checks.

With S = global_batch / lr.base_batch, the step scales the base batch's lr by r_t and stretches
its schedule: lr_t = r_t lr_base(tau_t), tau_{t+1} = tau_t + r_t (base-batch iterations), and
the run ends at the first step with tau / S >= the schedule's length in steps of the global
batch. The optimizer state holds r_t and tau (bigbatch/optim.py); the step computes r_t from the
noise-scale moving averages (bigbatch/grad_stats.py); hooks.AdaScaleStop ends the run.
docs/design.md, "AdaScale", has the formulas and where they differ from the paper.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bigbatch import fields
from bigbatch.fields import ConfigError


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the step needs: S = global_batch / base_batch, and base_batch itself."""
  scale: float
  base_batch: float


def settings(config) -> Settings | None:
  """The AdaScale settings of a validated config; None when optimizer.adascale is off (or the
  config was recorded before the field existed)."""
  if not config.optimizer.get('adascale', False):
    return None
  base = float(config.lr.base_batch)
  return Settings(scale=float(config.global_batch) / base, base_batch=base)


def validate(config) -> None:
  """optimizer.adascale's requirements, before any data is read. Raises ConfigError."""
  if not config.optimizer.get('adascale', False):
    return
  where = 'config.optimizer.adascale=True'
  if config.optimizer.name != 'sgd':
    raise ConfigError(f'{where} scales the lr of SGD (momentum allowed); config.optimizer.name='
                      f'{config.optimizer.name!r}: set --config.optimizer.name=sgd or '
                      f'--config.optimizer.adascale=False')
  if not fields.get(config, 'noise_scale.enabled'):
    raise ConfigError(f'{where} computes its gain from the gradient noise measurement; '
                      f'config.noise_scale.enabled is False: set '
                      f'--config.noise_scale.enabled=True')
  if config.lr.scaling != 'none':
    raise ConfigError(f'{where} scales the lr itself (lr.base_lr is the lr at lr.base_batch); '
                      f'config.lr.scaling={config.lr.scaling!r}: set --config.lr.scaling=none')
  if config.get('batch_schedule'):
    raise ConfigError(f'{where} needs one global batch (one scale S); config.batch_schedule='
                      f'{tuple(config.batch_schedule)}: unset it')
  if config.global_batch < config.lr.base_batch:
    raise ConfigError(f'{where}: config.global_batch={config.global_batch} is below '
                      f'config.lr.base_batch={config.lr.base_batch} (scale S < 1); set '
                      f'lr.base_batch to at most the global batch')


def gain(g2, trace_sigma, s: Settings) -> jax.Array:
  """The gain r = (sigma2 + mu2) / (sigma2 / S + mu2), in [1, S] (jnp; traceable).

  mu2 = max(g2, 0) estimates |G|^2, sigma2 = max(trace_sigma, 0) / base_batch the variance of
  one base-batch gradient (tr(Sigma) is per example). Clipping at 0 gives r = S where only noise
  is measured (mu2 = 0 < sigma2) and r = 1 where no noise is (sigma2 = 0); both 0 or a
  non-finite estimate give 1, the plain base-batch step. The result is clipped to [1, S]
  against rounding."""
  mu2 = jnp.maximum(jnp.asarray(g2, jnp.float32), 0.0)
  sigma2 = jnp.maximum(jnp.asarray(trace_sigma, jnp.float32), 0.0) / s.base_batch
  denominator = sigma2 / s.scale + mu2
  ratio = (sigma2 + mu2) / jnp.where(denominator > 0, denominator, 1.0)
  ok = (denominator > 0) & jnp.isfinite(ratio)
  return jnp.clip(jnp.where(ok, ratio, 1.0), 1.0, s.scale)
