"""The full-size experiment configs (ImageNet, CIFAR-10, faces): each one's runlocal variant trains
two steps, its full-size train step traces and lowers on abstract inputs (no compile), and the
published recipes derive the numbers their sources give (docs/references.md). The CPU configs
(quickstart, face_synthetic, the studies) run in their own tests."""
from __future__ import annotations

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import loop
from bigbatch import models
from bigbatch import optim
from bigbatch import schedule
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch import trust_ratio
from bigbatch.data import faces
from bigbatch.data import images

ROOT = os.path.join(os.path.dirname(__file__), '..')
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_'))
FULL_SIZE = [c for c in CONFIGS if c.startswith(('r50_', 'cifar10_', 'face_r100', 'face_64k'))]
# face_recordio: WebFace42M's published size (the face configs' data), as bigbatch/data/faces.py
# holds it (arcface_torch's wf42m configs: num_image 42,474,557, num_classes 2,059,906).
NUM_TRAIN = {'imagenet2012': images.IMAGENET_TRAIN_EXAMPLES, 'cifar10': 50_000,
             'face_recordio': faces.WEBFACE42M[0]}
IMAGE_SHAPE = {'imagenet2012': (224, 224, 3), 'cifar10': (32, 32, 3),
               'face_recordio': (112, 112, 3)}
NUM_CLASSES = {'imagenet2012': 1000, 'cifar10': 10, 'face_recordio': faces.WEBFACE42M[1]}


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.__doc__ and 'Command:' in module.__doc__ and 'Expected:' in module.__doc__
  return module.get_config(arg)


# Training a full-size config's runlocal form takes minutes of compilation on CPU each: all run
# with the slow tests; the default suite lowers every full-size step (below).
_FAST = ()


@pytest.mark.parametrize('name', [
    n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in FULL_SIZE])
def test_runlocal_trains_two_steps(name, tmp_path):
  config = load(name, 'runlocal')
  config.model.conv_impl = 'xla'  # compiles faster; the matmul path has its own tests
  result = loop.train_and_evaluate(config, str(tmp_path))
  if config.task == 'face':
    assert 0.0 <= result['verify/synthetic/accuracy'] <= 1.0
    return
  assert np.isfinite(result['eval/loss'])
  assert result['eval/examples'] == config.data.num_eval


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n.startswith('face') else n for n in FULL_SIZE])
def test_full_size_step_lowers(name):
  """Shapes and shardings at full size, by tracing and lowering only (8 devices)."""
  config = load(name)
  config.model.conv_impl = 'xla'
  config_lib.validate(config, jax.device_count())
  data = config.data.name
  mesh = sharding.make_mesh(config)
  trainer = trainer_lib.build(config, mesh, num_train=NUM_TRAIN[data], image_shape=IMAGE_SHAPE[data],
                        num_classes=NUM_CLASSES[data], initialize=False)
  k, m = config.accumulation_steps, config.global_batch // config.accumulation_steps
  batch = {'image': jax.ShapeDtypeStruct((k, m, *IMAGE_SHAPE[data]), np.float32,
                                         sharding=trainer.batch_sharding),
           'label': jax.ShapeDtypeStruct((k, m), np.int32, sharding=trainer.batch_sharding)}
  lowered = trainer.train_step.lower(trainer.state, batch)
  text = lowered.as_text()
  assert 'all-reduce' in text or 'all_reduce' in text
  if config.model.dtype == 'bfloat16':
    assert 'bf16' in text
  params = sum(np.prod(x.shape) for x in jax.tree.leaves(trainer.state.params))
  if data == 'imagenet2012':
    assert params == 25_557_032  # ResNet-50, torchvision's count
  if data == 'face_recordio':  # iResNet-100 (65.2M) and 2.06M x 512 class centers over 8 devices
    from bigbatch.face import partial_fc  # pylint: disable=g-import-not-at-top
    centers = trainer.state.params['centers']
    assert centers.shape == (partial_fc.padded_num_classes(NUM_CLASSES[data], 8), 512)
    assert centers.sharding.shard_shape(centers.shape)[0] == centers.shape[0] // 8
    backbone = sum(np.prod(x.shape) for x in jax.tree.leaves(trainer.state.params['backbone']))
    assert backbone == 65_156_160


