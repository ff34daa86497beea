"""A data source written outside bigbatch, in one file: Gaussian blobs, one per class.

Example i of a split has label i % data.blob_classes and image center[label] + data.blob_spread *
noise, of shape [S, S, 1] (S = data.image_size); the centers and the noise are functions of
(split, i) alone, so any process builds any rows. Nothing in bigbatch names it:
tests/test_add_a_file.py registers it with `bigbatch.data.register`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from bigbatch import data
from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import common

SPLIT_TRAIN, SPLIT_EVAL, SPLIT_CENTERS = 11, 12, 13


def defaults() -> dict[str, Any]:
  """The config.data fields only this source reads (num_eval and image_size are shared)."""
  return {'blob_train': 512, 'blob_classes': 4, 'blob_spread': 0.5}


def validate(config) -> None:
  for path in ('data.blob_train', 'data.blob_classes', 'data.num_eval', 'data.image_size'):
    fields.positive(config, path)
  fields.finite(config, 'data.blob_spread', low=0.0)


def image_shape(config) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, 1)


def facts(config) -> data.DataFacts:
  d = config.data
  return data.DataFacts(d.blob_train, d.num_eval, image_shape(config), d.blob_classes,
                        'generated blobs (tests/extra_source.py)')


def runlocal(config) -> None:
  """Small enough to train on as it is: smaller images, 64 eval examples."""
  config.data.image_size = 4
  config.data.blob_train = 256
  config.data.num_eval = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Blobs:
  """One split: idx_N -> (images [N, S, S, 1] float32, labels [N] int32)."""
  split: int
  centers: np.ndarray  # [classes, S * S]
  spread: float
  shape: tuple[int, int, int]

  def __call__(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = (idx_N % len(self.centers)).astype(np.int32)
    noise = common.synthetic_inputs(self.split, idx_N, self.centers.shape[1])
    images = self.centers[labels] + self.spread * noise
    return images.reshape(-1, *self.shape).astype(np.float32), labels


def create(config, **common_args: Any) -> input_pipeline.Dataset:
  """The blobs of config.data; `common_args` are the Dataset's batching fields."""
  d = config.data
  shape = image_shape(config)
  centers = common.synthetic_inputs(SPLIT_CENTERS, np.arange(d.blob_classes), math.prod(shape))
  return input_pipeline.Dataset(
      name='blobs', num_train=d.blob_train, num_eval=d.num_eval, image_shape=shape,
      num_classes=d.blob_classes, train_source=Blobs(SPLIT_TRAIN, centers, d.blob_spread, shape),
      eval_source=Blobs(SPLIT_EVAL, centers, d.blob_spread, shape), **common_args)
