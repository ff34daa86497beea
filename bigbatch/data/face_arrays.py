"""The converted face format: decoded uint8 images read by global index, with numpy only.

With data.face_cache set, folder and RecordIO sets (bigbatch/data/face_files.py) are first
converted, once, into a directory of decoded uint8 images [N, S, S, 3] in one memory-mapped .npy
plus labels, verified on every open (`ArrayFile`); training then reads them by global index with
numpy only (no JPEG decoding, no TensorFlow): the fast path for large batches on few cores. It
costs S*S*3 bytes per image (37.6 KB at 112x112, several times the JPEGs). Direct and converted
reading give identical batches.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable
import zlib

import numpy as np

from bigbatch import workdir as workdir_lib
from bigbatch.data import common
from bigbatch.data import face_files

FaceDataError = face_files.FaceDataError

ARRAY_FORMAT = 'bigbatch-face-arrays'
ARRAY_VERSION = 1
_CRC_BLOCK = 1024  # images per checksum block


class ArrayFile:
  """A converted face set: directory with images.npy (uint8 [N, S, S, 3], memory-mapped),
  labels.npy (int32 [N]) and meta.json (written last: its presence marks a finished conversion).

  Opening checks the json, the .npy headers and exact file sizes (a truncated file is caught),
  the labels' checksum and range, and the first image block's checksum; `verify()` checks every
  block (a full read). Any mismatch raises FaceDataError naming the file.
  """

  def __init__(self, directory):
    self.directory = os.fspath(directory)
    meta_path = os.path.join(self.directory, 'meta.json')
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      self.count, self.image_shape = int(meta['count']), tuple(int(x) for x in meta['image_shape'])
      self.num_identities, self.source = int(meta['num_identities']), str(meta['source'])
      self._crc, self._labels_crc = [int(c) for c in meta['crc32']], int(meta['labels_crc32'])
      if meta['format'] != ARRAY_FORMAT or meta['version'] != ARRAY_VERSION:
        raise ValueError(f'format {meta["format"]!r} version {meta["version"]!r}')
    except FileNotFoundError:
      raise FaceDataError(f'{meta_path}: missing (no finished conversion in this directory)'
                          ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise FaceDataError(f'{meta_path}: not a {ARRAY_FORMAT} v{ARRAY_VERSION} description '
                          f'({type(e).__name__}: {e}); delete the directory to convert again'
                          ) from None
    if len(self._crc) != math.ceil(self.count / _CRC_BLOCK):
      raise FaceDataError(f'{meta_path}: {len(self._crc)} checksums for {self.count} images')
    self.images = self._open('images.npy', np.uint8, (self.count, *self.image_shape))
    self.labels = np.asarray(self._open('labels.npy', np.int32, (self.count,)))
    self.labels.flags.writeable = False
    if zlib.crc32(self.labels.tobytes()) != self._labels_crc:
      raise FaceDataError(f'{self.directory}/labels.npy: checksum mismatch (corrupt file); '
                          'delete the directory to convert again')
    if self.count and (self.labels.min() < 0 or self.labels.max() >= self.num_identities):
      raise FaceDataError(f'{self.directory}/labels.npy: labels outside 0..'
                          f'{self.num_identities - 1}')
    if self.count:
      self._check_block(0)

  def _open(self, name: str, dtype, shape) -> np.ndarray:
    path = os.path.join(self.directory, name)
    try:
      with open(path, 'rb') as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                       np.lib.format.read_array_header_2_0)
        stored_shape, fortran, stored_dtype = read_header(f)
        offset = f.tell()
    except (OSError, ValueError) as e:
      raise FaceDataError(f'{path}: cannot be read as .npy ({e}); delete the directory to '
                          'convert again') from None
    if stored_dtype != dtype or tuple(stored_shape) != shape or fortran:
      raise FaceDataError(f'{path}: holds {stored_dtype} {tuple(stored_shape)}, meta.json says '
                          f'{np.dtype(dtype)} {shape}')
    expected = offset + math.prod(shape) * np.dtype(dtype).itemsize
    if os.path.getsize(path) != expected:
      raise FaceDataError(f'{path}: {os.path.getsize(path)} bytes, expected {expected} '
                          '(truncated or appended to); delete the directory to convert again')
    return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape)

  def _check_block(self, b: int):
    block = self.images[b * _CRC_BLOCK:(b + 1) * _CRC_BLOCK]
    if zlib.crc32(np.ascontiguousarray(block)) != self._crc[b]:
      raise FaceDataError(f'{self.directory}/images.npy: checksum mismatch in images '
                          f'{b * _CRC_BLOCK}..{min(self.count, (b + 1) * _CRC_BLOCK) - 1} (corrupt '
                          'file); delete the directory to convert again')

  def verify(self) -> None:
    """Checks every image block's checksum (reads the whole file)."""
    for b in range(len(self._crc)):
      self._check_block(b)

  def read(self, idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, S, S, 3], int32 [N]) of examples idx_N."""
    return np.asarray(self.images[idx_N]), self.labels[idx_N]


def convert(images, directory, image_size: int, *, parallel: int = -1,
            block: int = 256) -> ArrayFile:
  """Converts `images` (FolderImages | RecordIOImages) into an ArrayFile in `directory`, once.

  Under an exclusive lock on the directory, so that processes sharing it convert once; a finished
  conversion of the same source and size is opened instead. One that does not match raises.
  """
  directory = os.fspath(directory)
  shape = (image_size, image_size, 3)
  with common.exclusive_lock(directory):
    if os.path.exists(os.path.join(directory, 'meta.json')):
      done = ArrayFile(directory)
      if (done.source, done.image_shape, done.count) != (images.description, shape,
                                                         images.num_examples):
        raise FaceDataError(
            f'{directory} holds a conversion of {done.source} ({done.count} images of '
            f'{done.image_shape}), not of {images.description} ({images.num_examples} of '
            f'{shape}); point config.data.face_cache elsewhere or delete it')
      return done
    n = images.num_examples
    tmp = {name: os.path.join(directory, name + '.tmp') for name in ('images.npy', 'labels.npy')}
    out = np.lib.format.open_memmap(tmp['images.npy'], mode='w+', dtype=np.uint8,
                                    shape=(n, *shape))
    labels = np.empty(n, np.int32)
    starts = range(0, n, block)
    blocks = (np.arange(s, min(n, s + block)) for s in starts)
    # The last block is shorter: decode_stream batches a fixed size, so pad it with example 0.
    padded = (np.concatenate([b, np.zeros(block - len(b), np.int64)]) for b in blocks)
    decoded_blocks = face_files.decode_stream(images, image_size, parallel, padded, block)
    for s, (decoded, lab) in zip(starts, decoded_blocks):
      m = min(block, n - s)
      out[s:s + m], labels[s:s + m] = decoded[:m], lab[:m]
    crc = [zlib.crc32(np.ascontiguousarray(out[s:s + _CRC_BLOCK])) for s in range(0, n,
                                                                                  _CRC_BLOCK)]
    out.flush()
    del out
    with open(tmp['labels.npy'], 'wb') as f:  # np.save(path) would append '.npy' to the name
      np.save(f, labels)
    for name, path in tmp.items():
      os.replace(path, os.path.join(directory, name))
    meta = dict(format=ARRAY_FORMAT, version=ARRAY_VERSION, count=n, image_shape=list(shape),
                num_identities=images.num_identities, source=images.description, crc32=crc,
                labels_crc32=zlib.crc32(labels.tobytes()))
    workdir_lib.write_json(os.path.join(directory, 'meta.json'), meta, indent=None)  # last
  return ArrayFile(directory)


def array_stream(array: ArrayFile) -> Callable:
  """`stream(index_blocks, block)` over `array`, as face_files.decode_stream streams images."""
  def stream(index_blocks, block):
    del block
    for idx in index_blocks:
      yield array.read(idx)
  return stream
