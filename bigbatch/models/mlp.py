"""A multilayer perceptron on flattened images: [dense-norm-relu] x 2, dense."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bigbatch.models import layers


class Model(nn.Module):
  num_classes: int
  norm: layers.Norm
  width: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    # A bias before a normalization layer is redundant; keep it only without one.
    use_bias = self.norm.kind == 'none'
    x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(self.dtype)
    for i in range(2):
      x = nn.Dense(self.width, use_bias=use_bias, dtype=self.dtype, name=f'dense{i}')(x)
      x = self.norm(train, name=f'norm{i}')(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(x).astype(jnp.float32)
