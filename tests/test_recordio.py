"""MXNet RecordIO reader/writer and the InsightFace layout (bigbatch/third_party)."""
import struct

import numpy as np
import pytest

from bigbatch.third_party import insightface
from bigbatch.third_party import recordio

MAGIC = recordio.MAGIC_BYTES


def _write(tmp_path, payloads, name='t'):
  rec, idx = tmp_path / f'{name}.rec', tmp_path / f'{name}.idx'
  with recordio.RecordIOWriter(rec, idx) as w:
    for key, p in enumerate(payloads):
      w.write(p, key)
  return rec, idx


def _parts(data: bytes, offset: int):
  """A test-side parser: [(header_pos, data_pos, length, padded)] of the record at offset."""
  parts, pos = [], offset
  while True:
    magic, lrec = struct.unpack_from('<II', data, pos)
    assert magic == recordio.MAGIC
    cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
    parts.append((pos, pos + 8, length, (length + 3) & ~3))
    pos += 8 + ((length + 3) & ~3)
    if cflag in (0, 3):
      return parts, pos


def test_encode_matches_dmlc_framing():
  # Magic at aligned offsets 0 and 8 splits into start(0 bytes) middle(4 bytes) end(3 bytes);
  # the unaligned magic at 13 stays in the data.
  payload = MAGIC + b'abcd' + MAGIC + b'x' + MAGIC + b'yz'
  assert payload[13:17] == MAGIC
  expected = (MAGIC + struct.pack('<I', 1 << 29 | 0) +
              MAGIC + struct.pack('<I', 2 << 29 | 4) + b'abcd' +
              MAGIC + struct.pack('<I', 3 << 29 | 7) + b'x' + MAGIC + b'yz' + b'\0')
  assert recordio.encode(payload) == expected
  assert recordio.encode(b'hello') == MAGIC + struct.pack('<I', 5) + b'hello\0\0\0'
  assert recordio.encode(b'') == MAGIC + struct.pack('<I', 0)
  # Trailing aligned magic: an end part of length 0.
  assert recordio.encode(b'abcd' + MAGIC).endswith(MAGIC + struct.pack('<I', 3 << 29 | 0))


PAYLOADS = [
    b'',
    b'plain record',
    MAGIC + b'abcd' + MAGIC + b'x' + MAGIC + b'yz',  # split, unaligned magic kept
    MAGIC * 3,  # consecutive aligned magics: empty middle parts
    b'abcd' + MAGIC,  # aligned magic at the very end
    bytes(range(256)) * 3,
]


def test_roundtrip_indexed_and_sequential(tmp_path):
  rec, idx = _write(tmp_path, PAYLOADS)
  with recordio.IndexedRecordIOReader(idx, rec) as reader:
    assert len(reader) == len(PAYLOADS) and list(reader.keys) == list(range(len(PAYLOADS)))
    for key, p in enumerate(PAYLOADS):
      assert reader.read(key) == p
    assert [p for _, p in reader] == PAYLOADS
  with recordio.RecordIOReader(rec) as seq:
    got = list(seq)
  assert [p for _, p in got] == PAYLOADS
  assert [o for o, _ in got] == list(recordio.read_index(idx)[1])


def test_pack_unpack_scalar_and_array_labels():
  header, image = recordio.unpack(recordio.pack((0, 3.0, 7, 9), b'JPEG'))
  assert header == recordio.IRHeader(0, 3.0, 7, 9) and image == b'JPEG'
  payload = recordio.pack((0, [1.5, 2.0, 42.0], 1, 2), b'img')
  assert len(payload) == 24 + 12 + 3
  header, image = recordio.unpack(payload)
  assert header.flag == 3 and header.id == 1 and header.id2 == 2 and image == b'img'
  np.testing.assert_array_equal(header.label, np.float32([1.5, 2.0, 42.0]))
  # mxnet's layout: flag, label=0 in the header, then the labels.
  assert struct.unpack_from('<IfQQ', payload) == (3, 0.0, 1, 2)


