"""docs/errors.md's face data rows: a damaged or mismatched face set, or a bad verification .bin,
ends the run with exit 6 and one line naming the file (for RecordIO the record and its byte
offset) and the fix for face files, never the TFDS hint, and no traceback.

Each row makes a tiny set in tmp_path (12 PNG images of 8x8), damages it and runs main.train (the
CLI's code path; a slow test runs the real command line). The rows found when the set is opened
cost about a second each; the two found later (an image that does not decode, read by the first
training step; a .bin image, decoded at the task's startup check) build a small MLP first.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import main
from bigbatch.third_party import insightface
from bigbatch.third_party import recordio

ROOT = os.path.join(os.path.dirname(__file__), '..')

# The rows of docs/errors.md tested here.
DOC_ROWS = ('face-root-missing', 'face-rec-truncated', 'face-idx-past-end', 'face-idx-mismatch',
            'face-idx-shared-offset', 'face-idx-out-of-order', 'face-rec-not-recordio', 'face-image-corrupt', 'face-folder-image-corrupt',
            'face-bin-missing', 'face-bin-not-pickle', 'face-bin-hostile', 'face-bin-lengths',
            'face-bin-few-pairs', 'face-bin-image-corrupt')

IDENTITIES, PER_IDENTITY, SIZE = 3, 4, 8
JUNK = b'\x89PNG but not really' * 4  # no decoder takes it


def _images(seed=0, size=SIZE):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [tf.io.encode_png(rng.integers(0, 256, (size, size, 3), np.uint8)).numpy()
          for _ in range(IDENTITIES * PER_IDENTITY)]


def _write_recordio(root, images):
  """An InsightFace set: header record 0, image records 1..N, then one record per identity."""
  os.makedirs(root, exist_ok=True)
  n = len(images)
  payloads = [recordio.pack((0, [n + 1.0, n + 1.0 + IDENTITIES], 0, 0), b'')]
  payloads += [recordio.pack((0, float(i // PER_IDENTITY), i, 0), e) for i, e in enumerate(images)]
  payloads += [recordio.pack((0, [1.0 + c * PER_IDENTITY, 1.0 + (c + 1) * PER_IDENTITY], 0, 0),
                             b'') for c in range(IDENTITIES)]
  with recordio.RecordIOWriter(os.path.join(root, 'train.rec'),
                               os.path.join(root, 'train.idx')) as w:
    for key, p in enumerate(payloads):
      w.write(p, key)


def _write_folder(root, images):
  for i, e in enumerate(images):
    os.makedirs(os.path.join(root, f'id{i // PER_IDENTITY}'), exist_ok=True)
    with open(os.path.join(root, f'id{i // PER_IDENTITY}', f'{i:03d}.png'), 'wb') as f:
      f.write(e)


# The run: the smallest model (the rows test the data, not the network), two steps.
CONFIG = {
    'task': 'face', 'data.name': 'face_recordio', 'data.image_size': SIZE, 'data.num_eval': 8,
    'model.name': 'mlp', 'model.width': 8, 'model.embedding_dim': 8, 'face.sample_rate': 1.0,
    'face.verify_batch': 8, 'global_batch': 8, 'eval_batch': 8, 'num_epochs': None,
    'num_steps': 2, 'lr.warmup_epochs': None, 'lr.decay': 'constant', 'eval_every_epochs': None,
}


def _config(root, **overrides):
  return config_lib.override(config_lib.base_config(),
                             **{**CONFIG, 'data.face_root': str(root), **overrides})


def _pairs_bin(path, images, pairs=10):
  insightface.save_bin(path, [images[i % len(images)] for i in range(2 * pairs)],
                       [bool(i % 2) for i in range(pairs)])


# ---------------------------------------------------------------------------------------------
# Damage, one function per row: (root, images) -> config overrides.

def _truncate(path, size):
  with open(path, 'r+b') as f:
    f.truncate(size)


def root_missing(root, images):
  del images
  os.makedirs(root / 'empty')
  return {'data.face_root': str(root / 'empty')}


def rec_truncated(root, images):  # an interrupted copy: the last record is cut
  del images
  _truncate(root / 'train.rec', os.path.getsize(root / 'train.rec') - 8)
  return {}


def idx_past_end(root, images):  # cut more: the .idx points past the end
  del images
  _truncate(root / 'train.rec', os.path.getsize(root / 'train.rec') // 2)
  return {}


def idx_mismatch(root, images):  # the .idx of another set (smaller images: other offsets)
  del images
  _write_recordio(root / 'other', _images(seed=1, size=SIZE // 2))
  os.replace(root / 'other' / 'train.idx', root / 'train.idx')
  return {}


def _edit_idx(root, edit):
  lines = (root / 'train.idx').read_text().splitlines()
  edit(lines)
  (root / 'train.idx').write_text('\n'.join(lines) + '\n')


def idx_shared_offset(root, images):  # two keys at one offset: example 4 read with 3's label
  del images
  _edit_idx(root, lambda lines: lines.__setitem__(5, '5\t' + lines[4].split('\t')[1]))
  return {}


def idx_out_of_order(root, images):  # distinct offsets, two swapped: each key reads the other
  del images

  def swap(lines):
    (k6, o6), (k7, o7) = lines[6].split('\t'), lines[7].split('\t')
    lines[6], lines[7] = f'{k6}\t{o7}', f'{k7}\t{o6}'
  _edit_idx(root, swap)
  return {}


def rec_not_recordio(root, images):  # e.g. a zip saved under the name
  del images
  (root / 'train.rec').write_bytes(b'PK\x03\x04' + bytes(os.path.getsize(root / 'train.rec') - 4))
  return {}


def bin_missing(root, images):
  del root, images
  return {'data.verification_bins': ('lfw.bin',)}


def bin_not_pickle(root, images):
  del images
  (root / 'lfw.bin').write_bytes(b'<html>403 Forbidden</html>')  # a failed download
  return {'data.verification_bins': ('lfw.bin',)}


class _Hostile:

  def __reduce__(self):
    return os.system, ('echo pwned',)


def bin_hostile(root, images):
  del images
  (root / 'lfw.bin').write_bytes(pickle.dumps(([_Hostile()], [True]), protocol=2))
  return {'data.verification_bins': ('lfw.bin',)}


def bin_lengths(root, images):
  insightface.save_bin(root / 'lfw.bin', images[:11], [True] * 10)
  return {'data.verification_bins': ('lfw.bin',)}


def bin_few_pairs(root, images):
  _pairs_bin(root / 'lfw.bin', images, pairs=3)
  return {'data.verification_bins': ('lfw.bin',)}


# id: (damage, words the one line must contain). The set is face_recordio unless the damage
# says otherwise; every row exits 6.
OPEN_ROWS = {
    'face-root-missing': (root_missing, ['empty/train.rec: missing', 'config.data.face_root']),
    'face-rec-truncated': (rec_truncated, ['train.rec: byte', 'runs past the end of the file',
                                           'record 15, which train.idx puts at byte',
                                           'copy train.rec and train.idx again']),
    'face-idx-past-end': (idx_past_end, ['train.idx: byte', 'is not inside the .rec',
                                         'the .rec is truncated', 'copy train.rec and train.idx']),
    'face-idx-mismatch': (idx_mismatch, ['train.rec: byte', 'record', 'train.idx puts at byte',
                                         'copy train.rec and train.idx again']),
    'face-idx-shared-offset': (idx_shared_offset, ['train.idx: byte', '(line 6): records 4 and 5 '
                                                   'share byte offset', 'not theirs',
                                                   'copy train.rec and train.idx again']),
    'face-idx-out-of-order': (idx_out_of_order, ['train.idx: byte', '(line 8): record 7 at byte',
                                                 'comes after record 6 at byte',
                                                 'the offsets go back',
                                                 'copy train.rec and train.idx again']),
    'face-rec-not-recordio': (rec_not_recordio, ['train.rec: byte 0: bad magic 0x04034b50',
                                                 'no record starts here',
                                                 'record 0, which train.idx puts at byte 0']),
    'face-bin-missing': (bin_missing, ['lfw.bin: missing', 'config.data.verification_bins',
                                       'relative to config.data.face_root']),
    'face-bin-not-pickle': (bin_not_pickle, ['lfw.bin: ', 'replace it with a good copy']),
    'face-bin-hostile': (bin_hostile, ['lfw.bin: refused to load', 'system',
                                       'replace it with a good copy']),
    'face-bin-lengths': (bin_lengths, ['lfw.bin: 11 images for 10 pairs']),
    'face-bin-few-pairs': (bin_few_pairs, ['lfw.bin: holds 3 pairs', 'at least 10']),
}


def _assert_one_line(e, capsys, words):
  assert e.value.code == main.EXIT_DATA_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  line = err[0]
  assert line.startswith('bigbatch: data error: '), line
  for w in words:
    assert w in line, (w, line)
  assert 'tensorflow_datasets' not in line and 'Traceback' not in line, line
  return line


@pytest.fixture(scope='module')
def images():
  return _images()


@pytest.mark.parametrize('row', sorted(OPEN_ROWS))
def test_found_when_the_set_is_opened(row, images, tmp_path, capsys):
  """Found before the model is built: each run ends in seconds, and writes nothing."""
  damage, words = OPEN_ROWS[row]
  root = tmp_path / 'set'
  _write_recordio(root, images)
  overrides = damage(root, images)
  workdir = tmp_path / 'wd'
  with pytest.raises(SystemExit) as e:
    main.train(_config(root, **overrides), str(workdir))
  _assert_one_line(e, capsys, words)
  assert not (workdir / 'checkpoints').exists()


@pytest.mark.parametrize('kind', ['recordio', 'folder'])
def test_undecodable_image_is_named_when_converted(kind, images, tmp_path, capsys):
  """face_cache: the conversion at open decodes every image; the one that does not decode is
  named (record and byte offset, or the file), and the set is refused, not skipped."""
  images = list(images)
  images[5] = JUNK
  root = tmp_path / 'set'
  if kind == 'recordio':
    _write_recordio(root, images)
    words = ['train.rec: record 6 (example 5), byte ', 'the image cannot be decoded',
             'Unknown image file format', 're-create train.rec and train.idx']
  else:
    _write_folder(root, images)
    words = [f'{root}/id1/005.png (example 5): the image cannot be decoded',
             'replace the file with a good copy, or delete it']
  config = _config(root, **{'data.name': f'face_{kind}', 'data.face_cache': str(tmp_path / 'c')})
  with pytest.raises(SystemExit) as e:
    main.train(config, str(tmp_path / 'wd'))
  _assert_one_line(e, capsys, words)
  assert not (tmp_path / 'c' / 'meta.json').exists()  # no half conversion taken as finished


def test_bin_image_that_does_not_decode_stops_the_start(images, tmp_path, capsys):
  """Decoded by the face task's startup check, before the first step: not at the first
  evaluation hours in."""
  root = tmp_path / 'set'
  _write_recordio(root, images)
  pairs = [images[i % len(images)] for i in range(20)]
  pairs[13] = JUNK
  insightface.save_bin(root / 'agedb_30.bin', pairs, [bool(i % 2) for i in range(10)])
  config = _config(root, **{'data.verification_bins': ('agedb_30.bin',)})
  with pytest.raises(SystemExit) as e:
    main.train(config, str(tmp_path / 'wd'))
  _assert_one_line(e, capsys, [f'{root}/agedb_30.bin: image 13 (pair 6): the image cannot be '
                               'decoded', 'replace it with a good copy'])
  assert not (tmp_path / 'wd' / 'checkpoints').exists()


def test_undecodable_image_met_by_a_training_step(images, tmp_path, capsys):
  """The reported case: a corrupt image inside a valid record, read directly (no face_cache) by
  the first training step: one line naming the record and its byte offset, exit 6."""
  images = list(images)
  images[2] = JUNK
  root = tmp_path / 'set'
  _write_recordio(root, images)
  with pytest.raises(SystemExit) as e:
    main.train(_config(root), str(tmp_path / 'wd'))
  line = _assert_one_line(e, capsys, ['the image cannot be decoded', 're-create train.rec'])
  assert line.startswith(f'bigbatch: data error: {root}/train.rec: record 3 (example 2), byte '
                         f'{recordio.read_index(root / "train.idx")[1][3]}: '), line


@pytest.mark.slow  # ~35 s on 2 loaded cores, most of it importing jax and TensorFlow
def test_undecodable_image_in_training_is_one_line_from_the_cli(images, tmp_path):
  """The same through the real command line: exit 6, one line, no traceback, and no tf.data
  error logged at interpreter exit after the line (an iterator left to be finalized then)."""
  images = list(images)
  images[2] = JUNK
  root = tmp_path / 'set'
  _write_recordio(root, images)
  config_file = tmp_path / 'face_config.py'
  config_file.write_text(
      'from bigbatch import config_lib\n'
      'def get_config():\n'
      f'  return config_lib.override(config_lib.base_config(), **{CONFIG!r},\n'
      f'                             **{{"data.face_root": {str(root)!r}}})\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='0')
  proc = subprocess.run([sys.executable, '-m', 'bigbatch.main', f'--config={config_file}',
                         f'--workdir={tmp_path / "wd"}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == main.EXIT_DATA_ERROR, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'FAILED_PRECONDITION' not in proc.stderr, (
      proc.stderr[-3000:])
  lines = [l for l in proc.stderr.splitlines() if l.startswith('bigbatch:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f'bigbatch: data error: {root}/train.rec: record 3 (example 2), '
                             'byte '), lines[0]
  assert 'the image cannot be decoded' in lines[0], lines[0]
  assert not (tmp_path / 'wd' / 'checkpoints').exists() or not os.listdir(
      tmp_path / 'wd' / 'checkpoints')
