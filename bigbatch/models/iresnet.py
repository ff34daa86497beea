"""iResNet-18/34/50/100/200 face embedding networks (InsightFace arcface_torch iresnet.py).

112x112x3 faces -> stem -> 4 stages of IBasicBlocks (stride 2 each: 112 -> 7) -> head (norm,
flatten, dropout, dense, norm) -> embeddings [B, embedding_dim], not normalized; the classifier
is Partial FC (bigbatch/face/partial_fc.py), outside the model. The block, the deliberate
differences from the reference and the parameter counts are in docs/design.md, "iResNet, the
face backbone".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bigbatch.models import conv
from bigbatch.models import layers
from bigbatch.models.resnet import stage_depths_of

STAGE_DEPTHS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
DEPTHS = tuple(STAGE_DEPTHS)
STAGES = 4  # block counts in model.stage_depths


def runlocal(config) -> None:
  """The CPU smoke form (config_lib.runlocal): one block per stage, width 8."""
  config.model.stage_depths = (1,) * STAGES
  config.model.width = 8

# arcface_torch: nn.init.normal_(conv.weight, 0, 0.1); harmless behind a norm (scale-invariant).
REFERENCE_CONV_INIT = nn.initializers.normal(0.1)
# Without a norm the scale matters: variance-preserving for the forward pass.
NO_NORM_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
# torch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
DENSE_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class PReLU(nn.Module):
  """max(x, 0) + alpha * min(x, 0) with one learned slope per channel (last axis)."""
  init_slope: float = 0.25

  @nn.compact
  def __call__(self, x):
    alpha = self.param('alpha', nn.initializers.constant(self.init_slope), (x.shape[-1],),
                       jnp.float32)
    alpha = alpha.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    return jnp.where(x >= 0, x, alpha * x)


def make_conv(features: int, kernel: int, strides: int, *, norm: layers.Norm, dtype: Any,
              impl: str, name: str) -> conv.Conv:
  """kxk conv with padding k // 2 (torch's), a bias only without a norm (docs/design.md)."""
  with_norm = norm.kind != 'none'
  return conv.Conv(features, (kernel, kernel), strides=strides,
                   padding=((kernel // 2, kernel // 2),) * 2, use_bias=not with_norm,
                   dtype=dtype, kernel_init=REFERENCE_CONV_INIT if with_norm else NO_NORM_CONV_INIT,
                   impl=impl, name=name)


class IBasicBlock(nn.Module):
  """norm - 3x3 - norm - PReLU - 3x3 (stride) - norm, + shortcut (no activation after)."""
  norm: layers.Norm
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool):
    conv_layer = lambda f, k, s, name: make_conv(f, k, s, norm=self.norm, dtype=self.dtype,
                                                 impl=self.conv_impl, name=name)
    y = self.norm(train, name='norm1')(x)
    y = conv_layer(self.features, 3, 1, 'conv1')(y)
    y = self.norm(train, name='norm2')(y)
    y = PReLU(name='prelu')(y)
    y = conv_layer(self.features, 3, self.strides, 'conv2')(y)
    y = self.norm(train, name='norm3')(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv_layer(self.features, 1, self.strides, 'proj_conv')(x)
      x = self.norm(train, name='proj_norm')(x)
    return y + x


class Model(nn.Module):
  """iResNet embedding network (docs/design.md, "iResNet"). Returns [B, embedding_dim] float32
  embeddings.

  Names: stem_conv, stem_norm, stem_prelu, stage{1-4}_block{j}/{norm1-3, conv1-2, prelu,
  proj_conv, proj_norm}, head_norm, head_dense, features.
  """
  num_classes: int  # unused: the classifier (Partial FC) is outside the model
  norm: layers.Norm
  width: int = 64
  dtype: Any = jnp.float32
  depth: int = 50
  stage_depths: Sequence[int] | None = None
  conv_impl: str = 'auto'
  embedding_dim: int = 512
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    if self.depth not in STAGE_DEPTHS:
      raise ValueError(f'iResNet depth {self.depth} is not one of {DEPTHS}')
    depths = stage_depths_of(self.depth, self.stage_depths, STAGES, STAGE_DEPTHS[self.depth])

    x = x_BxHxWxC.astype(self.dtype)
    x = make_conv(self.width, 3, 1, norm=self.norm, dtype=self.dtype, impl=self.conv_impl,
                  name='stem_conv')(x)
    x = self.norm(train, name='stem_norm')(x)
    x = PReLU(name='stem_prelu')(x)
    for i, n in enumerate(depths):
      for j in range(n):
        x = IBasicBlock(norm=self.norm, features=self.width * 2**i, strides=2 if j == 0 else 1,
                        dtype=self.dtype, conv_impl=self.conv_impl,
                        name=f'stage{i + 1}_block{j}')(x, train)
    x = self.norm(train, name='head_norm')(x)
    # Flatten in float32 (the reference runs the fc in float32 under fp16 too): the 25088 x 512
    # product is the embedding itself.
    x = x.astype(jnp.float32).reshape(x.shape[0], -1)
    if self.dropout > 0:  # only then does the model need a 'dropout' rng
      x = nn.Dropout(self.dropout, deterministic=not train, name='dropout')(x)
    x = nn.Dense(self.embedding_dim, dtype=jnp.float32, kernel_init=DENSE_INIT,
                 name='head_dense')(x)
    # The embedding leaves the model in float32 whatever the compute dtype.
    features_norm = dataclasses.replace(self.norm, dtype=jnp.float32)
    return features_norm(train, name='features')(x)