def test_unpack_errors_name_file_and_offset():
  with pytest.raises(recordio.RecordIOError, match=r'x\.rec: byte 96: payload of 23 bytes'):
    recordio.unpack(b'\0' * 23, path='x.rec', offset=96)
  bad = struct.pack('<IfQQ', 5, 0.0, 0, 0) + b'\0' * 16  # 5 labels announced, 4 present
  with pytest.raises(recordio.RecordIOError, match=r'byte 8: header flag 5 .* past the payload'):
    recordio.unpack(bad, path='x.rec', offset=8)


def _corrupt(path, pos, new: bytes):
  data = bytearray(path.read_bytes())
  data[pos:pos + len(new)] = new
  path.write_bytes(bytes(data))


def test_malformed_inputs_raise_recordio_error(tmp_path):
  rec, idx = _write(tmp_path, PAYLOADS)
  offsets = recordio.read_index(idx)[1]
  original = rec.read_bytes()

  def read(key):
    with recordio.IndexedRecordIOReader(idx, rec) as r:
      return r.read(key)

  _corrupt(rec, int(offsets[1]), b'\0\0\0\0')
  with pytest.raises(recordio.RecordIOError, match=rf't\.rec: byte {offsets[1]}: bad magic'):
    read(1)
  rec.write_bytes(original[:int(offsets[5]) + 100])  # truncated inside the last record
  with pytest.raises(recordio.RecordIOError, match=rf'byte {offsets[5]}: part length 768 runs '
                     'past the end'):
    read(5)
  rec.write_bytes(original)
  # The middle part of record 2 read as if it were a record: continuation without start.
  middle = _parts(original, int(offsets[2]))[0][1][0]
  idx.write_text(f'0\t{middle}\n')
  with pytest.raises(recordio.RecordIOError, match=rf'byte {middle}: a middle part with no start'):
    read(0)
  # An offset inside a record's data: no magic there (the writer never leaves one aligned).
  idx.write_text(f'0\t{int(offsets[5]) + 16}\n')
  with pytest.raises(recordio.RecordIOError, match=rf'byte {int(offsets[5]) + 16}: bad magic'):
    read(0)
  for text, what in [('0\t0\n1 8\n', 'line 2'), ('0\t0\nx\t8\n', 'line 2'), ('0\t0\n\n1\t8\n',
                                                                              'line 2'),
                     ('0\t0\n0\t8\n', 'appears twice'), ('0\t6\n', 'offset 6'),
                     ('0\t-4\n', 'offset -4'), (f'0\t{len(original)}\n', 'inside the .rec')]:
    idx.write_text(text)
    with pytest.raises(recordio.RecordIOError, match=rf't\.idx: byte \d+ .*{what}'):
      read(0)
  # Trailing garbage: the last record ends where no record starts.
  _write(tmp_path, PAYLOADS)
  rec.write_bytes(original + b'garbage!')
  with pytest.raises(recordio.RecordIOError, match=rf'byte {len(original)}: the record that '
                     'started'):
    read(5)
  with pytest.raises(recordio.RecordIOError), recordio.RecordIOReader(rec) as seq:
    list(seq)
  with pytest.raises(recordio.RecordIOError, match='cannot open'):
    recordio.IndexedRecordIOReader(idx, tmp_path / 'missing.rec')


