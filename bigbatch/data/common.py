"""Helpers every data source shares: what a source says about its data before reading it
(DataFacts), the counter hash, file locks, and the tf.data plumbing.

Numpy only at import: TensorFlow (seconds to import) is imported inside `quiet_tf` and the
helpers that call it, so the registry (bigbatch/data/__init__.py) and the numpy-only sources stay
light for config validation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from typing import Any, Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataFacts:
  """What a run needs to know about its data before reading it (a source's `facts`): sizes of
  the training and evaluation splits, the image shape [H, W, C] and the class count; None where
  unknown without reading or preparing the data."""
  num_train: int | None
  num_eval: int | None
  image_shape: tuple[int, ...] | None
  num_classes: int | None
  source: str  # where the numbers come from, said in main --print_derived's output

  @property
  def known(self) -> bool:
    return None not in (self.num_train, self.image_shape, self.num_classes)


class DataError(RuntimeError):
  """A data set that cannot be read (missing, corrupt or inconsistent files), raised by a source
  whose message already names the files, where in them (record, byte offset) and the fix: one
  line, reported as it is (bigbatch/main.py: exit 6)."""


# Fixed seed of every generated data set (inputs, teachers, face identities). Deliberately not
# config.seed: a study that varies the training seed must see the same data set.
SYNTHETIC_SEED = 0x5EED_DA7A

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: consecutive counters land far apart
_GEN_BLOCK = 1 << 14


def splitmix64(z: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer over uint64 arrays (wrapping arithmetic): a counter -> 64 random bits.

  A counter-based hash instead of a seeded generator per example: one vectorized pass makes a
  whole batch, whichever indices it holds (4096 8x8 examples in ~2 ms; np.random.Philox per
  example would take seconds).
  """
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def hash_key(*words: int) -> np.uint64:
  """One 64-bit key from small non-negative integers (e.g. seed and epoch, or seed and split)."""
  z = 0
  for word in words:
    z = ((z << 32) | (word & 0xFFFFFFFF)) & MASK64
  return splitmix64(np.array([z * GOLDEN & MASK64], np.uint64))[0]


def hash_bits(key: np.uint64, idx_N: np.ndarray) -> np.ndarray:
  """uint64 [N] random bits of counters idx_N under `key`: element n depends on (key, idx_N[n])."""
  return splitmix64(np.asarray(idx_N, np.uint64) * np.uint64(GOLDEN) + np.uint64(key))


def _split_key(split: int) -> np.uint64:
  z = np.array([(SYNTHETIC_SEED * 16 + split) * GOLDEN & MASK64], np.uint64)
  return splitmix64(z)[0]


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
    bits = splitmix64(counter * np.uint64(GOLDEN) + key)
    # Two 24-bit uniforms (exact in float32; u1 in (0, 1] keeps the log finite), in float32
    # because numpy's float64 log/cos are ~20x slower. Tails are cut at |x| < 5.8.
    u1 = ((bits >> np.uint64(40)).astype(np.float32) + np.float32(1)) * np.float32(2.0**-24)
    u2 = (bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    radius, angle = np.sqrt(np.float32(-2) * np.log(u1)), np.float32(2 * np.pi) * u2
    pairs = out[start:start + rows].reshape(-1, half, 2)
    np.multiply(radius, np.cos(angle), out=pairs[..., 0])
    np.multiply(radius, np.sin(angle), out=pairs[..., 1])
  return out[:, :dim]


# ---------------------------------------------------------------------------------------------
# Preparing data on disk.

@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike, name: str = ''):
  """Holds an exclusive lock named `name` on local `directory` (created if missing).

  Processes (or test workers, or threads) that prepare the same directory take turns, so one
  prepares and the others find the result. flock is released when the file closes, also if the
  process dies, so a crashed preparation never leaves a stale lock behind.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  lock_name = f'.{name.replace("/", "_")}.lock' if name else '.lock'
  with open(os.path.join(directory, lock_name), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def default_tfds_dir() -> str:
  """$TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def is_local(path: str | os.PathLike) -> bool:
  return '://' not in os.fspath(path)


# ---------------------------------------------------------------------------------------------
# tf.data.

def quiet_tf():
  """The tensorflow module, with its GPUs hidden: JAX owns the accelerators, TF here only runs
  input pipelines, and left alone a GPU build of TF would reserve all GPU memory at its first op.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # seconds: only when reading
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialized its devices (someone used it first): leave them
    pass
  return tf


def parallelism(num_parallel_calls: int) -> int:
  """config.data.num_parallel_calls as tf.data takes it (-1: AUTOTUNE)."""
  tf = quiet_tf()
  return tf.data.AUTOTUNE if num_parallel_calls == -1 else num_parallel_calls


def deterministic(ds):
  """`ds` with deterministic (order-preserving) outputs, whatever the global tf.data default."""
  tf = quiet_tf()
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def map_and_batch(elements, fn: Callable, batch: int, parallel: int):
  """Parallel, order-preserving `fn` over tf.data `elements`, in batches of `batch`, one ahead.

  The prefetch keeps the next batch in the making while the trainer's Prefetcher thread turns
  this one into global arrays; the parallel map keeps every core decoding.
  """
  ds = elements.map(fn, num_parallel_calls=parallelism(parallel), deterministic=True)
  # Batching copies every example once more (a 64 x 224x224x3 float32 batch is 38 MB): in
  # parallel too, so that the copy is not a serial stage.
  ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=parallelism(parallel),
                deterministic=True)
  return deterministic(ds.prefetch(1))


def blocks_dataset(blocks: Callable[[], Iterator[Any]], signature: Any):
  """tf.data elements from a Python generator of blocks (arrays with a leading block axis).

  Python yields one block per step (a generator call per element would cost more than fetching
  it); unbatch hands the elements to the parallel map one by one.
  """
  tf = quiet_tf()
  return tf.data.Dataset.from_generator(blocks, output_signature=signature).unbatch()
