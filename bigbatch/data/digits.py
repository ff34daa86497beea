"""scikit-learn's handwritten digits as a TFDS data set, `bigbatch_digits`, built locally, and
the data set 'digits' (each split held in memory, standardized with the training split's
statistics): the quickstart and small studies run on a fresh machine with no download.

The fixed train/test split rule and the pixel encoding are in docs/design.md, "Sources and
readers". Light at import: TensorFlow Datasets is imported when the digits are built or read.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from bigbatch import input_pipeline
from bigbatch.data import common

NAME = 'bigbatch_digits'
TEST_EVERY = 5  # sklearn row i is a test example iff i % TEST_EVERY == 0


def split_indices(split: str, n: int) -> np.ndarray:
  """sklearn row indices of `split` ('train' | 'test'), in the order the split stores them."""
  rows = np.arange(n)
  if split == 'test':
    return rows[rows % TEST_EVERY == 0]
  if split == 'train':
    return rows[rows % TEST_EVERY != 0]
  raise ValueError(f'unknown split {split!r}; choose train or test')


def load_sklearn() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as (uint8 images [N, 8, 8, 1] scaled to 0..255, int64 labels [N])."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def prepared_dir(config) -> str:
  """Where the prepared TFDS files are: derived data, rebuilt when deleted."""
  return config.data.data_dir or common.default_tfds_dir()


def facts(config) -> common.DataFacts:
  """The splits' sizes by the split rule over the rows scikit-learn ships (read, not built)."""
  del config
  n = len(load_sklearn()[1])
  return common.DataFacts(len(split_indices('train', n)), len(split_indices('test', n)),
                          (8, 8, 1), 10,
                          'scikit-learn digits (the split rule of bigbatch/data/digits.py)')


@functools.cache
def builder_class():
  """The TFDS builder `bigbatch_digits`, defined (and so registered with TFDS) on first use."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (seconds)

  class BigbatchDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 10 classes."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release: test = every 5th sklearn row.'}

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
          description=__doc__,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(8, 8, 1)),
              'label': tfds.features.ClassLabel(num_classes=10),
          }),
          supervised_keys=('image', 'label'),
          # Records in sklearn row order (sorted by key) rather than TFDS's hash order, so
          # record j of a split is split_indices(split)[j]: traceable back to sklearn.
          disable_shuffling=True,
          homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # the data ships with scikit-learn
      return {split: self._generate_examples(split) for split in ('train', 'test')}

    def _generate_examples(self, split):
      images, labels = load_sklearn()
      for i in split_indices(split, len(labels)):
        yield int(i), {'image': images[i], 'label': int(labels[i])}

  return BigbatchDigits


def prepare(data_dir: str | os.PathLike | None = None):
  """Builds the data set under `data_dir` once and returns its builder.

  Safe when several processes (or pytest-xdist workers, or threads) prepare the same directory at
  once: TFDS alone lets the loser fail with FileExistsError. The builder is created *inside* the
  lock, because a builder decides at construction whether the data exists; one created before
  the lock would try to prepare again what the winner just wrote.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (seconds)
  data_dir = os.fspath(data_dir) if data_dir is not None else common.default_tfds_dir()
  with common.exclusive_lock(data_dir, NAME):
    builder = builder_class()(data_dir=data_dir)
    # A one-second build of 1,797 examples: TFDS's progress bars would only put noise on stderr,
    # where the run's one-line errors go (and on a fresh machine, before the first error line).
    tfds.display_progress_bar(False)
    builder.download_and_prepare()
  return builder


# ---------------------------------------------------------------------------------------------
# The data set: the whole split in memory, indexed directly.

@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory: images float32 [N, H, W, C], labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __call__(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[idx_N], self.labels[idx_N]


@functools.lru_cache(maxsize=2)
def load(data_dir: str | None) -> tuple[ArraySource, ArraySource]:
  """(train, test) digits, normalized. Cached: tests and restarts in one process load once."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (seconds)
  builder = prepare(data_dir)
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


def create(config, **common_args: Any) -> input_pipeline.Dataset:
  """The digits under config.data.data_dir (built there first if needed)."""
  data_dir = config.data.data_dir
  train, test = load(os.path.abspath(data_dir) if data_dir else None)
  return input_pipeline.Dataset(name='digits', num_train=len(train.labels),
                                num_eval=len(test.labels), image_shape=train.images.shape[1:],
                                num_classes=10, train_source=train, eval_source=test,
                                **common_args)
