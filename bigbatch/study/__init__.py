"""Batch-size study tools: the gradient noise scale (noise_scale), the top Hessian eigenvalue of
the training loss (sharpness), the in-run measurements and the target stop as loop hooks
(hooks), the sweep runner (run) and its report (report).

The study's config fields (target.*, noise_scale.*, sharpness.*) are owned here.
"""
from __future__ import annotations

from typing import Any

from ml_collections import config_dict

from bigbatch import fields


def defaults() -> dict[str, Any]:
  """The config fields of the in-run study measurements, with their defaults."""
  return {
      # Stop at a target (batch-size studies, Shallue et al. 2018): after each evaluation, if
      # `metric` (an eval metric name, e.g. eval/top1) is >= value (mode max) or <= value (mode
      # min), the step is recorded in workdir/target.json (steps, examples and wall time to
      # target) and, with stop, training ends there. value None: no target.
      'target.metric': 'eval/top1',
      'target.value': config_dict.placeholder(float),
      'target.mode': 'max',
      'target.stop': True,
      # Gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018), from the
      # squared norms of each device's microbatch gradients (batch b) and of the update's
      # gradient (batch B) in every step, smoothed by moving averages of numerator and
      # denominator (bigbatch/study/noise_scale.py); logged as gns/*. Needs b < B: more than one
      # device or accumulation_steps > 1.
      'noise_scale.enabled': False,
      'noise_scale.ema_decay': 0.95,
      # Sharpness: the largest eigenvalue of the training-loss Hessian by Lanczos over
      # Hessian-vector products, on the first `num_examples` examples of the training order with
      # BN statistics frozen at those examples' statistics; every N steps and/or at the end,
      # logged as sharpness/*.
      'sharpness.every_steps': config_dict.placeholder(int),
      'sharpness.at_end': False,
      'sharpness.num_examples': 512,
      'sharpness.num_iters': 20,
  }


def validate(config, data_parallel: int) -> None:
  """Raises fields.ConfigError; `data_parallel` is the mesh's 'data' size."""
  if config.target.value is not None:
    fields.choice(config, 'target.mode', ('max', 'min'))
    fields.finite(config, 'target.value')
    if not isinstance(config.target.metric, str) or not config.target.metric.startswith(
        ('eval/', 'eval_ema/', 'verify/')):
      raise fields.ConfigError(f'config.target.metric={config.target.metric!r}: name an '
                               f'evaluation metric, e.g. eval/top1 or eval/loss')
  if config.noise_scale.enabled:
    fields.finite(config, 'noise_scale.ema_decay', low=0.0, high=1.0, high_open=True)
    if not config.noise_scale.ema_decay > 0:
      raise fields.ConfigError(f'config.noise_scale.ema_decay={config.noise_scale.ema_decay}: '
                               f'must be in (0, 1)')
    if data_parallel * config.accumulation_steps < 2:
      raise fields.ConfigError(
          'config.noise_scale.enabled: the small batch (one device\'s microbatch) and the large '
          'batch (the update) coincide with one data-parallel device and accumulation_steps=1; '
          'use several devices or set --config.accumulation_steps=2 or more')
  fields.positive(config, 'sharpness.every_steps', allow_none=True)
  if config.sharpness.every_steps or config.sharpness.at_end:
    fields.positive(config, 'sharpness.num_examples')
    fields.positive(config, 'sharpness.num_iters')
