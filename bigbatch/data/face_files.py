"""Real face sets on disk: image folders and InsightFace RecordIO, decoded by global index.

face_folder reads data.face_root/<identity>/ files, face_recordio train.rec + train.idx
(bigbatch/third_party/insightface.py); both give random access to (encoded image, label), and
`decode_stream` decodes blocks of them with tf.data. Unreadable input raises FaceDataError
naming the file (and record and offset), never a skip; the example order and the error policy
are in docs/design.md, "Sources and readers". Numpy at import; TensorFlow when decoding.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Callable, Iterator

import numpy as np

from bigbatch.data import common
from bigbatch.third_party import insightface
from bigbatch.third_party import recordio

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


class FaceDataError(common.DataError, ValueError):
  """A face data set on disk that cannot be read as it should (missing, corrupt, inconsistent);
  the message names the file (and record and byte offset) and the fix."""


# The fix for a damaged or mismatched RecordIO set: the pair is only meaningful together.
RECORDIO_FIX = ('copy {rec} and {idx} again from their source, both (they are written together; '
                'an .idx of another .rec points at the wrong bytes), or re-create them with the '
                'tool that wrote them')


def _recordio_error(e: Exception, rec_path: str, idx_path: str) -> FaceDataError:
  """A RecordIOError (or OSError) of a training set as a FaceDataError with the fix."""
  what = str(e) if isinstance(e, recordio.RecordIOError) else (
      f'{getattr(e, "filename", None) or rec_path}: reading failed '
      f'({getattr(e, "strerror", None) or e})')
  fix = RECORDIO_FIX.format(rec=os.path.basename(rec_path), idx=os.path.basename(idx_path))
  return FaceDataError(f'{what}; {fix}')


def _one_line(text: str, limit: int = 200) -> str:
  """TensorFlow's message without its graph-node prefix and op suffix, on one line."""
  text = re.sub(r'\{\{function_node [^}]*\}\}|\[\[\{\{node [^]]*\]\]|\[Op:\w+\].*$', ' ',
                str(text), flags=re.S)
  return ' '.join(text.split()).rstrip('.')[:limit]


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

  def where(self, i: int) -> str:
    return f'{self._paths[i]} (example {i})'

  def decode_fix(self, i: int) -> str:
    del i
    return 'replace the file with a good copy, or delete it (the examples after it renumber)'


