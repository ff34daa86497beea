"""ResNet-18/34/50/101/152 for ImageNet (He et al. 2016), in the v1.5 form.

v1.5 (torchvision, flax's imagenet example, the MLPerf reference) puts a bottleneck block's stride
on its 3x3 convolution instead of the first 1x1, which costs a little speed and gains ~0.5% top-1.
Paddings are torchvision's (k // 2 on each side, not 'SAME'), so that ported weights compute the
same function: 'SAME' pads a stride-2 layer on an even input only at the end.

Parameter counts with 1000 classes equal torchvision's (BN scale/bias included, running statistics
not): 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 / 60,192,808.

GroupNorm needs model.gn_groups to divide every channel count; all of them here are multiples of
the stem width, and the config checks that gn_groups divides model.width.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bigbatch.models import conv
from bigbatch.models import layers

# He et al. (and torchvision): fan_out keeps the variance of the backward pass, which is what
# trains a deep ReLU net from scratch.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# depth -> (block, blocks per stage).
STAGE_DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
DEPTHS = tuple(STAGE_DEPTHS)
STAGES = 4  # block counts in model.stage_depths


def runlocal(config) -> None:
  """The CPU smoke form (config_lib.runlocal): one block per stage, width 8."""
  config.model.stage_depths = (1,) * STAGES
  config.model.width = 8


def make_conv(features: int, kernel: int, strides: int, *, norm: layers.Norm, dtype: Any,
              impl: str, name: str) -> conv.Conv:
  """A kxk conv with torchvision's padding, He init, and a bias only where no norm follows."""
  # A bias before a normalization layer is redundant: the norm's own bias absorbs it.
  return conv.Conv(features, (kernel, kernel), strides=strides,
                   padding=((kernel // 2, kernel // 2),) * 2, use_bias=norm.kind == 'none',
                   dtype=dtype, kernel_init=CONV_INIT, impl=impl, name=name)


def pool_padding(n: int, kernel: int, stride: int, pad: int) -> tuple[int, int]:
  """torchvision's padding `pad` on each side, less the trailing rows no window reaches.

  The windows, and so the output, are the same; on an even input (112 after the stem at 224) the
  last padded row and column are dropped, which saves a pass over them forward and backward.
  """
  out = (n + 2 * pad - kernel) // stride + 1
  return pad, (out - 1) * stride + kernel - n - pad


class _Block(nn.Module):
  """Fields and the shortcut shared by both block types."""
  norm: layers.Norm
  features: int
  strides: int = 1
  zero_init_last_gamma: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def conv_layer(self, features: int, kernel: int, strides: int = 1, *, name: str):
    return make_conv(features, kernel, strides, norm=self.norm, dtype=self.dtype,
                     impl=self.conv_impl, name=name)

  def last_norm(self, train: bool, name: str):
    # Goyal et al. 2017: gamma = 0 in a block's last norm makes every block start as the
    # identity (relu of its shortcut), so the net starts shallow and takes a large-batch lr.
    # With norm='none' there is no gamma and this is a no-op.
    scale_init = nn.initializers.zeros if self.zero_init_last_gamma else nn.initializers.ones
    return self.norm(train, name=name, scale_init=scale_init)

  def shortcut(self, x, out_features: int, train: bool):
    """Identity, or a 1x1 projection + norm where the shape changes (He et al. option B)."""
    if x.shape[-1] == out_features and self.strides == 1:
      return x
    x = self.conv_layer(out_features, 1, self.strides, name='proj_conv')(x)
    return self.norm(train, name='proj_norm')(x)


class BasicBlock(_Block):
  """3x3 (stride) - norm - relu - 3x3 - norm, + shortcut, relu. Output channels = features."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    residual = self.shortcut(x, self.features, train)
    y = self.conv_layer(self.features, 3, self.strides, name='conv1')(x)
    y = nn.relu(self.norm(train, name='norm1')(y))
    y = self.conv_layer(self.features, 3, name='conv2')(y)
    y = self.last_norm(train, name='norm2')(y)
    return nn.relu(y + residual)


class BottleneckBlock(_Block):
  """1x1 - norm - relu - 3x3 (stride, v1.5) - norm - relu - 1x1 (4x) - norm, + shortcut, relu.
  Output channels = 4 * features."""
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = self.expansion * self.features
    residual = self.shortcut(x, out, train)
    y = self.conv_layer(self.features, 1, name='conv1')(x)
    y = nn.relu(self.norm(train, name='norm1')(y))
    y = self.conv_layer(self.features, 3, self.strides, name='conv2')(y)
    y = nn.relu(self.norm(train, name='norm2')(y))
    y = self.conv_layer(out, 1, name='conv3')(y)
    y = self.last_norm(train, name='norm3')(y)
    return nn.relu(y + residual)


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


def stage_depths_of(depth: int, stage_depths: Sequence[int] | None, num_stages: int,
                    standard: Sequence[int]) -> tuple[int, ...]:
  """The blocks per stage: `standard`, or the override (e.g. (1, 1, 1, 1) for smoke runs)."""
  if stage_depths is None:
    return tuple(standard)
  stage_depths = tuple(int(d) for d in stage_depths)
  if len(stage_depths) != num_stages or min(stage_depths) < 1:
    raise ValueError(f'stage_depths={stage_depths} for depth {depth}: need {num_stages} '
                     f'positive block counts')
  return stage_depths


class Model(nn.Module):
  """ImageNet ResNet: 7x7/2 conv stem, norm, relu, 3x3/2 max pool; 4 stages of `width * 2^i`
  (x4 for bottlenecks) channels, the first block of stages 2-4 with stride 2; global average
  pool; a float32 dense head. Parameters are float32, computation in `dtype`.

  Names: stem_conv, stem_norm, stage{1-4}_block{j}/{conv,norm}{1-3}, .../proj_{conv,norm}, head.
  """
  num_classes: int
  norm: layers.Norm
  width: int = 64
  dtype: Any = jnp.float32
  depth: int = 50
  stage_depths: Sequence[int] | None = None
  zero_init_last_gamma: bool = True
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    if self.depth not in STAGE_DEPTHS:
      raise ValueError(f'ResNet depth {self.depth} is not one of {DEPTHS}')
    kind, standard = STAGE_DEPTHS[self.depth]
    depths = stage_depths_of(self.depth, self.stage_depths, STAGES, standard)
    block = BLOCKS[kind]

    x = x_BxHxWxC.astype(self.dtype)
    x = make_conv(self.width, 7, 2, norm=self.norm, dtype=self.dtype, impl=self.conv_impl,
                  name='stem_conv')(x)
    x = nn.relu(self.norm(train, name='stem_norm')(x))
    # Max pooling pads with -inf, so torchvision's padding=1 is exact here too.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=tuple(
        pool_padding(n, 3, 2, 1) for n in x.shape[1:3]))
    for i, n in enumerate(depths):
      for j in range(n):
        x = block(norm=self.norm, dtype=self.dtype, conv_impl=self.conv_impl,
                  features=self.width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                  zero_init_last_gamma=self.zero_init_last_gamma,
                  name=f'stage{i + 1}_block{j}')(x, train)
    # Pool and classify in float32: the logits feed a softmax over up to 1000 classes.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head')(x)
