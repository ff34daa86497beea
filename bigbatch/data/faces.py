"""Face recognition data: training sets as `input_pipeline.Dataset`s, and verification pairs.

config.data.name picks the training set:
  face_synthetic  generated identities (no files): example i of a split is made from
                  (SYNTHETIC_SEED, split, i) alone, like input_pipeline's 'synthetic', so any size
                  costs no memory and any process builds any rows. Each identity has a latent
                  prototype; an image (RGB, data.image_size square) is a fixed random smooth
                  "renderer" (tanh MLP, then a bilinearly upsampled coarse map, tanh) of
                  [prototype + per-image latent noise, a per-image "pose" latent unrelated to
                  the identity], plus pixel noise, mirrored left-right for half the images (so
                  identity must be learnt flip-invariant, as for faces, and the verification
                  flip test makes sense). Example i of the training split shows identity
                  i mod num_identities. Verification pairs come from held-out identities (a
                  separate prototype space, disjoint from the training identities). Defaults:
                  raw pixels with the flip test verify at ~0.74-0.81; a small CNN trained with a
                  CosFace loss for 8 epochs reaches >= 0.90 (tests/test_face_data.py, slow).
  face_folder     image files under data.face_root/<identity>/; identities sorted by directory
                  name are labels 0..C-1; example i is the i-th file in (identity, file name) order.
  face_recordio   data.face_root/train.rec + train.idx in the InsightFace layout
                  (bigbatch/third_party/insightface.py); example i is the i-th image record.
Real images are decoded (JPEG/PNG, tf.io in parallel tf.data maps), resized to
data.image_size if they are not that size already, kept as uint8, then mirrored (training, when
data.face_flip) and normalized as InsightFace does: x / 127.5 - 1, i.e. (x/255 - 0.5) / 0.5.
The flip of an example is a function of (config.seed, epoch, global index) only.

With data.face_cache set, folder and RecordIO sets are first converted, once, into a directory of
decoded uint8 images [N, S, S, 3] in one memory-mapped .npy plus labels, verified on every open
(`ArrayFile`); training then reads them by global index with numpy only (no JPEG decoding, no
TensorFlow): the fast path for large batches on few cores. It costs S*S*3 bytes per image
(37.6 KB at 112x112, several times the JPEGs).

Every reader reads by global example index, so the batch at step s is `Dataset.train_indices(s)`
(the core's global order, independent of the process count) and a process reads only its rows.
Direct and converted reading give identical batches.

The Dataset's eval split is a closed-set check, not the face metric: face_synthetic evaluates
fresh images of the training identities; folder and RecordIO sets evaluate data.num_eval training
examples spread evenly over the set (seen images, no flip). Face verification accuracy comes from
`verification_sets` and bigbatch/face/verification.py.

Shape letters: N examples, H W C image, L latent dimension.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from bigbatch import config_lib
from bigbatch import input_pipeline
from bigbatch.third_party import insightface
from bigbatch.third_party import recordio

FACE_DATASETS = ('face_synthetic', 'face_folder', 'face_recordio')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


class FaceDataError(ValueError):
  """A face data set on disk that cannot be read as it should (missing, corrupt, inconsistent)."""


def defaults() -> dict[str, Any]:
  """The config.data fields this module reads, with their defaults (config_lib adds them)."""
  return dict(
      face_root=None,            # folder root, or the directory with train.rec/train.idx
      face_cache=None,           # directory of the converted uint8 arrays; None: decode JPEGs
      face_flip=True,            # random horizontal flip of training images (real sets)
      verification_bins=(),      # .bin files (absolute, or relative to face_root)
      num_identities=1000,       # face_synthetic: training identities
      images_per_identity=16,    # face_synthetic: num_train = num_identities * images_per_identity
      latent_dim=16,             # face_synthetic: identity latent (prototype) dimension
      nuisance_dim=8,            # face_synthetic: per-image latent independent of the identity
      noise=0.5,                 # face_synthetic: per-image latent noise (relative to prototype 1)
      pixel_noise=0.1,           # face_synthetic: per-pixel noise (pixels are in [-1, 1])
      verification_pairs=3000,   # face_synthetic: held-out pairs (half same identity)
      verification_identities=500,  # face_synthetic: held-out identities they are drawn from
  )


def normalize(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] -> float32 x / 127.5 - 1 (InsightFace's Normalize(0.5, 0.5))."""
  return images_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


