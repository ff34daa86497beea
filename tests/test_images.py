"""Image data sets through TFDS: preprocessing, augmentation keys, reading orders, eval padding.

One tiny local TFDS set (bigbatch_fake_images/tiny: 40 train / 12 test random JPEGs of 40..80 px,
label = example index, 4 files per split) is built once per session in each format, array_record
and tfrecord, and stands in for imagenet2012 / cifar10 / mnist through config.data.tfds_name.
Every test that reads it imports TensorFlow (~10 s, once per worker).
"""
import threading

import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import data
from bigbatch import fields
from bigbatch import input_pipeline as ip

TINY = 'bigbatch_fake_images/tiny'
NUM_TRAIN, NUM_EVAL, SIZE = 40, 12, 16
BATCH, K, EVAL_BATCH = 8, 2, 8
STEPS_PER_EPOCH = NUM_TRAIN // BATCH  # 5
FORMATS = ('array_record', 'tfrecord')


@pytest.fixture(scope='session')
def data_dirs(tmp_path_factory):
  import fake_tfds  # pylint: disable=g-import-not-at-top,unused-import  # registers the builder
  from bigbatch.data import images  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  dirs = {}
  for fmt in FORMATS:
    data_dir = tmp_path_factory.mktemp(fmt)
    # Several files per split, so per-process reading and file shuffling have something to do.
    builder = images.prepare(TINY, data_dir, file_format=fmt,
                             download_config=tfds.download.DownloadConfig(num_shards=4))
    assert builder.info.file_format.value == fmt
    assert len(builder.info.splits['train'].file_instructions) == 4
    dirs[fmt] = str(data_dir)
  return dirs


def _config(data_dir=None, name='imagenet2012', **overrides):
  c = config_lib.base_config()
  c.data.name, c.data.tfds_name, c.data.data_dir = name, TINY, data_dir
  c.data.image_size = SIZE
  c.global_batch, c.accumulation_steps, c.eval_batch = BATCH, K, EVAL_BATCH
  c.num_steps = 10
  for path, value in overrides.items():
    node, _, leaf = path.rpartition('.')
    (c[node] if node else c)[leaf] = value
  return c


def _create(data_dirs, fmt='array_record', process_index=0, process_count=1, **overrides):
  return data.create(_config(data_dirs[fmt], **overrides), process_index=process_index,
                     process_count=process_count)


def _by_label(batches):
  """{label: image} over train batches [K, m, ...] (label = example index in the tiny set)."""
  out = {}
  for batch in batches:
    for image, label in zip(batch['image'].reshape(-1, SIZE, SIZE, 3), batch['label'].reshape(-1)):
      assert int(label) not in out  # at most once per epoch
      out[int(label)] = image
  return out


