"""Models by name: a registry of model sources, and `build` for the one that config.model.name
names.

`register(name, source)` adds a source (a module with a `Model` class) from any module; the
modules of this package that define a Model are registered below under their file names. What a
source provides is in docs/design.md, "Adding a data set or a model: one file".
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

import jax.numpy as jnp
from ml_collections import config_dict

from bigbatch import fields
from bigbatch.models import layers

NORMS = ('batch', 'group', 'none')
# name -> source, in the order of registration (the order the choices are listed in).
_MODELS: dict[str, Any] = {}

# config.model fields a Model receives only if it declares a field of that name: an MLP has no
# depth and no convolution, and should not carry fields that do nothing.
OPTIONAL_FIELDS = ('depth', 'stage_depths', 'zero_init_last_gamma', 'conv_impl', 'embedding_dim',
                   'dropout')


def register(name: str, source: Any) -> None:
  """Adds model `name` (config.model.name), built from `source`: a module or object with a
  `Model` class, and optionally `DEPTHS`, `STAGES`, `validate`, `runlocal` (docs/design.md,
  "Adding a data set or a model: one file"). Registering the same source again is a no-op;
  another source under a registered name is a ValueError, one without Model a TypeError."""
  if not isinstance(getattr(source, 'Model', None), type):
    raise TypeError(f'model {name!r} ({source!r}) has no Model class')
  known = _MODELS.get(name)
  if known is not None and known is not source:
    raise ValueError(f'model {name!r} is already registered ({known!r})')
  _MODELS[name] = source


def unregister(name: str) -> None:
  """Removes model `name` (nothing if it is not registered)."""
  _MODELS.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered model names."""
  return tuple(_MODELS)


def get(name: str) -> Any:
  """The source of model `name`; ConfigError naming config.model.name if it is unknown."""
  if name not in _MODELS:
    raise fields.ConfigError(f'config.model.name={name!r} is unknown; choose one of '
                             f'{", ".join(_MODELS)}')
  return _MODELS[name]


def build(model_config, num_classes: int, axis_name: str | None = None):
  """The model of the config; axis_name is the mesh axis sync BN reduces over (None outside)."""
  model = get(model_config.name).Model
  declared = {f.name for f in dataclasses.fields(model)}
  optional = {k: model_config[k] for k in OPTIONAL_FIELDS if k in declared}
  return model(num_classes=num_classes, norm=layers.make_norm(model_config, axis_name),
               width=model_config.width, dtype=jnp.dtype(model_config.dtype), **optional)


def runlocal(config) -> None:
  """config_lib.runlocal's part for the model: its source's own CPU smoke form, if it has one."""
  source = get(config.model.name)
  if hasattr(source, 'runlocal'):
    source.runlocal(config)


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
  fields.choice(config, 'model.name', names())
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
  source = get(m.name)
  depths = getattr(source, 'DEPTHS', None)
  if depths is not None and m.depth not in depths:
    raise fields.ConfigError(f'config.model.depth={m.depth} for {m.name}; choose '
                             f'{", ".join(map(str, depths))}')
  stages = getattr(source, 'STAGES', None)
  if m.stage_depths is not None and (stages is None or len(m.stage_depths) != stages
                                     or min(m.stage_depths) < 1):
    raise fields.ConfigError(
        f'config.model.stage_depths={m.stage_depths}: ' + (
            f'set {stages} positive block counts for {m.name}, or leave it None' if stages else
            f'{m.name} has no stages; leave it None'))
  if hasattr(source, 'validate'):
    source.validate(config)


for _module in pkgutil.iter_modules(__path__):
  _source = importlib.import_module(f'{__name__}.{_module.name}')
  if hasattr(_source, 'Model'):  # layers.py and conv.py are building blocks
    register(_module.name, _source)
