"""Input pipeline: batch order, process rows, eval masking, global arrays, prefetching, data sets.

Most tests use small synthetic data (numpy only). TensorFlow is imported by the digits tests
alone (~9 s once per worker), which share one session-scoped build.
"""
import math
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bigbatch import config_lib
from bigbatch import data
from bigbatch import fields
from bigbatch import input_pipeline as ip
from bigbatch.data import common as data_common

NUM_TRAIN, NUM_EVAL, BATCH, K, EVAL_BATCH = 1000, 300, 64, 2, 64
STEPS_PER_EPOCH = NUM_TRAIN // BATCH  # 15; the last 40 examples of each epoch are dropped


def _config(**overrides):
  """A small synthetic config; overrides by dotted path ('data.num_train': ...)."""
  c = config_lib.base_config()
  c.data.name = 'synthetic'
  c.data.num_train, c.data.num_eval = NUM_TRAIN, NUM_EVAL
  c.global_batch, c.accumulation_steps, c.eval_batch = BATCH, K, EVAL_BATCH
  for path, value in overrides.items():
    node, _, leaf = path.rpartition('.')
    (c[node] if node else c)[leaf] = value
  return c


def _create(process_index=0, process_count=1, **overrides):
  return data.create(_config(**overrides), process_index=process_index, process_count=process_count)


# --------------------------------------------------------------------------------------------
# Batch order and process rows.