def flip_bits(seed: int, epoch: int, idx_N: np.ndarray) -> np.ndarray:
  """bool [N]: whether example idx_N[n] is mirrored in `epoch`; a function of these three only."""
  # pylint: disable=protected-access  # input_pipeline's counter hash and constants
  mix, golden, mask = input_pipeline._splitmix64, input_pipeline._GOLDEN, input_pipeline._MASK64
  key = ((seed & 0xFFFFFFFF) << 32 | epoch & 0xFFFFFFFF) * golden & mask
  base = mix(np.array([key], np.uint64))
  return (mix(np.asarray(idx_N, np.uint64) * np.uint64(golden) + base) >> np.uint64(63)).astype(
      bool)


def finish(images_uint8_NxHxWxC: np.ndarray, flip_N: np.ndarray | None) -> np.ndarray:
  """Mirrors the flagged images and normalizes: float32 [N, H, W, C]. Both readers end here."""
  images = images_uint8_NxHxWxC
  if flip_N is not None and flip_N.any():
    images = np.where(flip_N.reshape(-1, 1, 1, 1), images[:, :, ::-1], images)
  return normalize(images)


# ---------------------------------------------------------------------------------------------
# face_synthetic.

_SPLIT_IDENTITY, _SPLIT_HELDOUT_IDENTITY = 8, 9  # prototype spaces: training / held-out
_SPLIT_TRAIN_FACES, _SPLIT_EVAL_FACES, _SPLIT_PAIR_FACES = 10, 11, 12
_BLOCK_ROWS = 256  # fixed matmul blocks: a row's arithmetic does not depend on its batch


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_in, n_out] bilinear (align-corners) interpolation weights along one axis."""
  pos = np.linspace(0, n_in - 1, n_out)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2) if n_in > 1 else np.zeros(n_out, int)
  frac = pos - lo
  m = np.zeros((n_in, n_out))
  m[lo, np.arange(n_out)] += 1 - frac
  if n_in > 1:
    m[lo + 1, np.arange(n_out)] += frac
  return m


@dataclasses.dataclass(frozen=True, eq=False)
class FaceRenderer:
  """A fixed random map latent [L] -> image [H, W, C] in (-1, 1):
  tanh(2 * upsample(tanh(z @ w1) @ w2)), the upsampling folded into w2."""
  w1: np.ndarray  # [L, hidden]
  w2: np.ndarray  # [hidden, H*W*C]
  image_shape: tuple[int, int, int]

  def __call__(self, z_NxL: np.ndarray) -> np.ndarray:
    # BLAS may round a row differently with the number of rows in the call; fixed blocks of
    # rows (the last one padded) give every row the same arithmetic whatever its batch, so any
    # process builds bit-identical rows. (A stacked np.matmul would too, but runs ~20x slower.)
    n = len(z_NxL)
    out = np.empty((n, self.w2.shape[1]), np.float32)
    for start in range(0, n, _BLOCK_ROWS):
      z = z_NxL[start:start + _BLOCK_ROWS].astype(np.float32)
      m = len(z)
      if m < _BLOCK_ROWS:
        z = np.concatenate([z, np.zeros((_BLOCK_ROWS - m, z.shape[1]), np.float32)])
      out[start:start + m] = np.tanh(np.tanh(z @ self.w1) @ self.w2)[:m]
    return out.reshape(-1, *self.image_shape)


@functools.lru_cache(maxsize=4)
def _renderer(image_shape: tuple[int, int, int], latent_dim: int) -> FaceRenderer:
  h, w, c = image_shape
  hidden = 4 * latent_dim
  h0, w0 = max(2, h // 4), max(2, w // 4)
  rng = np.random.default_rng([input_pipeline.SYNTHETIC_SEED, 0xFACE, h, w, c, latent_dim])
  w1 = rng.standard_normal((latent_dim, hidden)) / math.sqrt(latent_dim)
  # tanh of unit-variance inputs has variance ~0.39: scale the coarse map back to unit variance,
  # then gain 2 so that the final tanh bends the image (neither linear nor saturated).
  coarse = rng.standard_normal((hidden, h0, w0, c)) * (2 / math.sqrt(0.39 * hidden))
  up = np.einsum('kyxc,yY,xX->kYXc', coarse, _upsample_matrix(h0, h), _upsample_matrix(w0, w))
  # Bilinear upsampling shrinks the variance between the coarse points; restore it per pixel.
  up /= up.std(axis=0, keepdims=True) / coarse.std()
  return FaceRenderer(w1.astype(np.float32), up.reshape(hidden, -1).astype(np.float32),
                      image_shape)


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticFaces:
  """Generated identities (module docstring). Images are float32 [N, H, W, C], normalized."""
  image_shape: tuple[int, int, int]
  num_identities: int
  latent_dim: int
  nuisance_dim: int
  noise: float
  pixel_noise: float

  @property
  def renderer(self) -> FaceRenderer:
    return _renderer(self.image_shape, self.latent_dim + self.nuisance_dim)

  def images(self, split: int, idx_N: np.ndarray, identity_N: np.ndarray,
             heldout: bool = False) -> np.ndarray:
    """Image idx_N[n] of `split`, of identity identity_N[n] (of the held-out space if heldout)."""
    dim, latent, pixels = self.latent_dim, self.latent_dim + self.nuisance_dim, math.prod(
        self.image_shape)
    prototypes = input_pipeline.synthetic_inputs(
        _SPLIT_HELDOUT_IDENTITY if heldout else _SPLIT_IDENTITY, identity_N, dim)
    r = input_pipeline.synthetic_inputs(split, idx_N, latent + pixels + 1)
    # Identity part: the prototype moved by per-image noise (rescaled to unit variance);
    # nuisance part ("pose, light"): independent of the identity, to be ignored.
    z = np.concatenate([(prototypes + np.float32(self.noise) * r[:, :dim]) / np.float32(
        math.sqrt(1 + self.noise**2)), r[:, dim:latent]], axis=1)
    x = self.renderer(z) + np.float32(self.pixel_noise) * r[:, latent:latent + pixels].reshape(
        -1, *self.image_shape)
    return np.where((r[:, -1] > 0).reshape(-1, 1, 1, 1), x[:, :, ::-1], x)

  def source(self, split: int) -> input_pipeline.Source:
    """Example i of `split` is an image of identity i mod num_identities."""
    def fn(idx_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      identity = np.asarray(idx_N, np.int64) % self.num_identities
      return self.images(split, idx_N, identity), identity.astype(np.int32)
    return fn

  def verification_pairs(self, num_pairs: int, num_identities: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [2N, H, W, C] as consecutive pairs, issame bool [N]) from `num_identities`
    held-out identities; exactly N // 2 pairs are of one identity, in a fixed random order."""
    if num_identities < 2:
      raise config_lib.ConfigError('config.data.verification_identities must be >= 2')
    rng = np.random.default_rng([input_pipeline.SYNTHETIC_SEED, 0xFACE, num_pairs,
                                 num_identities])
    issame = rng.permutation(np.arange(num_pairs) < num_pairs // 2)
    first = rng.integers(num_identities, size=num_pairs)
    other = (first + 1 + rng.integers(num_identities - 1, size=num_pairs)) % num_identities
    identity = np.stack([first, np.where(issame, first, other)], axis=1).reshape(-1)
    return self.images(_SPLIT_PAIR_FACES, np.arange(2 * num_pairs), identity, heldout=True), issame


def _synthetic(config) -> SyntheticFaces:
  d = config.data
  if not isinstance(d.nuisance_dim, int) or d.nuisance_dim < 0:
    raise config_lib.ConfigError(f'config.data.nuisance_dim={d.nuisance_dim!r}: must be an '
                                 'integer >= 0')
  for name in ('image_size', 'num_identities', 'images_per_identity', 'latent_dim'):
    if not isinstance(d[name], int) or d[name] <= 0:
      raise config_lib.ConfigError(f'config.data.{name}={d[name]!r}: must be a positive integer')
  for name in ('noise', 'pixel_noise'):
    if d[name] < 0:
      raise config_lib.ConfigError(f'config.data.{name}={d[name]}: must be >= 0')
  # RGB like the real sets (data.channels, the plain synthetic set's field, does not apply).
  return SyntheticFaces((d.image_size, d.image_size, 3), d.num_identities, d.latent_dim,
                        d.nuisance_dim, float(d.noise), float(d.pixel_noise))


# ---------------------------------------------------------------------------------------------
# Encoded images on disk: random access to (encoded bytes or file path, label) by global index.

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


def _decode_fn(size: int, from_paths: bool) -> Callable:
  """tf: encoded image (or its path) -> uint8 [size, size, 3], resized bilinearly if needed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def decode(item):
    data = tf.io.read_file(item) if from_paths else item
    image = tf.io.decode_image(data, channels=3, expand_animations=False)

    def resize():
      resized = tf.image.resize(image, [size, size], method='bilinear')
      return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size]))
    return tf.ensure_shape(tf.cond(same, lambda: image, resize), [size, size, 3])

  return decode


def _tf_quiet():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # JAX owns the accelerators (as in bigbatch/data/images.py).
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass
  return tf


def decode_stream(images, size: int, parallel: int, index_blocks: Iterator[np.ndarray],
                  block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 [block, size, size, 3], labels int32 [block]) for each index block, in order; images
  decoded in a parallel, order-preserving tf.data map (one block ahead)."""
  tf = _tf_quiet()
  raised = []  # an error reading the files, re-raised as itself (tf.data would wrap it)

  def gen():
    try:
      for idx in index_blocks:
        data, labels = images.encoded(np.asarray(idx, np.int64))
        yield data, labels
    except Exception as e:  # pylint: disable=broad-except  # handed to the consumer below
      raised.append(e)

  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32))).unbatch()
  decode = _decode_fn(size, images.yields_paths)
  ds = ds.map(lambda item, label: (decode(item), label),
              num_parallel_calls=tf.data.AUTOTUNE if parallel == -1 else parallel,
              deterministic=True)
  ds = ds.batch(block, drop_remainder=True).prefetch(1)
  options = tf.data.Options()
  options.deterministic = True
  try:
    yield from ds.with_options(options).as_numpy_iterator()
  except tf.errors.OpError as e:
    if raised:
      raise raised[0] from None
    raise FaceDataError(f'decoding an image failed (a damaged or non-image file): {e.message}'
                        ) from None
  if raised:
    raise raised[0]


