"""Real face sets on disk: image folders and InsightFace RecordIO, decoded by global index.

  face_folder     image files under data.face_root/<identity>/; identities sorted by directory
                  name are labels 0..C-1; example i is the i-th file in (identity, file name) order.
  face_recordio   data.face_root/train.rec + train.idx in the InsightFace layout
                  (bigbatch/third_party/insightface.py); example i is the i-th image record.
Both give random access to (encoded image or its path, label) by global index; `decode_stream`
decodes blocks of them (JPEG/PNG, tf.io in a parallel, order-preserving tf.data map), resized to
the set's image size if they are not that size already, as uint8.

Numpy at import; TensorFlow only when images are decoded.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np

from bigbatch.data import common
from bigbatch.third_party import insightface
from bigbatch.third_party import recordio

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


class FaceDataError(ValueError):
  """A face data set on disk that cannot be read as it should (missing, corrupt, inconsistent)."""


class FolderImages:
  """root/<identity>/<image>: labels by sorted identity name, examples in (identity, file) order.

  Identity directories without images still take a label (so labels follow the names alone).
  Hidden entries and files without an image extension are ignored.
  """
  yields_paths = True

  def __init__(self, root):
    self.root = os.fspath(root)
    if not os.path.isdir(self.root):
      raise FaceDataError(f'{self.root}: not a directory (config.data.face_root of a face_folder '
                          'set: one subdirectory of images per identity)')
    names = sorted(e.name for e in os.scandir(self.root)
                   if e.is_dir() and not e.name.startswith('.'))
    paths, labels = [], []
    for label, name in enumerate(names):
      files = sorted(e.name for e in os.scandir(os.path.join(self.root, name))
                     if e.is_file() and not e.name.startswith('.')
                     and e.name.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(self.root, name, f) for f in files]
      labels += [label] * len(files)
    if not paths:
      raise FaceDataError(f'{self.root}: no images ({", ".join(IMAGE_EXTENSIONS)}) in '
                          'identity subdirectories')
    self.identities = names
    self.num_identities = len(names)
    self._paths = np.array(paths, dtype=object)
    self.labels = np.asarray(labels, np.int32)
    self.num_examples = len(paths)
    self.description = f'face_folder:{os.path.abspath(self.root)}'

  def encoded(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(file paths [N] (objects), labels int32 [N])."""
    return self._paths[idx_N], self.labels[idx_N]


class RecordIOImages:
  """root/train.rec + train.idx (InsightFace layout): example i is the i-th image record."""
  yields_paths = False

  def __init__(self, root, rec_name: str = 'train'):
    root = os.fspath(root)
    self.reader = recordio.IndexedRecordIOReader(os.path.join(root, f'{rec_name}.idx'),
                                                 os.path.join(root, f'{rec_name}.rec'))
    layout = insightface.face_layout(self.reader)
    self._keys = layout.image_keys
    self.num_examples = len(self._keys)
    self._labels = None
    if layout.num_identities is None:  # no header: count the identities from every label
      self._labels = self._read_labels(np.arange(self.num_examples))
      self.num_identities = int(self._labels.max()) + 1
    else:
      self.num_identities = layout.num_identities
    self.description = f'face_recordio:{os.path.abspath(self.reader.rec_path)}'

  def _label(self, key: int, header: recordio.IRHeader) -> int:
    label = insightface.image_label(header)
    limit = getattr(self, 'num_identities', None)
    if label != int(label) or label < 0 or (limit is not None and label >= limit):
      raise recordio.RecordIOError(
          f'{self.reader.rec_path}: byte {self.reader.offset(key)}: image record {key} has label '
          f'{label}, not an identity in 0..{"" if limit is None else limit - 1}')
    return int(label)

  def _read_labels(self, idx_N: np.ndarray) -> np.ndarray:
    out = np.empty(len(idx_N), np.int32)
    for n, key in enumerate(self._keys[idx_N].tolist()):
      out[n] = self._label(key, self.reader.read_unpacked(key)[0])
    return out

  def encoded(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(encoded images [N] (bytes objects), labels int32 [N])."""
    data = np.empty(len(idx_N), dtype=object)
    labels = np.empty(len(idx_N), np.int32)
    for n, key in enumerate(self._keys[idx_N].tolist()):
      header, image = self.reader.read_unpacked(key)
      if not image:
        raise recordio.RecordIOError(f'{self.reader.rec_path}: byte {self.reader.offset(key)}: '
                                     f'image record {key} holds no image')
      data[n], labels[n] = image, self._label(key, header)
    return data, labels


def decode_fn(size: int, from_paths: bool) -> Callable:
  """tf: encoded image (or its path) -> uint8 [size, size, 3], resized bilinearly if needed."""
  tf = common.quiet_tf()

  def decode(item):
    data = tf.io.read_file(item) if from_paths else item
    image = tf.io.decode_image(data, channels=3, expand_animations=False)

    def resize():
      resized = tf.image.resize(image, [size, size], method='bilinear')
      return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size]))
    return tf.ensure_shape(tf.cond(same, lambda: image, resize), [size, size, 3])

  return decode


def decode_stream(images, size: int, parallel: int, index_blocks: Iterator[np.ndarray],
                  block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 [block, size, size, 3], labels int32 [block]) for each index block, in order; images
  decoded in a parallel, order-preserving tf.data map (one block ahead)."""
  tf = common.quiet_tf()
  raised = []  # an error reading the files, re-raised as itself (tf.data would wrap it)

  def gen():
    try:
      for idx in index_blocks:
        data, labels = images.encoded(np.asarray(idx, np.int64))
        yield data, labels
    except Exception as e:  # pylint: disable=broad-except  # handed to the consumer below
      raised.append(e)

  ds = common.blocks_dataset(gen, (tf.TensorSpec([None], tf.string),
                                   tf.TensorSpec([None], tf.int32)))
  decode = decode_fn(size, images.yields_paths)
  ds = common.map_and_batch(ds, lambda item, label: (decode(item), label), block, parallel)
  try:
    yield from ds.as_numpy_iterator()
  except tf.errors.OpError as e:
    if raised:
      raise raised[0] from None
    raise FaceDataError(f'decoding an image failed (a damaged or non-image file): {e.message}'
                        ) from None
  if raised:
    raise raised[0]


def decode_images(bins: list[bytes], image_size: int, parallel: int = -1) -> np.ndarray:
  """uint8 [N, S, S, 3] of encoded images, decoded (and resized if needed) in parallel."""

  class _Bytes:
    yields_paths = False

    @staticmethod
    def encoded(idx):
      data = np.empty(len(idx), dtype=object)
      data[:] = [bins[i] for i in idx.tolist()]
      return data, np.zeros(len(idx), np.int32)

  if not bins:
    return np.zeros((0, image_size, image_size, 3), np.uint8)
  n = len(bins)
  block = min(n, 512)
  starts = range(0, n, block)
  blocks = (np.minimum(np.arange(s, s + block), n - 1) for s in starts)
  out = np.empty((n, image_size, image_size, 3), np.uint8)
  for s, (decoded, _) in zip(starts, decode_stream(_Bytes, image_size, parallel, blocks, block)):
    out[s:s + block] = decoded[:n - s]
  return out
