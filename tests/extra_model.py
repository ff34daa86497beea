"""A model written outside bigbatch, in one file: an MLP of model.depth hidden layers.

Nothing in bigbatch names it: tests/test_add_a_file.py registers it with
`bigbatch.models.register`. It declares `depth`, so the config's model.depth reaches it (checked
against DEPTHS); it has no stages, so model.stage_depths must stay None.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bigbatch.models import layers

DEPTHS = (1, 2, 3)  # the model.depth values it builds


def runlocal(config) -> None:
  """The CPU smoke form: one hidden layer of 8."""
  config.model.depth = 1
  config.model.width = 8


class Model(nn.Module):
  """[dense-norm-relu] x depth on the flattened image, then a float32 dense head."""
  num_classes: int
  norm: layers.Norm
  width: int = 32
  dtype: Any = jnp.float32
  depth: int = 2

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(self.dtype)
    for i in range(self.depth):
      x = nn.Dense(self.width, use_bias=self.norm.kind == 'none', dtype=self.dtype,
                   name=f'dense{i}')(x)
      x = nn.relu(self.norm(train, name=f'norm{i}')(x))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(x)
