"""TFDS image data sets (imagenet2012, cifar10, mnist) with their preprocessing, as global batches.

`create(config, ...)` returns an `input_pipeline.Dataset` whose batches stream from tf.data;
`config.data.name` picks the preprocessing (image_preprocess.py) and `config.data.tfds_name` the
TFDS set read with it. array_record sets are read by global index (exact order), TFRecord sets
per process; readers are in image_readers.py. Light at import, as every registered source is:
TensorFlow and TFDS are imported when a set is prepared, read or measured (`facts`). The formats'
order guarantees and the augmentation's randomness: docs/design.md, "Sources and readers".
"""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from absl import logging
from ml_collections import config_dict

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import common

if TYPE_CHECKING:
  from etils import epath
  import tensorflow_datasets as tfds

# The data set names this module reads (config.data.name; each is its preprocessing).
NAMES = ('imagenet2012', 'cifar10', 'mnist')
IMAGENET_TRAIN_EXAMPLES = 1_281_167
# Published split sizes, classes and stored image shape (None: resized to S x S x 3) of the sets
# (TFDS catalog), for `facts` when a set is not prepared under the data directory: the run would
# prepare it, `facts` never does.
PUBLISHED = {
    'imagenet2012': ({'train': IMAGENET_TRAIN_EXAMPLES, 'validation': 50_000}, 1000, None),
    'cifar10': ({'train': 50_000, 'test': 10_000}, 10, (32, 32, 3)),
    'mnist': ({'train': 60_000, 'test': 10_000}, 10, (28, 28, 1)),
}


def defaults() -> dict[str, Any]:
  """The config.data fields only the TFDS image sets read, with their defaults."""
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


def validate(config) -> None:
  """The checks of config.data for an image set, without reading it."""
  d = config.data
  for path in ('data.image_size', 'data.shuffle_buffer'):
    fields.positive(config, path)
  if not isinstance(d.train_split, str) or not d.train_split.strip():
    raise fields.ConfigError(f'config.data.train_split={d.train_split!r}: name a TFDS split, '
                             f'e.g. train or train[:99%]')
  if d.file_format not in (None, 'tfrecord', 'array_record'):
    raise fields.ConfigError(f'config.data.file_format={d.file_format!r} is unknown; choose '
                             'array_record, tfrecord or None (TFDS default)')


# ---------------------------------------------------------------------------------------------
# What a run will read, without preparing anything (main --print_derived).

def split_size(splits: dict[str, int], spec: str) -> int:
  """Examples of a TFDS split string ('train', 'train[:99%]', 'a+b') over named split sizes, by
  TFDS's own slicing arithmetic."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (seconds)
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                                     filename_template=None) for name, n in splits.items()}
  try:
    parts = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
  except (ValueError, KeyError, AssertionError) as e:
    raise fields.ConfigError(f'TFDS split {spec!r}: {e}') from None
  return sum((p.to if p.to is not None else splits[p.splitname]) - (p.from_ or 0) for p in parts)


def prepared_info(name: str, data_dir: str | None):
  """(DatasetInfo of TFDS set `name` if a prepared copy is under `data_dir`, else None; where it
  was looked for). Reads only; the newest version there."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  base, _, version = name.partition(':')
  root = epath.Path(data_dir or common.default_tfds_dir()) / base
  try:
    found = sorted((p.parent for p in root.glob('*/dataset_info.json')
                    if not version or p.parent.name == version),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.name.split('.')])
  except OSError:
    return None, str(root)
  if not found:
    return None, str(root)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_from_directory(found[-1]).info, str(found[-1])


def prepared_dir(config) -> str:
  """Where the prepared TFDS files are: derived data, rebuilt when deleted."""
  return config.data.data_dir or common.default_tfds_dir()


def facts(config) -> common.DataFacts:
  """The splits' sizes, image shape and classes: from a prepared copy's metadata, else the
  published sizes; unknown for another TFDS set that is not prepared."""
  d = config.data
  tfds_name = d.tfds_name or d.name
  info, where = prepared_info(tfds_name, d.data_dir)
  if info is not None:
    from bigbatch.data import image_preprocess  # pylint: disable=g-import-not-at-top
    splits = {name: s.num_examples for name, s in info.splits.items()}
    pre = image_preprocess.Preprocess(d.name, info, d.image_size, config.seed)
    eval_split = d.eval_split or ('validation' if 'validation' in splits else 'test')
    return common.DataFacts(split_size(splits, d.train_split), split_size(splits, eval_split),
                            pre.image_shape, pre.num_classes, f'prepared copy: {where}')
  base = tfds_name.partition(':')[0]
  if base not in PUBLISHED:
    return common.DataFacts(
        None, None, None, None,
        f'unknown: {tfds_name} is not prepared under {where} and its size is not known without '
        f'preparing it (the run would); prepare it first, e.g. `tfds build {tfds_name}`')
  splits, classes, stored = PUBLISHED[base]
  shape = stored or (d.image_size, d.image_size, 3)
  eval_split = d.eval_split or ('validation' if 'validation' in splits else 'test')
  return common.DataFacts(split_size(splits, d.train_split), split_size(splits, eval_split),
                          shape, classes, f'published size of {base} (not prepared under '
                          f'{where}; the run would prepare it)')

