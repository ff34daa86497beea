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
from typing import Sequence

import ml_collections
from ml_collections import config_dict

MODELS = ('cnn', 'mlp', 'resnet', 'cifar_resnet', 'iresnet')
DATASETS = ('digits', 'synthetic', 'imagenet2012', 'cifar10', 'mnist', 'face_synthetic',
            'face_folder', 'face_recordio')
TASKS = ('classification', 'face')
OPTIMIZERS = ('sgd', 'adamw', 'lars', 'lamb')
SCALING_RULES = ('linear', 'sqrt', 'none', 'table')
DECAYS = ('cosine', 'polynomial', 'step', 'linear', 'constant')
NORMS = ('batch', 'group', 'none')


class ConfigError(ValueError):
  """An invalid config. The message names the field and the fix, in one line."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment; configs/*.py start from this and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits'  # digits | synthetic
  # TFDS data directory; None means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data.data_dir = config_dict.placeholder(str)
  # Synthetic data only: a fixed random teacher network labels random inputs, so a model can
  # learn it and a data set of any size costs no memory (examples are generated from their index).
  c.data.num_train = 1_000_000
  c.data.num_eval = 10_000
  c.data.image_size = 8
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.teacher_width = 64
  c.data.prefetch = 2  # batches prepared ahead of the device, on a host thread
  # Image data sets through TFDS (imagenet2012 | cifar10 | mnist; bigbatch/data/images.py).
  # image_size above is the ImageNet crop size (set 224); cifar10 and mnist keep their own size.
  # The TFDS data set read with data.name's preprocessing; None: data.name itself.
  c.data.tfds_name = config_dict.placeholder(str)
  c.data.train_split = 'train'  # any TFDS split string, e.g. 'train[:99%]'
  c.data.eval_split = config_dict.placeholder(str)  # None: 'validation' if present, else 'test'
  # Format to prepare a data set in when it is not prepared yet: 'array_record' is read by global
  # index (batch order independent of the process count); 'tfrecord' (TFDS's default, None) is
  # streamed per process. Data already prepared is read in the format it has.
  c.data.file_format = config_dict.placeholder(str)
  c.data.num_parallel_calls = -1  # tf.data decode/augment parallelism; -1: AUTOTUNE
  c.data.shuffle_buffer = 10_000  # TFRecord only: examples per process (~1 GB of ImageNet JPEGs)

  # Face data (bigbatch/data/faces.py): face_synthetic | face_folder | face_recordio.
  from bigbatch.data import faces  # pylint: disable=g-import-not-at-top  (numpy only)
  for key, value in faces.defaults().items():
    c.data[key] = (config_dict.placeholder(str) if value is None else value)

  # classification: softmax over num_classes. face: the model gives embeddings and the
  # classifier is a margin softmax over class centers sharded across every device (Partial FC,
  # bigbatch/face/partial_fc.py); evaluation is pair verification (bigbatch/face/verification.py).
  c.task = 'classification'
  c.face = ml_collections.ConfigDict()
  # Target logit s * (cos(m1 * theta + m2) - m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4).
  c.face.s = 64.0
  c.face.m1 = 1.0
  c.face.m2 = 0.5
  c.face.m3 = 0.0
  # The reference's no_grad margin (gradient as if there were no margin); False: true gradient.
  c.face.straight_through = False
  c.face.sample_rate = 0.1  # Partial FC: fraction of each device's centers in the softmax
  # Momentum and weight decay only on the rows sampled in the step (partial_fc v1); False: all
  # rows (arcface_torch's partial_fc_v2).
  c.face.sampled_rows_only = False
  c.face.verify_batch = 256  # global batch of the verification embedding pass

  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'  # module bigbatch.models.<name>
  c.model.width = 32
  c.model.norm = 'batch'  # batch | group | none
  # None: BatchNorm over the whole microbatch on all devices (sync BN, stats reduced over 'data').
  # g: ghost BN, statistics over groups of g examples within each device's share.
  c.model.bn_group_size = config_dict.placeholder(int)
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  c.model.gn_groups = 8
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32
  # ResNets: resnet (ImageNet) depth 18 | 34 | 50 | 101 | 152; cifar_resnet depth 6n+2 in
  # 8 | 14 | 20 | 32 | 44 | 56 | 110. model.width is the stem width (64 / 16 standard).
  c.model.depth = 50
  # Blocks per stage, overriding the depth's (4 for resnet, 3 for cifar_resnet), e.g. (1,1,1,1)
  # for smoke runs; the depth still picks basic or bottleneck blocks.
  c.model.stage_depths = config_dict.placeholder(tuple)
  # Goyal et al. 2017: gamma = 0 in the last norm of each residual block (no-op with norm=none).
  c.model.zero_init_last_gamma = True
  # Conv backward: auto (matmul weight gradients on CPU, XLA elsewhere) | xla | matmul.
  c.model.conv_impl = 'auto'
  c.model.embedding_dim = 512  # task=face: the embedding size (iresnet's head)
  c.model.dropout = 0.0  # iresnet head dropout

  # The global batch is a number, not a property of the hardware:
  # global_batch = accumulation_steps * microbatch, and the microbatch is split over 'data'.
  c.global_batch = 128
  c.accumulation_steps = 1
  # Batch-size schedule (Smith et al. 2017, "Don't decay the learning rate, increase the batch
  # size"): ((epoch, multiplier), ...) multiplies global_batch (and accumulation_steps, so the
  # microbatch stays) from those whole epochs on. The lr schedule is then a function of the
  # epochs seen (counted in steps of the initial batch); one compilation per batch size; the
  # data order stays that of each epoch's permutation. None: a fixed batch.
  c.batch_schedule = config_dict.placeholder(tuple)
  c.eval_batch = 512  # global; the eval split is padded to a multiple and masked

  # Training length: exactly one of the two.
  c.num_epochs = config_dict.placeholder(float)
  c.num_steps = config_dict.placeholder(int)

  c.lr = ml_collections.ConfigDict()
  c.lr.base_lr = 0.1
  c.lr.base_batch = 256
  c.lr.scaling = 'linear'  # linear | sqrt | none: peak = base_lr * rule(global_batch / base_batch)
  # scaling=table: a published per-batch recipe, rows (max_batch, peak_lr, warmup_epochs or None);
  # the first row with max_batch >= global_batch gives the peak lr (and the warmup, if not None).
  c.lr.table = config_dict.placeholder(tuple)
  # Gradual linear warmup from warmup_init_lr (absolute) to the peak: at most one of the two.
  c.lr.warmup_epochs = config_dict.placeholder(float)
  c.lr.warmup_steps = config_dict.placeholder(int)
  c.lr.warmup_init_lr = 0.0
  c.lr.decay = 'cosine'  # cosine | polynomial | step | linear | constant (after warmup)
  c.lr.end_lr = 0.0  # cosine/polynomial/linear end value
  c.lr.power = 2.0  # polynomial decay power
  # step decay: multiply by decay_factor at each boundary, counted from step 0 (warmup included).
  c.lr.boundaries_epochs = config_dict.placeholder(tuple)
  c.lr.boundaries_steps = config_dict.placeholder(tuple)
  c.lr.decay_factor = 0.1

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'sgd'  # sgd | adamw | lars | lamb
  c.optimizer.momentum = 0.9  # sgd, lars
  c.optimizer.nesterov = False  # sgd, lars
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9  # adamw, lamb
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.trust_coefficient = 0.001  # LARS eta
  # Regexes over '/'-joined parameter paths. Matching leaves get neither weight decay nor a
  # trust ratio (the reference LARS/LAMB skip list: biases and normalization parameters).
  c.optimizer.weight_decay_exclude = r'(^|/)(bias|scale)$'
  c.optimizer.trust_ratio_exclude = r'(^|/)(bias|scale)$'
  c.optimizer.clip_grad_norm = config_dict.placeholder(float)  # global-norm clipping

  c.label_smoothing = 0.0

  # A step whose loss or gradients are not finite is never applied. 'skip': count it and go on,
  # stopping after max_nonfinite_steps in a row; 'stop': stop at the first one.
  c.nonfinite = 'skip'
  c.max_nonfinite_steps = 10

  # Mesh axes ('data', 'model'); -1 takes the devices that are left.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1

  c.log_every_steps = 10
  # 'train', or 'eval': evaluate the workdir's latest good checkpoint and stop (writes
  # workdir/eval-<step>.json, changes nothing else).
  c.mode = 'train'
  # Precise BN: before each evaluation, BN population statistics recomputed as the mean over
  # this many training batches (running averages lag when parameters move fast); 0: off.
  c.precise_bn_batches = 0
  # Another run's workdir: a new run starts from its latest good params and BN statistics
  # (fine-tuning, or a new recipe), with a fresh optimizer; None: from scratch.
  c.init_from = config_dict.placeholder(str)
  # Exponential moving average of the parameters, evaluated beside them (eval_ema/*); None: off.
  c.ema_decay = config_dict.placeholder(float)
  # Profiler trace of updates [first, last] (1-based) into workdir/profile (TensorBoard's
  # profile plugin reads it); None: off.
  c.profile_steps = config_dict.placeholder(tuple)
  # Persistent XLA compilation cache (a 64k ResNet-50 step takes minutes to compile on every
  # restart); None: off. On in the pod configs.
  c.compilation_cache_dir = config_dict.placeholder(str)
  # Evaluation: every N epochs or every N steps (at most one), and always at the end.
  c.eval_every_epochs = config_dict.placeholder(float)
  c.eval_every_steps = config_dict.placeholder(int)
  # Stop at a target (batch-size studies, Shallue et al. 2018): after each evaluation, if
  # `metric` (an eval metric name, e.g. eval/top1) is >= value (mode max) or <= value (mode min),
  # the step is recorded in workdir/target.json (steps, examples and wall time to target) and,
  # with stop, training ends there. value None: no target.
  c.target = ml_collections.ConfigDict()
  c.target.metric = 'eval/top1'
  c.target.value = config_dict.placeholder(float)
  c.target.mode = 'max'
  c.target.stop = True
  # Gradient noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018), from the squared
  # norms of each device's microbatch gradients (batch b) and of the update's gradient (batch B)
  # in every step, smoothed by moving averages of numerator and denominator (bigbatch/study/
  # noise_scale.py); logged as gns/*. Needs b < B: more than one device or accumulation_steps > 1.
  c.noise_scale = ml_collections.ConfigDict()
  c.noise_scale.enabled = False
  c.noise_scale.ema_decay = 0.95
  # Sharpness: the largest eigenvalue of the training-loss Hessian by Lanczos over Hessian-vector
  # products, on the first `num_examples` examples of the training order with BN statistics frozen
  # at those examples' statistics; every N steps and/or at the end, logged as sharpness/*.
  c.sharpness = ml_collections.ConfigDict()
  c.sharpness.every_steps = config_dict.placeholder(int)
  c.sharpness.at_end = False
  c.sharpness.num_examples = 512
  c.sharpness.num_iters = 20
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  return c


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
  if c.task == 'face':  # synthetic identities; verification on held-out ones
    c.data.name = 'face_synthetic'
    c.data.num_identities = 100
    c.data.images_per_identity = 41
    c.data.verification_pairs = 64
    c.data.verification_identities = 20
    c.data.verification_bins = ()
    c.model.embedding_dim = 16
    c.face.verify_batch = 64
    c.target.metric = 'verify/synthetic/accuracy'
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
  c.compilation_cache_dir = None
  c.profile_steps = None
  return c


def override(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """Sets dotted fields, e.g. override(c, **{'optimizer.name': 'lars', 'global_batch': 64})."""
  for key, value in fields.items():
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


def _positive(config, path: str, allow_none: bool = False):
  value = _get(config, path)
  if value is None and allow_none:
    return
  if value is None or not value > 0:
    raise ConfigError(f'config.{path}={value!r}: must be a positive number; set --config.{path}=...')


def _get(config, path: str):
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def _choice(config, path: str, choices: Sequence[str]):
  value = _get(config, path)
  if value not in choices:
    raise ConfigError(f'config.{path}={value!r} is unknown; choose one of {", ".join(choices)}')


def _validate_face(config) -> None:
  face_data = config.data.name.startswith('face_')
  if config.task != 'face':
    if face_data:
      raise ConfigError(f'config.data.name={config.data.name!r} is a face data set; set '
                        f'--config.task=face')
    return
  if not face_data:
    raise ConfigError(f'config.task=face needs a face data set (face_synthetic, face_folder, '
                      f'face_recordio); config.data.name is {config.data.name!r}')
  if config.mesh.model != 1:
    raise ConfigError(f'config.mesh.model={config.mesh.model}: task=face runs the backbone '
                      f'data-parallel over every device and splits the class centers over all of '
                      f'them; set --config.mesh.model=1')
  if not 0.0 < config.face.sample_rate <= 1.0:
    raise ConfigError(f'config.face.sample_rate={config.face.sample_rate}: must be in (0, 1]')
  _positive(config, 'face.s')
  _positive(config, 'model.embedding_dim')
  _positive(config, 'face.verify_batch')
  if config.optimizer.clip_grad_norm is not None:
    raise ConfigError('config.optimizer.clip_grad_norm with task=face: global-norm clipping is '
                      'not supported (the class centers are sharded); unset it')
  if config.optimizer.name in ('lars', 'lamb') and not re.search(
      config.optimizer.trust_ratio_exclude or '$^', 'centers'):
    raise ConfigError(
        f'config.optimizer.name={config.optimizer.name} with task=face: the class centers are '
        f'split over devices, and a trust ratio over one device\'s rows would depend on the '
        f'device count; exclude them, e.g. --config.optimizer.trust_ratio_exclude='
        f'"(^|/)(bias|scale|centers)$"')
  if config.sharpness.every_steps or config.sharpness.at_end:
    raise ConfigError('config.sharpness with task=face is not supported; unset '
                      'sharpness.every_steps and sharpness.at_end')
  if not 0.0 <= config.model.dropout < 1.0:
    raise ConfigError(f'config.model.dropout={config.model.dropout}: must be in [0, 1)')


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """Resolves the ('data', 'model') mesh shape, or raises ConfigError."""
  data, model = config.mesh.data, config.mesh.model
  if model == -1 and data == -1:
    raise ConfigError('config.mesh: at most one of mesh.data, mesh.model may be -1')
  if model == -1:
    model = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data == -1:
    data = num_devices // model if model > 0 and num_devices % model == 0 else 0
  if data <= 0 or model <= 0 or data * model != num_devices:
    raise ConfigError(
        f'config.mesh=(data={config.mesh.data}, model={config.mesh.model}) does not match the '
        f'{num_devices} devices; set --config.mesh.data=-1 --config.mesh.model=1 or a product '
        f'equal to {num_devices}')
  return data, model


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks everything that can be checked without data or compilation. Raises ConfigError."""
  _choice(config, 'model.name', MODELS)
  _choice(config, 'data.name', DATASETS)
  _choice(config, 'task', TASKS)
  _validate_face(config)
  _choice(config, 'optimizer.name', OPTIMIZERS)
  _choice(config, 'lr.scaling', SCALING_RULES)
  _choice(config, 'lr.decay', DECAYS)
  _choice(config, 'model.norm', NORMS)
  for path in ('global_batch', 'accumulation_steps', 'eval_batch', 'lr.base_lr', 'lr.base_batch',
               'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    _positive(config, path)
  if config.lr.warmup_init_lr < 0:
    raise ConfigError(f'config.lr.warmup_init_lr={config.lr.warmup_init_lr}: must be >= 0')
  for a, b in (('num_epochs', 'num_steps'), ('lr.warmup_epochs', 'lr.warmup_steps'),
               ('eval_every_epochs', 'eval_every_steps'),
               ('lr.boundaries_epochs', 'lr.boundaries_steps')):
    if _get(config, a) is not None and _get(config, b) is not None:
      raise ConfigError(f'config.{a} and config.{b} are both set; set only one of them')
  if config.num_epochs is None and config.num_steps is None:
    raise ConfigError('config.num_epochs and config.num_steps are both unset; '
                      'set --config.num_epochs=... or --config.num_steps=...')
  _positive(config, 'num_epochs', allow_none=True)
  _positive(config, 'num_steps', allow_none=True)
  _positive(config, 'eval_every_epochs', allow_none=True)
  _positive(config, 'eval_every_steps', allow_none=True)
  _positive(config, 'optimizer.clip_grad_norm', allow_none=True)
  if config.optimizer.weight_decay < 0:
    raise ConfigError(f'config.optimizer.weight_decay={config.optimizer.weight_decay}: must be >= 0')
  if config.lr.decay == 'step' and not (config.lr.boundaries_epochs or config.lr.boundaries_steps):
    raise ConfigError('config.lr.decay=step needs boundaries; set --config.lr.boundaries_epochs='
                      '"(30,60,80)" or lr.boundaries_steps')
  if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
    raise ConfigError(f'config.ema_decay={config.ema_decay}: must be in (0, 1), e.g. 0.9999, or '
                      f'unset')
  if config.profile_steps is not None and (
      len(config.profile_steps) != 2 or not 1 <= config.profile_steps[0] <= config.profile_steps[1]):
    raise ConfigError(f'config.profile_steps={config.profile_steps}: give (first, last) update '
                      f'numbers, 1 <= first <= last')
  _choice(config, 'mode', ('train', 'eval'))
  if config.precise_bn_batches < 0:
    raise ConfigError(f'config.precise_bn_batches={config.precise_bn_batches}: must be >= 0')
  _choice(config, 'nonfinite', ('skip', 'stop'))
  _positive(config, 'max_nonfinite_steps')
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ConfigError(f'config.label_smoothing={config.label_smoothing}: must be in [0, 1)')
  for path in ('optimizer.weight_decay_exclude', 'optimizer.trust_ratio_exclude'):
    try:
      re.compile(_get(config, path) or '')
    except re.error as e:
      raise ConfigError(f'config.{path}: not a valid regex ({e}); fix the pattern') from None

  if config.batch_schedule:
    from bigbatch import optim  # pylint: disable=g-import-not-at-top  (optim imports this module)
    optim.batch_phases(config, 1 << 62)  # the schedule's form; batch vs data size comes later
  data, _ = mesh_shape(config, num_devices)
  if config.target.value is not None:
    _choice(config, 'target.mode', ('max', 'min'))
    if not config.target.metric.startswith(('eval/', 'eval_ema/', 'verify/')):
      raise ConfigError(f'config.target.metric={config.target.metric!r}: name an evaluation '
                        f'metric, e.g. eval/top1 or eval/loss')
  if config.noise_scale.enabled and not 0 < config.noise_scale.ema_decay < 1:
    raise ConfigError(f'config.noise_scale.ema_decay={config.noise_scale.ema_decay}: must be '
                      f'in (0, 1)')
  _positive(config, 'sharpness.every_steps', allow_none=True)
  if config.sharpness.every_steps or config.sharpness.at_end:
    _positive(config, 'sharpness.num_examples')
    _positive(config, 'sharpness.num_iters')
  per_update = config.global_batch
  k = config.accumulation_steps
  if per_update % (data * k):
    raise ConfigError(
        f'config.global_batch={per_update} is not divisible by mesh.data ({data}) x '
        f'accumulation_steps ({k}) = {data * k}; choose a global_batch that is a multiple of '
        f'{data * k} or change accumulation_steps')
  per_device = per_update // (data * k)
  if config.noise_scale.enabled and data * k < 2:
    raise ConfigError(
        'config.noise_scale.enabled: the small batch (one device\'s microbatch) and the large '
        'batch (the update) coincide with one data-parallel device and accumulation_steps=1; '
        'use several devices or set --config.accumulation_steps=2 or more')
  g = config.model.bn_group_size
  if g is not None:
    if config.model.norm != 'batch':
      raise ConfigError(f'config.model.bn_group_size={g} needs model.norm=batch '
                        f'(it is {config.model.norm!r}); unset bn_group_size or set norm=batch')
    if g <= 0 or per_device % g:
      raise ConfigError(
          f'config.model.bn_group_size={g} does not divide the per-device microbatch '
          f'{per_device} (= global_batch {per_update} / (data {data} x accumulation {k})); '
          f'choose a divisor of {per_device}')
  if config.task == 'face' and config.face.verify_batch % data:
    raise ConfigError(f'config.face.verify_batch={config.face.verify_batch} is not divisible by '
                      f'mesh.data ({data}); choose a multiple of {data}')
  if config.eval_batch % data:
    raise ConfigError(f'config.eval_batch={config.eval_batch} is not divisible by mesh.data '
                      f'({data}); choose a multiple of {data}')
  if config.data.name == 'synthetic':
    for path in ('data.num_train', 'data.num_eval', 'data.image_size', 'data.channels',
                 'data.num_classes', 'data.teacher_width'):
      _positive(config, path)
  if config.data.name in ('imagenet2012', 'cifar10', 'mnist'):
    for path in ('data.image_size', 'data.shuffle_buffer'):
      _positive(config, path)
  if config.data.file_format not in (None, 'tfrecord', 'array_record'):
    raise ConfigError(f'config.data.file_format={config.data.file_format!r} is unknown; choose '
                      'array_record, tfrecord or None (TFDS default)')
  if config.data.num_parallel_calls != -1 and config.data.num_parallel_calls < 1:
    raise ConfigError(f'config.data.num_parallel_calls={config.data.num_parallel_calls}: must be '
                      '-1 (AUTOTUNE) or positive')
  if config.model.norm == 'group' and config.model.width % config.model.gn_groups:
    raise ConfigError(f'config.model.gn_groups={config.model.gn_groups} does not divide '
                      f'model.width={config.model.width}; choose a divisor')
  if config.model.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(f'config.model.dtype={config.model.dtype!r}; choose float32, bfloat16 or float16')
  if config.model.name == 'resnet' and config.model.depth not in (18, 34, 50, 101, 152):
    raise ConfigError(f'config.model.depth={config.model.depth} for resnet; '
                      f'choose 18, 34, 50, 101 or 152')
  if config.model.name == 'cifar_resnet' and config.model.depth not in (8, 14, 20, 32, 44, 56, 110):
    raise ConfigError(f'config.model.depth={config.model.depth} for cifar_resnet; '
                      f'choose 6n+2: 8, 14, 20, 32, 44, 56 or 110')
  if config.model.stage_depths is not None and (
      len(config.model.stage_depths) != {'resnet': 4, 'cifar_resnet': 3,
                                         'iresnet': 4}.get(config.model.name)
      or min(config.model.stage_depths) < 1):
    raise ConfigError(f'config.model.stage_depths={config.model.stage_depths}: set 4 positive '
                      f'block counts for resnet and iresnet, 3 for cifar_resnet, or leave it '
                      f'None')
  if config.model.name == 'iresnet' and config.model.depth not in (18, 34, 50, 100, 200):
    raise ConfigError(f'config.model.depth={config.model.depth} for iresnet; '
                      f'choose 18, 34, 50, 100 or 200')
  if config.model.conv_impl not in ('auto', 'xla', 'matmul'):
    raise ConfigError(f'config.model.conv_impl={config.model.conv_impl!r}; '
                      f'choose auto, xla or matmul')
