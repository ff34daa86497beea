"""IJB-style template verification (bigbatch/face/ijb.py) against an independent NumPy reference
written the way InsightFace's eval_ijbc.py loops over templates and media, on a synthetic
benchmark whose identities are known, laid out as the IJB-C release is."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from bigbatch.face import ijb


def _similarity(angle, scale, tx, ty):
  c, s = scale * np.cos(angle), scale * np.sin(angle)
  return np.array([[c, -s, tx], [s, c, ty]])


def test_similarity_transform_recovers_a_known_one():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 200, size=(5, 2))
  m = _similarity(0.3, 1.7, 12.0, -5.0)
  dst = src @ m[:, :2].T + m[:, 2]
  np.testing.assert_allclose(ijb.similarity_transform(src, dst), m, atol=1e-9)


def test_align_undoes_a_similarity_warp():
  """A 112x112 face placed rotated, scaled and shifted in a larger image, with its template
  landmarks moved the same way: align() puts it back (bilinear twice: small differences)."""
  from scipy import ndimage
  yy, xx = np.mgrid[0:112, 0:112]
  face = np.stack([128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
                   128 + 90 * np.cos(xx / 7.0 + yy / 11.0),
                   np.full((112, 112), 60.0)], axis=-1)
  m = _similarity(0.2, 1.5, 40.0, 25.0)  # face coordinates -> canvas coordinates (x, y)
  a_inv = np.linalg.inv(m[:, :2])
  swap = np.array([[0, 1], [1, 0]])
  canvas = np.stack([ndimage.affine_transform(face[..., c], swap @ a_inv @ swap,
                                              offset=swap @ (-a_inv @ m[:, 2]),
                                              output_shape=(260, 260), order=1)
                     for c in range(3)], -1)
  landmarks = ijb.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
  out = ijb.align(np.clip(canvas, 0, 255).astype(np.uint8), landmarks).astype(np.float64)
  inner = (slice(10, 102), slice(10, 102))
  assert np.abs(out[inner] - face[inner]).mean() < 2.0


def _reference_templates(feats, templates, medias):
  """eval_ijbc.py's image2template_feature, loop for loop."""
  unique_templates = np.unique(templates)
  template_feats = np.zeros((len(unique_templates), feats.shape[1]))
  for k, t in enumerate(unique_templates):
    (ind_t,) = np.where(templates == t)
    face_feats, face_medias = feats[ind_t], medias[ind_t]
    unique_medias, counts = np.unique(face_medias, return_counts=True)
    media_feats = []
    for u, ct in zip(unique_medias, counts):
      (ind_m,) = np.where(face_medias == u)
      media_feats += [face_feats[ind_m]] if ct == 1 else [
          np.mean(face_feats[ind_m], axis=0, keepdims=True)]
    template_feats[k] = np.sum(np.concatenate(media_feats), axis=0)
  norm = np.sqrt(np.sum(template_feats**2, -1, keepdims=True))
  return template_feats / norm, unique_templates


def _reference_tar(labels, scores, fars):
  """eval_ijbc.py's table: sklearn's ROC flipped, the nearest-FAR point by min over (|d|, i)."""
  from sklearn.metrics import roc_curve
  fpr, tpr, _ = roc_curve(labels, scores)
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  return [tpr[min(zip(abs(fpr - x), range(len(fpr))))[1]] for x in fars]


def test_templates_scores_and_tar_equal_the_reference():
  rng = np.random.default_rng(1)
  n, d = 300, 16
  templates = rng.integers(0, 40, size=n) * 7 + 3  # sparse, unsorted ids
  medias = rng.integers(0, 5, size=n) + 100 * (templates % 3)
  feats = rng.normal(size=(n, d))
  ours, ids = ijb.template_features(feats, templates, medias)
  ref, ref_ids = _reference_templates(feats, templates, medias)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
  pairs = rng.choice(ids, size=(500, 2))
  labels = rng.integers(0, 2, size=500)
  scores = ijb.pair_scores(ours, ids, pairs)
  row = {t: i for i, t in enumerate(ref_ids)}
  np.testing.assert_allclose(
      scores, [ref[row[a]] @ ref[row[b]] for a, b in pairs], rtol=1e-12, atol=1e-12)
  got = ijb.tar_at_far(labels, scores)
  assert [got[f'tar_at_far_1e-{k}'] for k in range(6, 0, -1)] == _reference_tar(
      labels, scores, ijb.FARS)


