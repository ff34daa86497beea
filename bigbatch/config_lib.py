"""The experiment config: defaults, argument parsing and validation.

Every number that changes a result lives in the config. Batch-dependent values (peak lr, step
counts) are *not* computed here: the config states `base_lr` at `base_batch` and a rule, and
`bigbatch.optim.derive` applies it once, so a `--config.global_batch=...` override can never leave
a stale learning rate behind.

`validate` runs before TensorFlow is imported or anything is written: a bad config costs one line
naming the field and the fix, not a traceback after minutes of setup.
"""
from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from bigbatch import data
from bigbatch import fields
from bigbatch import models
from bigbatch import optim
from bigbatch import sharding
from bigbatch import study
from bigbatch import tasks
from bigbatch.fields import ConfigError  # pylint: disable=unused-import  (re-exported)


def _shared_defaults() -> dict:
  """The fields no single module owns: the run's size, length, schedule of host work, mesh."""
  placeholder = config_dict.placeholder
  return {
      'seed': 0,
      # classification: softmax over num_classes. face: embeddings, a margin softmax over class
      # centers sharded across every device, pair verification (bigbatch/tasks/).
      'task': 'classification',
      # The global batch is a number, not a property of the hardware:
      # global_batch = accumulation_steps * microbatch, and the microbatch is split over 'data'.
      'global_batch': 128,
      'accumulation_steps': 1,
      # Batch-size schedule (Smith et al. 2017, "Don't decay the learning rate, increase the
      # batch size"): ((epoch, multiplier), ...) multiplies global_batch (and
      # accumulation_steps, so the microbatch stays) from those whole epochs on. The lr schedule
      # is then a function of the epochs seen (counted in steps of the initial batch); one
      # compilation per batch size; the data order stays that of each epoch's permutation.
      # None: a fixed batch.
      'batch_schedule': placeholder(tuple),
      'eval_batch': 512,  # global; the eval split is padded to a multiple and masked
      # Training length: exactly one of the two.
      'num_epochs': placeholder(float),
      'num_steps': placeholder(int),
      'label_smoothing': 0.0,
      # A step whose loss or gradients are not finite is never applied. 'skip': count it and go
      # on, stopping after max_nonfinite_steps in a row; 'stop': stop at the first one.
      'nonfinite': 'skip',
      'max_nonfinite_steps': 10,
      # Mesh axes ('data', 'model'); -1 takes the devices that are left.
      'mesh.data': -1,
      'mesh.model': 1,
      'log_every_steps': 10,
      # 'train', or 'eval': evaluate the workdir's latest good checkpoint and stop (writes
      # workdir/eval-<step>.json, changes nothing else).
      'mode': 'train',
      # Precise BN: before each evaluation, BN population statistics recomputed as the mean over
      # this many training batches (running averages lag when parameters move fast); 0: off.
      'precise_bn_batches': 0,
      # Another run's workdir: a new run starts from its latest good params and BN statistics
      # (fine-tuning, or a new recipe), with a fresh optimizer; None: from scratch.
      'init_from': placeholder(str),
      # Exponential moving average of the parameters, evaluated beside them (eval_ema/*); None:
      # off.
      'ema_decay': placeholder(float),
      # Profiler trace of updates [first, last] (1-based) into workdir/profile (TensorBoard's
      # profile plugin reads it); None: off.
      'profile_steps': placeholder(tuple),
      # Persistent XLA compilation cache (a 64k ResNet-50 step takes minutes to compile on every
      # restart); None: off. On in the pod configs.
      'compilation_cache_dir': placeholder(str),
      # Evaluation: every N epochs or every N steps (at most one), and always at the end.
      'eval_every_epochs': placeholder(float),
      'eval_every_steps': placeholder(int),
      'checkpoint_every_steps': 500,
      # Also a checkpoint once this many minutes have passed since the last one (process 0's
      # clock, agreed by every process), so that a hard kill with no SIGTERM first (a host that
      # dies, maintenance without Autocheckpoint) loses at most about that much; None: by steps
      # only. 10 in the multi-device accelerator configs.
      'checkpoint_every_minutes': placeholder(float),
      'keep_checkpoints': 3,
  }


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every experiment; configs/*.py start from this and override. Each module owns
  its fields and their defaults (data.*: bigbatch/data, model.*: bigbatch/models, lr.* and
  optimizer.*: bigbatch/optim, face.*: bigbatch/tasks/face.py, target.*, noise_scale.*,
  sharpness.*: bigbatch/study); a field claimed twice is an error."""
  c = ml_collections.ConfigDict()
  fields.merge(c, _shared_defaults(), 'bigbatch.config_lib')
  fields.merge(c, {f'data.{k}': v for k, v in data.defaults().items()}, 'bigbatch.data')
  fields.merge(c, models.defaults(), 'bigbatch.models')
  fields.merge(c, optim.defaults(), 'bigbatch.optim')
  for name in tasks.NAMES:
    fields.merge(c, tasks.get(name).defaults(), f'bigbatch.tasks.{name}')
  fields.merge(c, study.defaults(), 'bigbatch.study')
  return c


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks everything that can be checked without data or compilation: the shared fields here,
  then each module's own. Raises ConfigError."""
  fields.choice(config, 'task', tasks.NAMES)
  seed = config.seed
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
    # np.random.default_rng refuses negative seeds, jax.random.PRNGKey overflows past 2**63,
    # and the data sets' counter hashes keep 32 bits (seed and seed + 2**32 would coincide).
    raise ConfigError(f'config.seed={seed!r}: must be an integer in [0, 2**32 - 1]; set '
                      f'--config.seed=...')
  for path in ('global_batch', 'accumulation_steps', 'eval_batch', 'log_every_steps',
               'checkpoint_every_steps', 'keep_checkpoints', 'max_nonfinite_steps'):
    fields.positive(config, path)
  fields.positive(config, 'checkpoint_every_minutes', allow_none=True)
  for a, b in (('num_epochs', 'num_steps'), ('eval_every_epochs', 'eval_every_steps')):
    if fields.get(config, a) is not None and fields.get(config, b) is not None:
      raise ConfigError(f'config.{a} and config.{b} are both set; set only one of them: '
                        f'unset the other with --config.{a}=None or --config.{b}=None, or set '
                        f'it to None in the config file')
  if config.num_epochs is None and config.num_steps is None:
    raise ConfigError('config.num_epochs and config.num_steps are both unset; '
                      'set --config.num_epochs=... or --config.num_steps=...')
  for path in ('num_epochs', 'num_steps', 'eval_every_epochs', 'eval_every_steps'):
    fields.positive(config, path, allow_none=True)
  if config.ema_decay is not None:
    fields.finite(config, 'ema_decay', low=0.0, high=1.0, high_open=True)
    if not config.ema_decay > 0:
      raise ConfigError(f'config.ema_decay={config.ema_decay}: must be in (0, 1), e.g. 0.9999, '
                        f'or unset')
  if config.profile_steps is not None and (
      len(config.profile_steps) != 2
      or not 1 <= config.profile_steps[0] <= config.profile_steps[1]):
    raise ConfigError(f'config.profile_steps={config.profile_steps}: give (first, last) update '
                      f'numbers, 1 <= first <= last')
  source = config.init_from
  if source is not None and not (
      source.startswith('/') or re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*://', source)):
    # A relative path would depend on the directory each process starts in, and orbax refuses
    # it only when the run starts from it, after the data set is loaded.
    raise ConfigError(f'config.init_from={source!r}: give the other run\'s workdir as an '
                      f'absolute path or a URL (gs://...), or unset it')
  fields.choice(config, 'mode', ('train', 'eval'))
  fields.choice(config, 'nonfinite', ('skip', 'stop'))
  fields.finite(config, 'precise_bn_batches', low=0)
  fields.finite(config, 'label_smoothing', low=0.0, high=1.0, high_open=True)
  for path in ('mesh.data', 'mesh.model'):  # -1: the devices the other axis leaves
    fields.integer(config, path, low=-1)
  data_parallel, _ = sharding.mesh_shape(config, num_devices)
  per_update, k = config.global_batch, config.accumulation_steps
  if per_update % (data_parallel * k):
    raise ConfigError(
        f'config.global_batch={per_update} is not divisible by mesh.data ({data_parallel}) x '
        f'accumulation_steps ({k}) = {data_parallel * k}; choose a global_batch that is a '
        f'multiple of {data_parallel * k} or change accumulation_steps')
  if config.eval_batch % data_parallel:
    raise ConfigError(f'config.eval_batch={config.eval_batch} is not divisible by mesh.data '
                      f'({data_parallel}); choose a multiple of {data_parallel}')
  models.validate(config)
  g = config.model.bn_group_size
  per_device = per_update // (data_parallel * k)
  if g is not None and (g <= 0 or per_device % g):
    raise ConfigError(
        f'config.model.bn_group_size={g} does not divide the per-device microbatch '
        f'{per_device} (= global_batch {per_update} / (data {data_parallel} x accumulation '
        f'{k})); choose a divisor of {per_device}')
  optim.validate(config)
  data.validate(config)
  for name in tasks.NAMES:  # each task checks its own config, and refuses another's data
    tasks.get(name).validate(config, num_devices)
  study.validate(config, data_parallel)


IMAGENET_TRAIN_EXAMPLES = 1_281_167


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
  """Shrinks any experiment to a CPU smoke run: synthetic 16x16 data, stage depths of 1, a
  narrow model, a small batch, float32, a few steps. Optimizer and schedule shape are kept."""
  c.data.name = 'synthetic'
  c.data.image_size = 16
  c.data.channels = 3
  c.data.num_classes = 10
  c.data.num_train = 4096
  c.data.num_eval = 64
  c.data.file_format = None
  tasks.get(c.task).runlocal(c)
  if c.model.name in ('resnet', 'iresnet'):
    c.model.stage_depths = (1, 1, 1, 1)
    c.model.width = 8
  elif c.model.name == 'cifar_resnet':
    c.model.stage_depths = (1, 1, 1)
    c.model.width = 8
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
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
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






