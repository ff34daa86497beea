"""The core's config: the fields every run shares (batch, length, mesh, schedule of host work)
and those of each core owner (data sources, models, the optimizer, the tasks, the gradient
statistics), with their defaults and validation. The experiment config (bigbatch/config_lib.py)
adds the study's fields on top.
"""
from __future__ import annotations

import re

import ml_collections
from ml_collections import config_dict

from bigbatch import data
from bigbatch import fields
from bigbatch import grad_stats
from bigbatch import models
from bigbatch import optim
from bigbatch import sharding
from bigbatch import tasks
from bigbatch.fields import ConfigError

# Read by the host loop, the data reader or the initial state only: a change to one of them
# never changes the compiled step (trainer.CompileCache leaves them out of its key).
fields.declare_host_only(
    'seed', 'log_every_steps', 'eval_every_epochs', 'eval_every_steps', 'checkpoint_every_steps',
    'checkpoint_every_minutes', 'keep_checkpoints', 'num_steps', 'num_epochs', 'nonfinite',
    'max_nonfinite_steps', 'profile_steps', 'compilation_cache_dir', 'mode', 'precise_bn_batches',
    'init_from')


def shared_defaults() -> dict:
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
  """The defaults of the core's fields. Each module owns its fields (data.*: bigbatch/data,
  model.*: bigbatch/models, lr.* and optimizer.*: bigbatch/optim, face.*: bigbatch/tasks/face.py,
  noise_scale.*: bigbatch/grad_stats.py); a field claimed twice is an error."""
  c = ml_collections.ConfigDict()
  fields.merge(c, shared_defaults(), 'bigbatch.core_config')
  fields.merge(c, {f'data.{k}': v for k, v in data.defaults().items()}, 'bigbatch.data')
  fields.merge(c, models.defaults(), 'bigbatch.models')
  fields.merge(c, optim.defaults(), 'bigbatch.optim')
  for name in tasks.NAMES:
    fields.merge(c, tasks.get(name).defaults(), f'bigbatch.tasks.{name}')
  fields.merge(c, grad_stats.defaults(), 'bigbatch.grad_stats')
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
  grad_stats.validate(config, data_parallel)
