"""Models, chosen by name: bigbatch.models.<name> exposes `Model(num_classes, norm, width, dtype)`
called as `model.apply(variables, x_BxHxWxC, train=...)`. Architecture fields that only some
models have (depth, stage_depths, zero_init_last_gamma, conv_impl) are passed to those that
declare them."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

import jax.numpy as jnp
from ml_collections import config_dict

from bigbatch import fields
from bigbatch.models import layers

# Every module of this package that defines a Model; a new model is a new file.
NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                     if m.name not in ('layers', 'conv')))
NORMS = ('batch', 'group', 'none')
DEPTHS = {'resnet': (18, 34, 50, 101, 152), 'cifar_resnet': (8, 14, 20, 32, 44, 56, 110),
          'iresnet': (18, 34, 50, 100, 200)}
STAGES = {'resnet': 4, 'cifar_resnet': 3, 'iresnet': 4}

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


def defaults() -> dict[str, Any]:
  """The config fields this package owns (model.*), with their defaults."""
  return {
      'model.name': 'cnn',  # module bigbatch.models.<name>
      'model.width': 32,
      'model.norm': 'batch',  # batch | group | none
      # None: BatchNorm over the whole microbatch on all devices (sync BN, statistics reduced
      # over 'data'). g: ghost BN, statistics over groups of g examples within each device's
      # share.
      'model.bn_group_size': config_dict.placeholder(int),
      'model.bn_momentum': 0.9,
      'model.bn_epsilon': 1e-5,
      'model.gn_groups': 8,
      'model.dtype': 'float32',  # compute dtype; parameters stay float32
      # ResNets: resnet (ImageNet) depth 18 | 34 | 50 | 101 | 152; cifar_resnet depth 6n+2 in
      # 8 | 14 | 20 | 32 | 44 | 56 | 110. model.width is the stem width (64 / 16 standard).
      'model.depth': 50,
      # Blocks per stage, overriding the depth's (4 for resnet, 3 for cifar_resnet), e.g.
      # (1,1,1,1) for smoke runs; the depth still picks basic or bottleneck blocks.
      'model.stage_depths': config_dict.placeholder(tuple),
      # Goyal et al. 2017: gamma = 0 in the last norm of each residual block (no-op with
      # norm=none).
      'model.zero_init_last_gamma': True,
      # Conv backward: auto (matmul weight gradients on CPU, XLA elsewhere) | xla | matmul.
      'model.conv_impl': 'auto',
      'model.embedding_dim': 512,  # task=face: the embedding size (iresnet's head)
      'model.dropout': 0.0,  # iresnet head dropout
  }


def validate(config) -> None:
  """The model fields' form (the per-device batch vs bn_group_size is checked with the mesh, in
  config_lib). Raises fields.ConfigError."""
  m = config.model
  fields.choice(config, 'model.name', NAMES)
  fields.choice(config, 'model.norm', NORMS)
  if m.dtype == 'float16':
    # float16's 5-bit exponent underflows small gradients unless the loss is scaled (and the
    # scale adapted to overflow), which the step does not do; bfloat16 keeps float32's range.
    raise fields.ConfigError("config.model.dtype='float16' needs loss scaling, which bigbatch "
                             "does not do; use --config.model.dtype=bfloat16 (16 bits as well, "
                             "with float32's exponent range) or float32")
  fields.choice(config, 'model.dtype', ('float32', 'bfloat16'))
  fields.choice(config, 'model.conv_impl', ('auto', 'xla', 'matmul'))
  fields.positive(config, 'model.width')
  fields.finite(config, 'model.bn_momentum', low=0.0, high=1.0)
  fields.positive(config, 'model.bn_epsilon')
  fields.finite(config, 'model.dropout', low=0.0, high=1.0, high_open=True)
  if m.bn_group_size is not None and m.norm != 'batch':
    raise fields.ConfigError(f'config.model.bn_group_size={m.bn_group_size} needs '
                             f'model.norm=batch (it is {m.norm!r}); unset bn_group_size or set '
                             f'norm=batch')
  if m.norm == 'group':
    fields.positive(config, 'model.gn_groups')
    if m.width % m.gn_groups:
      raise fields.ConfigError(f'config.model.gn_groups={m.gn_groups} does not divide '
                               f'model.width={m.width}; choose a divisor')
  if m.name in DEPTHS and m.depth not in DEPTHS[m.name]:
    raise fields.ConfigError(f'config.model.depth={m.depth} for {m.name}; choose '
                             f'{", ".join(map(str, DEPTHS[m.name]))}')
  if m.stage_depths is not None and (len(m.stage_depths) != STAGES.get(m.name)
                                     or min(m.stage_depths) < 1):
    raise fields.ConfigError(f'config.model.stage_depths={m.stage_depths}: set 4 positive block '
                             f'counts for resnet and iresnet, 3 for cifar_resnet, or leave it '
                             f'None')