def _lr_at_epochs(config, epochs):
  derived = schedule.resolve(config, images.IMAGENET_TRAIN_EXAMPLES)
  lr_fn = optim.lr_schedule(config, derived)
  return derived, [float(lr_fn(round(e * derived.steps_per_epoch), derived.peak_lr))
                   for e in epochs]


def test_goyal_8k_recipe_from_the_config_alone():
  config = load('r50_8k_goyal')
  derived, lrs = _lr_at_epochs(config, [0, 2.5, 5, 29.9, 30, 60, 80])
  assert derived.steps_per_epoch == 156 and derived.warmup_steps == 780
  assert derived.boundaries_steps == (4680, 9360, 12480)
  np.testing.assert_allclose(lrs, [0.1, 1.65, 3.2, 3.2, 0.32, 0.032, 0.0032], rtol=1e-5)
  assert config.model.bn_group_size == 32 and config.model.zero_init_last_gamma
  assert config.optimizer.nesterov and config.optimizer.weight_decay == 1e-4
  _assert_no_decay_on_bn_or_bias(config)


def test_baseline_is_the_same_recipe_at_256():
  base, goyal = load('r50_baseline'), load('r50_8k_goyal')
  assert base.global_batch == 256 and goyal.global_batch == 8192
  base.global_batch = 8192
  assert base.to_json() == goyal.to_json()
  derived, lrs = _lr_at_epochs(load('r50_baseline'), [0, 5, 30, 60, 80])
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.001, 0.0001], rtol=1e-5)


@pytest.mark.parametrize('batch,peak,warmup_epochs', [(16384, 25.0, 5), (32768, 34.0, 12),
                                                      (65536, 41.0, 16)])
def test_64k_lars_follows_the_tpu_reference_table(batch, peak, warmup_epochs):
  config = load('r50_64k', f'batch={batch}')
  derived = schedule.resolve(config, images.IMAGENET_TRAIN_EXAMPLES)
  assert derived.peak_lr == peak
  # lars_util.py: w_steps = w_epochs * num_train_images // train_batch_size.
  assert derived.warmup_steps == warmup_epochs * images.IMAGENET_TRAIN_EXAMPLES // batch
  lr_fn = optim.lr_schedule(config, derived)
  lrs = [float(lr_fn(s, derived.peak_lr)) for s in (0, derived.warmup_steps, derived.total_steps)]
  np.testing.assert_allclose(lrs, [0.0, peak, 0.0], atol=1e-6)  # from 0, poly-2 decay to 0
  # Halfway through the decay, power 2: peak * (1/2)^2.
  mid = (derived.warmup_steps + derived.total_steps) // 2
  lr_mid = float(optim.lr_schedule(config, derived)(mid, derived.peak_lr))
  frac = 1 - (mid - derived.warmup_steps) / (derived.total_steps - derived.warmup_steps)
  assert lr_mid == pytest.approx(peak * frac**2, rel=1e-4)
  assert config.optimizer.name == 'lars' and config.optimizer.trust_coefficient == 0.001
  assert config.label_smoothing == 0.1 and config.model.dtype == 'bfloat16'
  _assert_no_decay_on_bn_or_bias(config)


def _assert_no_decay_on_bn_or_bias(config):
  model = models.build(config.model, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3)),
                                             train=False))['params']
  decayed = trust_ratio.path_mask(shapes, config.optimizer.weight_decay_exclude)
  flat = jax.tree_util.tree_flatten_with_path(decayed)[0]
  for path, on in flat:
    name = sharding.path_str(path)
    assert on == name.endswith('kernel'), name