@pytest.mark.parametrize('lines, what', [
    # Two keys at one offset: one record read under both keys (and their labels), one never.
    ([(0, 0), (1, 'o1'), (2, 'o1'), (3, 'o3')], r'line 3\): records 1 and 2 share byte offset '
     r'{o1}'),
    ([(0, 0), (1, 'o1'), (2, 'o2'), (3, 'o1')], r'line 4\): records 1 and 3 share byte offset '
     r'{o1}'),
    # Distinct offsets out of file order: a writer never produces them.
    ([(0, 0), (1, 'o2'), (2, 'o1'), (3, 'o3')], r'line 3\): record 2 at byte {o1} comes after '
     r'record 1 at byte {o2} on the line before: the offsets go back'),
    # Overlapping: an offset inside the record before it (closer than a part header).
    ([(0, 0), (1, 'o1'), (2, 'o1+4'), (3, 'o3')], r'line 3\): record 2 at byte {o1+4} starts 4 '
     r'bytes after record 1 at byte {o1} on the line before, inside it'),
    ([(0, 0), (1, 'o1'), (1, 'o2')], r'line 3\): key 1 appears twice \(line 2 puts it at byte '
     r'{o1}, this line at byte {o2}\)'),
])
def test_index_that_would_mix_records_is_refused_at_open(lines, what, tmp_path):
  """The keys and offsets of the lines at fault are named; reading would return a record under a
  key (and label) not its own."""
  rec, idx = _write(tmp_path, [recordio.pack((0, float(k), k, 0), b'image%d' % k * 9)
                               for k in range(4)])
  offsets = recordio.read_index(idx)[1]
  names = {'o1': int(offsets[1]), 'o2': int(offsets[2]), 'o3': int(offsets[3]),
           'o1+4': int(offsets[1]) + 4}
  idx.write_text(''.join(f'{k}\t{names.get(o, o)}\n' for k, o in lines))
  pattern = what
  for name, value in names.items():
    pattern = pattern.replace('{%s}' % name, str(value))
  with pytest.raises(recordio.RecordIOError, match=r't\.idx: byte \d+ \(' + pattern):
    recordio.IndexedRecordIOReader(idx, rec)
  with pytest.raises(recordio.RecordIOError, match='strictly increasing offsets|appears twice'):
    recordio.read_index(idx)


def test_index_keys_need_not_be_in_order(tmp_path):
  """im2rec takes keys from a .lst, in any order: only the offsets must increase."""
  payloads = [recordio.pack((0, float(k), k, 0), b'x' * (k + 1)) for k in range(4)]
  rec, idx = tmp_path / 's.rec', tmp_path / 's.idx'
  with recordio.RecordIOWriter(rec, idx) as w:
    for key, p in zip([7, 2, 9, 0], payloads):
      w.write(p, key)
  with recordio.IndexedRecordIOReader(idx, rec) as r:
    assert r.keys.tolist() == [7, 2, 9, 0]
    assert [r.read(k) for k in (7, 2, 9, 0)] == payloads