def _write_benchmark(root, rng, identities=12, templates_per_identity=3):
  """A synthetic IJB-C: each identity a base face, each image that face plus noise placed at a
  random similarity (its 5 landmarks the template's, moved alike); templates of 1-3 media of 1-3
  frames; all same-identity and a sample of different-identity template pairs."""
  from scipy import ndimage
  os.makedirs(os.path.join(root, 'loose_crop'))
  os.makedirs(os.path.join(root, 'meta'))
  yy, xx = np.mgrid[0:112, 0:112]
  bases = [np.stack([128 + 90 * np.sin(xx / f1 + p) * np.cos(yy / f2), 128 + 80 * np.cos(
      xx / f2 + yy / f1 + p), 100 + 50 * np.sin(yy / f1)], -1) for f1, f2, p in
           rng.uniform([5, 5, 0], [15, 15, 6], size=(identities, 3))]
  points, tid_mid, by_identity, tid = [], [], {}, 0
  for ident in range(identities):
    for _ in range(templates_per_identity):
      tid += 1
      by_identity.setdefault(ident, []).append(tid)
      for media in range(rng.integers(1, 4)):
        for frame in range(rng.integers(1, 4)):
          face = bases[ident] + rng.normal(0, 8, size=bases[ident].shape)
          m = _similarity(rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.6),
                          *rng.uniform(10, 50, size=2))
          a_inv = np.linalg.inv(m[:, :2])
          swap = np.array([[0, 1], [1, 0]])
          canvas = np.stack([ndimage.affine_transform(
              face[..., c], swap @ a_inv @ swap, offset=swap @ (-a_inv @ m[:, 2]),
              output_shape=(240, 240), order=1) for c in range(3)], -1)
          name = f'{tid}_{media}_{frame}.png'
          Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(
              os.path.join(root, 'loose_crop', name))
          lmk = ijb.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
          points.append(' '.join([name, *(f'{v:.3f}' for v in lmk.ravel()),
                                  f'{rng.uniform(0.5, 1.0):.4f}']))
          tid_mid.append(f'{name} {tid} {tid * 10 + media}')
  pairs = []
  all_t = [t for ts in by_identity.values() for t in ts]
  for ident, ts in by_identity.items():
    pairs += [f'{a} {b} 1' for i, a in enumerate(ts) for b in ts[i + 1:]]
    others = [t for t in all_t if t not in ts]
    pairs += [f'{ts[0]} {b} 0' for b in rng.choice(others, size=6, replace=False)]
  for name, lines in (('ijbc_name_5pts_score.txt', points), ('ijbc_face_tid_mid.txt', tid_mid),
                      ('ijbc_template_pair_label.txt', pairs)):
    with open(os.path.join(root, 'meta', name), 'w') as f:
      f.write('\n'.join(lines) + '\n')


