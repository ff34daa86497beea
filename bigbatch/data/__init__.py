"""Data sets by name: `create(config)` builds the one config.data.name names.

  name              module              reads
  digits            digits.py           sklearn's 8x8 digits through TFDS, held in memory
  synthetic         synthetic.py        generated images labelled by a random teacher network
  imagenet2012      images.py           TFDS image sets, decoded and augmented by tf.data
  cifar10           images.py           (array_record: by global index; tfrecord: per process)
  mnist             images.py
  face_synthetic    faces.py            generated identities (face_synthetic.py)
  face_folder       faces.py            image folders (face_files.py)
  face_recordio     faces.py            InsightFace RecordIO (face_files.py, face_arrays.py)

Each source module has `create(config, *, process_index, process_count, **batching)` returning an
`input_pipeline.Dataset`; `defaults()` gathers every config.data field with its default (the
config gets them from here) and `validate(config)` checks them before anything is read. Shared
helpers (counter hash, file locks, tf.data plumbing) are in common.py.

Importing this package costs numpy only: the modules that import TensorFlow (digits, images;
seconds) are imported by `create`, after the config has been validated. Adding a data set: a
module with `create`, a row in _SOURCES, its fields in `defaults` and checks in `validate`.
"""
from __future__ import annotations

import importlib
from typing import Any

from ml_collections import config_dict

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import faces
from bigbatch.data import synthetic

IMAGE_DATASETS = ('imagenet2012', 'cifar10', 'mnist')

# name -> module with its `create`.
_SOURCES = {
    'digits': 'bigbatch.data.digits',
    'synthetic': 'bigbatch.data.synthetic',
    **{name: 'bigbatch.data.images' for name in IMAGE_DATASETS},
    **{name: 'bigbatch.data.faces' for name in faces.FACE_DATASETS},
}
DATASETS = tuple(_SOURCES)


def _shared_defaults() -> dict[str, Any]:
  return dict(
      name='digits',  # one of DATASETS
      # TFDS data directory (digits and the image sets); None: $TFDS_DATA_DIR or
      # ~/tensorflow_datasets.
      data_dir=config_dict.placeholder(str),
      # Evaluation examples of the generated sets (synthetic, face_synthetic) and of the closed-set
      # check of the real face sets; TFDS sets evaluate their whole eval split.
      num_eval=10_000,
      # Image side S: the synthetic sets' size, the ImageNet crop (set 224), the face sets' size
      # (112 for the public ones); cifar10 and mnist keep their stored size.
      image_size=8,
      prefetch=2,  # batches prepared ahead of the device, on a host thread
      num_parallel_calls=-1,  # tf.data decode/augment parallelism; -1: AUTOTUNE
  )


def _image_defaults() -> dict[str, Any]:
  # The TFDS image sets (images.py imports TensorFlow, so its fields are listed here).
  return dict(
      # The TFDS data set read with data.name's preprocessing; None: data.name itself.
      tfds_name=config_dict.placeholder(str),
      train_split='train',  # any TFDS split string, e.g. 'train[:99%]'
      eval_split=config_dict.placeholder(str),  # None: 'validation' if present, else 'test'
      # Format to prepare a data set in when it is not prepared yet: 'array_record' is read by
      # global index (batch order independent of the process count); 'tfrecord' (TFDS's
      # default, None) is streamed per process. Data already prepared is read as it is.
      file_format=config_dict.placeholder(str),
      shuffle_buffer=10_000,  # TFRecord only: examples per process (~1 GB of ImageNet JPEGs)
  )


def defaults() -> dict[str, Any]:
  """Every config.data field with its default, keyed relative to config.data."""
  out = {}
  for owner, group in (('bigbatch.data', _shared_defaults()),
                       ('bigbatch.data.synthetic', synthetic.defaults()),
                       ('bigbatch.data.images', _image_defaults()),
                       ('bigbatch.data.faces', faces.defaults())):
    for key, value in group.items():
      if key in out:  # two modules claiming one field: a programming error
        raise ValueError(f'config.data.{key} of {owner} is already defined by another module')
      out[key] = value
  return out


def validate(config) -> None:
  """Checks config.data (for the data set it names) without reading data. Raises ConfigError."""
  d = config.data
  fields.choice(config, 'data.name', DATASETS)
  fields.integer(config, 'data.prefetch', low=0)  # batches prepared ahead
  if d.num_parallel_calls != -1 and not (isinstance(d.num_parallel_calls, int)
                                         and 1 <= d.num_parallel_calls <= fields.INT_MAX):
    raise fields.ConfigError(f'config.data.num_parallel_calls={d.num_parallel_calls}: must be '
                             '-1 (AUTOTUNE) or positive')
  if d.file_format not in (None, 'tfrecord', 'array_record'):
    raise fields.ConfigError(f'config.data.file_format={d.file_format!r} is unknown; choose '
                             'array_record, tfrecord or None (TFDS default)')
  if d.name == 'synthetic':
    synthetic.validate(config)
  elif d.name in IMAGE_DATASETS:
    for path in ('data.image_size', 'data.shuffle_buffer'):
      fields.positive(config, path)
    if not isinstance(d.train_split, str) or not d.train_split.strip():
      raise fields.ConfigError(f'config.data.train_split={d.train_split!r}: name a TFDS split, '
                               f'e.g. train or train[:99%]')
  elif d.name in faces.FACE_DATASETS:
    faces.validate(config)


def create(config, *, process_index: int | None = None,
           process_count: int | None = None) -> input_pipeline.Dataset:
  """The data set named by config.data.name, batched per `config` (validated first).

  process_index / process_count default to jax.process_index() / jax.process_count(); tests pass
  them to simulate several processes in one.
  """
  validate(config)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # not needed to validate a config
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  # Imported here, not at the top: digits and images import TensorFlow (seconds).
  source = importlib.import_module(_SOURCES[config.data.name])
  return source.create(config, global_batch=config.global_batch,
                       accumulation_steps=config.accumulation_steps,
                       eval_batch=config.eval_batch, seed=config.seed,
                       process_index=process_index, process_count=process_count,
                       prefetch=config.data.prefetch)
