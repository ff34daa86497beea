"""Input pipeline: global batches from (seed, step), each process reading its own rows.

The sequence of global batches depends only on (seed, data set, global batch), never on the
number of processes or devices, so a run resumes exactly and a laptop sees the same batches as a
pod:
  steps_per_epoch = num_train // global_batch     (the remainder of each epoch is dropped)
  epoch, offset   = divmod(step, steps_per_epoch)
  perm            = np.random.default_rng([seed, epoch]).permutation(num_train)
  batch(step)     = perm[offset * B:(offset + 1) * B].reshape(k, B // k)
with B = global_batch and k = accumulation_steps. Axis 0 is the microbatch (scanned on device),
axis 1 the examples of one microbatch, split over the mesh 'data' axis; process p builds only the
block of axis 1 its devices hold and `make_global_batches` assembles the global jax.Arrays.

Sources are random access by example index, so any process can build any rows without reading
the others:
  'digits'    sklearn's 8x8 digits through TFDS (bigbatch/data/digits.py), held in memory;
              pixels / 255, standardized with the training split's pixel mean and std.
  'synthetic' example i of a split generated from (SYNTHETIC_SEED, split, i): standard normal
              images, labelled by a fixed random tanh-MLP teacher with balanced classes.
Image data sets ('imagenet2012', 'cifar10', 'mnist': bigbatch/data/images.py) stream from tf.data
instead, through readers: prepared as array_record they are read by global index in exactly this
order; prepared as TFRecord each process streams its own files, an order that depends on the
process count (`Dataset.global_order` is False).

Shape letters: K accumulation steps, M examples per microbatch, N examples, H W C image.

Importing this module costs only numpy; jax is imported where it is used and TensorFlow only when
the digits are loaded, because configs are validated before either is needed.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator
import weakref

import numpy as np

from bigbatch import config_lib

# Fixed seed of the synthetic data (inputs and teacher). Deliberately not config.seed: a study
# that varies the training seed must see the same data set.
SYNTHETIC_SEED = 0x5EED_DA7A

# A source maps int64 example indices [N] of one split to (float32 images [N,H,W,C], int32 [N]).
Source = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# A train reader streams local batches {'image' [K, m, H, W, C], 'label' [K, m]} of `rows` for
# steps start, start + 1, ...: reader(dataset, start, rows). An eval reader yields the padded eval
# batches of `rows`, as `Dataset.eval_batches` documents: reader(dataset, rows).
TrainReader = Callable[[Any, int, Any], Iterator[dict[str, np.ndarray]]]
EvalReader = Callable[[Any, Any], Iterator[dict[str, np.ndarray]]]


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The contiguous block of a batch's example axis that process `process_index` reads.

  Matches a NamedSharding whose 'data' axis lists devices process by process (jax.make_mesh
  does): process p holds examples p*m/P .. (p+1)*m/P.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside 0..{process_count - 1}')
  if batch_size % process_count:
    raise ValueError(f'batch of {batch_size} examples does not split evenly over '
                     f'{process_count} processes; choose a multiple of {process_count}')
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n training examples in `epoch`: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(n)


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  # Every step of an epoch slices the same permutation (1M examples: ~10 ms to draw); a few
  # entries cover the prefetch thread running into the next epoch while the trainer evaluates.
  perm = epoch_permutation(seed, epoch, n)
  perm.flags.writeable = False  # shared between callers
  return perm


@dataclasses.dataclass(kw_only=True, eq=False)
class Dataset:
  """A training split and an evaluation split, batched as the trainer needs.

  `train_batch(step)` and `eval_batches()` are numpy; `make_global_batches` and
  `make_global_eval_batches` turn this process's rows into global jax.Arrays.

  Each split comes from a random-access `Source` (indexed per batch) or a reader (a stream). A
  streamed `train_batch` is fastest for steps in increasing order, as the trainer asks for them;
  any other step starts a new stream there (for TFRecord, by reading up to it).
  """
  num_train: int
  num_eval: int
  image_shape: tuple[int, int, int]
  num_classes: int
  global_batch: int
  accumulation_steps: int
  eval_batch: int
  seed: int
  train_source: Source | None = dataclasses.field(default=None, repr=False)
  eval_source: Source | None = dataclasses.field(default=None, repr=False)
  train_reader: TrainReader | None = dataclasses.field(default=None, repr=False)
  eval_reader: EvalReader | None = dataclasses.field(default=None, repr=False)
  # False when batches are not `train_indices` of the global order (TFRecord read per process).
  global_order: bool = True
  name: str = ''
  process_index: int = 0
  process_count: int = 1
  prefetch: int = 2  # config.data.prefetch, for the trainer's Prefetcher
  # Open train streams by rows: [next step, iterator]. Guarded by _lock, since the Prefetcher
  # thread reads them while the main thread may ask for a batch too.
  _streams: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False,
                                            repr=False)

  def __post_init__(self):
    b, k = self.global_batch, self.accumulation_steps
    if b <= 0 or k <= 0 or b % k:
      raise config_lib.ConfigError(
          f'config.global_batch={b} is not a positive multiple of config.accumulation_steps={k}; '
          f'choose a global_batch divisible by {k}')
    if self.num_train < b:
      raise config_lib.ConfigError(
          f'config.global_batch={b} is larger than the {self.num_train} training examples of '
          f'{self.name or "the data set"}, so an epoch has no full batch; lower global_batch')
    if self.eval_batch <= 0:
      raise config_lib.ConfigError(f'config.eval_batch={self.eval_batch}: must be positive')
    for split, source, reader in (('train', self.train_source, self.train_reader),
                                  ('eval', self.eval_source, self.eval_reader)):
      if (source is None) == (reader is None):
        raise ValueError(f'give the {split} split a source or a reader (exactly one)')
    # Fail here, not at the first step, when the processes cannot split the batches evenly.
    process_rows(self.microbatch, self.process_index, self.process_count)
    process_rows(self.eval_batch, self.process_index, self.process_count)

  @property
  def microbatch(self) -> int:
    """Examples per microbatch (axis 1 of a training batch), over all processes."""
    return self.global_batch // self.accumulation_steps

  @property
  def steps_per_epoch(self) -> int:
    return self.num_train // self.global_batch

  @property
  def num_eval_steps(self) -> int:
    """Eval batches per pass: the same on every process, the last one padded."""
    return math.ceil(self.num_eval / self.eval_batch)

  @property
  def train_rows(self) -> slice:
    """This process's block of axis 1 of each training batch."""
    return process_rows(self.microbatch, self.process_index, self.process_count)

  @property
  def eval_rows(self) -> slice:
    """This process's block of each eval batch."""
    return process_rows(self.eval_batch, self.process_index, self.process_count)

  def train_indices(self, step: int) -> np.ndarray:
    """Global example indices [K, M] of the global batch at `step` (all processes' rows)."""
    if step < 0:
      raise ValueError(f'step={step} must be >= 0')
    if not self.global_order:
      raise ValueError(f'{self.name} is read per process (TFRecord), not in global-index order; '
                       'prepare it with config.data.file_format=array_record for that')
    epoch, offset = divmod(step, self.steps_per_epoch)
    perm = _cached_permutation(self.seed, epoch, self.num_train)
    b = self.global_batch
    return perm[offset * b:(offset + 1) * b].reshape(self.accumulation_steps, -1).copy()

  def train_batch(self, step: int, rows: slice | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{'image': float32 [K, m, H, W, C], 'label': int32 [K, m]} for `rows` of axis 1.

    `rows=None` gives the whole global batch (m = M); a process passes `self.train_rows`.
    """
    if self.train_reader is not None:
      return self._streamed_batch(step, rows)
    idx_KxM = self.train_indices(step)
    if rows is not None:
      idx_KxM = idx_KxM[:, rows]
    k, m = idx_KxM.shape
    images, labels = self.train_source(idx_KxM.reshape(-1))
    return {'image': images.reshape(k, m, *self.image_shape), 'label': labels.reshape(k, m)}

  def _streamed_batch(self, step: int, rows) -> dict[str, np.ndarray]:
    if step < 0:
      raise ValueError(f'step={step} must be >= 0')
    key = _rows_key(rows)
    with self._lock:
      stream = self._streams.get(key)
      if stream is None or stream[0] != step:
        # Another step than the next one: a new stream from there. At most two open streams (the
        # trainer's rows and, in tests, the whole batch), each holding tf.data buffers.
        if stream is None and len(self._streams) >= 2:
          self._streams.pop(next(iter(self._streams)))
        stream = self._streams[key] = [step, self.train_reader(self, step, rows)]
      batch = next(stream[1])
      stream[0] += 1
    return batch

  def close(self):
    """Drops the open train streams (and their tf.data buffers); a later batch starts anew."""
    with self._lock:
      self._streams.clear()

  def eval_batches(self, rows: slice | np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The eval split in order, in `num_eval_steps` batches of `eval_batch`, padded and masked.

    Yields {'image' [n, H, W, C], 'label' [n], 'mask' bool [n]} for `rows` of each batch (all
    rows when None; a process passes `self.eval_rows`). Padding has mask False, a zero image and
    label 0; every process gets the same number of batches, so collectives stay in step.
    """
    if self.eval_reader is not None:
      yield from self.eval_reader(self, rows)
      return
    e = self.eval_batch
    for b in range(self.num_eval_steps):
      pos = np.arange(b * e, (b + 1) * e)
      if rows is not None:
        pos = pos[rows]
      mask = pos < self.num_eval
      # Padding reads example 0 and blanks it: simpler than a ragged fetch, and only the last
      # batch has any.
      images, labels = self.eval_source(np.where(mask, pos, 0))
      yield {
          'image': np.where(mask.reshape(-1, 1, 1, 1), images, np.float32(0)),
          'label': np.where(mask, labels, np.int32(0)),
          'mask': mask,
      }


def _rows_key(rows) -> Any:
  if rows is None or isinstance(rows, slice):
    return rows if rows is None else (rows.start, rows.stop, rows.step)
  return tuple(np.asarray(rows).reshape(-1).tolist())


IMAGE_DATASETS = ('imagenet2012', 'cifar10', 'mnist')  # bigbatch/data/images.py

# tf.data iterators over Python generators that are still open when the interpreter shuts down
# log an error each ("Python interpreter state is not initialized"): the readers that hold them
# register their Dataset here, and it is closed before that.
_OPEN_DATASETS = weakref.WeakSet()


def close_at_exit(dataset: 'Dataset') -> 'Dataset':
  _OPEN_DATASETS.add(dataset)
  return dataset


@atexit.register
def _close_open_datasets():
  for dataset in list(_OPEN_DATASETS):
    dataset.close()


def create(config, *, process_index: int | None = None,
           process_count: int | None = None) -> Dataset:
  """The data set named by config.data.name, batched per `config`.

  'digits' | 'synthetic' here; 'imagenet2012' | 'cifar10' | 'mnist' through TFDS in
  bigbatch/data/images.py (imports TensorFlow).

  process_index / process_count default to jax.process_index() / jax.process_count(); tests pass
  them to simulate several processes in one.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  common = dict(global_batch=config.global_batch, accumulation_steps=config.accumulation_steps,
                eval_batch=config.eval_batch, seed=config.seed, process_index=process_index,
                process_count=process_count, prefetch=config.data.prefetch)
  name = config.data.name
  if name == 'digits':
    data_dir = config.data.data_dir
    train, test = _load_digits(os.path.abspath(data_dir) if data_dir else None)
    return Dataset(name='digits', num_train=len(train.labels), num_eval=len(test.labels),
                   image_shape=train.images.shape[1:], num_classes=10,
                   train_source=train, eval_source=test, **common)
  if name in IMAGE_DATASETS:
    from bigbatch.data import images  # pylint: disable=g-import-not-at-top  # imports TF (seconds)
    return images.create(config, **common)
  if name.startswith('face_'):
    from bigbatch.data import faces  # pylint: disable=g-import-not-at-top
    return faces.create(config, **common)
  if name == 'synthetic':
    d = config.data
    image_shape = (d.image_size, d.image_size, d.channels)
    teacher = _teacher(image_shape, d.teacher_width, d.num_classes)
    return Dataset(name='synthetic', num_train=d.num_train, num_eval=d.num_eval,
                   image_shape=image_shape, num_classes=d.num_classes,
                   train_source=SyntheticSource(_SPLIT_TRAIN, image_shape, teacher),
                   eval_source=SyntheticSource(_SPLIT_EVAL, image_shape, teacher), **common)
  raise config_lib.ConfigError(
      f'config.data.name={name!r} is unknown; choose one of {", ".join(config_lib.DATASETS)}')


# ---------------------------------------------------------------------------------------------
# digits: the whole split in memory, indexed directly.

@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory: images float32 [N, H, W, C], labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __call__(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[idx_N], self.labels[idx_N]


@functools.lru_cache(maxsize=2)
def _load_digits(data_dir: str | None) -> tuple[ArraySource, ArraySource]:
  """(train, test) digits, normalized. Cached: tests and restarts in one process load once."""
  from bigbatch.data import digits  # pylint: disable=g-import-not-at-top  # imports TF (seconds)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = digits.prepare(data_dir)
  raw = {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
         for split in ('train', 'test')}
  # Normalization: x / 255, then standardized with the mean and std of all training pixels (one
  # scalar each, a fixed function of the fixed split, so the same on every process and resume).
  # The digits are mostly background (mean ~0.30, std ~0.38 after /255); standardized, they are
  # on the scale of the synthetic data, so the same learning rates and inits suit both.
  train_pixels = raw['train']['image'].astype(np.float64) / 255.0
  mean, std = train_pixels.mean(), train_pixels.std()

  def source(split):
    images = ((raw[split]['image'].astype(np.float64) / 255.0 - mean) / std).astype(np.float32)
    images.flags.writeable = False  # shared by every Dataset built from this cache entry
    labels = raw[split]['label'].astype(np.int32)
    labels.flags.writeable = False
    return ArraySource(images, labels)

  return source('train'), source('test')


# ---------------------------------------------------------------------------------------------
# synthetic: example i of a split is generated from (SYNTHETIC_SEED, split, i) alone.

_SPLIT_TRAIN, _SPLIT_EVAL, _SPLIT_CALIBRATION = 1, 2, 3
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: consecutive counters land far apart
_GEN_BLOCK = 1 << 14


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer over uint64 arrays (wrapping arithmetic): a counter -> 64 random bits.

  A counter-based hash instead of a seeded generator per example: one vectorized pass makes a
  whole batch, whichever indices it holds (4096 8x8 examples in ~2 ms; np.random.Philox per
  example would take seconds).
  """
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _split_key(split: int) -> np.uint64:
  z = np.array([(SYNTHETIC_SEED * 16 + split) * _GOLDEN & _MASK64], np.uint64)
  return _splitmix64(z)[0]


def synthetic_inputs(split: int, idx_N: np.ndarray, dim: int) -> np.ndarray:
  """Standard normal float32 [N, dim]; row n depends only on (split, idx_N[n])."""
  half = (dim + 1) // 2  # Box-Muller makes a pair of normals from one 64-bit hash
  idx = np.asarray(idx_N, np.uint64).reshape(-1)
  out = np.empty((len(idx), 2 * half), np.float32)
  key, pair = _split_key(split), np.arange(half, dtype=np.uint64)
  # Blocks of ~16k pairs keep the uint64 temporaries in cache: 3-4x faster than whole batches
  # once examples are large (4096 x 32x32x3: ~55 ms instead of ~210 ms).
  rows = max(1, _GEN_BLOCK // half)
  for start in range(0, len(idx), rows):
    counter = idx[start:start + rows].reshape(-1, 1) * np.uint64(half) + pair
    bits = _splitmix64(counter * np.uint64(_GOLDEN) + key)
    # Two 24-bit uniforms (exact in float32; u1 in (0, 1] keeps the log finite), in float32
    # because numpy's float64 log/cos are ~20x slower. Tails are cut at |x| < 5.8.
    u1 = ((bits >> np.uint64(40)).astype(np.float32) + np.float32(1)) * np.float32(2.0**-24)
    u2 = (bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    radius, angle = np.sqrt(np.float32(-2) * np.log(u1)), np.float32(2 * np.pi) * u2
    pairs = out[start:start + rows].reshape(-1, half, 2)
    np.multiply(radius, np.cos(angle), out=pairs[..., 0])
    np.multiply(radius, np.sin(angle), out=pairs[..., 1])
  return out[:, :dim]


# OpenBLAS runs a gemm on one thread when m*n*k <= GEMM_MULTITHREAD_THRESHOLD (4) * 65536.
_BLAS_SINGLE_THREAD_MNK = 4 * 65536


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A fixed random 2-layer tanh MLP; label = argmax(tanh(x @ w1) @ w2 - offset)."""
  w1: np.ndarray  # [D, width]
  w2: np.ndarray  # [width, classes]
  offset: np.ndarray  # [classes]

  def logits(self, x_NxD: np.ndarray) -> np.ndarray:
    # BLAS rounds a row differently depending on how many rows share the call (M=1 takes another
    # kernel than M=4096), which could flip a near-tie label with the batch an example lands in.
    # Fixed blocks of rows (a stacked matmul: one small gemm per block) give every row the same
    # arithmetic wherever it sits.
    n, dim = x_NxD.shape
    rows = self.block_rows
    x = np.concatenate([x_NxD.astype(np.float64), np.zeros((-n % rows, dim))])
    h = np.tanh(np.matmul(x.reshape(-1, rows, dim), self.w1))
    return np.matmul(h, self.w2).reshape(-1, self.w2.shape[1])[:n]

  @property
  def block_rows(self) -> int:
    # As many rows as keep each gemm on one OpenBLAS thread: its threads spin against the trainer for the cores, 1 ms -> 120 ms per 4096 8x8 examples on a busy
    # 2-core machine. A power of two from the teacher's shape alone, so fixed per data set.
    per_row = self.w1.shape[0] * self.w1.shape[1]
    return 1 << min(8, max(0, (_BLAS_SINGLE_THREAD_MNK // per_row).bit_length() - 1))

  def labels(self, x_NxD: np.ndarray) -> np.ndarray:
    return np.argmax(self.logits(x_NxD) - self.offset, axis=1).astype(np.int32)


@functools.lru_cache(maxsize=4)
def _teacher(image_shape: tuple[int, int, int], width: int, num_classes: int) -> Teacher:
  dim = math.prod(image_shape)
  rng = np.random.default_rng([SYNTHETIC_SEED, dim, width, num_classes])
  # Unit-variance pre-activations, so tanh is neither linear nor saturated.
  w1 = rng.standard_normal((dim, width)) / math.sqrt(dim)
  w2 = rng.standard_normal((width, num_classes)) / math.sqrt(width)
  # A raw random teacher gives some classes 4% of the data and others 15% (with 100 classes and
  # a narrow teacher, some never win). Per-class offsets, fitted on a fixed calibration sample,
  # even the classes out, so accuracy means the same for every shape of the data.
  n = max(8192, 16 * num_classes)
  logits = Teacher(w1, w2, np.zeros(num_classes)).logits(
      synthetic_inputs(_SPLIT_CALIBRATION, np.arange(n), dim))
  offset, scale = np.zeros(num_classes), logits.std()
  for t in range(50):
    freq = np.bincount(np.argmax(logits - offset, axis=1), minlength=num_classes) / n
    offset += 0.1 * scale * (freq * num_classes - 1.0) / math.sqrt(1.0 + t)
  return Teacher(w1, w2, offset)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSource:
  """One split of the synthetic data: random normal images labelled by the teacher.

  4096 examples take ~3 ms at 8x8x1 and ~170 ms at 32x32x3 (one busy core), on the prefetch
  thread.
  """
  split: int
  image_shape: tuple[int, int, int]
  teacher: Teacher

  def __call__(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x_NxD = synthetic_inputs(self.split, idx_N, math.prod(self.image_shape))
    return x_NxD.reshape(-1, *self.image_shape), self.teacher.labels(x_NxD)


# ---------------------------------------------------------------------------------------------
# Global arrays and prefetching.

def local_rows(sharding, global_shape: tuple[int, ...], axis: int) -> slice:
  """The block of `axis` that this process's devices hold under `sharding` (must be contiguous)."""
  spans = {(s.start or 0, global_shape[axis] if s.stop is None else s.stop)
           for s in (idx[axis] for idx in sharding.addressable_devices_indices_map(
               global_shape).values())}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(f'this process holds non-contiguous rows {sorted(spans)} of axis {axis}; '
                     'order the mesh devices by process (jax.make_mesh does)')
  return slice(start, stop)


def make_global_batches(dataset: Dataset, step: int, sharding,
                        rows: slice | np.ndarray | None = None) -> dict[str, Any]:
  """The global batch at `step` as global jax.Arrays [K, M, ...] laid out by `sharding`.

  `sharding` is a NamedSharding with PartitionSpec(None, 'data'); this process builds only
  `rows` of axis 1 (default: the rows its devices hold under `sharding`, which is
  `dataset.train_rows` for a mesh ordered by process).
  """
  import jax  # pylint: disable=g-import-not-at-top
  k, m = dataset.accumulation_steps, dataset.microbatch
  if rows is None:
    rows = local_rows(sharding, (k, m), axis=1)
  local = dataset.train_batch(step, rows)
  return {name: jax.make_array_from_process_local_data(sharding, x, (k, m) + x.shape[2:])
          for name, x in local.items()}


def make_global_eval_batches(dataset: Dataset, sharding,
                             rows: slice | np.ndarray | None = None) -> Iterator[dict[str, Any]]:
  """`dataset.eval_batches` as global jax.Arrays [eval_batch, ...], PartitionSpec('data')."""
  import jax  # pylint: disable=g-import-not-at-top
  e = dataset.eval_batch
  if rows is None:
    rows = local_rows(sharding, (e,), axis=0)
  for local in dataset.eval_batches(rows):
    yield {name: jax.make_array_from_process_local_data(sharding, x, (e,) + x.shape[1:])
           for name, x in local.items()}


class _Raised:

  def __init__(self, error: BaseException):
    self.error = error


_DONE = object()


class Prefetcher:
  """Yields (step, batch_fn(step)) for step in [start, end), computed `prefetch` steps ahead.

  The batches are built on a background thread while the devices run the previous steps, e.g.
  `Prefetcher(functools.partial(make_global_batches, ds, sharding=s), start, end, ds.prefetch)`.
  An exception in batch_fn is re-raised by the consumer at the step it belongs to.
  `wait_seconds` is the total time the consumer spent waiting for a batch: time the training loop
  was input-bound. prefetch=0 builds each batch in the consumer's thread (and counts it all).
  Close it (or use it as a context manager) to stop the thread before `end`.
  """

  def __init__(self, batch_fn: Callable[[int], Any], start: int, end: int, prefetch: int = 2):
    self.wait_seconds = 0.0
    self._batch_fn = batch_fn
    self._next_step, self._end = start, end
    self._finished = start >= end
    self._stop = threading.Event()
    self._thread = None
    if prefetch > 0 and not self._finished:
      self._queue = queue.Queue(maxsize=prefetch)
      # A daemon, so a trainer that dies without close() does not hang at interpreter exit.
      self._thread = threading.Thread(target=self._work, args=(start, end), daemon=True,
                                      name='bigbatch-prefetch')
      self._thread.start()

  def _work(self, start: int, end: int):
    try:
      for step in range(start, end):
        if self._stop.is_set() or not self._put((step, self._batch_fn(step))):
          return
    except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
      self._put(_Raised(e))
      return
    self._put(_DONE)

  def _put(self, item) -> bool:
    # Blocks while the queue is full, but wakes to notice close().
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self):
    return self

  def __next__(self) -> tuple[int, Any]:
    if self._finished:
      raise StopIteration
    t0 = time.perf_counter()
    try:
      if self._thread is None:
        step = self._next_step
        item = (step, self._batch_fn(step))
        self._next_step += 1
        self._finished = self._next_step >= self._end
        return item
      item = self._queue.get()
    finally:
      self.wait_seconds += time.perf_counter() - t0
    if item is _DONE:
      self._finished = True
      raise StopIteration
    if isinstance(item, _Raised):
      self.close()
      raise item.error
    return item

  def close(self):
    """Stops the background thread and drops the batches it prepared. Idempotent."""
    self._finished = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc):
    self.close()