def test_protocol_on_a_synthetic_benchmark_matches_the_reference(tmp_path):
  rng = np.random.default_rng(2)
  root = str(tmp_path / 'IJBC')
  _write_benchmark(root, rng)
  proj = np.random.default_rng(3).normal(size=(112 * 112 * 3 // 64, 32))

  def embed(x):  # a fixed "network": 8x8-pooled pixels, projected
    pooled = x.reshape(len(x), 14, 8, 14, 8, 3).mean(axis=(2, 4)).reshape(len(x), -1)
    return pooled @ proj

  result = ijb.evaluate(embed, root, 'IJBC', batch=16)
  # The same numbers from the reference formulas on the same image features.
  meta = ijb.read_metadata(root, 'IJBC')
  feats = ijb.image_features(embed, root, meta, batch=7) * meta.faceness[:, None]
  ref, ref_ids = _reference_templates(feats, meta.templates, meta.medias)
  row = {t: i for i, t in enumerate(ref_ids)}
  scores = np.array([ref[row[a]] @ ref[row[b]] for a, b in meta.pairs])
  expected = _reference_tar(meta.labels, scores, ijb.FARS)
  assert [result[f'tar_at_far_1e-{k}'] for k in range(6, 0, -1)] == pytest.approx(expected)
  assert result['templates'] == 36 and result['pairs'] == len(meta.labels)
  # Known identities: same-identity templates score above different ones.
  assert result['auc'] > 0.9


def test_mismatched_metadata_is_one_error(tmp_path):
  root = tmp_path / 'IJBC'
  (root / 'meta').mkdir(parents=True)
  (root / 'meta' / 'ijbc_name_5pts_score.txt').write_text('a.jpg ' + '1 ' * 10 + '0.9\n')
  (root / 'meta' / 'ijbc_face_tid_mid.txt').write_text('b.jpg 1 1\n')
  (root / 'meta' / 'ijbc_template_pair_label.txt').write_text('1 1 1\n')
  with pytest.raises(ijb.IJBError, match='same images in the same order'):
    ijb.read_metadata(str(root), 'IJBC')
  with pytest.raises(ijb.IJBError, match='ijbb_name_5pts_score.txt is missing'):
    ijb.read_metadata(str(root), 'IJBB')


def test_face_task_reports_ijb_at_every_evaluation(tmp_path):
  """config.data.ijb_root wires the protocol into the face task's evaluation: the same numbers
  as ijb.evaluate with the trainer's evaluation step as the embedding."""
  import types
  from bigbatch import config_lib
  from bigbatch import tasks
  rng = np.random.default_rng(4)
  root = str(tmp_path / 'IJBC')
  _write_benchmark(root, rng, identities=4, templates_per_identity=2)
  c = config_lib.base_config()
  config_lib.override(c, **{'task': 'face', 'data.name': 'face_synthetic', 'data.image_size': 112,
                            'data.verification_pairs': 20, 'data.ijb_root': root,
                            'face.verify_batch': 8, 'num_steps': 10})
  config_lib.validate(c, 8)
  task = tasks.get('face')(c, c.data.num_identities)
  task.check_startup()
  proj = np.random.default_rng(5).normal(size=(112 * 112 * 3 // 64, 16))
  calls = []

  def eval_step(state, x):
    calls.append(len(x))
    x = np.asarray(x)
    return x.reshape(len(x), 14, 8, 14, 8, 3).mean(axis=(2, 4)).reshape(len(x), -1) @ proj

  trainer = types.SimpleNamespace(eval_step=eval_step, eval_sharding=None)
  out = task.evaluate(trainer, None, None, 'verify')
  assert set(calls) == {8}  # padded to the batch: one compilation
  expected = ijb.evaluate(lambda x: eval_step(None, x), root, 'IJBC', batch=8)
  for k in ('tar_at_far_1e-3', 'tar_at_far_1e-1', 'auc', 'pairs'):
    assert out[f'verify/ijbc/{k}'] == pytest.approx(expected[k])
  assert 'verify/synthetic/accuracy' in out


def test_ijb_config_errors(tmp_path):
  from bigbatch import config_lib
  c = config_lib.base_config()
  config_lib.override(c, **{'task': 'face', 'data.name': 'face_synthetic', 'data.image_size': 16,
                            'data.ijb_root': str(tmp_path), 'num_steps': 10})
  with pytest.raises(config_lib.ConfigError, match='aligned to 112x112'):
    config_lib.validate(c, 8)
  config_lib.override(c, **{'data.image_size': 112, 'data.ijb_target': 'IJBA'})
  with pytest.raises(config_lib.ConfigError, match='ijb_target'):
    config_lib.validate(c, 8)


def test_command_prints_the_table_and_writes_the_metrics(tmp_path, monkeypatch, capsys):
  rng = np.random.default_rng(6)
  root = str(tmp_path / 'IJBC')
  _write_benchmark(root, rng, identities=4, templates_per_identity=2)
  proj = np.random.default_rng(7).normal(size=(112 * 112 * 3 // 64, 16))
  embed = lambda x: x.reshape(len(x), 14, 8, 14, 8, 3).mean(axis=(2, 4)).reshape(len(x), -1) @ proj
  monkeypatch.setattr(ijb, 'embed_fn', lambda path: embed)
  assert ijb.main(['model', f'--root={root}', f'--out={tmp_path / "out"}', '--batch=8']) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith('IJBC 1:1 verification, 8 templates') and 'TAR@FAR=1e-4' in line
  saved = json.loads((tmp_path / 'out' / 'ijbc.json').read_text())
  assert saved == pytest.approx(ijb.evaluate(embed, root, 'IJBC', batch=8))
  assert ijb.main(['model', f'--root={tmp_path}']) == 6  # no meta/: one line, exit 6
  assert 'is missing' in capsys.readouterr().err
