"""CIFAR ResNets of depth 6n + 2 (He et al. 2016, section 4.2): ResNet-8/14/20/32/44/56/110.

A 3x3 conv stem (no max pool: 32x32 images are small already), then 3 stages of n basic blocks
with width, 2 * width, 4 * width channels (16/32/64 at the standard width 16), the first block of
stages 2 and 3 with stride 2; global average pool; a float32 dense head. Shortcuts that change
shape are 1x1 conv + norm projections (option B; the paper's CIFAR nets used zero-padding, A),
so parameter counts are slightly above the paper's: 272,474 for ResNet-20 and 855,770 for
ResNet-56 with 10 classes (0.27M / 0.85M in the paper). ResNet-8 is the CIFAR-10 model of
Shallue et al. 2018.

Blocks are the ImageNet ResNet's `BasicBlock`, so norms, zero-init gammas, dtypes and conv
implementations behave identically in both.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bigbatch.models import layers
from bigbatch.models import resnet

DEPTHS = (8, 14, 20, 32, 44, 56, 110)
STAGES = 3  # block counts in model.stage_depths


def runlocal(config) -> None:
  """The CPU smoke form (config_lib.runlocal): one block per stage, width 8."""
  config.model.stage_depths = (1,) * STAGES
  config.model.width = 8


class Model(nn.Module):
  """CIFAR ResNet-`depth`; `stage_depths` (3 block counts) overrides the n of depth = 6n + 2.

  Names: stem_conv, stem_norm, stage{1-3}_block{j}/{conv,norm}{1,2}, .../proj_{conv,norm}, head.
  """
  num_classes: int
  norm: layers.Norm
  width: int = 16
  dtype: Any = jnp.float32
  depth: int = 20
  stage_depths: Sequence[int] | None = None
  zero_init_last_gamma: bool = True
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    if self.depth not in DEPTHS:
      raise ValueError(f'CIFAR ResNet depth {self.depth} is not one of {DEPTHS} (6n + 2)')
    n = (self.depth - 2) // 6
    depths = resnet.stage_depths_of(self.depth, self.stage_depths, STAGES, (n,) * STAGES)

    x = x_BxHxWxC.astype(self.dtype)
    x = resnet.make_conv(self.width, 3, 1, norm=self.norm, dtype=self.dtype,
                         impl=self.conv_impl, name='stem_conv')(x)
    x = nn.relu(self.norm(train, name='stem_norm')(x))
    for i, blocks in enumerate(depths):
      for j in range(blocks):
        x = resnet.BasicBlock(norm=self.norm, dtype=self.dtype, conv_impl=self.conv_impl,
                              features=self.width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                              zero_init_last_gamma=self.zero_init_last_gamma,
                              name=f'stage{i + 1}_block{j}')(x, train)
    # Pool and classify in float32, as the ImageNet model does.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(x)
