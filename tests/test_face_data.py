"""Face data: synthetic identities, folder / RecordIO / converted sets, .bin pairs
(bigbatch/data/faces.py and face_*.py, bigbatch/third_party/insightface.py)."""
import errno
import os
import pickle

import numpy as np
import pytest

from bigbatch import config_lib
from bigbatch import fields
from bigbatch.data import face_arrays
from bigbatch.data import face_files
from bigbatch.data import face_synthetic
from bigbatch.data import faces
from bigbatch.face import verification
from bigbatch.third_party import insightface
from bigbatch.third_party import recordio


def _config(name, **data):
  c = config_lib.base_config()
  for key, value in faces.defaults().items():
    c.data[key] = value
  c.data.name = name
  c.global_batch, c.accumulation_steps, c.eval_batch = 4, 1, 4
  for key, value in data.items():
    c.data[key] = value
  return c


def _create(config, **kw):
  return faces.create(config, global_batch=config.global_batch,
                      accumulation_steps=config.accumulation_steps, eval_batch=config.eval_batch,
                      seed=config.seed, prefetch=0, **{'process_index': 0, 'process_count': 1,
                                                       **kw})


# ---------------------------------------------------------------------------------------------
# face_synthetic.

SYNTH = dict(image_size=16, num_identities=50, images_per_identity=4, num_eval=8,
             verification_pairs=400, verification_identities=100)


def test_synthetic_rows_depend_only_on_their_index():
  faces_ = face_synthetic.from_config(_config('face_synthetic', **SYNTH))
  source = faces_.source(face_synthetic.SPLIT_TRAIN)
  images, labels = source(np.arange(600))
  some = np.array([599, 3, 256, 0])
  images2, labels2 = source(some)
  np.testing.assert_array_equal(images2, images[some])  # bit-identical, whatever the batch
  np.testing.assert_array_equal(labels, np.arange(600) % 50)
  assert images.dtype == np.float32 and images.shape == (600, 16, 16, 3)
  assert 0.5 < images.std() < 1.0 and np.abs(images).max() < 2.0
  # Another split: other images of the same identities.
  eval_images, _ = faces_.source(face_synthetic.SPLIT_EVAL)(some)
  assert not np.allclose(eval_images, images2)


def test_synthetic_dataset_and_process_rows():
  config = _config('face_synthetic', **SYNTH)
  config.global_batch = 8
  ds = _create(config)
  assert (ds.num_train, ds.num_classes, ds.image_shape, ds.num_eval) == (200, 50, (16, 16, 3), 8)
  whole = ds.train_batch(3)
  assert whole['image'].shape == (1, 8, 16, 16, 3)
  parts = [_create(config, process_index=p, process_count=2) for p in range(2)]
  joined = np.concatenate([p.train_batch(3, p.train_rows)['image'] for p in parts], axis=1)
  np.testing.assert_array_equal(joined, whole['image'])
  batches = list(ds.eval_batches())
  assert len(batches) == 2 and all(b['mask'].all() for b in batches)


def test_synthetic_verification_pairs_need_learning():
  config = _config('face_synthetic', **SYNTH)
  sets = faces.verification_sets(config)
  images, issame = sets['synthetic']
  assert images.shape == (800, 16, 16, 3) and issame.shape == (400,)
  assert issame.sum() == 200
  np.testing.assert_array_equal(faces.verification_sets(config)['synthetic'][0], images)
  # Raw pixels (with the flip test) carry identity, but far from what a trained model reaches.
  flat = images.reshape(800, -1)
  raw = flat + images[:, :, ::-1].reshape(800, -1) - 2 * flat.mean(0)
  acc = verification.evaluate(raw / np.linalg.norm(raw, axis=1, keepdims=True), issame)
  assert 0.6 < acc['accuracy_mean'] < 0.88, acc