@pytest.mark.parametrize('count', [1, 2, 4])
def test_process_rows_partition_each_global_batch(count):
  m = BATCH // K
  datasets = [_create(p, count) for p in range(count)]
  rows = [ds.train_rows for ds in datasets]
  assert rows == [ip.process_rows(m, p, count) for p in range(count)]
  covered = np.concatenate([np.arange(m)[r] for r in rows])
  np.testing.assert_array_equal(covered, np.arange(m))  # disjoint, in order, complete
  for step in (0, 7, STEPS_PER_EPOCH + 3):
    full = datasets[0].train_batch(step)
    parts = [ds.train_batch(step, ds.train_rows) for ds in datasets]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts], axis=1),
                                    full[key])
    assert parts[0]['image'].shape == (K, m // count, 8, 8, 1)
    assert parts[0]['image'].dtype == np.float32 and parts[0]['label'].dtype == np.int32


def test_process_rows_reject_uneven_split():
  with pytest.raises(ValueError, match='multiple of 3'):
    ip.process_rows(32, 0, 3)
  with pytest.raises(ValueError, match='outside'):
    ip.process_rows(32, 2, 2)
  with pytest.raises(fields.ConfigError, match='global_batch'):
    _create(global_batch=63)  # not divisible by accumulation_steps=2
  with pytest.raises(ValueError, match='processes'):
    _create(0, 3)  # microbatch 32 over 3 processes
  with pytest.raises(fields.ConfigError, match='larger than'):
    _create(global_batch=2048)
  with pytest.raises(fields.ConfigError, match='unknown'):
    data.create(_config(**{'data.name': 'imagenet'}), process_index=0, process_count=1)


def _sequence(ds, steps=2 * STEPS_PER_EPOCH):
  return np.stack([ds.train_indices(step) for step in range(steps)])


def test_batch_sequence_does_not_depend_on_process_count():
  reference = _sequence(_create(0, 1))
  assert reference.shape == (2 * STEPS_PER_EPOCH, K, BATCH // K)
  for count in (2, 4):
    for p in range(count):
      np.testing.assert_array_equal(_sequence(_create(p, count)), reference)


def test_batch_sequence_changes_with_seed():
  assert not np.array_equal(_sequence(_create(seed=0)), _sequence(_create(seed=1)))


def test_each_epoch_is_a_permutation_and_epochs_differ():
  seq = _sequence(_create(seed=3)).reshape(2, STEPS_PER_EPOCH * BATCH)
  for epoch, indices in enumerate(seq):
    assert len(np.unique(indices)) == len(indices)  # every index at most once per epoch
    assert indices.min() >= 0 and indices.max() < NUM_TRAIN
    # The batch order is the documented formula, so any process or restart can recompute it.
    np.testing.assert_array_equal(indices, ip.epoch_permutation(3, epoch, NUM_TRAIN)[:len(indices)])
  assert not np.array_equal(seq[0], seq[1])


def test_batch_is_a_function_of_step_for_exact_resume():
  step = 2 * STEPS_PER_EPOCH + 5
  walked = _create(seed=5)
  for s in range(step):
    walked.train_indices(s)
  resumed = _create(seed=5)
  for key, value in resumed.train_batch(step).items():
    np.testing.assert_array_equal(value, walked.train_batch(step)[key])


# --------------------------------------------------------------------------------------------
# Evaluation.

@pytest.mark.parametrize('count', [1, 2, 4])
def test_eval_counts_every_example_once(count):
  datasets = [_create(p, count) for p in range(count)]
  per_process = [list(ds.eval_batches(ds.eval_rows)) for ds in datasets]
  expected_steps = math.ceil(NUM_EVAL / EVAL_BATCH)
  assert [len(batches) for batches in per_process] == [expected_steps] * count
  assert all(ds.num_eval_steps == expected_steps for ds in datasets)
  # Reassemble the global batches (process rows in process order) and keep the masked rows.
  merged = {key: np.concatenate([np.concatenate([b[key] for b in batches_of_step], axis=0)
                                 for batches_of_step in zip(*per_process)])
            for key in ('image', 'label', 'mask')}
  assert merged['mask'].shape == (expected_steps * EVAL_BATCH,)
  assert merged['mask'].sum() == NUM_EVAL
  images, labels = datasets[0].eval_source(np.arange(NUM_EVAL))
  np.testing.assert_array_equal(merged['image'][merged['mask']], images)
  np.testing.assert_array_equal(merged['label'][merged['mask']], labels)
  assert not merged['image'][~merged['mask']].any()  # padding is blank


# --------------------------------------------------------------------------------------------
# Global arrays on an 8-device mesh.

def _mesh(data, model):
  return jax.make_mesh((data, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize('data,model', [(8, 1), (4, 2)])
def test_make_global_batches_match_train_batch(data, model):
  ds = _create()
  sharding = NamedSharding(_mesh(data, model), P(None, 'data'))
  assert ip.local_rows(sharding, (K, BATCH // K), axis=1) == ds.train_rows
  step = STEPS_PER_EPOCH + 2
  arrays = ip.make_global_batches(ds, step, sharding)
  expected = ds.train_batch(step)
  assert set(arrays) == set(expected)
  for key, array in arrays.items():
    assert isinstance(array, jax.Array) and array.shape == expected[key].shape
    assert array.dtype == expected[key].dtype
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), expected[key])
    for shard in array.addressable_shards:
      assert shard.data.shape[1] == BATCH // K // data
      np.testing.assert_array_equal(np.asarray(shard.data), expected[key][shard.index])


def test_make_global_eval_batches_are_sharded_and_complete():
  ds = _create()
  sharding = NamedSharding(_mesh(8, 1), P('data'))
  batches = list(ip.make_global_eval_batches(ds, sharding))
  assert len(batches) == ds.num_eval_steps
  for got, want in zip(batches, ds.eval_batches()):
    for key in ('image', 'label', 'mask'):
      assert got[key].sharding == sharding
      np.testing.assert_array_equal(np.asarray(got[key]), want[key])


# --------------------------------------------------------------------------------------------
# Prefetcher.

def test_prefetcher_yields_steps_in_order_and_records_waiting():
  calls = []

  def slow(step):
    calls.append(step)
    time.sleep(0.02)
    return {'x': np.full(3, step)}

  with ip.Prefetcher(slow, 5, 10, prefetch=2) as prefetcher:
    got = list(prefetcher)
  assert [step for step, _ in got] == list(range(5, 10))
  assert all((batch['x'] == step).all() for step, batch in got)
  assert calls == list(range(5, 10))
  # The consumer does nothing, so it waits for roughly every batch.
  assert prefetcher.wait_seconds >= 0.05


def test_prefetcher_synchronous_when_prefetch_is_zero():
  prefetcher = ip.Prefetcher(lambda step: step * 10, 0, 3, prefetch=0)
  assert list(prefetcher) == [(0, 0), (1, 10), (2, 20)]
  assert list(ip.Prefetcher(lambda step: step, 4, 4)) == []


def test_prefetcher_propagates_exceptions_at_their_step():

  def failing(step):
    if step == 3:
      raise RuntimeError('bad record at step 3')
    return step

  prefetcher = ip.Prefetcher(failing, 0, 10, prefetch=2)
  assert [next(prefetcher)[0] for _ in range(3)] == [0, 1, 2]
  with pytest.raises(RuntimeError, match='bad record at step 3'):
    next(prefetcher)
  with pytest.raises(StopIteration):
    next(prefetcher)


def test_prefetcher_close_stops_the_thread_early():
  made = []
  prefetcher = ip.Prefetcher(lambda step: made.append(step) or step, 0, 1000, prefetch=2)
  assert next(prefetcher) == (0, 0)
  prefetcher.close()
  assert not prefetcher._thread.is_alive()  # pylint: disable=protected-access
  assert len(made) <= 5  # at most the queue plus one in hand, never the whole range
  with pytest.raises(StopIteration):
    next(prefetcher)


def test_prefetcher_feeds_global_batches():
  ds = _create()
  sharding = NamedSharding(_mesh(8, 1), P(None, 'data'))
  with ip.Prefetcher(lambda s: ip.make_global_batches(ds, s, sharding), 0, 3, 2) as prefetcher:
    for step, batch in prefetcher:
      np.testing.assert_array_equal(np.asarray(batch['label']), ds.train_batch(step)['label'])


# --------------------------------------------------------------------------------------------
# Synthetic data.

def test_synthetic_example_depends_only_on_its_index():
  ds = _create()
  a_images, a_labels = ds.train_source(np.array([5, 7, 100, 999]))
  b_images, b_labels = ds.train_source(np.array([100, 3, 5] + list(range(400, 700))))
  np.testing.assert_array_equal(a_images[[0, 2]], b_images[[2, 0]])
  np.testing.assert_array_equal(a_labels[[0, 2]], b_labels[[2, 0]])
  # Teacher logits are bitwise the same alone, at any position and in any batch size.
  x = data_common.synthetic_inputs(1, np.arange(1000), 64)
  logits = ds.train_source.teacher.logits(x)
  for i in (0, 1, 255, 256, 600, 999):
    np.testing.assert_array_equal(ds.train_source.teacher.logits(x[i:i + 1]), logits[i:i + 1])
  np.testing.assert_array_equal(ds.train_source.teacher.logits(x[37:]), logits[37:])
  # The same index across batches of two epochs.
  first, second = ds.train_indices(0).reshape(-1), ds.train_indices(STEPS_PER_EPOCH).reshape(-1)
  common = np.intersect1d(first, second)[0]
  i, j = np.flatnonzero(first == common)[0], np.flatnonzero(second == common)[0]
  batch0, batch1 = ds.train_batch(0), ds.train_batch(STEPS_PER_EPOCH)
  np.testing.assert_array_equal(batch0['image'].reshape(-1, 8, 8, 1)[i],
                                batch1['image'].reshape(-1, 8, 8, 1)[j])
  # Splits differ; the training seed does not change the data.
  assert not np.array_equal(ds.eval_source(np.arange(4))[0], ds.train_source(np.arange(4))[0])
  other = _create(seed=123)
  np.testing.assert_array_equal(other.train_source(np.arange(50))[0],
                                ds.train_source(np.arange(50))[0])
  np.testing.assert_array_equal(other.train_source(np.arange(50))[1],
                                ds.train_source(np.arange(50))[1])


def test_synthetic_inputs_are_standard_normal_of_any_shape():
  ds = _create(**{'data.image_size': 5, 'data.channels': 3})
  images, _ = ds.train_source(np.arange(2000))
  assert images.shape == (2000, 5, 5, 3) and images.dtype == np.float32
  assert abs(images.mean()) < 0.02 and abs(images.std() - 1) < 0.02
  assert abs(np.corrcoef(images.reshape(2000, -1)[:, :2].T)[0, 1]) < 0.1


def test_synthetic_labels_are_balanced_and_learnable():
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  ds = _create(**{'data.num_train': 10_000, 'data.num_eval': 10_000})
  _, labels = ds.eval_source(np.arange(10_000))
  assert np.bincount(labels, minlength=10).min() >= 300  # every class >= 3%
  # Not noise: even a linear model beats chance (10%) by far; a network does better.
  train_x, train_y = ds.train_source(np.arange(4000))
  model = LogisticRegression(max_iter=200).fit(train_x.reshape(4000, -1), train_y)
  assert model.score(ds.eval_source(np.arange(2000))[0].reshape(2000, -1), labels[:2000]) > 0.5


def test_import_is_light():
  # Configs are validated before TensorFlow (~9 s) or jax are imported.
  code = ('import sys, bigbatch.input_pipeline; '
          'assert not {"tensorflow", "tensorflow_datasets", "jax", "bigbatch.data"} & '
          'set(sys.modules), sorted(sys.modules); '
          'import bigbatch.data; bigbatch.data.defaults(); '
          'assert not {"tensorflow", "tensorflow_datasets", "jax"} & set(sys.modules)')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Digits (TensorFlow Datasets).

@pytest.fixture(scope='session')
def digits_config(tmp_path_factory):
  return _config(**{'data.name': 'digits',
                    'data.data_dir': str(tmp_path_factory.mktemp('tfds'))},
                 global_batch=128, accumulation_steps=1, eval_batch=64)


def test_digits_builds_and_loads(digits_config):
  from bigbatch.data import digits  # pylint: disable=g-import-not-at-top
  ds = data.create(digits_config, process_index=0, process_count=1)
  assert (ds.num_train, ds.num_eval) == (1437, 360)
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  batch = ds.train_batch(3)
  assert batch['image'].shape == (1, 128, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  # Train and test are the documented disjoint split of sklearn's rows, stored in row order.
  images, labels = digits.load_sklearn()
  train_rows, test_rows = digits.split_indices('train', 1797), digits.split_indices('test', 1797)
  assert not set(train_rows) & set(test_rows) and len(train_rows) + len(test_rows) == 1797
  np.testing.assert_array_equal(ds.train_source.labels, labels[train_rows])
  np.testing.assert_array_equal(ds.eval_source.labels, labels[test_rows])
  assert set(np.unique(ds.eval_source.labels)) == set(range(10))
  # Normalization: standardized with the training pixels' mean and std.
  train = ds.train_source.images
  assert abs(train.mean()) < 1e-5 and abs(train.std() - 1) < 1e-5
  expected = (images[test_rows] / 255.0 - (images[train_rows] / 255.0).mean()) / (
      images[train_rows] / 255.0).std()
  np.testing.assert_allclose(ds.eval_source.images, expected, atol=1e-5)


def test_digits_eval_counts_each_example_once(digits_config):
  datasets = [data.create(digits_config, process_index=p, process_count=2) for p in range(2)]
  per_process = [list(ds.eval_batches(ds.eval_rows)) for ds in datasets]
  assert [len(b) for b in per_process] == [math.ceil(360 / 64)] * 2
  masks = np.concatenate([b['mask'] for batches in per_process for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for batches in per_process for b in batches])
  assert masks.sum() == 360
  np.testing.assert_array_equal(np.sort(labels), np.sort(datasets[0].eval_source.labels))


def test_digits_concurrent_prepare(tmp_path):
  from bigbatch.data import digits  # pylint: disable=g-import-not-at-top
  shared = tmp_path / 'tfds'
  shared.mkdir()
  alias = tmp_path / 'alias'
  alias.symlink_to(shared, target_is_directory=True)
  barrier, results, errors = threading.Barrier(2), [], []

  def build(data_dir):
    try:
      barrier.wait()
      results.append(digits.prepare(data_dir))
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build, args=(d,)) for d in (str(shared), str(alias))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors, errors
  assert len(results) == 2
  for builder in results:
    assert builder.info.splits['train'].num_examples == 1437
    assert builder.info.splits['test'].num_examples == 360
  assert os.listdir(shared / digits.NAME) == ['1.0.0']  # one build, no leftovers
