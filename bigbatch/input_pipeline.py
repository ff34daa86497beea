"""Input pipeline: global batches from (seed, step), each process reading its own rows.

The batch at a step depends only on (seed, data set, global batch), never on the number of
processes or devices: a run resumes exactly and a laptop sees a pod's batches (docs/design.md,
"Data order does not depend on the process count"). Batches are [K, M, ...]; process p builds
only its block of axis 1, and `make_global_batches` assembles the global jax.Arrays. Sources
and readers come from bigbatch/data/. This module knows no data set: it imports neither
bigbatch.data nor TensorFlow, and jax only where it is used.

Shape letters: K accumulation steps, M examples per microbatch, N examples, H W C image.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import queue
import threading
import time
from typing import Any, Callable, Iterator
import weakref

import numpy as np

from bigbatch import fields

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
      raise fields.ConfigError(
          f'config.global_batch={b} is not a positive multiple of config.accumulation_steps={k}; '
          f'choose a global_batch divisible by {k}')
    if self.num_train < b:
      raise fields.ConfigError(
          f'config.global_batch={b} is larger than the {self.num_train} training examples of '
          f'{self.name or "the data set"}, so an epoch has no full batch; lower global_batch')
    if self.eval_batch <= 0:
      raise fields.ConfigError(f'config.eval_batch={self.eval_batch}: must be positive')
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


# tf.data iterators over Python generators that are still open when the interpreter shuts down
# log an error each ("Python interpreter state is not initialized"): the readers that hold them
# register their Dataset here, and it is closed before that.
_OPEN_DATASETS = weakref.WeakSet()


def close_at_exit(dataset: 'Dataset') -> 'Dataset':
  """Registers `dataset` to be closed when the interpreter exits; returns it."""
  _OPEN_DATASETS.add(dataset)
  return dataset


@atexit.register
def _close_open_datasets():
  for dataset in list(_OPEN_DATASETS):
    dataset.close()


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