class RecordIOImages:
  """root/train.rec + train.idx (InsightFace layout): example i is the i-th image record."""
  yields_paths = False

  def __init__(self, root, rec_name: str = 'train'):
    root = os.fspath(root)
    rec, idx = (os.path.join(root, f'{rec_name}.{ext}') for ext in ('rec', 'idx'))
    for path in (rec, idx):
      if not os.path.isfile(path):
        raise FaceDataError(
            f'{path}: missing; config.data.face_root ({root}) must be the directory that holds '
            f'{rec_name}.rec and {rec_name}.idx (InsightFace\'s training set layout)')
    self.rec_path, self.idx_path = rec, idx
    try:
      self.reader = recordio.IndexedRecordIOReader(idx, rec)
      layout = insightface.face_layout(self.reader)
      self._keys = layout.image_keys
      self.num_examples = len(self._keys)
      self._labels = None
      if layout.num_identities is None:  # no header: count the identities from every label
        self._labels = self._read_labels(np.arange(self.num_examples))
        self.num_identities = int(self._labels.max()) + 1
      else:
        self.num_identities = layout.num_identities
      # The record that ends the file: a .rec cut short (an interrupted copy) fails here, at
      # start, rather than when training first reads that far.
      self.reader.read(int(self.reader.keys[np.argmax(self.reader.offsets)]))
    except (recordio.RecordIOError, OSError) as e:
      raise _recordio_error(e, rec, idx) from None
    self.description = f'face_recordio:{os.path.abspath(self.reader.rec_path)}'

  def _label(self, key: int, header: recordio.IRHeader) -> int:
    label = insightface.image_label(header)
    limit = getattr(self, 'num_identities', None)
    if label != int(label) or label < 0 or (limit is not None and label >= limit):
      raise recordio.RecordIOError(
          f'{self.reader.rec_path}: record {key}, byte {self.reader.offset(key)}: image label '
          f'{label} is not an identity in 0..{"" if limit is None else limit - 1}')
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
    try:
      for n, key in enumerate(self._keys[idx_N].tolist()):
        header, image = self.reader.read_unpacked(key)
        if not image:
          raise recordio.RecordIOError(f'{self.reader.rec_path}: record {key}, byte '
                                       f'{self.reader.offset(key)}: an image record holds no image')
        data[n], labels[n] = image, self._label(key, header)
    except (recordio.RecordIOError, OSError) as e:
      raise _recordio_error(e, self.rec_path, self.idx_path) from None
    return data, labels

  def where(self, i: int) -> str:
    key = int(self._keys[i])
    return f'{self.rec_path}: record {key} (example {i}), byte {self.reader.offset(key)}'

  def decode_fix(self, i: int) -> str:
    del i
    return ('the record is intact but its image bytes are not an image: re-create '
            f'{os.path.basename(self.rec_path)} and {os.path.basename(self.idx_path)} from the '
            'source images (or copy them again if the source is good)')


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
  decoded in a parallel, order-preserving tf.data map (one block ahead). Every block holds
  `block` indices, so batch k is block k: an image that does not decode is named from it."""
  tf = common.quiet_tf()
  raised = []  # an error reading the files, re-raised as itself (tf.data would wrap it)
  pending = collections.deque()  # index blocks handed to tf.data and not yet consumed, in order

  def gen():
    try:
      for idx in index_blocks:
        idx = np.asarray(idx, np.int64)
        pending.append(idx)
        data, labels = images.encoded(idx)
        yield data, labels
    except Exception as e:  # pylint: disable=broad-except  # handed to the consumer below
      raised.append(e)

  ds = common.blocks_dataset(gen, (tf.TensorSpec([None], tf.string),
                                   tf.TensorSpec([None], tf.int32)))
  decode = decode_fn(size, images.yields_paths)
  ds = common.map_and_batch(ds, lambda item, label: (decode(item), label), block, parallel)
  batches = ds.as_numpy_iterator()
  failure = None
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      break
    except tf.errors.OpError as e:
      failure = raised[0] if raised else _decode_error(
          images, pending[0] if pending else None, decode, e)
      break
    pending.popleft()
    yield batch
  # Dropped before raising: an iterator still referenced by the traceback is finalized at
  # interpreter exit, where tf.data logs a FAILED_PRECONDITION error after the one line.
  del batches, ds
  if failure is None and raised:
    failure = raised[0]
  if failure is not None:
    raise failure


def _decode_error(images, idx: np.ndarray | None, decode: Callable,
                  error: Exception) -> FaceDataError:
  """The FaceDataError naming the first image of block `idx` that does not decode (decoded again
  one by one, eagerly: tf.data's error names no element)."""
  tf = common.quiet_tf()
  for i in ([] if idx is None else sorted(set(idx.tolist()))):
    item = images.encoded(np.asarray([i], np.int64))[0][0]
    try:
      decode(tf.constant(item))
    except tf.errors.OpError as e:
      reason = _one_line(e.message) or type(e).__name__
      return FaceDataError(f'{images.where(i)}: the image cannot be decoded ({reason}); '
                           f'{images.decode_fix(i)}')
  what = (f'examples {int(idx.min())}..{int(idx.max())}' if idx is not None and idx.size else
          'a block of images')
  return FaceDataError(f'{getattr(images, "description", "the face set")}: decoding {what} '
                       f'failed ({_one_line(getattr(error, "message", error))})')


class _BinImages:
  """The encoded images of a verification .bin, read as decode_stream reads a training set."""
  yields_paths = False

  def __init__(self, bins: list[bytes], name: str, fix: str):
    self.bins, self.name, self.fix = bins, name, fix

  def encoded(self, idx):
    data = np.empty(len(idx), dtype=object)
    data[:] = [self.bins[i] for i in idx.tolist()]
    return data, np.zeros(len(idx), np.int32)

  def where(self, i: int) -> str:
    return f'{self.name}: image {i} (pair {i // 2})'

  def decode_fix(self, i: int) -> str:
    del i
    return self.fix


def decode_images(bins: list[bytes], image_size: int, parallel: int = -1, *,
                  name: str = '<images>', fix: str = 'replace the file with a good copy'
                  ) -> np.ndarray:
  """uint8 [N, S, S, 3] of encoded images, decoded (and resized if needed) in parallel; an image
  that does not decode raises FaceDataError naming `name`, the image's index and `fix`."""
  if not bins:
    return np.zeros((0, image_size, image_size, 3), np.uint8)
  images = _BinImages(bins, name, fix)
  n = len(bins)
  block = min(n, 512)
  starts = range(0, n, block)
  blocks = (np.minimum(np.arange(s, s + block), n - 1) for s in starts)
  out = np.empty((n, image_size, image_size, 3), np.uint8)
  for s, (decoded, _) in zip(starts, decode_stream(images, image_size, parallel, blocks, block)):
    out[s:s + block] = decoded[:n - s]
  return out
