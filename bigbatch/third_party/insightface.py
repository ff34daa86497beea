"""InsightFace data conventions: the RecordIO layout of face training sets, and `.bin` pairs.

Specification: deepinsight/insightface recognition/arcface_torch (dataset.py MXFaceDataset,
eval/verification.py load_bin) and the face2rec2 tools that wrote the public sets. The layout
(and why record indices come from the `.idx` keys, not the float32 header), and the restricted
unpickler for `.bin` pairs, are in docs/design.md, "InsightFace face sets and verification
pairs".
"""
from __future__ import annotations

import bisect
import dataclasses
import io
import os
import pickle

import numpy as np

from bigbatch.third_party import recordio


# ---------------------------------------------------------------------------------------------
# RecordIO layout.

@dataclasses.dataclass(frozen=True)
class FaceLayout:
  """Where the images of an InsightFace RecordIO set are.

  image_keys: int64 [N], the `.idx` keys of the image records in order (example i is record
  image_keys[i]); num_identities: the number of identity records (None without a header record:
  count the labels); has_header: whether record 0 is the InsightFace header.
  """
  image_keys: np.ndarray
  num_identities: int | None
  has_header: bool


def image_label(header: recordio.IRHeader) -> float:
  """The identity of an image record: the label, or label[0] when it is an array (as
  arcface_torch's MXFaceDataset)."""
  return float(header.label) if header.flag == 0 else float(header.label[0])


def face_layout(reader: recordio.IndexedRecordIOReader) -> FaceLayout:
  """The layout of an InsightFace training set (docs/design.md, "InsightFace face sets"); raises
  RecordIOError when the records do not follow it."""
  keys = reader.keys
  if len(keys) == 0:
    raise recordio.RecordIOError(f'{reader.idx_path}: byte 0: the index lists no records')
  if 0 not in reader or reader.read_unpacked(0)[0].flag == 0:
    return FaceLayout(np.sort(keys), None, False)
  header0, _ = reader.read_unpacked(0)
  where = f'{reader.rec_path}: byte {reader.offset(0)} (record 0)'
  if header0.flag < 2:
    raise recordio.RecordIOError(f'{where}: header record has {header0.flag} label(s); the '
                                 'InsightFace layout needs [first identity record, end)')
  end = len(keys)
  # The index's keys are distinct, so min 0 and max end - 1 mean exactly 0..end-1 (no sort of
  # millions of keys).
  if keys.min() != 0 or keys.max() != end - 1:
    raise recordio.RecordIOError(f'{reader.idx_path}: byte 0: keys are not 0..{end - 1}, as an '
                                 'InsightFace set with a header record has')

  def is_identity(key: int) -> bool:
    header, image = reader.read_unpacked(key)
    return header.flag >= 2 and not image

  # The first identity record: images (with image bytes) come first, identity records last.
  first = bisect.bisect_left(range(end), True, lo=1, key=is_identity)
  label0 = np.float32(header0.label[0])
  if np.float32(first) != label0 or np.float32(end) != np.float32(header0.label[1]):
    raise recordio.RecordIOError(
        f'{where}: header range [{float(label0):.0f}, {float(header0.label[1]):.0f}) does not '
        f'match the records: images 1..{first - 1}, identity records {first}..{end - 1} (by the '
        'index keys); the .idx and .rec do not belong together, or the layout is not InsightFace')
  if first == 1:
    raise recordio.RecordIOError(f'{where}: the set holds no image records')
  return FaceLayout(np.arange(1, first, dtype=np.int64), end - first, True)


# ---------------------------------------------------------------------------------------------
# .bin verification pairs.

class BinFileError(ValueError):
  """An unreadable, refused or malformed `.bin` verification file; the message names the file."""


def _numpy_attr(module: str, name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  # numpy 2 first: importing numpy.core there warns (deprecated alias).
  for candidate in (module.replace('numpy.core', 'numpy._core', 1), module):
    try:
      return getattr(importlib.import_module(candidate), name)
    except (ImportError, AttributeError):
      continue
  raise pickle.UnpicklingError(f'{module}.{name} is not available in this numpy')


# What a `.bin` may construct: numpy arrays, dtypes and scalars (Python 2/3 pickles, numpy 1 and
# 2 module names, protocol 5's _frombuffer), and bytes as Python 3 pickles them. None of these
# calls code a pickle chooses; everything else (os.system, builtins.eval, ...) is refused.
_ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
}
_ALLOWED_BUILTINS = {('builtins', 'bytes'), ('builtins', 'bytearray'), ('__builtin__', 'bytearray'),
                     ('_codecs', 'encode')}


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _numpy_attr(module, name)
    if (module, name) in _ALLOWED_BUILTINS:
      if module == '_codecs':
        import codecs  # pylint: disable=g-import-not-at-top
        return codecs.encode
      return {'bytes': bytes, 'bytearray': bytearray}[name]
    raise pickle.UnpicklingError(
        f'refused to load {module}.{name}: a verification .bin needs only numpy arrays and bytes')


def _safe_loads(data: bytes):
  return _RestrictedUnpickler(io.BytesIO(data), encoding='bytes').load()


def load_bin(path) -> tuple[list[bytes], np.ndarray]:
  """(bins: 2N encoded images as bytes, issame bool [N]) of an InsightFace `.bin` file.

  Images may be stored as bytes or as uint8 numpy arrays (both occur); both come back as bytes.
  Raises BinFileError for a pickle that names anything but numpy arrays and bytes (nothing it
  names is called), and for a structure other than (2N images, N flags).
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise BinFileError(f'{path}: cannot open ({e.strerror})') from e
  try:
    obj = _safe_loads(data)
  except pickle.UnpicklingError as e:
    raise BinFileError(f'{path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  # any damage in a pickle stream
    raise BinFileError(f'{path}: not a readable pickle ({type(e).__name__}: {e})') from None
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise BinFileError(f'{path}: expected a pickled (bins, issame_list) pair, got '
                       f'{type(obj).__name__}')
  raw_bins, raw_issame = obj
  if not isinstance(raw_bins, (list, tuple, np.ndarray)):
    raise BinFileError(f'{path}: bins is a {type(raw_bins).__name__}, not a list of images')
  bins = []
  for i, b in enumerate(raw_bins):
    if isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1:
      bins.append(b.tobytes())
    elif isinstance(b, (bytes, bytearray)):
      bins.append(bytes(b))
    else:
      raise BinFileError(f'{path}: image {i} is a {type(b).__name__}'
                         f'{" of " + str(b.dtype) if isinstance(b, np.ndarray) else ""}, not '
                         'encoded bytes or a 1-D uint8 array')
  try:
    issame = np.asarray(raw_issame)
  except Exception as e:  # pylint: disable=broad-except
    raise BinFileError(f'{path}: issame_list is not an array of flags ({e})') from None
  if issame.ndim != 1 or issame.dtype.kind not in 'bui' or not np.isin(issame, (0, 1)).all():
    raise BinFileError(f'{path}: issame_list must be a 1-D list of booleans, got dtype '
                       f'{issame.dtype} and shape {issame.shape}')
  if len(bins) != 2 * len(issame):
    raise BinFileError(f'{path}: {len(bins)} images for {len(issame)} pairs; expected '
                       f'{2 * len(issame)} (consecutive pairs)')
  return bins, issame.astype(bool)


def save_bin(path, bins: list[bytes], issame) -> None:
  """Writes a `.bin` the way InsightFace's tools do (for tests and for making small sets)."""
  with open(path, 'wb') as f:
    pickle.dump((list(bins), [bool(x) for x in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)
