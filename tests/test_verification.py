"""The InsightFace verification protocol (bigbatch/face/verification.py)."""
import numpy as np
import pytest
from sklearn.model_selection import KFold

from bigbatch.face import verification


def _reference(emb, issame, nfolds=10, far_target=1e-3):
  """A plain-loop port of InsightFace's calculate_roc / calculate_val (FAR threshold by the
  documented interpolation), with sklearn's KFold."""
  dist = np.array([np.sum((emb[2 * i] - emb[2 * i + 1])**2) for i in range(len(issame))])
  acc, tar, far, chosen = [], [], [], []
  for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(issame))):
    best, best_acc = None, -1.0
    for t in np.arange(0, 4, 0.01):
      tp = np.sum((dist[train] < t) & issame[train])
      tn = np.sum((dist[train] >= t) & ~issame[train])
      if (tp + tn) / len(train) > best_acc:  # the first best, as np.argmax
        best, best_acc = t, (tp + tn) / len(train)
    chosen.append(best)
    acc.append(np.mean((dist[test] < best) == issame[test]))
    thresholds = np.arange(0, 4, 0.001)
    negatives = dist[train][~issame[train]]
    fars = [np.sum(negatives < t) / len(negatives) for t in thresholds]
    if max(fars) < far_target:
      threshold = thresholds[-1]
    else:
      j = max(k for k, f in enumerate(fars) if f <= far_target)
      threshold = thresholds[j] + (far_target - fars[j]) / (fars[j + 1] - fars[j]) * (
          thresholds[j + 1] - thresholds[j])
    same = [i for i in test if issame[i]]
    diff = [i for i in test if not issame[i]]
    tar.append(sum(dist[i] < threshold for i in same) / len(same))
    far.append(sum(dist[i] < threshold for i in diff) / len(diff))
  return {'accuracy_mean': np.mean(acc), 'accuracy_std': np.std(acc),
          'best_threshold': np.mean(chosen), 'tar_at_far_1e-3': np.mean(tar), 'far': np.mean(far)}


def _pairs(rng, n, dim, spread):
  issame = rng.permutation(np.arange(n) < n // 2)
  a = rng.standard_normal((n, dim))
  b = np.where(issame[:, None], a + spread * rng.standard_normal((n, dim)),
               rng.standard_normal((n, dim)))
  emb = np.stack([a, b], axis=1).reshape(2 * n, dim)
  return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


@pytest.mark.parametrize('n', [1003, 600])
def test_evaluate_matches_reference_loop(n):
  rng = np.random.default_rng(n)
  emb, issame = _pairs(rng, n, 8, 0.8)
  got = verification.evaluate(emb, issame)
  want = _reference(emb, issame)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key
  assert 0.7 < got['accuracy_mean'] < 1.0  # a real, imperfect separation was tested


def test_kfold_is_sklearn_without_shuffle():
  for n, k in [(6000, 10), (1003, 10), (25, 4)]:
    ours = verification.kfold(n, k)
    for (tr, te), (tr2, te2) in zip(ours, KFold(n_splits=k, shuffle=False).split(np.arange(n))):
      np.testing.assert_array_equal(tr, tr2)
      np.testing.assert_array_equal(te, te2)


def test_separable_pairs_are_perfect():
  rng = np.random.default_rng(0)
  emb, issame = _pairs(rng, 400, 16, 0.0)  # same pairs: identical embeddings (distance 0)
  out = verification.evaluate(emb, issame)
  assert out['accuracy_mean'] == 1.0 and out['accuracy_std'] == 0.0
  # The FAR threshold sits at the closest training negative; a test fold may hold a closer one.
  assert out['tar_at_far_1e-3'] == 1.0 and out['far'] < 0.01
  # Negatives at distance 4 (opposite embeddings): no threshold below 4 accepts any.
  emb[1::2] = np.where(issame[:, None], emb[0::2], -emb[0::2])
  out = verification.evaluate(emb, issame)
  assert out['accuracy_mean'] == 1.0 and out['tar_at_far_1e-3'] == 1.0 and out['far'] == 0.0
  # Swapped labels: as wrong as can be.
  assert verification.evaluate(emb, ~issame)['accuracy_mean'] < 0.6


def test_embed_pairs_flip_test_and_padding():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((10, 4, 6, 3)).astype(np.float32)
  w = rng.standard_normal((4 * 6 * 3, 5)).astype(np.float32)
  calls = []

  def embed(x):
    calls.append(x.shape[0])
    return x.reshape(len(x), -1) @ w

  got = verification.embed_pairs(embed, images, batch=4)
  assert set(calls) == {4} and len(calls) == 6  # 3 batches, each plain and mirrored
  raw = images.reshape(10, -1) @ w + images[:, :, ::-1].reshape(10, -1) @ w
  np.testing.assert_allclose(got, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5)
  plain = verification.embed_pairs(embed, images, batch=4, flip=False)
  np.testing.assert_allclose(np.linalg.norm(plain, axis=1), 1.0, rtol=1e-6)
  assert not np.allclose(plain, got)
  doubled = verification.embed_pairs(embed, images / 2, batch=4, preprocess=lambda x: 2 * x)
  np.testing.assert_allclose(doubled, got, rtol=1e-5)


def test_evaluate_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='pairs'):
    verification.evaluate(np.zeros((9, 4)), np.zeros(5, bool))