# ---------------------------------------------------------------------------------------------
# The converted format: decoded uint8 arrays read by global index.

ARRAY_FORMAT = 'bigbatch-face-arrays'
ARRAY_VERSION = 1
_CRC_BLOCK = 1024  # images per checksum block


@contextlib.contextmanager
def _exclusive_lock(directory: str):
  # flock is released when the file closes, also if the process dies: no stale lock.
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, '.lock'), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


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
  with _exclusive_lock(directory):
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
    for s, (decoded, lab) in zip(starts, decode_stream(images, image_size, parallel, padded,
                                                       block)):
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
    with open(os.path.join(directory, 'meta.json.tmp'), 'w') as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(os.path.join(directory, 'meta.json.tmp'), os.path.join(directory, 'meta.json'))
  return ArrayFile(directory)


# ---------------------------------------------------------------------------------------------
# Readers (input_pipeline.TrainReader / EvalReader) over a uint8 stream by global index.

class FaceReader:
  """Train and eval readers for real face sets; `stream(index_blocks, block)` yields
  (uint8 images, int32 labels) per block of global indices, in order.

  Training flips example i of epoch e iff flip_bits(seed, e, i) (when `flip`). Eval reads
  `num_eval` training examples spread evenly over the set, unflipped.
  """

  def __init__(self, stream: Callable, num_train: int, num_eval: int, flip: bool):
    self._stream, self._flip = stream, flip
    self.eval_examples = (np.arange(num_eval, dtype=np.int64) * num_train) // max(1, num_eval)

  def train(self, dataset, start: int, rows) -> Iterator[dict[str, np.ndarray]]:
    k = dataset.accumulation_steps

    def indices():
      for step in itertools.count(start):
        idx = dataset.train_indices(step)
        yield step, (idx if rows is None else idx[:, rows]).reshape(-1)

    for_stream, for_flips = itertools.tee(indices())
    blocks = (idx for _, idx in for_stream)
    first = dataset.train_indices(start)
    block = (first if rows is None else first[:, rows]).size
    for (step, idx), (images, labels) in zip(for_flips, self._stream(blocks, block)):
      flip = flip_bits(dataset.seed, step // dataset.steps_per_epoch, idx) if self._flip else None
      yield {'image': finish(images, flip).reshape(k, -1, *images.shape[1:]),
             'label': labels.reshape(k, -1)}

  def eval(self, dataset, rows) -> Iterator[dict[str, np.ndarray]]:
    e = dataset.eval_batch
    positions = [np.arange(b * e, (b + 1) * e) for b in range(dataset.num_eval_steps)]
    positions = [p if rows is None else p[rows] for p in positions]
    if not positions:
      return
    blocks = (self.eval_examples[np.where(p < dataset.num_eval, p, 0)] for p in positions)
    for pos, (images, labels) in zip(positions, self._stream(blocks, len(positions[0]))):
      mask = pos < dataset.num_eval
      yield {'image': np.where(mask.reshape(-1, 1, 1, 1), finish(images, None), np.float32(0)),
             'label': np.where(mask, labels, np.int32(0)), 'mask': mask}


def _array_stream(array: ArrayFile) -> Callable:
  def stream(index_blocks, block):
    del block
    for idx in index_blocks:
      yield array.read(idx)
  return stream


# ---------------------------------------------------------------------------------------------
# The data sets.

def _root(config) -> str:
  root = config.data.face_root
  if not root:
    raise config_lib.ConfigError(f'config.data.face_root is unset; {config.data.name} needs the '
                                 'directory of the training set')
  return os.path.abspath(os.path.expanduser(root))


def open_images(config):
  """The FolderImages or RecordIOImages of config.data (face_folder | face_recordio)."""
  if config.data.name == 'face_folder':
    return FolderImages(_root(config))
  return RecordIOImages(_root(config))


def create(config, *, process_index: int, process_count: int,
           **common: Any) -> input_pipeline.Dataset:
  """The face training set of config.data.name (module docstring) as an input_pipeline.Dataset."""
  d = config.data
  name = d.name
  if name == 'face_synthetic':
    faces = _synthetic(config)
    return input_pipeline.Dataset(
        name=name, num_train=d.num_identities * d.images_per_identity, num_eval=d.num_eval,
        image_shape=faces.image_shape, num_classes=d.num_identities,
        train_source=faces.source(_SPLIT_TRAIN_FACES), eval_source=faces.source(_SPLIT_EVAL_FACES),
        process_index=process_index, process_count=process_count, **common)
  if name not in FACE_DATASETS:
    raise config_lib.ConfigError(f'config.data.name={name!r} is not a face data set; choose one '
                                 f'of {", ".join(FACE_DATASETS)}')
  if not isinstance(d.image_size, int) or d.image_size <= 0:
    raise config_lib.ConfigError(f'config.data.image_size={d.image_size!r}: must be a positive '
                                 'integer (112 for the public face sets)')
  images = open_images(config)
  if d.face_cache:
    array = convert(images, os.path.abspath(os.path.expanduser(d.face_cache)), d.image_size,
                    parallel=d.num_parallel_calls)
    stream = _array_stream(array)
  else:
    stream = functools.partial(decode_stream, images, d.image_size, d.num_parallel_calls)
  num_train = images.num_examples
  reader = FaceReader(stream, num_train, min(d.num_eval, num_train), d.face_flip)
  dataset = input_pipeline.Dataset(
      name=name, num_train=num_train, num_eval=min(d.num_eval, num_train),
      image_shape=(d.image_size, d.image_size, 3), num_classes=images.num_identities,
      train_reader=reader.train, eval_reader=reader.eval, process_index=process_index,
      process_count=process_count, **common)
  return input_pipeline.close_at_exit(dataset)


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


def verification_sets(config, *, as_uint8: bool = False
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (images [2N, H, W, C] as consecutive pairs, issame bool [N])}.

  Images are float32 normalized as in training (x / 127.5 - 1), unflipped; with as_uint8 they
  stay uint8 (4x less memory: LFW's 12,000 112x112 images are 1.8 GB as float32), to be
  normalized per batch with `normalize`. face_synthetic: {'synthetic': held-out pairs} (already
  float; as_uint8 does not apply). Real sets: one entry per data.verification_bins file, named
  by its file name without '.bin', paths relative to data.face_root unless absolute.
  """
  d = config.data
  if d.name == 'face_synthetic':
    faces = _synthetic(config)
    return {'synthetic': faces.verification_pairs(d.verification_pairs,
                                                  d.verification_identities)}
  out = {}
  for path in d.verification_bins or ():
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and d.face_root:
      path = os.path.join(os.path.expanduser(d.face_root), path)
    name = os.path.basename(path)
    name = name[:-4] if name.endswith('.bin') else name
    if name in out:
      raise config_lib.ConfigError(f'config.data.verification_bins names {name!r} twice')
    bins, issame = insightface.load_bin(path)
    images = decode_images(bins, d.image_size, d.num_parallel_calls)
    out[name] = (images if as_uint8 else normalize(images), issame)
  return out