def test_fuzz_reads_return_the_record_or_raise(tmp_path):
  """Random byte flips, truncations, appended garbage and .idx edits (fixed seed): every read
  returns the original record or raises RecordIOError, except where RecordIO without a checksum
  cannot tell (a flipped data byte comes back flipped, in place; a length changed within its
  zero padding; an idx offset moved onto another record start reads that record)."""
  payloads = PAYLOADS + [recordio.pack((0, [1.0, 2.0], 3, 4), b'\xff\xd8jpeg' + MAGIC + b'..')]
  rec, idx = _write(tmp_path, payloads, 'valid')
  data, idx_text = rec.read_bytes(), idx.read_text()
  offsets = [int(o) for o in recordio.read_index(idx)[1]]
  layout = [_parts(data, o) for o in offsets]  # ([parts], end) per record
  rng = np.random.default_rng(1234)
  target_rec, target_idx = tmp_path / 'fuzz.rec', tmp_path / 'fuzz.idx'
  counts = {'ok': 0, 'error': 0, 'flipped': 0}
  for case in range(300):
    kind = ['flip', 'flip', 'truncate', 'append', 'idx_offset', 'idx_garbage'][case % 6]
    mutated, text, q = bytearray(data), idx_text, None
    if kind == 'flip':
      q = int(rng.integers(len(data)))
      mutated[q] ^= int(rng.integers(1, 256))
    elif kind == 'truncate':
      mutated = mutated[:int(rng.integers(len(data)))]
    elif kind == 'append':
      mutated += rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
    elif kind == 'idx_offset':
      key = int(rng.integers(len(offsets)))
      moved = offsets[key] + int(rng.choice([-8, -4, -2, 1, 3, 4, 8, 12, 16, 64]))
      lines = idx_text.splitlines()
      lines[key] = f'{key}\t{moved}'
      text = '\n'.join(lines) + '\n'
    else:
      lines = idx_text.splitlines()
      lines[int(rng.integers(len(lines)))] = rng.choice(['7', 'a\tb', '1\t2\t3', '', '\t'])
      text = '\n'.join(lines) + '\n'
    target_rec.write_bytes(bytes(mutated))
    target_idx.write_text(text)

    try:
      reader = recordio.IndexedRecordIOReader(target_idx, target_rec)
    except recordio.RecordIOError:
      # Only an index that names a line or offset the .rec cannot hold may fail to open.
      assert kind in ('idx_garbage', 'idx_offset') or (
          kind == 'truncate' and max(offsets) >= len(mutated))
      counts['error'] += 1
      continue
    assert kind != 'idx_garbage'
    for key, (parts, end) in enumerate(layout):
      try:
        got = reader.read(key)
      except recordio.RecordIOError as e:
        assert 'fuzz.rec' in str(e) and 'byte' in str(e)
        got = None
      start = offsets[key]
      if got is None:
        counts['error'] += 1
      elif got == payloads[key]:
        counts['ok'] += 1
      elif kind == 'flip' and start <= q < end:
        # Only a data byte may change undetected: the payload with that one byte flipped.
        pos, expected = 0, None
        for j, (_, data_pos, length, _) in enumerate(parts):
          if data_pos <= q < data_pos + length:
            expected = bytearray(payloads[key])
            expected[pos + q - data_pos] ^= data[q] ^ mutated[q]
          pos += length + 4
        if expected is None:  # a length changed within its padding: zero bytes come or go
          orig, common = payloads[key], min(len(got), len(payloads[key]))
          assert abs(len(got) - len(orig)) < 4 and got[:common] == orig[:common]
          assert not any(got[common:] + orig[common:]), (case, key, q)
        else:
          assert got == bytes(expected), (case, key, q)
        counts['flipped'] += 1
      elif kind == 'idx_offset':
        assert f'{key}\t' in text and reader.offset(key) in offsets, (case, key)
        assert got == payloads[offsets.index(reader.offset(key))]
      else:
        raise AssertionError(f'case {case} ({kind}): key {key} read {got!r}')
      # Reads that must be exact: the mutation lies outside this record and its successor's
      # header (which a read checks).
      untouched = {
          'flip': q is not None and not start <= q < end + 8,
          'truncate': len(mutated) >= end + 8 or len(mutated) == end == len(data),
          'append': end < len(data),
          'idx_offset': reader.offset(key) == start,
      }[kind]
      if untouched:
        assert got == payloads[key], (case, kind, key)
      if got is not None:
        try:
          recordio.unpack(got)
        except recordio.RecordIOError:
          pass
    reader.close()
    # Sequential reading: records in order up to the first damage, then RecordIOError.
    try:
      with recordio.RecordIOReader(target_rec) as seq:
        for offset, payload in seq:
          if offset in offsets and kind != 'append':
            end = layout[offsets.index(offset)][1]
            if q is None and end + 8 <= len(mutated) or q is not None and end + 8 <= q:
              assert payload == payloads[offsets.index(offset)]
    except recordio.RecordIOError:
      pass
  # The cases exercised each outcome.
  assert min(counts.values()) > 10, counts