def test_face_baseline_is_the_public_recipe():
  """docs/references.md: iResNet-100, CosFace s=64 m=0.4, Partial FC 0.2, SGD 0.9, lr 0.1 per
  1k images linearly (0.4 at 4k; arcface_torch's 4k run used 0.3), weight decay 5e-4 on every
  parameter, 20 epochs, polynomial decay."""
  config = load('face_r100_cosface_4k')
  derived = schedule.resolve(config, NUM_TRAIN['face_recordio'])
  assert derived.peak_lr == pytest.approx(0.4) and config.global_batch == 4096
  assert (config.face.s, config.face.m1, config.face.m2, config.face.m3) == (64.0, 1.0, 0.0, 0.4)
  assert config.face.sample_rate == 0.2 and config.model.depth == 100
  assert config.optimizer.name == 'sgd' and config.optimizer.momentum == 0.9
  assert config.optimizer.weight_decay == 5e-4 and config.optimizer.weight_decay_exclude is None
  assert config.num_epochs == 20 and config.lr.decay == 'polynomial'
  big = load('face_64k_lamb')
  assert big.global_batch == 65536 and big.optimizer.name == 'lamb'
  assert schedule.resolve(big, NUM_TRAIN['face_recordio']).peak_lr == pytest.approx(2e-3 * 4)


# --- Recipes counted as their sources count them (docs/references.md) ------------------------
# (config, arg, overrides, total steps, warmup steps, step-decay boundaries), each number the
# source's own: tensorflow/tpu lars_util.py warms up over w_epochs * 1,281,167 // batch steps and
# 90 epochs of 1,281,167 examples are floor(90 N / B) steps; the LAMB authors' run.sh trains
# 3,519 steps at 32k (README: "3519 iterations"), 1,760 at 64k, and warms up 782 steps for 20
# epochs at 32k; Nado et al. train 2,512 steps; Goyal et al.'s recipe counts whole batches per
# epoch (facebookresearch/pycls: a drop_last loader, the lr set by epoch).
SOURCE_STEPS = [
    ('r50_64k', None, {}, 1759, 312, ()),
    ('r50_64k', 'batch=32768', {}, 3518, 469, ()),
    ('r50_64k', 'batch=16384', {}, 7037, 390, ()),
    ('r50_32k_lamb', None, {}, 3519, 196, ()),  # 5 warmup epochs: ours, ceil(195.5)
    ('r50_32k_lamb', None, {'warmup_epochs': 20.0}, 3519, 782, ()),  # the authors' warmup
    ('r50_32k_lamb', 'batch=65536', {}, 1760, 98, ()),
    ('r50_32k_nesterov', None, {}, 2512, 195, ()),
    ('r50_8k_goyal', None, {}, 14040, 780, (4680, 9360, 12480)),
    ('r50_baseline', None, {}, 450360, 25020, (150120, 300240, 400320)),
]


@pytest.mark.parametrize('name, arg, lr_overrides, total, warmup, boundaries', SOURCE_STEPS)
def test_imagenet_recipes_count_steps_as_their_sources(name, arg, lr_overrides, total, warmup,
                                                       boundaries):
  config = load(name, arg)
  for key, value in lr_overrides.items():
    config.lr[key] = value
  n = images.IMAGENET_TRAIN_EXAMPLES
  derived = schedule.resolve(config, n)
  assert (derived.total_steps, derived.warmup_steps, derived.boundaries_steps) == (
      total, warmup, boundaries)
  # Only the schedule is counted in examples: the input pipeline still makes floor(N / B)
  # steps per pass of its permutation, so the data each step reads is where it was.
  assert derived.steps_per_epoch == n // config.global_batch


def test_64k_recipe_sees_90_epochs_of_examples():
  """The mistake this guards against: 19 whole batches per epoch ran 1,710 steps, 2.8% short of
  90 epochs; 1,759 steps are 90 epochs less than one batch."""
  config = load('r50_64k')
  n = images.IMAGENET_TRAIN_EXAMPLES
  derived = schedule.resolve(config, n)
  seen = derived.total_steps * config.global_batch
  assert 90 * n - config.global_batch < seen <= 90 * n
  # A run past 90 whole passes of 19 batches goes on into the next permutations.
  assert divmod(derived.total_steps - 1, derived.steps_per_epoch) == (92, 10)


def test_configs_without_an_imagenet_source_keep_floor_per_epoch():
  """The default rule is today's: every config but the ImageNet recipes derives the steps it
  derived before lr.epoch_steps existed (the shipped studies' budgets among them)."""
  for name in CONFIGS:
    if not name.startswith('r50_'):
      config = load(name)
      if 'base' in config:  # a study: its experiment config, and no variant changes the rule
        assert 'epoch_steps' not in str(config.variants), name
        config = config.base
      assert config.lr.epoch_steps == 'floor_per_epoch', name