def _epoch(ds, epoch, rows=None):
  return _by_label(ds.train_batch(s, rows) for s in range(epoch * ds.steps_per_epoch,
                                                           (epoch + 1) * ds.steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# Config (no TensorFlow).

def test_config_validates_image_fields():
  config_lib.validate(_config(), 2)
  for overrides, match in (({'data.file_format': 'parquet'}, 'file_format'),
                           ({'data.num_parallel_calls': 0}, 'num_parallel_calls'),
                           ({'data.image_size': 0}, 'image_size'),
                           ({'data.shuffle_buffer': 0}, 'shuffle_buffer')):
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(_config(**overrides), 2)
    with pytest.raises(fields.ConfigError, match=match):
      data.validate(_config(**overrides))


# ---------------------------------------------------------------------------------------------
# Preprocessing.

_STYLES = {  # name: (mean, std) on the 0..1 scale
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'mnist': ((0.1307,) * 3, (0.3081,) * 3),
}


@pytest.mark.parametrize('name', list(_STYLES))
def test_batches_have_the_layout_dtypes_and_ranges(data_dirs, name):
  ds = _create(data_dirs, name=name)
  assert (ds.num_train, ds.num_eval, ds.num_classes) == (NUM_TRAIN, NUM_EVAL, 40)
  assert ds.image_shape == (SIZE, SIZE, 3)
  mean, std = (np.array(v, np.float32) for v in _STYLES[name])
  lo, hi = (0 - mean) / std, (1 - mean) / std  # the images of pixel 0 and 255 per channel
  batch = ds.train_batch(0)
  assert batch['image'].shape == (K, BATCH // K, SIZE, SIZE, 3)
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
  images = batch['image'].reshape(-1, SIZE, SIZE, 3)
  assert (images >= lo - 1e-4).all() and (images <= hi + 1e-4).all()
  assert images.std() > 0.3  # not blank: the fake images span most of 0..255
  if name == 'cifar10':
    # Zero padding shows as pixel-0 values (exactly `lo`) wherever a crop is off center.
    assert np.isclose(images, lo, atol=1e-5).all(axis=-1).any()
  batches = list(ds.eval_batches())
  assert len(batches) == ds.num_eval_steps == 2
  for b in batches:
    assert b['image'].shape == (EVAL_BATCH, SIZE, SIZE, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
  assert [b['mask'].sum() for b in batches] == [8, 4]
  real = np.concatenate([b['image'][b['mask']] for b in batches])
  assert (real >= lo - 1e-4).all() and (real <= hi + 1e-4).all()


def test_inception_window_respects_area_and_aspect():
  from bigbatch.data import image_preprocess  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.constant([300, 400, 3])
  windows = np.array([[int(v) for v in image_preprocess.inception_window(
      shape, image_preprocess.example_key(0, 0, i))] for i in range(100)])
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 300).all() and (x + w <= 400).all()
  area = h * w / (300 * 400)
  assert area.min() >= 0.075 and area.max() <= 1.0 and area.max() - area.min() > 0.5
  assert (w / h >= 0.74).all() and (w / h <= 1.35).all()
  assert len({tuple(v) for v in windows}) > 90


# ---------------------------------------------------------------------------------------------
# Augmentation: keyed on (seed, epoch, global index) only.

def test_augmentation_depends_only_on_seed_epoch_and_index(data_dirs):
  reference = _create(data_dirs, seed=3)
  epoch0, epoch1 = _epoch(reference, 0), _epoch(reference, 1)
  assert len(epoch0) == NUM_TRAIN  # 5 steps of 8 cover the 40 examples
  # The same example in other batches (another global batch and accumulation, so other steps
  # and positions), on another process of two, or read from TFRecord files per process.
  others = {
      'batch 4, k=1': _epoch(_create(data_dirs, seed=3, global_batch=4, accumulation_steps=1), 0),
      'process 1 of 2': _epoch(_create(data_dirs, 'array_record', 1, 2, seed=3), 0,
                               rows=slice(2, 4)),
      'tfrecord': _epoch(_create(data_dirs, 'tfrecord', seed=3), 0),
  }
  for what, images in others.items():
    assert len(images) >= 16, what
    for label, image in images.items():
      np.testing.assert_array_equal(image, epoch0[label], err_msg=what)
  # Another epoch or seed: another crop (nearly always; a flip alone matches half the time).
  differ = [not np.array_equal(epoch0[i], epoch1[i]) for i in range(NUM_TRAIN)]
  assert sum(differ) >= 0.9 * NUM_TRAIN
  other_seed = _epoch(_create(data_dirs, seed=4), 0)
  assert sum(not np.array_equal(epoch0[i], other_seed[i]) for i in range(NUM_TRAIN)) >= 36


# ---------------------------------------------------------------------------------------------
# array_record: the core's global-index order.

@pytest.mark.parametrize('count', [1, 2])
def test_array_record_batches_follow_the_global_index_order(data_dirs, count):
  datasets = [_create(data_dirs, 'array_record', p, count, name='mnist', seed=5)
              for p in range(count)]
  assert all(ds.global_order for ds in datasets)
  steps = range(2 * STEPS_PER_EPOCH + 1)
  for step in steps:
    labels = np.concatenate([ds.train_batch(step, ds.train_rows)['label'] for ds in datasets],
                            axis=1)
    np.testing.assert_array_equal(labels, datasets[0].train_indices(step))
  # Resume at any step, also backwards, and the whole batch next to a process's rows.
  ds = datasets[-1]
  for step in (7, 3, 4, 9):
    np.testing.assert_array_equal(ds.train_batch(step, ds.train_rows)['label'],
                                  ds.train_indices(step)[:, ds.train_rows])
  np.testing.assert_array_equal(ds.train_batch(2)['label'], ds.train_indices(2))


def test_array_record_trains_through_prefetcher_and_global_arrays(data_dirs):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  ds = _create(data_dirs, name='cifar10')
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = NamedSharding(mesh, P(None, 'data'))
  with ip.Prefetcher(lambda s: ip.make_global_batches(ds, s, sharding), 4, 8, 2) as prefetcher:
    for step, batch in prefetcher:
      assert batch['image'].shape == (K, BATCH // K, SIZE, SIZE, 3)
      np.testing.assert_array_equal(np.asarray(batch['label']), ds.train_indices(step))


# ---------------------------------------------------------------------------------------------
# TFRecord: per-process streams.

def test_tfrecord_processes_read_their_own_share_deterministically(data_dirs):
  count, share = 2, NUM_TRAIN // 2

  def run(p, start=0, steps=2 * STEPS_PER_EPOCH):
    ds = _create(data_dirs, 'tfrecord', p, count, name='mnist', seed=7)
    return np.stack([ds.train_batch(s, ds.train_rows)['label'] for s in range(start, steps)])

  for p in range(count):
    labels = run(p)
    assert labels.shape == (2 * STEPS_PER_EPOCH, K, BATCH // K // count)
    epochs = labels.reshape(2, -1)
    for epoch in epochs:  # each epoch: exactly this process's even share, every example once
      np.testing.assert_array_equal(np.sort(epoch), np.arange(p * share, (p + 1) * share))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    np.testing.assert_array_equal(run(p), labels)  # a second run: the same sequence
    # Resume in the second epoch: skipped to, for the same process count.
    np.testing.assert_array_equal(run(p, start=7), labels[7:])

  ds = _create(data_dirs, 'tfrecord', 0, count)
  assert not ds.global_order
  with pytest.raises(ValueError, match='own training rows'):
    ds.train_batch(0)  # the whole batch: the other process's files
  with pytest.raises(ValueError, match='per process'):
    ds.train_indices(0)


# ---------------------------------------------------------------------------------------------
# Evaluation.

@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('count', [1, 2])
def test_eval_pads_and_masks_every_example_once(data_dirs, fmt, count):
  datasets = [_create(data_dirs, fmt, p, count, name='cifar10') for p in range(count)]
  per_process = [list(ds.eval_batches(ds.eval_rows)) for ds in datasets]
  assert [len(b) for b in per_process] == [datasets[0].num_eval_steps] * count == [2] * count
  batches = [b for batches in per_process for b in batches]
  assert all(b['image'].shape == (EVAL_BATCH // count, SIZE, SIZE, 3) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  assert mask.sum() == NUM_EVAL
  np.testing.assert_array_equal(np.sort(labels), np.arange(NUM_EVAL))
  padding = np.concatenate([b['image'][~b['mask']] for b in batches])
  assert len(padding) == 2 * EVAL_BATCH - NUM_EVAL and not padding.any()
  assert not np.concatenate([b['label'][~b['mask']] for b in batches]).any()
  # No randomness in eval: the same images whichever format and process count.
  reference = {int(l): im for b in _create(data_dirs, name='cifar10').eval_batches()
               for l, im in zip(b['label'][b['mask']], b['image'][b['mask']])}
  for label, image in zip(labels, images):
    np.testing.assert_array_equal(image, reference[int(label)])


# ---------------------------------------------------------------------------------------------
# Preparation.

def test_concurrent_prepare_makes_one_copy(tmp_path):
  import fake_tfds  # pylint: disable=g-import-not-at-top,unused-import  # registers the builder
  from bigbatch.data import images  # pylint: disable=g-import-not-at-top
  barrier, results, errors = threading.Barrier(2), [], []

  def build():
    try:
      barrier.wait()
      results.append(images.prepare(TINY, tmp_path, file_format='array_record'))
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors, errors
  assert [b.info.splits['train'].num_examples for b in results] == [NUM_TRAIN] * 2
  assert sorted(p.name for p in (tmp_path / 'bigbatch_fake_images' / 'tiny').iterdir()) == [
      '1.0.0']
