"""Models, chosen by name: bigbatch.models.<name> exposes `Model(num_classes, norm, width, dtype)`
called as `model.apply(variables, x_BxHxWxC, train=...)`."""
from __future__ import annotations

import importlib

import jax.numpy as jnp

from bigbatch.models import layers


def build(model_config, num_classes: int, axis_name: str | None = None):
  """The model of the config; axis_name is the mesh axis sync BN reduces over (None outside)."""
  module = importlib.import_module(f'bigbatch.models.{model_config.name}')
  return module.Model(num_classes=num_classes, norm=layers.make_norm(model_config, axis_name),
                      width=model_config.width, dtype=jnp.dtype(model_config.dtype))
