"""Face recognition data: training sets as `input_pipeline.Dataset`s, and verification pairs.

config.data.name picks the training set: face_synthetic (generated, face_synthetic.py),
face_folder or face_recordio (files, face_files.py; the decoded cache, face_arrays.py). Every
reader reads by global example index, so the core's global order holds. How images are
decoded, flipped and normalized, and what the eval split checks (a closed-set check, not the
face metric; `verification_sets` gives the pairs): docs/design.md, "Sources and readers".
Numpy at import. Shape letters: N examples, H W C image.
"""
from __future__ import annotations

import errno
import functools
import itertools
import os
from typing import Any, Callable, Iterator

from ml_collections import config_dict
import numpy as np

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import common
from bigbatch.data import face_arrays
from bigbatch.data import face_files
from bigbatch.data import face_synthetic
from bigbatch.face import verification
from bigbatch.third_party import insightface

FACE_DATASETS = ('face_synthetic', 'face_folder', 'face_recordio')
# The face configs' training set when data.face_root cannot be read here: WebFace42M as
# arcface_torch configures it (docs/references.md): images, identities.
WEBFACE42M = (42_474_557, 2_059_906)
FaceDataError = face_files.FaceDataError  # what a damaged or inconsistent set on disk raises


def defaults() -> dict[str, Any]:
  """The config.data fields only the face sets read, with their defaults."""
  return dict(
      # folder root, or the directory with train.rec/train.idx
      face_root=config_dict.placeholder(str),
      # directory of the converted uint8 arrays; None: decode the images at every read
      face_cache=config_dict.placeholder(str),
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
      # IJB-B or IJB-C (the directory with meta/ and loose_crop/): its 1:1 template protocol at
      # every evaluation (bigbatch/face/ijb.py; 112x112 models); None: off. It embeds every
      # image twice (flip test): IJB-C's 469k images take a while, so evaluate rarely.
      ijb_root=config_dict.placeholder(str),
      ijb_target='IJBC',         # IJBB | IJBC: which metadata under ijb_root/meta
  )


def validate(config) -> None:
  """The checks of config.data for a face set (config.data.name in FACE_DATASETS)."""
  d = config.data
  fields.choice(config, 'data.name', FACE_DATASETS)
  if d.name == 'face_synthetic':
    face_synthetic.validate(config)
  elif not isinstance(d.image_size, int) or d.image_size <= 0:
    raise fields.ConfigError(f'config.data.image_size={d.image_size!r}: must be a positive '
                             'integer (112 for the public face sets)')
  if not isinstance(d.face_flip, bool):
    raise fields.ConfigError(f'config.data.face_flip={d.face_flip!r}: must be True or False')
  if not isinstance(d.verification_bins, (tuple, list)) or not all(
      isinstance(b, str) and b for b in d.verification_bins):
    raise fields.ConfigError(f'config.data.verification_bins={d.verification_bins!r}: give a '
                             f'list of .bin files, e.g. ("lfw.bin",)')
  fields.choice(config, 'data.ijb_target', ('IJBB', 'IJBC'))
  if d.ijb_root is not None:
    if not isinstance(d.ijb_root, str) or not d.ijb_root:
      raise fields.ConfigError(f'config.data.ijb_root={d.ijb_root!r}: give the IJB-B or IJB-C '
                               f'directory (with meta/ and loose_crop/), or None')
    if d.image_size != 112:
      raise fields.ConfigError(f'config.data.ijb_root: IJB images are aligned to 112x112, and '
                               f'config.data.image_size={d.image_size}; train at 112 or unset '
                               f'ijb_root')


