"""Readers of the TFDS image sets: streams of local batches for `input_pipeline.Dataset`.

`train(dataset, start_step, rows)` streams local batches for steps start, start+1, ...;
`eval(dataset, rows)` yields the padded eval batches. Dataset.train_batch keeps one stream going
while steps come in order and starts a new one at any other step. The formats' order guarantees
are in docs/design.md, "Sources and readers".

Imports TensorFlow (seconds).
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bigbatch.data import common
from bigbatch.data import image_preprocess


def local_rows(n: int, rows) -> np.ndarray:
  """The positions [n'] that `rows` (a slice, an index array or None: all) selects of n."""
  return np.arange(n) if rows is None else np.arange(n)[rows]


def _to_train_batches(ds: tf.data.Dataset, k: int) -> Iterator[dict[str, np.ndarray]]:
  for batch in ds.as_numpy_iterator():
    yield {'image': batch['image'].reshape(k, -1, *batch['image'].shape[1:]),
           'label': batch['label'].reshape(k, -1)}


_RAW = tfds.decode.DeserializeMethod.RAW_BYTES


class ArrayRecordReader:
  """Random access by global index: exactly the core's order, whatever the process count.

  Each step's records are fetched as raw bytes by one `__getitems__` call (one Python call per
  step, not per record) inside a parallel tf.data map over step numbers, so several steps are
  read at once on TF's threads and no single Python thread feeds the pipeline (a generator
  did, and capped the reader near one core); parsing, decoding and augmentation follow in a
  second parallel map. Both maps are deterministic: the order is the steps' order.
  """

  def __init__(self, builder, preprocess: image_preprocess.Preprocess, train_split: str,
               eval_split: str, parallel: int):
    self._builder, self._preprocess = builder, preprocess
    self._train_split, self._eval_split, self._parallel = train_split, eval_split, parallel
    # A data source per (thread, split): the map's threads read at once, each from its own.
    self._local = threading.local()

  def _records(self, split: str, idx_N: np.ndarray) -> np.ndarray:
    sources = self._local.__dict__.setdefault('sources', {})
    if split not in sources:
      sources[split] = self._builder.as_data_source(split, deserialize_method=_RAW)
    return np.array(sources[split].__getitems__(idx_N.tolist()), dtype=object)

  def _elements(self, split: str, steps: tf.data.Dataset, block: Callable[[int], tuple],
                n: int) -> tf.data.Dataset:
    """Elements {'record', 'index', 'epoch', 'mask'} of blocks block(s) -> (index [n] int64,
    epoch, mask [n] bool) for each s in `steps`, read in parallel and kept in order."""
    def read(step):
      idx, epoch, mask = block(int(step))
      return self._records(split, idx), idx, np.full(n, epoch, np.int64), mask

    def fn(step):
      out = tf.numpy_function(read, [step], (tf.string, tf.int64, tf.int64, tf.bool),
                              stateful=False)  # a function of the step alone
      return dict(zip(('record', 'index', 'epoch', 'mask'), (tf.ensure_shape(x, [n])
                                                            for x in out)))

    return steps.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()

  def train(self, dataset, start: int, rows) -> Iterator[dict[str, np.ndarray]]:
    k, m = dataset.accumulation_steps, len(local_rows(dataset.microbatch, rows))
    ones = np.ones(k * m, bool)

    def block(step):
      idx = dataset.train_indices(step)
      idx = (idx if rows is None else idx[:, rows]).reshape(-1)
      return idx, step // dataset.steps_per_epoch, ones

    steps = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    elements = self._elements(self._train_split, steps, block, k * m)
    ds = common.map_and_batch(elements, self._preprocess.train, k * m, self._parallel)
    return _to_train_batches(ds, k)

  def eval(self, dataset, rows) -> Iterator[dict[str, np.ndarray]]:
    e = dataset.eval_batch
    n = len(local_rows(e, rows))

    def block(b):
      pos = local_rows(e, rows) + b * e
      mask = pos < dataset.num_eval
      return np.where(mask, pos, 0), 0, mask  # padding reads example 0, blanked by Preprocess.eval

    steps = tf.data.Dataset.range(dataset.num_eval_steps)
    elements = self._elements(self._eval_split, steps, block, n)
    yield from common.map_and_batch(elements, self._preprocess.eval, n,
                                    self._parallel).as_numpy_iterator()


class TFRecordReader:
  """Per-process streaming: process p reads its even share of each split (its own files).

  The order of a process's batches depends on (seed, epoch, process_index, process_count); the
  augmentation of each example does not (it is keyed on the example's global index).
  """

  def __init__(self, builder, preprocess: image_preprocess.Preprocess, train_split: str,
               eval_split: str, parallel: int, shuffle_buffer: int, process_index: int,
               process_count: int):
    self._preprocess, self._parallel, self._shuffle_buffer = preprocess, parallel, shuffle_buffer
    self._process_index, self._process_count = process_index, process_count
    self.train_files = self._instructions(builder.info, train_split)
    self.eval_files = self._instructions(builder.info, eval_split)

  def _instructions(self, info, split: str) -> list[tuple[str, int, int, int]]:
    """(filename, skip, take, global index of the first record taken) for this process's share.

    The global index is the record's position in the whole split (as in the array_record
    format), so augmentation keys agree between formats and process counts.
    """
    shares = tfds.even_splits(split, n=self._process_count)
    base = sum(info.splits[s].num_examples for s in shares[:self._process_index])
    out = []
    for f in info.splits[shares[self._process_index]].file_instructions:
      out.append((os.fspath(f.filename), f.skip, f.take, base))
      base += f.take
    return out

  def _check_rows(self, n: int, rows, expected: slice, what: str):
    if not np.array_equal(local_rows(n, rows), np.arange(n)[expected]):
      raise ValueError(
          f'a TFRecord data set streams process {self._process_index}\'s own {what} rows '
          f'{expected} only, not {rows}: each process reads its own files (prepare the data with '
          f'config.data.file_format=array_record for random access)')

  @staticmethod
  def _columns(files: list[tuple[str, int, int, int]]) -> tuple[tf.Tensor, ...]:
    # Built column by column, so an empty share (fewer eval examples than processes) works too.
    return (tf.constant([f[0] for f in files], tf.string),
            *(tf.constant([f[i] for f in files], tf.int64) for i in (1, 2, 3)))

  @staticmethod
  def _read(name, skip, take, base) -> tf.data.Dataset:
    """One file instruction's records, each with its global index."""
    records = tf.data.TFRecordDataset(name).skip(skip).take(take)
    return tf.data.Dataset.zip(records, tf.data.Dataset.range(base, base + take))

  def train(self, dataset, start: int, rows) -> Iterator[dict[str, np.ndarray]]:
    self._check_rows(dataset.microbatch, rows, dataset.train_rows, 'training')
    k = dataset.accumulation_steps
    local = k * len(local_rows(dataset.microbatch, rows))
    # Every process takes the same number of examples per epoch, so all step in lockstep; its
    # share (>= floor(N / P)) always holds them: steps_per_epoch * B / P <= N / P.
    per_epoch = dataset.steps_per_epoch * local
    columns = self._columns(self.train_files)
    num_files, seed, buffer = len(self.train_files), dataset.seed, self._shuffle_buffer

    def epoch_records(epoch):
      # From (seed, epoch) only; -1 is no example index, so this key is no example's key.
      key = tf.random.experimental.stateless_fold_in(
          tf.stack([tf.constant(seed, tf.int64), epoch]), -1, alg='philox')
      order = tf.random.experimental.stateless_shuffle(
          tf.range(num_files), seed=image_preprocess.subkey(key, 0))
      files = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(c, order) for c in columns))
      records = files.interleave(self._read, cycle_length=min(num_files, 16), block_length=1,
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      shuffle_seed = tf.random.stateless_uniform([], seed=image_preprocess.subkey(key, 1),
                                                 minval=None, maxval=None, dtype=tf.int64)
      records = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
      return records.take(per_epoch).map(
          lambda record, index: {'record': record, 'index': index, 'epoch': epoch,
                                 'mask': tf.constant(True)})

    first_epoch, offset = divmod(start, dataset.steps_per_epoch)
    elements = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
    # Resume: skipping to `start` reads (and shuffles, but does not decode) the start epoch's
    # earlier examples, and lands on the same batch only for the same process count.
    elements = elements.skip(offset * local)
    ds = common.map_and_batch(elements, self._preprocess.train, local, self._parallel)
    return _to_train_batches(ds, k)

  def eval(self, dataset, rows) -> Iterator[dict[str, np.ndarray]]:
    self._check_rows(dataset.eval_batch, rows, dataset.eval_rows, 'eval')
    n = len(local_rows(dataset.eval_batch, rows))
    elements = tf.data.Dataset.from_tensor_slices(self._columns(self.eval_files)).flat_map(
        self._read).map(
        lambda record, index: {'record': record, 'index': index,
                               'epoch': tf.constant(0, tf.int64), 'mask': tf.constant(True)})
    pad = {'record': tf.constant(b''), 'index': tf.constant(0, tf.int64),
           'epoch': tf.constant(0, tf.int64), 'mask': tf.constant(False)}
    preprocess = self._preprocess

    def fn(element):
      # Padding has no record to parse: a blank example of the right shape instead.
      return tf.cond(element['mask'], lambda: preprocess.eval(element), lambda: {
          'image': tf.zeros(preprocess.image_shape, tf.float32),
          'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)})

    # Every process yields num_eval_steps batches: its share (at most ceil(N / P) examples, and
    # ceil(ceil(N / P) / (E / P)) == ceil(N / E)) then padding.
    elements = elements.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    elements = elements.take(dataset.num_eval_steps * n)
    yield from common.map_and_batch(elements, fn, n, self._parallel).as_numpy_iterator()
