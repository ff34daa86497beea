"""A small CNN for 8x8 digits and other small images: 3 conv-norm-relu blocks, pool, dense."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bigbatch.models import conv
from bigbatch.models import layers


class Model(nn.Module):
  num_classes: int
  norm: layers.Norm
  width: int = 32
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'  # conv.Conv backward: auto | xla | matmul

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    # A bias before a normalization layer is redundant; keep it only without one.
    use_bias = self.norm.kind == 'none'
    x = x_BxHxWxC.astype(self.dtype)
    for i, (features, stride) in enumerate(
        [(self.width, 1), (2 * self.width, 2), (2 * self.width, 1)]):
      x = conv.Conv(features, (3, 3), strides=stride, padding='SAME', use_bias=use_bias,
                    dtype=self.dtype, impl=self.conv_impl, name=f'conv{i}')(x)
      x = self.norm(train, name=f'norm{i}')(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(x).astype(jnp.float32)