def normalize(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, C] -> float32 x / 127.5 - 1 (InsightFace's Normalize(0.5, 0.5))."""
  return images_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


def flip_bits(seed: int, epoch: int, idx_N: np.ndarray) -> np.ndarray:
  """bool [N]: whether example idx_N[n] is mirrored in `epoch`; a function of these three only."""
  bits = common.hash_bits(common.hash_key(seed, epoch), idx_N)
  return (bits >> np.uint64(63)).astype(bool)


def finish(images_uint8_NxHxWxC: np.ndarray, flip_N: np.ndarray | None) -> np.ndarray:
  """Mirrors the flagged images and normalizes: float32 [N, H, W, C]. Both readers end here."""
  images = images_uint8_NxHxWxC
  if flip_N is not None and flip_N.any():
    images = np.where(flip_N.reshape(-1, 1, 1, 1), images[:, :, ::-1], images)
  return normalize(images)


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


# ---------------------------------------------------------------------------------------------
# The data sets.

def _root(config) -> str:
  root = config.data.face_root
  if not root:
    raise fields.ConfigError(f'config.data.face_root is unset; {config.data.name} needs the '
                             'directory of the training set')
  return os.path.abspath(os.path.expanduser(root))


def open_images(config):
  """The FolderImages or RecordIOImages of config.data (face_folder | face_recordio)."""
  if config.data.name == 'face_folder':
    return face_files.FolderImages(_root(config))
  return face_files.RecordIOImages(_root(config))


def facts(config) -> common.DataFacts:
  """The training set's size, image shape and identities: face_synthetic's from the config, a
  real set's from its index or folder listing (no image is read), else WebFace42M's for
  face_recordio, or unknown."""
  d = config.data
  if d.name == 'face_synthetic':
    return common.DataFacts(d.num_identities * d.images_per_identity, d.num_eval,
                            face_synthetic.from_config(config).image_shape, d.num_identities,
                            'generated (config.data)')
  shape = (d.image_size, d.image_size, 3)
  root = os.path.expanduser(d.face_root) if d.face_root else None
  if root and os.path.isdir(root):
    images = open_images(config)  # reads the index (or lists the folders) only
    return common.DataFacts(images.num_examples, min(d.num_eval, images.num_examples), shape,
                            images.num_identities, f'read from {images.description}')
  why = 'data.face_root is unset' if not root else f'{root} is not a directory here'
  if d.name == 'face_recordio':
    n, classes = WEBFACE42M
    return common.DataFacts(n, min(d.num_eval, n), shape, classes,
                            f'assumed WebFace42M ({why}): {n:,} images of {classes:,} '
                            f'identities')
  return common.DataFacts(None, None, shape, None, f'unknown: {why}; the folder set is counted '
                          f'by listing it')


def create(config, *, process_index: int, process_count: int,
           **common_args: Any) -> input_pipeline.Dataset:
  """The face training set of config.data.name as an input_pipeline.Dataset;
  `common_args` are the Dataset's batching fields."""
  validate(config)
  d = config.data
  name = d.name
  if name == 'face_synthetic':
    faces = face_synthetic.from_config(config)
    return input_pipeline.Dataset(
        name=name, num_train=d.num_identities * d.images_per_identity, num_eval=d.num_eval,
        image_shape=faces.image_shape, num_classes=d.num_identities,
        train_source=faces.source(face_synthetic.SPLIT_TRAIN),
        eval_source=faces.source(face_synthetic.SPLIT_EVAL), process_index=process_index,
        process_count=process_count, **common_args)
  check_verification_files(config)  # before the model is built: a bad file fails in seconds
  try:
    images = open_images(config)
    if d.face_cache:
      cache = os.path.abspath(os.path.expanduser(d.face_cache))
      array = face_arrays.convert(images, cache, d.image_size, parallel=d.num_parallel_calls)
      stream = face_arrays.array_stream(array)
    else:
      stream = functools.partial(face_files.decode_stream, images, d.image_size,
                                 d.num_parallel_calls)
  except OSError as e:  # a folder that cannot be listed, a cache that cannot be written, ...
    path = e.filename or d.face_root
    fix = ('free space there, or point config.data.face_cache at a larger disk'
           if e.errno in (errno.ENOSPC, errno.EDQUOT) else 'fix the path or its permissions')
    raise FaceDataError(f'{path}: {e.strerror or e} (config.data.face_root={d.face_root!r}, '
                        f'config.data.face_cache={d.face_cache!r}); {fix}') from None
  num_train = images.num_examples
  reader = FaceReader(stream, num_train, min(d.num_eval, num_train), d.face_flip)
  dataset = input_pipeline.Dataset(
      name=name, num_train=num_train, num_eval=min(d.num_eval, num_train),
      image_shape=(d.image_size, d.image_size, 3), num_classes=images.num_identities,
      train_reader=reader.train, eval_reader=reader.eval, process_index=process_index,
      process_count=process_count, **common_args)
  return input_pipeline.close_at_exit(dataset)


BIN_FIX = ('replace it with a good copy from its source (InsightFace\'s lfw.bin, cfp_fp.bin, '
           '... are pickles of (2N encoded images, N issame flags)), or remove it from '
           'config.data.verification_bins')


def verification_sets(config, *, as_uint8: bool = False
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (images [2N, H, W, C] as consecutive pairs, issame bool [N])}.

  Images are float32 normalized as in training (x / 127.5 - 1), unflipped; with as_uint8 they
  stay uint8 (4x less memory: LFW's 12,000 112x112 images are 1.8 GB as float32), to be
  normalized per batch with `normalize`. face_synthetic: {'synthetic': held-out pairs} (already
  float; as_uint8 does not apply). Real sets: one entry per data.verification_bins file, named
  by its file name without '.bin', paths relative to data.face_root unless absolute.

  Every file is read whole and every image decoded here (the face task does it at startup), so
  a missing, refused, malformed or undecodable file is a FaceDataError naming it before training,
  not at the first evaluation hours in.
  """
  d = config.data
  if d.name == 'face_synthetic':
    faces = face_synthetic.from_config(config)
    return {'synthetic': faces.verification_pairs(d.verification_pairs,
                                                  d.verification_identities)}
  out = {}
  for name, path in _bin_files(config):
    bins, issame = _load_bin(path)
    images = face_files.decode_images(bins, d.image_size, d.num_parallel_calls, name=path,
                                      fix=BIN_FIX)
    out[name] = (images if as_uint8 else normalize(images), issame)
  return out


def check_verification_files(config) -> None:
  """Reads every data.verification_bins file and checks its structure, without decoding the
  images (seconds for the public sets): run when the training set is opened, before the model
  is built and compiled. `verification_sets` then decodes them (the face task, at startup)."""
  for _, path in _bin_files(config):
    _load_bin(path)


def _bin_files(config) -> list[tuple[str, str]]:
  """(name, path) of each data.verification_bins file; FaceDataError if one is missing."""
  d = config.data
  out = {}
  for entry in d.verification_bins or ():
    path = os.path.expanduser(entry)
    if not os.path.isabs(path) and d.face_root:
      path = os.path.join(os.path.expanduser(d.face_root), path)
    name = os.path.basename(path)
    name = name[:-4] if name.endswith('.bin') else name
    if name in out:
      raise fields.ConfigError(f'config.data.verification_bins names {name!r} twice')
    if not os.path.isfile(path):
      relative = '' if os.path.isabs(os.path.expanduser(entry)) else (
          ', relative to config.data.face_root' if d.face_root else
          ', relative to the current directory (config.data.face_root is unset)')
      raise FaceDataError(f'{path}: missing (config.data.verification_bins entry {entry!r}'
                          f'{relative}); fix the path, or remove the entry')
    out[name] = path
  return list(out.items())


def _load_bin(path: str) -> tuple[list[bytes], np.ndarray]:
  try:
    bins, issame = insightface.load_bin(path)
  except insightface.BinFileError as e:
    raise FaceDataError(f'{str(e).rstrip(".")}; {BIN_FIX}') from None
  if len(issame) < verification.NUM_FOLDS:
    raise FaceDataError(f'{path}: holds {len(issame)} pairs; the verification protocol\'s '
                        f'{verification.NUM_FOLDS} folds need at least '
                        f'{verification.NUM_FOLDS}; {BIN_FIX}')
  return bins, issame
