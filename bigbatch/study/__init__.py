"""The research layer: batch-size studies built on the core. The top Hessian eigenvalue of the
training loss (sharpness), the target stop and sharpness as loop hooks (hooks), the sweep runner
(run) and its reports. It owns the config fields target.* and sharpness.*; the core never
imports it.
"""
from __future__ import annotations

from typing import Any

from ml_collections import config_dict

from bigbatch import fields


# Read by the host (hooks between steps) only.
fields.declare_host_only('target', 'sharpness')


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
      # Sharpness: the largest eigenvalue of the training-loss Hessian by Lanczos over
      # Hessian-vector products, on the first `num_examples` examples of the training order with
      # BN statistics frozen at those examples' statistics; every N steps and/or at the end,
      # logged as sharpness/*.
      'sharpness.every_steps': config_dict.placeholder(int),
      'sharpness.at_end': False,
      'sharpness.num_examples': 512,
      'sharpness.num_iters': 20,
  }


def validate(config) -> None:
  """Raises fields.ConfigError for a bad target.* or sharpness.* field."""
  if config.target.value is not None:
    fields.choice(config, 'target.mode', ('max', 'min'))
    fields.finite(config, 'target.value')
    if not isinstance(config.target.metric, str) or not config.target.metric.startswith(
        ('eval/', 'eval_ema/', 'verify/')):
      raise fields.ConfigError(f'config.target.metric={config.target.metric!r}: name an '
                               f'evaluation metric, e.g. eval/top1 or eval/loss')
  fields.positive(config, 'sharpness.every_steps', allow_none=True)
  if config.sharpness.every_steps or config.sharpness.at_end:
    fields.positive(config, 'sharpness.num_examples')
    fields.positive(config, 'sharpness.num_iters')
