"""The experiment config: the core's fields (bigbatch/core_config.py) and the study's, argument
parsing, the shared recipe parts and the CPU smoke form (runlocal).

Every number that changes a result lives in the config. Batch-dependent values (peak lr, step
counts) are *not* computed here: the config states `base_lr` at `base_batch` and a rule, and
bigbatch/schedule.py applies it once, so a `--config.global_batch=...` override can never leave a
stale learning rate behind. `validate` runs before TensorFlow is imported or anything is written:
a bad config costs one line naming the field and the fix.
"""
from __future__ import annotations

import ml_collections

from bigbatch import core_config
from bigbatch import fields
from bigbatch import study
from bigbatch import tasks
from bigbatch.fields import ConfigError  # pylint: disable=unused-import  (re-exported)


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every experiment; configs/*.py start from this and override: the core's fields
  (bigbatch/core_config.py) and the study's (target.*, sharpness.*: bigbatch/study)."""
  c = core_config.base_config()
  fields.merge(c, study.defaults(), 'bigbatch.study')
  return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks everything that can be checked without data or compilation: the core's fields, then
  the study's. Raises ConfigError."""
  core_config.validate(config, num_devices)
  study.validate(config)


def imagenet_resnet50(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ResNet-50 on imagenet2012 at 224x224: the model and data part shared by the r50 recipes."""
  c.data.name = 'imagenet2012'
  c.data.image_size = 224
  c.data.file_format = 'array_record'  # read by global index: batch order independent of hosts
  c.model.name = 'resnet'
  c.model.depth = 50
  c.model.width = 64
  c.model.zero_init_last_gamma = True
  c.eval_batch = 1024
  c.log_every_steps = 100
  c.eval_every_epochs = 4.0
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_minutes = 10.0  # a hard kill loses at most ~10 minutes of the pod
  c.compilation_cache_dir = '~/.cache/bigbatch/jax'  # restarts skip minutes of compilation
  return c


def runlocal(c: ml_collections.ConfigDict, *, steps: int = 2) -> ml_collections.ConfigDict:
  """Shrinks any experiment to a CPU smoke run: the data source's, the task's and the model's
  own smoke forms (synthetic 16x16 data in place of a set a CPU cannot read in seconds; one block
  per stage and width 8 for the ResNets), a small batch, float32, a few steps. Optimizer and
  schedule shape are kept."""
  from bigbatch import data  # pylint: disable=g-import-not-at-top
  from bigbatch import models  # pylint: disable=g-import-not-at-top
  data.runlocal(c)
  tasks.get(c.task).runlocal(c)
  models.runlocal(c)
  c.model.dtype = 'float32'
  c.global_batch = 64
  c.accumulation_steps = 1
  if c.model.bn_group_size is not None:
    c.model.bn_group_size = 4
  c.eval_batch = 64
  c.num_epochs = None
  c.num_steps = steps
  if c.lr.scaling == 'table':
    c.lr.table = ((1 << 30, c.lr.table[0][1], None),)
  c.lr.warmup_epochs = None
  c.lr.warmup_steps = 1
  c.lr.boundaries_epochs = None
  c.lr.boundaries_steps = (steps,) if c.lr.decay == 'step' else None
  c.log_every_steps = 1
  c.eval_every_epochs = None
  c.eval_every_steps = None
  c.checkpoint_every_steps = steps
  c.checkpoint_every_minutes = None
  c.compilation_cache_dir = None
  c.profile_steps = None
  return c


def override(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """Sets dotted fields, e.g. override(c, **{'optimizer.name': 'lars', 'global_batch': 64})."""
  for key, value in values.items():
    fields.set_path(config, key, value)
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=x,flag' (the part after ':' in --config=file.py:ARG) into typed values.

  Keys must be known (given in `defaults`) so a typo fails loudly. A bare key sets True.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ConfigError(f'config argument {key!r} is unknown; known: {sorted(defaults)}')
    default = defaults[key]
    if not _:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out






