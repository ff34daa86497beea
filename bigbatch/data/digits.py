"""scikit-learn's handwritten digits as a TFDS data set, `bigbatch_digits`, built locally.

The 1797 8x8 images ship inside scikit-learn, so the quickstart and small studies run on a fresh
machine with no download, through the same TFDS path as the real data sets.

Split (fixed, deterministic): sklearn row i goes to 'test' when i % 5 == 0, otherwise to 'train'
(360 test, 1437 train; every class has 26 to 48 test examples). A fixed rule rather than a
seeded random split: it is the same in every scikit-learn version that ships the same rows, and
needs no seed that could drift from the training seed.

Pixels: sklearn's 0..16 counts are stored as uint8 round(value * 255 / 16), so the images look
like ordinary 8-bit images to any TFDS consumer; normalization is the input pipeline's business.

This module imports TensorFlow Datasets (seconds): import it lazily, not from config code.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds

NAME = 'bigbatch_digits'
TEST_EVERY = 5  # sklearn row i is a test example iff i % TEST_EVERY == 0
_LOCK_NAME = f'.{NAME}.lock'


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
        # Records in sklearn row order (sorted by key) rather than TFDS's hash order, so record j
        # of a split is split_indices(split)[j]: traceable back to sklearn.
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


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


@contextlib.contextmanager
def _exclusive_lock(data_dir: str):
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, _LOCK_NAME), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data_dir: str | os.PathLike | None = None) -> BigbatchDigits:
  """Builds the data set under `data_dir` once and returns its builder.

  Safe when several processes (or pytest-xdist workers, or threads) prepare the same directory at
  once: TFDS alone lets the loser fail with FileExistsError. The builder is created *inside* the
  lock, because a builder decides at construction whether the data exists; one created before
  the lock would try to prepare again what the winner just wrote.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  with _exclusive_lock(data_dir):
    builder = BigbatchDigits(data_dir=data_dir)
    builder.download_and_prepare()
  return builder
