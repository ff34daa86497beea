"""MXNet RecordIO: reader and writer, written from the public format (no MXNet needed).

Specification: dmlc-core include/dmlc/recordio.h and src/recordio.cc, mxnet
python/mxnet/recordio.py. The framing, the payload header, what an `.idx` must satisfy and the
error policy (every bad input is a `RecordIOError` naming the file and byte offset) are in
docs/design.md, "MXNet RecordIO". InsightFace's layout on top of it is insightface.py.
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Iterator, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack('<I', MAGIC)  # 0a 23 d7 ce
MAX_PART_LENGTH = (1 << 29) - 1  # length has 29 bits
HEADER_FORMAT = '<IfQQ'
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 24
_WHOLE, _START, _MIDDLE, _END = 0, 1, 2, 3
_FLAG_NAMES = {0: 'whole', 1: 'start', 2: 'middle', 3: 'end'}


class RecordIOError(ValueError):
  """A malformed, truncated or mismatched RecordIO input; the message names file and byte offset."""


def _error(path, offset: int, what: str) -> RecordIOError:
  return RecordIOError(f'{os.fspath(path)}: byte {offset}: {what}')


def _padded(n: int) -> int:
  return (n + 3) & ~3


# ---------------------------------------------------------------------------------------------
# Payload header.

class IRHeader(NamedTuple):
  """The payload header: `label` is a float, or float32 [flag] when flag > 0."""
  flag: int
  label: float | np.ndarray
  id: int
  id2: int


def pack(header: IRHeader | tuple, image: bytes) -> bytes:
  """A payload: header then image bytes. An array label sets flag to its size (as mxnet's pack)."""
  flag, label, id_, id2 = header
  if np.ndim(label) == 0:
    return struct.pack(HEADER_FORMAT, 0, float(label), id_, id2) + bytes(image)
  labels = np.asarray(label, '<f4').reshape(-1)
  return (struct.pack(HEADER_FORMAT, labels.size, 0.0, id_, id2) + labels.tobytes() +
          bytes(image))


def unpack(payload: bytes, *, path='<payload>', offset: int = 0) -> tuple[IRHeader, bytes]:
  """(header, image bytes) of a payload; `path`/`offset` (where it was read) name it in errors.

  Raises RecordIOError if the payload is shorter than the header or its labels.
  """
  if len(payload) < HEADER_SIZE:
    raise _error(path, offset, f'payload of {len(payload)} bytes is shorter than the '
                 f'{HEADER_SIZE}-byte IfQQ header')
  flag, label, id_, id2 = struct.unpack_from(HEADER_FORMAT, payload)
  if flag == 0:
    return IRHeader(0, label, id_, id2), bytes(payload[HEADER_SIZE:])
  end = HEADER_SIZE + 4 * flag
  if end > len(payload):
    raise _error(path, offset, f'header flag {flag} announces {flag} float32 labels, which end '
                 f'at payload byte {end}, past the payload end ({len(payload)} bytes)')
  labels = np.frombuffer(payload, '<f4', flag, HEADER_SIZE).astype(np.float32)
  return IRHeader(flag, labels, id_, id2), bytes(payload[end:])


# ---------------------------------------------------------------------------------------------
# Writing.

def encode(payload: bytes) -> bytes:
  """The framed bytes of one record, split at aligned magics exactly as dmlc's writer does."""
  payload = bytes(payload)
  n = len(payload)
  if n > MAX_PART_LENGTH:
    raise ValueError(f'payload of {n} bytes exceeds RecordIO\'s {MAX_PART_LENGTH}-byte limit')
  out, start = [], 0
  words = np.frombuffer(payload, '<u4', n // 4)
  for i in (np.flatnonzero(words == MAGIC) * 4).tolist():
    flag = _START if start == 0 else _MIDDLE
    out += [MAGIC_BYTES, struct.pack('<I', flag << 29 | (i - start)), payload[start:i]]
    start = i + 4
  flag = _WHOLE if start == 0 else _END
  out += [MAGIC_BYTES, struct.pack('<I', flag << 29 | (n - start)), payload[start:],
          b'\0' * (_padded(n) - n)]
  return b''.join(out)


class RecordIOWriter:
  """Appends records to a `.rec` file (and, given `idx_path`, "key\\toffset" lines to its
  `.idx`)."""

  def __init__(self, rec_path, idx_path=None):
    self.rec_path, self.idx_path = os.fspath(rec_path), idx_path
    self._rec = open(rec_path, 'wb')
    self._idx = open(idx_path, 'w') if idx_path is not None else None
    self._keys = set()

  def write(self, payload: bytes, key: int | None = None) -> int:
    """Writes one record; returns its byte offset. `key` (with an .idx) names it in the index."""
    offset = self._rec.tell()
    self._rec.write(encode(payload))
    if self._idx is not None:
      if key is None or key in self._keys:
        raise ValueError(f'give each record of an indexed file a new key, not {key!r}')
      self._keys.add(key)
      self._idx.write(f'{key}\t{offset}\n')
    return offset

  def close(self):
    self._rec.close()
    if self._idx is not None:
      self._idx.close()

  def __enter__(self) -> RecordIOWriter:
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------
# Reading.

def _read_at(fd: int, path, size: int, offset: int) -> tuple[bytes, int]:
  """(payload, end offset) of the record whose first part starts at `offset`.

  Checks the record ends where another record starts (or at the end of the file), so a length
  that was cut or grown by a multiple of 4 is caught rather than returned.
  """
  if offset % 4:
    raise _error(path, offset, 'a record must start at a 4-aligned offset')
  parts, pos = [], offset
  while True:
    head = os.pread(fd, 8, pos) if pos < size else b''
    if len(head) < 8:
      what = 'end of file' if not head else f'{len(head)} bytes before the end of file'
      raise _error(path, pos, f'{what} where a part header (8 bytes) was expected' +
                   ('' if pos == offset else f' (record started at byte {offset})'))
    magic, lrec = struct.unpack('<II', head)
    if magic != MAGIC:
      raise _error(path, pos, f'bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})' +
                   (': no record starts here' if pos == offset else
                    f' in the record that started at byte {offset}'))
    cflag, length = lrec >> 29, lrec & MAX_PART_LENGTH
    if cflag > _END:
      raise _error(path, pos, f'continuation flag {cflag} is not 0..3')
    if not parts and cflag in (_MIDDLE, _END):
      raise _error(path, pos, f'a {_FLAG_NAMES[cflag]} part with no start part before it (an '
                   f'index offset inside a split record, or a damaged flag)')
    if parts and cflag in (_WHOLE, _START):
      raise _error(path, pos, f'a {_FLAG_NAMES[cflag]} part inside the split record that started '
                   f'at byte {offset} (expected a middle or end part)')
    data_end = pos + 8 + _padded(length)
    if data_end > size:
      raise _error(path, pos, f'part length {length} runs past the end of the file ({size} '
                   'bytes): truncated file or damaged length')
    body = os.pread(fd, _padded(length), pos + 8)
    if len(body) != _padded(length):
      raise _error(path, pos, 'short read: the file changed while being read')
    if any(body[length:]):
      raise _error(path, pos + 8 + length, 'nonzero padding after the part data: damaged length')
    hits = np.flatnonzero(np.frombuffer(body, '<u4', length // 4) == MAGIC)
    if hits.size:
      raise _error(path, pos + 8 + 4 * int(hits[0]), 'the magic inside part data at an aligned '
                   'offset, where the writer would have split: a damaged length or flag')
    parts.append(body[:length])
    pos = data_end
    if cflag in (_WHOLE, _END):
      break
  if pos < size:
    nxt = os.pread(fd, 8, pos)
    if len(nxt) < 8 or nxt[:4] != MAGIC_BYTES or (struct.unpack('<I', nxt[4:])[0] >> 29) not in (
        _WHOLE, _START):
      raise _error(path, pos, f'the record that started at byte {offset} ends here, where no '
                   'record starts: a damaged length or flag')
  return MAGIC_BYTES.join(parts), pos


class RecordIOReader:
  """Sequential reading of a `.rec` file, and reading the record at a byte offset."""

  def __init__(self, rec_path):
    self.rec_path = os.fspath(rec_path)
    try:
      self._fd = os.open(self.rec_path, os.O_RDONLY)
    except OSError as e:
      raise RecordIOError(f'{self.rec_path}: byte 0: cannot open ({e.strerror})') from e
    self.size = os.fstat(self._fd).st_size
    self._close_lock = threading.Lock()

  def read_at(self, offset: int) -> bytes:
    """The payload of the record starting at byte `offset`."""
    if not 0 <= offset < self.size:
      raise _error(self.rec_path, offset, f'offset outside the file ({self.size} bytes)')
    try:
      return _read_at(self._fd, self.rec_path, self.size, offset)[0]
    except OSError as e:  # EIO from a failing disk, a file on a lost network mount, ...
      raise _error(self.rec_path, offset, f'reading failed ({e.strerror or e})') from None

  def __iter__(self) -> Iterator[tuple[int, bytes]]:
    """(byte offset, payload) of every record in file order; raises at the first damage."""
    pos = 0
    while pos < self.size:
      payload, end = _read_at(self._fd, self.rec_path, self.size, pos)
      yield pos, payload
      pos = end

  def close(self):
    with self._close_lock:
      if self._fd >= 0:
        os.close(self._fd)
        self._fd = -1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    if getattr(self, '_fd', -1) >= 0:
      self.close()


def read_index(idx_path, rec_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(keys int64 [K], offsets int64 [K]) of an `.idx` file, in file order.

  Lines are "key\\toffset" (integers; surrounding whitespace ignored, as mxnet does); a final
  newline is optional. Raises RecordIOError naming the line's byte offset for a malformed line, a
  duplicate key, an offset that is negative, not 4-aligned or (given rec_size) past the end, and
  for offsets that do not increase strictly, by at least a part header, in file order
  (docs/design.md, "MXNet RecordIO"): the keys and offsets involved are named.
  """
  idx_path = os.fspath(idx_path)
  try:
    with open(idx_path, 'rb') as f:
      text = f.read()
  except OSError as e:
    raise RecordIOError(f'{idx_path}: byte 0: cannot open ({e.strerror})') from e
  keys, offsets, seen, pos = [], [], {}, 0
  lines = text.split(b'\n')
  if lines and lines[-1] == b'':
    lines.pop()
  for lineno, line in enumerate(lines, 1):
    where = f'{idx_path}: byte {pos} (line {lineno})'
    pos += len(line) + 1
    fields = line.strip().split(b'\t')
    try:
      if len(fields) != 2:
        raise ValueError
      key, offset = int(fields[0]), int(fields[1])
    except ValueError:
      raise RecordIOError(f'{where}: expected "key<TAB>offset" (two integers), got '
                          f'{line[:60]!r}') from None
    if key in seen:
      first_line, first_offset = seen[key]
      raise RecordIOError(f'{where}: key {key} appears twice (line {first_line} puts it at byte '
                          f'{first_offset}, this line at byte {offset})')
    if rec_size is not None and offset >= rec_size:
      raise RecordIOError(f'{where}: offset {offset} of record {key} is not inside the .rec '
                          f'({rec_size} bytes): the .rec is truncated, or the .idx belongs to '
                          'another .rec')
    if offset < 0 or offset % 4:
      raise RecordIOError(f'{where}: offset {offset} of record {key} cannot start a record (must '
                          'be 4-aligned and not negative)')
    if offsets and offset - offsets[-1] < 8:
      raise RecordIOError(f'{where}: {_out_of_order(keys, offsets, key, offset)}: keys would '
                          'be read as records that are not theirs (and with their labels); every '
                          'writer lists records at strictly increasing offsets, 8 bytes apart or '
                          'more')
    seen[key] = (lineno, offset)
    keys.append(key)
    offsets.append(offset)
  return np.asarray(keys, np.int64), np.asarray(offsets, np.int64)


def _out_of_order(keys: list[int], offsets: list[int], key: int, offset: int) -> str:
  """What is wrong with (key, offset) after the index lines (keys, offsets), which increase."""
  previous = f'record {keys[-1]} at byte {offsets[-1]} on the line before'
  if offset == offsets[-1]:
    return f'records {keys[-1]} and {key} share byte offset {offset}'
  if offset > offsets[-1]:
    return (f'record {key} at byte {offset} starts {offset - offsets[-1]} bytes after '
            f'{previous}, inside it')
  i = int(np.searchsorted(offsets, offset))  # offsets increase: a binary search finds a twin
  if i < len(offsets) and offsets[i] == offset:
    return f'records {keys[i]} and {key} share byte offset {offset}'
  return f'record {key} at byte {offset} comes after {previous}: the offsets go back'


class IndexedRecordIOReader:
  """Random access to the records of a `.rec` by the keys of its `.idx` (mxnet's
  MXIndexedRecordIO, read-only). Thread-safe."""

  def __init__(self, idx_path, rec_path):
    self.idx_path = os.fspath(idx_path)
    self._rec = RecordIOReader(rec_path)
    self.rec_path = self._rec.rec_path
    self.keys, self.offsets = read_index(self.idx_path, self._rec.size)
    self._offset = dict(zip(self.keys.tolist(), self.offsets.tolist()))

  def __len__(self) -> int:
    return len(self.keys)

  def __contains__(self, key) -> bool:
    return key in self._offset

  def offset(self, key: int) -> int:
    try:
      return self._offset[int(key)]
    except KeyError:
      raise RecordIOError(f'{self.idx_path}: byte 0: key {key} is not in the index') from None

  def _where(self, key: int) -> str:
    return f'record {key}, which {os.path.basename(self.idx_path)} puts at byte {self.offset(key)}'

  def read(self, key: int) -> bytes:
    """The payload of record `key`."""
    offset = self.offset(key)
    try:
      return self._rec.read_at(offset)
    except RecordIOError as e:
      raise RecordIOError(f'{e} ({self._where(key)})') from None

  def read_unpacked(self, key: int) -> tuple[IRHeader, bytes]:
    """(header, image bytes) of record `key`."""
    payload = self.read(key)
    try:
      return unpack(payload, path=self.rec_path, offset=self.offset(key))
    except RecordIOError as e:
      raise RecordIOError(f'{e} (record {key})') from None

  def __iter__(self) -> Iterator[tuple[int, bytes]]:
    """(key, payload) in index order."""
    for key in self.keys.tolist():
      yield key, self.read(key)

  def close(self):
    self._rec.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