@pytest.mark.slow
def test_synthetic_faces_are_learnable():
  """A small CNN with a CosFace loss on the training identities separates held-out identities
  (>= 0.90 verification accuracy) within a few CPU minutes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  config = _config('face_synthetic', image_size=16, verification_pairs=3000)
  ds = _create(config)
  x_all, y_all = ds.train_source(np.arange(ds.num_train))
  images, issame = faces.verification_sets(config)['synthetic']

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      for features, stride in [(32, 1), (64, 2), (64, 1), (128, 2)]:
        x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
      return nn.Dense(128)(x.reshape(len(x), -1))

  net, classes = Net(), ds.num_classes
  params = {'net': net.init(jax.random.key(0), x_all[:2])['params'],
            'w': 0.01 * jax.random.normal(jax.random.key(1), (128, classes))}
  tx = optax.adamw(2e-3, weight_decay=5e-4)
  opt = tx.init(params)

  def loss_fn(p, x, y):
    e = net.apply({'params': p['net']}, x)
    e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
    w = p['w'] / jnp.linalg.norm(p['w'], axis=0, keepdims=True)
    logits = 30.0 * (e @ w - 0.3 * jax.nn.one_hot(y, classes))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, o, x, y):
    g = jax.grad(loss_fn)(p, x, y)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  embed = jax.jit(lambda p, x: net.apply({'params': p['net']}, x))
  rng = np.random.default_rng(0)
  for _ in range(8):
    perm = rng.permutation(len(x_all))
    for i in range(len(x_all) // 256):
      b = perm[i * 256:(i + 1) * 256]
      params, opt = step(params, opt, x_all[b], y_all[b])
  emb = verification.embed_pairs(lambda x: embed(params, x), images, 500)
  assert verification.evaluate(emb, issame)['accuracy_mean'] >= 0.90


# ---------------------------------------------------------------------------------------------
# Real sets: the same images as a folder, a RecordIO set and a converted array file.

IDENTITIES = {'carol': 2, 'alice': 3, 'bob': 2}  # labels by sorted name: alice 0, bob 1, carol 2


@pytest.fixture(scope='module')
def face_sets(tmp_path_factory):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('faces')
  rng = np.random.default_rng(0)
  pixels, labels, encoded = [], [], []
  for label, name in enumerate(sorted(IDENTITIES)):
    os.makedirs(root / 'folder' / name)
    for j in range(IDENTITIES[name]):
      image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      png = tf.io.encode_png(image).numpy()  # lossless: decoded pixels are known exactly
      (root / 'folder' / name / f'{j:02d}.png').write_bytes(png)
      pixels.append(image)
      labels.append(label)
      encoded.append(png)
  (root / 'folder' / 'alice' / 'notes.txt').write_text('not an image')
  (root / 'folder' / '.cache').mkdir()
  n = len(pixels)
  payloads = [recordio.pack((0, [n + 1.0, n + 1.0 + len(IDENTITIES)], 0, 0), b'')]
  payloads += [recordio.pack((0, float(c), i, 0), e) for i, (c, e) in enumerate(zip(labels,
                                                                                   encoded))]
  start = 1
  for name in sorted(IDENTITIES):
    payloads.append(recordio.pack((0, [start, start + IDENTITIES[name]], 0, 0), b''))
    start += IDENTITIES[name]
  os.makedirs(root / 'rec')
  with recordio.RecordIOWriter(root / 'rec' / 'train.rec', root / 'rec' / 'train.idx') as w:
    for key, p in enumerate(payloads):
      w.write(p, key)
  return root, np.stack(pixels), np.asarray(labels, np.int32), encoded


def _real_config(name, root, **data):
  return _config(name, face_root=str(root), image_size=8, num_eval=5, **data)


def test_folder_recordio_and_cache_give_the_same_batches(face_sets, tmp_path):
  root, pixels, labels, _ = face_sets
  datasets = {
      'folder': _create(_real_config('face_folder', root / 'folder')),
      'recordio': _create(_real_config('face_recordio', root / 'rec')),
      'cache': _create(_real_config('face_recordio', root / 'rec',
                                    face_cache=str(tmp_path / 'cache'))),
  }
  for ds in datasets.values():
    assert (ds.num_train, ds.num_classes, ds.image_shape) == (7, 3, (8, 8, 3))
  for step in (0, 1, 2, 1):  # the second epoch (step 2) has other flips; then a stream restart
    idx = datasets['folder'].train_indices(step).reshape(-1)
    epoch = step // datasets['folder'].steps_per_epoch
    flips = faces.flip_bits(0, epoch, idx)
    want = faces.finish(pixels[idx], flips)
    for name, ds in datasets.items():
      batch = ds.train_batch(step)
      np.testing.assert_array_equal(batch['image'][0], want, err_msg=name)
      np.testing.assert_array_equal(batch['label'][0], labels[idx], err_msg=name)
  assert 0 < sum(faces.flip_bits(0, e, np.arange(7)).sum() for e in range(4)) < 28
  # Eval: 5 training examples spread over the set, unflipped, padded to eval batches of 4.
  for ds in datasets.values():
    batches = list(ds.eval_batches())
    assert [b['mask'].sum() for b in batches] == [4, 1]
    spread = (np.arange(5) * 7) // 5
    got = np.concatenate([b['image'] for b in batches])[:5]
    np.testing.assert_array_equal(got, faces.normalize(pixels[spread]))
    assert not batches[1]['image'][1:].any()
  # A process reads only its rows.
  config = _real_config('face_folder', root / 'folder')
  parts = [_create(config, process_index=p, process_count=2) for p in range(2)]
  joined = np.concatenate([p.train_batch(1, p.train_rows)['image'] for p in parts], axis=1)
  np.testing.assert_array_equal(joined, datasets['folder'].train_batch(1)['image'])
  for ds in list(datasets.values()) + parts:
    ds.close()


def test_converted_arrays_are_verified(face_sets, tmp_path):
  root, pixels, labels, _ = face_sets
  images = faces.open_images(_real_config('face_folder', root / 'folder'))
  array = face_arrays.convert(images, tmp_path / 'c', 8)
  np.testing.assert_array_equal(array.read(np.arange(7))[0], pixels)
  np.testing.assert_array_equal(array.labels, labels)
  mtime = os.path.getmtime(tmp_path / 'c' / 'images.npy')
  face_arrays.convert(images, tmp_path / 'c', 8)  # done already: opened, not rewritten
  assert os.path.getmtime(tmp_path / 'c' / 'images.npy') == mtime
  with pytest.raises(faces.FaceDataError, match='holds a conversion of'):
    face_arrays.convert(images, tmp_path / 'c', 16)
  path = tmp_path / 'c' / 'images.npy'
  data = path.read_bytes()
  path.write_bytes(data[:-5])
  with pytest.raises(faces.FaceDataError, match='images.npy: .* bytes, expected'):
    face_arrays.ArrayFile(tmp_path / 'c')
  corrupt = bytearray(data)
  corrupt[-100] ^= 0xFF
  path.write_bytes(bytes(corrupt))
  with pytest.raises(faces.FaceDataError, match='checksum mismatch in images 0..6'):
    face_arrays.ArrayFile(tmp_path / 'c')
  (tmp_path / 'c' / 'meta.json').write_text('{"format": "x"')
  with pytest.raises(faces.FaceDataError, match='meta.json: not a'):
    face_arrays.ArrayFile(tmp_path / 'c')
  with pytest.raises(faces.FaceDataError, match='missing'):
    face_arrays.ArrayFile(tmp_path / 'empty')


def test_bad_real_sets_raise_clear_errors(face_sets, tmp_path):
  root, *_ = face_sets
  with pytest.raises(fields.ConfigError, match='face_root is unset'):
    _create(_config('face_folder'))
  with pytest.raises(faces.FaceDataError, match='no images'):
    _create(_real_config('face_folder', tmp_path))
  # An image record whose label is not one of the identities.
  rec = tmp_path / 'train.rec'
  payloads = [recordio.pack((0, [2.0, 3.0], 0, 0), b''), recordio.pack((0, 5.0, 0, 0), b'jpg'),
              recordio.pack((0, [1.0, 2.0], 0, 0), b'')]
  with recordio.RecordIOWriter(rec, tmp_path / 'train.idx') as w:
    for key, p in enumerate(payloads):
      w.write(p, key)
  config = _real_config('face_recordio', tmp_path)
  config.global_batch = config.eval_batch = 1
  ds = _create(config)
  with pytest.raises(faces.FaceDataError, match=r'train\.rec: record 1, byte \d+: image label '
                     r'5\.0 is not an identity in 0\.\.0; copy train\.rec and train\.idx again'):
    ds.train_batch(0)


def test_cache_that_cannot_be_written_names_the_fix(face_sets, tmp_path, monkeypatch):
  root, *_ = face_sets
  config = _real_config('face_recordio', root / 'rec', face_cache=str(tmp_path / 'c'))
  for code, fix in [(errno.ENOSPC, 'free space there'),
                    (errno.EACCES, 'fix the path or its permissions')]:
    def fail(*args, code=code, **kwargs):
      raise OSError(code, os.strerror(code), str(tmp_path / 'c' / 'images.npy.tmp'))
    monkeypatch.setattr(face_arrays, 'convert', fail)
    with pytest.raises(faces.FaceDataError, match=rf'c/images\.npy\.tmp: {os.strerror(code)} '
                       rf'\(config\.data\.face_root=.*; {fix}'):
      _create(config)


# ---------------------------------------------------------------------------------------------
# .bin verification pairs.

def test_verification_bins(face_sets, tmp_path):
  root, pixels, _, encoded = face_sets
  order = np.arange(22) % 7  # 11 pairs: the protocol's 10 folds need 10 or more
  issame = [bool(b) for b in np.arange(11) % 2]
  insightface.save_bin(tmp_path / 'pairs.bin', [encoded[i] for i in order], issame)
  # As MXNet's Python 2 tools left them: images as uint8 arrays, issame as a numpy array.
  with open(tmp_path / 'arrays.bin', 'wb') as f:
    pickle.dump(([np.frombuffer(encoded[i], np.uint8) for i in order[:20]],
                 np.arange(10) % 3 == 0), f, protocol=2)
  config = _real_config('face_folder', root / 'folder',
                        verification_bins=['pairs.bin', str(tmp_path / 'arrays.bin')])
  config.data.face_root = str(tmp_path)
  sets = faces.verification_sets(config)
  assert sorted(sets) == ['arrays', 'pairs']
  np.testing.assert_array_equal(sets['pairs'][0], faces.normalize(pixels[order]))
  np.testing.assert_array_equal(sets['pairs'][1], issame)
  np.testing.assert_array_equal(sets['arrays'][0], faces.normalize(pixels[order[:20]]))
  np.testing.assert_array_equal(sets['arrays'][1], np.arange(10) % 3 == 0)
  np.testing.assert_array_equal(faces.verification_sets(config, as_uint8=True)['arrays'][0],
                                pixels[order[:20]])
  # Other sizes are resized to data.image_size.
  resized = face_files.decode_images(encoded[:1], 4)
  assert resized.shape == (1, 4, 4, 3) and resized.dtype == np.uint8
  # Fewer pairs than folds would fail at the first evaluation: refused when read.
  insightface.save_bin(tmp_path / 'pairs.bin', encoded[:6], [True, False, True])
  with pytest.raises(faces.FaceDataError, match=r'pairs\.bin: holds 3 pairs; .* at least 10'):
    faces.verification_sets(config)


class _Hostile:

  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def test_hostile_bin_is_refused_and_runs_nothing(tmp_path):
  marker = tmp_path / 'ran'
  for fn, arg in [(os.system, f'touch {marker}'),
                  (eval, f'open({str(marker)!r}, "w").close()'),
                  (exec, f'open({str(marker)!r}, "w").close()')]:
    path = tmp_path / 'evil.bin'
    path.write_bytes(pickle.dumps(([_Hostile(fn, arg)], [True]), protocol=2))
    with pytest.raises(insightface.BinFileError, match='refused to load'):
      insightface.load_bin(path)
    assert not marker.exists()
  # Sanity: the payload does run when unpickled without restriction.
  pickle.loads(path.read_bytes())
  assert marker.exists()


@pytest.mark.parametrize('obj, match', [
    ([b'a', b'b', b'c'], 'expected a pickled'),
    (([b'a', b'b', b'c'], [True]), '3 images for 1 pairs'),
    (([b'a', 7], [True]), 'image 1 is a int'),
    (([b'a', b'b'], [[True]]), '1-D list of booleans'),
    (([b'a', b'b'], [2]), '1-D list of booleans'),
])
def test_malformed_bins_raise(tmp_path, obj, match):
  path = tmp_path / 'bad.bin'
  path.write_bytes(pickle.dumps(obj))
  with pytest.raises(insightface.BinFileError, match=match):
    insightface.load_bin(path)
  path.write_bytes(pickle.dumps(obj)[:-3])
  with pytest.raises(insightface.BinFileError, match='bad.bin'):
    insightface.load_bin(path)
