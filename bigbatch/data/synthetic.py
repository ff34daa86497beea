"""'synthetic': a generated classification set of any size that costs no memory.

Example i of a split is generated from (SYNTHETIC_SEED, split, i) alone: standard normal images
[S, S, C] (S = data.image_size, C = data.channels), labelled by a fixed random tanh-MLP teacher
with balanced classes. Any process builds any rows, and a model can learn the labels.

Numpy only.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import common

SPLIT_TRAIN, SPLIT_EVAL, SPLIT_CALIBRATION = 1, 2, 3

# OpenBLAS runs a gemm on one thread when m*n*k <= GEMM_MULTITHREAD_THRESHOLD (4) * 65536.
_BLAS_SINGLE_THREAD_MNK = 4 * 65536


def defaults() -> dict[str, Any]:
  """The config.data fields only this source reads (num_eval and image_size are shared)."""
  return dict(
      num_train=1_000_000,
      channels=1,
      num_classes=10,
      teacher_width=64,
  )


def validate(config) -> None:
  for path in ('data.num_train', 'data.num_eval', 'data.image_size', 'data.channels',
               'data.num_classes', 'data.teacher_width'):
    fields.positive(config, path)


def facts(config) -> common.DataFacts:
  """The set's sizes and shape: the config's own numbers."""
  d = config.data
  return common.DataFacts(d.num_train, d.num_eval, (d.image_size, d.image_size, d.channels),
                          d.num_classes, 'generated (config.data)')


def runlocal(config) -> None:
  """The CPU smoke run's data (config_lib.runlocal; it also stands in for the sets without a
  runlocal of their own): 16x16x3 images of 10 classes, 4096 to train on, 64 to evaluate."""
  d = config.data
  d.image_size = 16
  d.channels = 3
  d.num_classes = 10
  d.num_train = 4096
  d.num_eval = 64


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
    # As many rows as keep each gemm on one OpenBLAS thread: its threads spin against the
    # trainer for the cores, 1 ms -> 120 ms per 4096 8x8 examples on a busy 2-core machine. A
    # power of two from the teacher's shape alone, so fixed per data set.
    per_row = self.w1.shape[0] * self.w1.shape[1]
    return 1 << min(8, max(0, (_BLAS_SINGLE_THREAD_MNK // per_row).bit_length() - 1))

  def labels(self, x_NxD: np.ndarray) -> np.ndarray:
    return np.argmax(self.logits(x_NxD) - self.offset, axis=1).astype(np.int32)


@functools.lru_cache(maxsize=4)
def teacher(image_shape: tuple[int, int, int], width: int, num_classes: int) -> Teacher:
  """The teacher of one data shape (cached: drawing and calibrating it takes ~0.1 s)."""
  dim = math.prod(image_shape)
  rng = np.random.default_rng([common.SYNTHETIC_SEED, dim, width, num_classes])
  # Unit-variance pre-activations, so tanh is neither linear nor saturated.
  w1 = rng.standard_normal((dim, width)) / math.sqrt(dim)
  w2 = rng.standard_normal((width, num_classes)) / math.sqrt(width)
  # A raw random teacher gives some classes 4% of the data and others 15% (with 100 classes and
  # a narrow teacher, some never win). Per-class offsets, fitted on a fixed calibration sample,
  # even the classes out, so accuracy means the same for every shape of the data.
  n = max(8192, 16 * num_classes)
  logits = Teacher(w1, w2, np.zeros(num_classes)).logits(
      common.synthetic_inputs(SPLIT_CALIBRATION, np.arange(n), dim))
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
    x_NxD = common.synthetic_inputs(self.split, idx_N, math.prod(self.image_shape))
    return x_NxD.reshape(-1, *self.image_shape), self.teacher.labels(x_NxD)


def create(config, **common_args: Any) -> input_pipeline.Dataset:
  """The synthetic data set of config.data; `common_args` are the Dataset's batching fields."""
  d = config.data
  image_shape = (d.image_size, d.image_size, d.channels)
  t = teacher(image_shape, d.teacher_width, d.num_classes)
  return input_pipeline.Dataset(
      name='synthetic', num_train=d.num_train, num_eval=d.num_eval, image_shape=image_shape,
      num_classes=d.num_classes, train_source=SyntheticSource(SPLIT_TRAIN, image_shape, t),
      eval_source=SyntheticSource(SPLIT_EVAL, image_shape, t), **common_args)