# ---------------------------------------------------------------------------------------------
# Preparation.

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
  # pylint: disable=g-import-not-at-top,redefined-outer-name  (seconds; typing's names)
  from etils import epath
  import tensorflow_datasets as tfds
  data_dir = epath.Path(data_dir or common.default_tfds_dir())
  if common.is_local(data_dir):
    with common.exclusive_lock(data_dir, name):
      builder = tfds.builder(name, data_dir=data_dir)
      builder.download_and_prepare(file_format=file_format, download_config=download_config)
  else:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      if not may_prepare:
        raise fields.ConfigError(
            f'TFDS data set {name!r} is not prepared under {data_dir}, and several processes '
            f'cannot safely prepare a remote directory at once; prepare it first, e.g. '
            f'`{shlex.join(["tfds", "build", name, f"--data_dir={data_dir}"])}`')
      builder.download_and_prepare(file_format=file_format, download_config=download_config)
  stored = builder.info.file_format
  if file_format and stored is not None and stored.value != file_format:
    logging.warning('%s under %s is stored as %s; config.data.file_format=%s applies only to a '
                    'new preparation (use another data_dir to get it)', name, data_dir,
                    stored.value, file_format)
  return builder


# ---------------------------------------------------------------------------------------------
# The data set.

def create(config, *, process_index: int, process_count: int,
           **common_args: Any) -> input_pipeline.Dataset:
  """The image data set of `config.data`, read as its prepared format allows."""
  # pylint: disable=g-import-not-at-top,redefined-outer-name  (seconds; typing's names)
  import tensorflow_datasets as tfds
  from bigbatch.data import image_preprocess
  from bigbatch.data import image_readers
  d = config.data
  name, tfds_name = d.name, d.tfds_name or d.name
  builder = prepare(tfds_name, d.data_dir, file_format=d.file_format,
                    may_prepare=process_count == 1)
  info = builder.info
  eval_split = d.eval_split or ('validation' if 'validation' in info.splits else 'test')
  if image_preprocess.imagenet_style(name) and d.image_size < 64:
    logging.warning('config.data.image_size=%d for %s (ImageNet models expect 224)', d.image_size,
                    name)
  preprocess = image_preprocess.Preprocess(name, info, d.image_size, config.seed)
  fmt = info.file_format
  if fmt == tfds.core.FileFormat.ARRAY_RECORD:
    reader = image_readers.ArrayRecordReader(builder, preprocess, d.train_split, eval_split,
                                             d.num_parallel_calls)
    logging.info('%s (%s): array_record, read by global index; the batch at step s depends only '
                 'on (seed, data set, global batch)', name, info.full_name)
  elif fmt in (None, tfds.core.FileFormat.TFRECORD):
    reader = image_readers.TFRecordReader(builder, preprocess, d.train_split, eval_split,
                                          d.num_parallel_calls, d.shuffle_buffer, process_index,
                                          process_count)
    logging.info('%s (%s): tfrecord, streamed per process (%d of %d): the batch order depends on '
                 'the process count; prepare with data.file_format=array_record for global-index '
                 'order', name, info.full_name, process_index, process_count)
  else:
    raise fields.ConfigError(
        f'{info.full_name} is stored as {fmt.value}; bigbatch reads array_record and tfrecord: '
        f'prepare it again in another data_dir with config.data.file_format=array_record')
  dataset = input_pipeline.Dataset(
      name=name, num_train=info.splits[d.train_split].num_examples,
      num_eval=info.splits[eval_split].num_examples, image_shape=preprocess.image_shape,
      num_classes=preprocess.num_classes, train_reader=reader.train, eval_reader=reader.eval,
      global_order=isinstance(reader, image_readers.ArrayRecordReader),
      process_index=process_index, process_count=process_count, **common_args)
  return input_pipeline.close_at_exit(dataset)
