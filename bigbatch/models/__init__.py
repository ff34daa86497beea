"""Models, chosen by name: bigbatch.models.<name> exposes `Model(num_classes, norm, width, dtype)`
called as `model.apply(variables, x_BxHxWxC, train=...)`. Architecture fields that only some
models have (depth, stage_depths, zero_init_last_gamma, conv_impl) are passed to those that
declare them."""
from __future__ import annotations

import dataclasses
import importlib

import jax.numpy as jnp

from bigbatch.models import layers

# config.model fields a Model receives only if it declares a field of that name: an MLP has no
# depth and no convolution, and should not carry fields that do nothing.
OPTIONAL_FIELDS = ('depth', 'stage_depths', 'zero_init_last_gamma', 'conv_impl', 'embedding_dim',
                   'dropout')


def build(model_config, num_classes: int, axis_name: str | None = None):
  """The model of the config; axis_name is the mesh axis sync BN reduces over (None outside)."""
  module = importlib.import_module(f'bigbatch.models.{model_config.name}')
  declared = {f.name for f in dataclasses.fields(module.Model)}
  optional = {k: model_config[k] for k in OPTIONAL_FIELDS if k in declared}
  return module.Model(num_classes=num_classes, norm=layers.make_norm(model_config, axis_name),
                      width=model_config.width, dtype=jnp.dtype(model_config.dtype), **optional)
