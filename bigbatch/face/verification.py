"""Face verification as InsightFace reports it (LFW, CFP-FP, AgeDB-30, ...): `embed_pairs` with
the flip test, `evaluate` for accuracy and TAR@FAR over 10 folds.

Specification: deepinsight/insightface recognition/arcface_torch eval/verification.py, itself
from FaceNet's lfw.py. The protocol, and where bigbatch departs from it (the TAR@FAR
interpolation), are in docs/design.md, "Face verification protocols".
"""
from __future__ import annotations

from typing import Callable

import numpy as np

NUM_FOLDS = 10  # the protocol's folds: a pair set needs at least this many pairs
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
FAR_THRESHOLDS = np.arange(0, 4, 0.001)


def embed_pairs(embed_fn: Callable[[np.ndarray], np.ndarray], images_2NxHxWxC: np.ndarray,
                batch: int, *, flip: bool = True,
                preprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
  """L2-normalized embeddings float32 [2N, D] of the images (flip test when `flip`).

  embed_fn maps a batch [batch, H, W, C] to embeddings [batch, D]; every call gets exactly
  `batch` images (the last batch is zero-padded and the padding dropped), so a jitted embed_fn
  compiles once; choose `batch` divisible by the devices it is sharded over. `preprocess`
  (e.g. faces.normalize for uint8 images) is applied to each batch before embed_fn.
  """
  n = len(images_2NxHxWxC)
  out = []
  for start in range(0, n, batch):
    x = np.asarray(images_2NxHxWxC[start:start + batch])
    m = len(x)
    if m < batch:
      x = np.concatenate([x, np.zeros((batch - m, *x.shape[1:]), x.dtype)])
    if preprocess is not None:
      x = preprocess(x)
    e = np.asarray(embed_fn(x), np.float64)
    if flip:
      e = e + np.asarray(embed_fn(np.ascontiguousarray(x[:, :, ::-1])), np.float64)
    out.append(e[:m])
  if not out:
    raise ValueError('no images to embed')
  emb = np.concatenate(out)
  # As sklearn.preprocessing.normalize: an all-zero row stays zero.
  norm = np.linalg.norm(emb, axis=1, keepdims=True)
  return (emb / np.where(norm == 0, 1, norm)).astype(np.float32)


def kfold(n: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, test) index arrays of sklearn's KFold(nfolds, shuffle=False) over range(n)."""
  if not 2 <= nfolds <= n:
    raise ValueError(f'nfolds={nfolds} needs 2 <= nfolds <= number of pairs ({n})')
  sizes = np.full(nfolds, n // nfolds)
  sizes[:n % nfolds] += 1
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  idx = np.arange(n)
  return [(np.concatenate([idx[:a], idx[b:]]), idx[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _counts_below(dist_sorted: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """How many distances are < each threshold (prediction 'same' is dist < threshold)."""
  return np.searchsorted(dist_sorted, thresholds, side='left')


def _rates(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
  """(true accepts, false accepts, n same, n different) per threshold."""
  same, diff = np.sort(dist[issame]), np.sort(dist[~issame])
  return _counts_below(same, thresholds), _counts_below(diff, thresholds), len(same), len(diff)


def _far_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
  if far.max() < target:  # every threshold keeps FAR under the target: the largest admits most
    return float(thresholds[-1])
  below = np.flatnonzero(far <= target)
  if not below.size:  # FAR exceeds the target already at threshold 0
    return float(thresholds[0])
  j = below[-1]
  if j + 1 == len(far):
    return float(thresholds[j])
  f0, f1, t0, t1 = far[j], far[j + 1], thresholds[j], thresholds[j + 1]
  return float(t0 + (target - f0) / (f1 - f0) * (t1 - t0))


def _sci(x: float) -> str:
  """1e-3 -> '1e-3' (the metric's name)."""
  mantissa, exponent = f'{x:e}'.split('e')
  return f'{float(mantissa):g}e{int(exponent)}'


def evaluate(embeddings_2NxD: np.ndarray, issame_N: np.ndarray, nfolds: int = NUM_FOLDS,
             far_target: float = 1e-3) -> dict[str, float]:
  """Verification metrics of consecutive-pair embeddings (docs/design.md, "Face verification").

  Returns accuracy_mean, accuracy_std, best_threshold (mean over folds of the chosen distance
  threshold), tar_at_far_1e-3 (for far_target=1e-3; the key names the target), tar_std and far
  (mean FAR achieved on the test folds).
  """
  emb = np.asarray(embeddings_2NxD, np.float64)
  issame = np.asarray(issame_N, bool).reshape(-1)
  if emb.ndim != 2 or len(emb) != 2 * len(issame):
    raise ValueError(f'embeddings {emb.shape} do not hold 2 x {len(issame)} pairs')
  dist = np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)
  accuracy, chosen, tar, far = [], [], [], []
  for train, test in kfold(len(issame), nfolds):
    ta, fa, n_same, n_diff = _rates(dist[train], issame[train], ACCURACY_THRESHOLDS)
    best = int(np.argmax((ta + (n_diff - fa)) / len(train)))
    threshold = ACCURACY_THRESHOLDS[best]
    chosen.append(threshold)
    pred = dist[test] < threshold
    accuracy.append(np.mean(pred == issame[test]))

    _, fa, _, n_diff = _rates(dist[train], issame[train], FAR_THRESHOLDS)
    far_train = fa / n_diff if n_diff else np.zeros(len(FAR_THRESHOLDS))
    threshold = _far_threshold(far_train, FAR_THRESHOLDS, far_target)
    pred = dist[test] < threshold
    same, diff = issame[test], ~issame[test]
    tar.append(np.sum(pred & same) / same.sum() if same.any() else 0.0)
    far.append(np.sum(pred & diff) / diff.sum() if diff.any() else 0.0)
  return {'accuracy_mean': float(np.mean(accuracy)), 'accuracy_std': float(np.std(accuracy)),
          'best_threshold': float(np.mean(chosen)),
          f'tar_at_far_{_sci(far_target)}': float(np.mean(tar)), 'tar_std': float(np.std(tar)),
          'far': float(np.mean(far))}