def _insightface_set(tmp_path, identities, name='train', header_fix=None):
  """InsightFace layout: record 0 header, images 1..n (label = identity), identity records."""
  images = [(c, f'img{c}-{j}'.encode()) for c, count in enumerate(identities)
            for j in range(count)]
  n = len(images)
  end = 1 + n + len(identities)
  header = [float(n + 1), float(end)] if header_fix is None else header_fix
  payloads = [recordio.pack((0, header, 0, 0), b'')]
  payloads += [recordio.pack((0, float(c), i, 0), img) for i, (c, img) in enumerate(images)]
  start = 1
  for count in identities:
    payloads.append(recordio.pack((0, [float(start), float(start + count)], 0, 0), b''))
    start += count
  rec, idx = _write(tmp_path, payloads, name)
  return rec, idx, images


def test_insightface_layout(tmp_path):
  rec, idx, images = _insightface_set(tmp_path, [3, 1, 4])
  with recordio.IndexedRecordIOReader(idx, rec) as reader:
    layout = insightface.face_layout(reader)
    assert layout.has_header and layout.num_identities == 3
    np.testing.assert_array_equal(layout.image_keys, np.arange(1, 9))
    for key, (c, img) in zip(layout.image_keys, images):
      header, data = reader.read_unpacked(key)
      assert insightface.image_label(header) == c and data == img
  # A header that does not match the records.
  rec, idx, _ = _insightface_set(tmp_path, [3, 1, 4], 'bad', header_fix=[8.0, 12.0])
  with recordio.IndexedRecordIOReader(idx, rec) as reader:
    with pytest.raises(recordio.RecordIOError, match=r'bad\.rec: byte 0 \(record 0\): header '
                       r'range \[8, 12\) does not match'):
      insightface.face_layout(reader)
  # No header record: every record is an image.
  rec, idx = _write(tmp_path, [recordio.pack((0, 1.0, 0, 0), b'a'),
                               recordio.pack((0, 0.0, 0, 0), b'b')], 'plain')
  with recordio.IndexedRecordIOReader(idx, rec) as reader:
    layout = insightface.face_layout(reader)
  assert not layout.has_header and layout.num_identities is None
  np.testing.assert_array_equal(layout.image_keys, [0, 1])


class _HugeReader:
  """Stands in for an indexed reader of a set above 2^24 records (no file): records 1..first-1
  are images, first..end-1 identity records, record 0 a float32 header."""

  def __init__(self, first: int, end: int):
    self.first, self.keys = first, np.arange(end, dtype=np.int64)
    self.idx_path = self.rec_path = 'huge'
    self.reads = 0

  def __contains__(self, key):
    return 0 <= key < len(self.keys)

  def offset(self, key):
    return 4 * key

  def read_unpacked(self, key):
    self.reads += 1
    if key == 0:
      return recordio.unpack(recordio.pack((0, [self.first, len(self.keys)], 0, 0), b''))
    if key < self.first:
      return recordio.IRHeader(0, 0.0, 0, 0), b'jpeg'
    return recordio.IRHeader(2, np.float32([1, 2]), 0, 0), b''


def test_insightface_layout_above_float32_integers():
  # 2^24 + 3 images: record 0 stores first = 2^24 + 4 as float32 2^24 + 4 (its nearest), and
  # 2^24 + 5 rounds too. The keys give the exact boundary; the float only cross-checks it.
  first = 2**24 + 4
  assert np.float32(first - 1) == np.float32(first)  # 2^24 + 3 is not a float32
  reader = _HugeReader(first, first + 7)
  layout = insightface.face_layout(reader)
  assert layout.num_identities == 7 and len(layout.image_keys) == first - 1
  assert layout.image_keys[-1] == first - 1
  assert reader.reads < 40  # a binary search, not a scan
  # The float header cannot tell first = 2^24 + 3 from 2^24 + 4; the layout still finds it.
  reader = _HugeReader(first - 1, first + 7)
  assert len(insightface.face_layout(reader).image_keys) == first - 2
