"""TFDS image data sets (imagenet2012, cifar10, mnist) with their preprocessing, as global batches.

`create(config, ...)` returns an `input_pipeline.Dataset` whose batches stream from tf.data.
`config.data.name` picks the preprocessing; `config.data.tfds_name` (default: the same name) picks
the TFDS data set read with it, so a small local set can stand in for a real one:

  name          train                                          eval                      image
  imagenet2012  inception crop (area 8%..100% of the image,    shorter side resized to   [S, S, 3]
                aspect 3/4..4/3), resized to S; random flip    S / 0.875, center crop S
  cifar10       zero padding of 4 px (black, before            none                      stored
                normalization, as He et al. 2016 and
                torchvision's RandomCrop(32, padding=4)),
                random crop of the stored size; random flip
  mnist         none                                           none                      stored
then x / 255 standardized per channel with the data set's usual constants (below). S is
config.data.image_size (224 for ImageNet; the base config's 8 is the synthetic data's). cifar10 and
mnist keep the stored size (32x32x3, 28x28x1); a stand-in whose images vary in size is resized to
S x S first. Output: float32 images [H, W, C], int32 labels.

Augmentation is stateless per example: its random numbers are a function of
(config.seed, epoch, global example index) only, where the global index is the record's position
in the split as TFDS stored it. The same example therefore gets the same crop and flip whatever
the process count, batch or position it lands in, and a resumed run reproduces it.

Reading follows the format the data set was prepared in (`builder.info.file_format`):
  array_record  random access by global index (tfds.data_source). The core's global-index order
                holds exactly: the batch at step s depends only on (seed, data set, global batch).
                A generator walks `Dataset.train_indices` from the start step, fetching each step's
                records as raw bytes (one `__getitems__` per step); parsing, decoding and
                augmentation run in parallel tf.data maps.
  tfrecord      (the TFDS default) streamed per process: process p reads its even share of the
                split (`tfds.even_splits`, i.e. its own subset of the files), each epoch in a file
                order and through a shuffle buffer seeded from (seed, epoch). Deterministic for a
                fixed process count, but the batch order DEPENDS ON THE PROCESS COUNT (augmentation
                does not). Prepare with config.data.file_format='array_record' for exact order.
Evaluation reads every example once, padded and masked to the same number of batches on every
process: array_record in the core's layout (batch b holds examples b*E .. (b+1)*E), TFRecord as
each process's even share of the eval split, in order.

This module imports TensorFlow and TFDS (seconds): import it lazily, not from config code.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import math
import os
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bigbatch import config_lib
from bigbatch import input_pipeline

# JAX owns the accelerators; TensorFlow here only runs the input pipeline, and left alone a GPU
# build of TF would reserve all GPU memory at its first op.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialized its devices (someone used it first): leave them
  pass

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per-channel mean and std of the 50k CIFAR-10 training images (the true std; the often copied
# (0.2023, 0.1994, 0.2010) is the mean of per-image stds).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: center crop S of the image resized to S / 0.875
CIFAR_PAD = 4


def _imagenet_style(name: str) -> bool:
  return name == 'imagenet2012'


# ---------------------------------------------------------------------------------------------
# Preparation.

def default_data_dir() -> epath.Path:
  return epath.Path(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets').expanduser()


def is_local(path: epath.PathLike) -> bool:
  return '://' not in os.fspath(path)


@contextlib.contextmanager
def exclusive_lock(data_dir: epath.PathLike, name: str):
  """Holds an exclusive lock on `data_dir` for data set `name` (a local directory only).

  flock is released when the file closes, also if the process dies, so a crashed preparation
  never leaves a stale lock behind.
  """
  data_dir = epath.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  with open(data_dir / f'.{name.replace("/", "_")}.lock', 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, data_dir: epath.PathLike | None = None, *, file_format: str | None = None,
            may_prepare: bool = True,
            download_config: tfds.download.DownloadConfig | None = None
            ) -> tfds.core.DatasetBuilder:
  """The builder of TFDS data set `name` under `data_dir`, prepared first if it is not yet.

  Local directories: under an exclusive file lock, so that several processes (or test workers)
  preparing the same directory at once make one copy (TFDS alone lets the loser fail with
  FileExistsError). The builder is created inside the lock: it decides at construction whether
  the data exists. Remote directories (gs://...) cannot be locked; there the data is prepared
  only when `may_prepare` (one process), else it must exist already.

  `file_format` ('tfrecord' | 'array_record' | None: TFDS's default, tfrecord) applies only when
  the data is prepared here; data already prepared is read in the format it has.
  `download_config` goes to `download_and_prepare` (e.g. num_shards, manual_dir).
  """
  data_dir = epath.Path(data_dir) if data_dir else default_data_dir()
  if is_local(data_dir):
    with exclusive_lock(data_dir, name):
      builder = tfds.builder(name, data_dir=data_dir)
      builder.download_and_prepare(file_format=file_format, download_config=download_config)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      if not may_prepare:
        raise config_lib.ConfigError(
            f'TFDS data set {name!r} is not prepared under {data_dir}, and several processes '
            f'cannot safely prepare a remote directory at once; prepare it first, e.g. '
            f'`tfds build {name} --data_dir={data_dir}`')
      builder.download_and_prepare(file_format=file_format, download_config=download_config)
  stored = builder.info.file_format
  if file_format and stored is not None and stored.value != file_format:
    logging.warning('%s under %s is stored as %s; config.data.file_format=%s applies only to a '
                    'new preparation (use another data_dir to get it)', name, data_dir,
                    stored.value, file_format)
  return builder


# ---------------------------------------------------------------------------------------------
# Preprocessing: tf functions of one example, run in parallel tf.data maps.

def example_key(seed, epoch, index) -> tf.Tensor:
  """The stateless RNG key [2] of one example's augmentation: a function of these three only.

  Philox named explicitly: 'auto_select' may pick another algorithm on another device.
  """
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64), alg='philox')


def _subkey(key: tf.Tensor, i: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, i, alg='philox')


def normalize(image_HxWxC: tf.Tensor, mean, std) -> tf.Tensor:
  """(x / 255 - mean) / std per channel (`mean`, `std` on the 0..1 scale).

  As one multiply and one subtract: four passes over a 224x224x3 image cost ~0.8 ms of the
  ~3 ms an ImageNet example takes; two cost ~0.25 ms.
  """
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  scale = tf.constant(1.0 / (255.0 * std), tf.float32)
  return tf.cast(image_HxWxC, tf.float32) * scale - tf.constant(mean / std, tf.float32)


def decode_and_crop(image_bytes: tf.Tensor, window_fn: Callable, channels: int = 3) -> tf.Tensor:
  """Decodes only the window `window_fn(shape [h, w, c]) -> (y, x, h, w)` of an encoded image.

  JPEGs decode just the window (decode_and_crop_jpeg skips most of the rest: a 8%-area crop
  decodes several times faster); other formats (PNG...) decode whole, then slice.
  """
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack(window), channels=channels)

  def other():
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    y, x, h, w = window_fn(tf.shape(image))
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def inception_window(shape: tf.Tensor, key: tf.Tensor, area=(0.08, 1.0),
                     aspect=(3 / 4, 4 / 3)) -> tuple[tf.Tensor, ...]:
  """A random crop (y, x, h, w) of an image of `shape`, as Szegedy et al. 2015 ("Inception").

  min_object_covered=0: the only constraints are the area and aspect ranges. When 10 draws all
  miss (a very elongated image), the whole image is used, as TF's reference does.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=key,
      min_object_covered=0.0, aspect_ratio_range=aspect, area_range=area, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], size[0], size[1]


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  # Plain bilinear, as the TF and MLPerf ResNet-50 references behind the large-batch results:
  # antialiasing would cost ~1 ms more per ImageNet example (+40% CPU) for a mild downscale
  # (a 400 px crop to 224). Returns float32 on the 0..255 scale.
  return tf.image.resize(image, size, method='bilinear')


def imagenet_train(image_bytes: tf.Tensor, key: tf.Tensor, size: int) -> tf.Tensor:
  crop = decode_and_crop(image_bytes, functools.partial(inception_window, key=_subkey(key, 0)))
  image = tf.image.stateless_random_flip_left_right(_resize(crop, [size, size]), _subkey(key, 1))
  return normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def imagenet_eval(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  target = float(round(size / EVAL_CROP_FRACTION))
  # The shorter side becomes `target` (never below `size`), the longer one keeps the aspect.
  new_hw = tf.maximum(tf.cast(tf.round(hw * target / tf.reduce_min(hw)), tf.int32), size)
  image = _resize(image, new_hw)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  image = image[top:top + size, left:left + size]
  image.set_shape([size, size, 3])
  return normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def cifar_train(image_HxWxC: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  shape = image_HxWxC.shape
  padded = tf.pad(image_HxWxC, [[CIFAR_PAD, CIFAR_PAD], [CIFAR_PAD, CIFAR_PAD], [0, 0]])
  image = tf.image.stateless_random_crop(padded, shape, seed=_subkey(key, 0))
  image = tf.image.stateless_random_flip_left_right(image, _subkey(key, 1))
  return normalize(image, CIFAR10_MEAN, CIFAR10_STD)


def cifar_eval(image_HxWxC: tf.Tensor) -> tf.Tensor:
  return normalize(image_HxWxC, CIFAR10_MEAN, CIFAR10_STD)


def mnist(image_HxWxC: tf.Tensor) -> tf.Tensor:
  return normalize(image_HxWxC, MNIST_MEAN, MNIST_STD)


class Preprocess:
  """Turns elements {'record': serialized tf.Example, 'index', 'epoch'[, 'mask']} into
  {'image': float32 [H, W, C], 'label': int32[, 'mask']}, for train or eval."""

  def __init__(self, name: str, info: tfds.core.DatasetInfo, image_size: int, seed: int):
    if not info.supervised_keys or len(info.supervised_keys) != 2:
      raise config_lib.ConfigError(
          f'TFDS data set {info.full_name} has no (image, label) supervised_keys; point '
          f'config.data.tfds_name at a classification data set')
    self.image_key, self.label_key = info.supervised_keys
    image_feature = info.features[self.image_key]
    label_feature = info.features[self.label_key]
    self.name, self.seed, self.size = name, seed, image_size
    self.num_classes = label_feature.num_classes
    stored = tuple(image_feature.shape)
    channels = stored[-1] or 3
    if _imagenet_style(name):
      self.image_shape = (image_size, image_size, 3)
      self._stored_shape = None
    elif None in stored:  # a stand-in of varying sizes: resized to S x S first
      self.image_shape = (image_size, image_size, channels)
      self._stored_shape = None
    else:
      self.image_shape = self._stored_shape = stored
    self.channels = self.image_shape[-1]
    # Parse only the two features read (the image stays encoded), with the specs TFDS wrote.
    serialized = info.features.get_serialized_info()
    self._spec = {}
    for key in (self.image_key, self.label_key):
      tensor_info = serialized[key]
      if not isinstance(tensor_info, tfds.features.TensorInfo) or None in tensor_info.shape:
        raise config_lib.ConfigError(f'feature {key!r} of {info.full_name} is not a plain tensor')
      self._spec[key] = tf.io.FixedLenFeature(tensor_info.shape, tensor_info.tf_dtype)

  def _parse(self, record):
    example = tf.io.parse_single_example(record, self._spec)
    return example[self.image_key], tf.cast(example[self.label_key], tf.int32)

  def _decode(self, image_bytes):
    """cifar/mnist style: the whole image, uint8 [H, W, C] (float32 0..255 once resized)."""
    image = tf.io.decode_image(image_bytes, channels=self.channels, expand_animations=False)
    if self._stored_shape is None:
      return _resize(image, [self.size, self.size])
    image.set_shape(self._stored_shape)
    return image

  def train(self, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image_bytes, label = self._parse(element['record'])
    key = example_key(self.seed, element['epoch'], element['index'])
    if _imagenet_style(self.name):
      image = imagenet_train(image_bytes, key, self.size)
    elif self.name == 'cifar10':
      image = cifar_train(self._decode(image_bytes), key)
    else:
      image = mnist(self._decode(image_bytes))
    return {'image': tf.ensure_shape(image, self.image_shape), 'label': label}

  def eval(self, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image_bytes, label = self._parse(element['record'])
    if _imagenet_style(self.name):
      image = imagenet_eval(image_bytes, self.size)
    elif self.name == 'cifar10':
      image = cifar_eval(self._decode(image_bytes))
    else:
      image = mnist(self._decode(image_bytes))
    image = tf.ensure_shape(image, self.image_shape)
    # Padding rows (mask False) are blanked here, so both readers pad alike.
    mask = element['mask']
    return {'image': tf.where(mask, image, 0.0), 'label': tf.where(mask, label, 0), 'mask': mask}


def map_and_batch(elements: tf.data.Dataset, fn: Callable, batch: int,
                  parallel: int) -> tf.data.Dataset:
  """Parallel, order-preserving `fn` over `elements`, in batches of `batch`, one batch ahead.

  The prefetch keeps the next batch in the making while the trainer's Prefetcher thread turns
  this one into global arrays; the parallel map keeps every core decoding.
  """
  ds = elements.map(fn, num_parallel_calls=tf.data.AUTOTUNE if parallel == -1 else parallel,
                    deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).prefetch(1)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _local_rows(n: int, rows) -> np.ndarray:
  return np.arange(n) if rows is None else np.arange(n)[rows]


def _to_train_batches(ds: tf.data.Dataset, k: int) -> Iterator[dict[str, np.ndarray]]:
  for batch in ds.as_numpy_iterator():
    yield {'image': batch['image'].reshape(k, -1, *batch['image'].shape[1:]),
           'label': batch['label'].reshape(k, -1)}


# ---------------------------------------------------------------------------------------------
# Readers: `train(dataset, start_step, rows)` streams local batches for steps start, start+1, ...;
# `eval(dataset, rows)` yields the padded eval batches. Dataset.train_batch keeps one stream going
# while steps come in order and starts a new one at any other step.

_RAW = tfds.decode.DeserializeMethod.RAW_BYTES


class ArrayRecordReader:
  """Random access by global index: exactly the core's order, whatever the process count."""

  def __init__(self, builder, preprocess: Preprocess, train_split: str, eval_split: str,
               parallel: int):
    self._builder, self._preprocess = builder, preprocess
    self._train_split, self._eval_split, self._parallel = train_split, eval_split, parallel

  def _source(self, split: str):
    # One data source per stream: each is read from its own generator thread.
    return self._builder.as_data_source(split, deserialize_method=_RAW)

  def _elements(self, blocks: Callable[[], Iterator[tuple]]) -> tf.data.Dataset:
    # Python yields one block of records per step (a generator call per record would cost more
    # than fetching it); unbatch hands the records to the parallel map one by one.
    spec = {'record': tf.TensorSpec([None], tf.string), 'index': tf.TensorSpec([None], tf.int64),
            'epoch': tf.TensorSpec([None], tf.int64), 'mask': tf.TensorSpec([None], tf.bool)}
    return tf.data.Dataset.from_generator(blocks, output_signature=spec).unbatch()

  def train(self, dataset, start: int, rows) -> Iterator[dict[str, np.ndarray]]:
    k, m = dataset.accumulation_steps, len(_local_rows(dataset.microbatch, rows))

    def blocks():
      source = self._source(self._train_split)
      for step in itertools.count(start):
        idx = dataset.train_indices(step)
        idx = (idx if rows is None else idx[:, rows]).reshape(-1)
        records = source.__getitems__(idx.tolist())
        epoch = step // dataset.steps_per_epoch
        yield {'record': np.array(records, dtype=object), 'index': idx,
               'epoch': np.full(idx.shape, epoch, np.int64), 'mask': np.ones(idx.shape, bool)}

    ds = map_and_batch(self._elements(blocks), self._preprocess.train, k * m, self._parallel)
    return _to_train_batches(ds, k)

  def eval(self, dataset, rows) -> Iterator[dict[str, np.ndarray]]:
    e = dataset.eval_batch
    n = len(_local_rows(e, rows))

    def blocks():
      source = self._source(self._eval_split)
      for b in range(dataset.num_eval_steps):
        pos = _local_rows(e, rows) + b * e
        mask = pos < dataset.num_eval
        idx = np.where(mask, pos, 0)  # padding reads example 0, blanked by Preprocess.eval
        yield {'record': np.array(source.__getitems__(idx.tolist()), dtype=object),
               'index': idx, 'epoch': np.zeros(idx.shape, np.int64), 'mask': mask}

    yield from map_and_batch(self._elements(blocks), self._preprocess.eval, n,
                             self._parallel).as_numpy_iterator()


class TFRecordReader:
  """Per-process streaming: process p reads its even share of each split (its own files).

  The order of a process's batches depends on (seed, epoch, process_index, process_count); the
  augmentation of each example does not (it is keyed on the example's global index).
  """

  def __init__(self, builder, preprocess: Preprocess, train_split: str, eval_split: str,
               parallel: int, shuffle_buffer: int, process_index: int, process_count: int):
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
    if not np.array_equal(_local_rows(n, rows), np.arange(n)[expected]):
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
    local = k * len(_local_rows(dataset.microbatch, rows))
    # Every process takes the same number of examples per epoch, so all step in lockstep; its
    # share (>= floor(N / P)) always holds them: steps_per_epoch * B / P <= N / P.
    per_epoch = dataset.steps_per_epoch * local
    columns = self._columns(self.train_files)
    num_files, seed, buffer = len(self.train_files), dataset.seed, self._shuffle_buffer

    def epoch_records(epoch):
      # From (seed, epoch) only; -1 is no example index, so this key is no example's key.
      key = tf.random.experimental.stateless_fold_in(
          tf.stack([tf.constant(seed, tf.int64), epoch]), -1, alg='philox')
      order = tf.random.experimental.stateless_shuffle(tf.range(num_files), seed=_subkey(key, 0))
      files = tf.data.Dataset.from_tensor_slices(tuple(tf.gather(c, order) for c in columns))
      records = files.interleave(self._read, cycle_length=min(num_files, 16), block_length=1,
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      shuffle_seed = tf.random.stateless_uniform([], seed=_subkey(key, 1), minval=None,
                                                 maxval=None, dtype=tf.int64)
      records = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
      return records.take(per_epoch).map(
          lambda record, index: {'record': record, 'index': index, 'epoch': epoch,
                                 'mask': tf.constant(True)})

    first_epoch, offset = divmod(start, dataset.steps_per_epoch)
    elements = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
    # Resume: skipping to `start` reads (and shuffles, but does not decode) the start epoch's
    # earlier examples, and lands on the same batch only for the same process count.
    elements = elements.skip(offset * local)
    ds = map_and_batch(elements, self._preprocess.train, local, self._parallel)
    return _to_train_batches(ds, k)

  def eval(self, dataset, rows) -> Iterator[dict[str, np.ndarray]]:
    self._check_rows(dataset.eval_batch, rows, dataset.eval_rows, 'eval')
    n = len(_local_rows(dataset.eval_batch, rows))
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
    yield from map_and_batch(elements, fn, n, self._parallel).as_numpy_iterator()


# ---------------------------------------------------------------------------------------------
# The data set.

def create(config, *, process_index: int, process_count: int,
           **common: Any) -> input_pipeline.Dataset:
  """The image data set of `config.data`, read as its prepared format allows (module docstring)."""
  d = config.data
  name, tfds_name = d.name, d.tfds_name or d.name
  builder = prepare(tfds_name, d.data_dir, file_format=d.file_format,
                    may_prepare=process_count == 1)
  info = builder.info
  eval_split = d.eval_split or ('validation' if 'validation' in info.splits else 'test')
  if _imagenet_style(name) and d.image_size < 64:
    logging.warning('config.data.image_size=%d for %s (ImageNet models expect 224)', d.image_size,
                    name)
  preprocess = Preprocess(name, info, d.image_size, config.seed)
  fmt = info.file_format
  if fmt == tfds.core.FileFormat.ARRAY_RECORD:
    reader = ArrayRecordReader(builder, preprocess, d.train_split, eval_split,
                               d.num_parallel_calls)
    logging.info('%s (%s): array_record, read by global index; the batch at step s depends only '
                 'on (seed, data set, global batch)', name, info.full_name)
  elif fmt in (None, tfds.core.FileFormat.TFRECORD):
    reader = TFRecordReader(builder, preprocess, d.train_split, eval_split, d.num_parallel_calls,
                            d.shuffle_buffer, process_index, process_count)
    logging.info('%s (%s): tfrecord, streamed per process (%d of %d): the batch order depends on '
                 'the process count; prepare with data.file_format=array_record for global-index '
                 'order', name, info.full_name, process_index, process_count)
  else:
    raise config_lib.ConfigError(
        f'{info.full_name} is stored as {fmt.value}; bigbatch reads array_record and tfrecord: '
        f'prepare it again in another data_dir with config.data.file_format=array_record')
  dataset = input_pipeline.Dataset(
      name=name, num_train=info.splits[d.train_split].num_examples,
      num_eval=info.splits[eval_split].num_examples, image_shape=preprocess.image_shape,
      num_classes=preprocess.num_classes, train_reader=reader.train, eval_reader=reader.eval,
      global_order=isinstance(reader, ArrayRecordReader), process_index=process_index,
      process_count=process_count, **common)
  return input_pipeline.close_at_exit(dataset)


# ---------------------------------------------------------------------------------------------
# A small local data set of random JPEGs, for tests and benchmarks (no download).

class FakeImagesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, num_train: int, num_eval: int, min_size: int, max_size: int,
               num_classes: int, **kwargs):
    super().__init__(version=tfds.core.Version('1.0.0'), **kwargs)
    self.num_train, self.num_eval = num_train, num_eval
    self.min_size, self.max_size, self.num_classes = min_size, max_size, num_classes


class BigbatchFakeImages(tfds.core.GeneratorBasedBuilder):
  """Random JPEGs of varied sizes; example i of a split is generated from (split, i).

  Configs: 'tiny' (40 train / 12 test, 40..80 px; label = index, so a label names its example)
  and 'bench' (320 / 32, about ImageNet's mean size of ~400x350; 1000 classes). Smooth random
  fields plus noise, so the JPEGs are about as large as photographs of the same size.
  """

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
      FakeImagesConfig(name='tiny', num_train=40, num_eval=12, min_size=40, max_size=80,
                       num_classes=40),
      FakeImagesConfig(name='bench', num_train=320, num_eval=32, min_size=330, max_size=420,
                       num_classes=1000),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Random JPEGs for tests and benchmarks.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
        }),
        supervised_keys=('image', 'label'),
        # Records in index order, so record i is example i (and has label i in 'tiny').
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated
    c = self.builder_config
    return {'train': self._generate_examples(1, c.num_train),
            'test': self._generate_examples(2, c.num_eval)}

  def _generate_examples(self, split: int, n: int):
    c = self.builder_config
    for i in range(n):
      rng = np.random.default_rng([split, i])
      h, w = rng.integers(c.min_size, c.max_size + 1, size=2)
      yield i, {'image': fake_image(rng, h, w), 'label': i % c.num_classes}


def fake_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3]: a bilinearly upsampled coarse random field plus pixel noise."""
  coarse = rng.uniform(0, 255, size=(math.ceil(h / 16) + 1, math.ceil(w / 16) + 1, 3))
  ys, xs = np.linspace(0, coarse.shape[0] - 1, h), np.linspace(0, coarse.shape[1] - 1, w)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, coarse.shape[0] - 1), np.minimum(x0 + 1, coarse.shape[1] - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  smooth = ((1 - fy) * ((1 - fx) * coarse[y0][:, x0] + fx * coarse[y0][:, x1]) +
            fy * ((1 - fx) * coarse[y1][:, x0] + fx * coarse[y1][:, x1]))
  return np.clip(smooth + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
