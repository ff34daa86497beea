"""IJB-B / IJB-C 1:1 template verification, as InsightFace's arcface_torch/eval_ijbc.py computes it.

  python -m bigbatch.face.ijb WORKDIR_OR_EXPORT --root=DIR/IJBC --target=IJBC [--batch=256]

The benchmark's layout, the computation (alignment, flip test, templates, TAR at FAR) and the
differences from the reference are in docs/design.md, "Face verification protocols".
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import numpy as np

from bigbatch import workdir as workdir_lib

# ArcFace's 5-point template for 112x112 crops (eyes, nose tip, mouth corners), x shifted by 8
# from the 96x112 one, as InsightFace aligns its training and test sets.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
IMAGE_SIZE = 112
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class IJBError(RuntimeError):
  """The benchmark's files are missing or malformed (named with the fix)."""


@dataclasses.dataclass
class Metadata:
  names: list[str]  # image file names under loose_crop/, in the order of every per-image array
  landmarks: np.ndarray  # [n, 5, 2] (x, y)
  faceness: np.ndarray  # [n]
  templates: np.ndarray  # [n] template id of each image
  medias: np.ndarray  # [n] media id of each image
  pairs: np.ndarray  # [m, 2] template ids
  labels: np.ndarray  # [m] 1 same identity, 0 not


def _rows(path: str, columns: int, what: str) -> list[list[str]]:
  if not os.path.isfile(path):
    raise IJBError(f'{path} is missing: {what}; point --root at the IJB-B or IJB-C directory '
                   f'(the one holding meta/ and loose_crop/)')
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != columns:
        raise IJBError(f'{path}: line {i} has {len(parts)} fields, not {columns} ({what})')
      rows.append(parts)
  return rows


def read_metadata(root: str, target: str) -> Metadata:
  """The three metadata files of `target` (IJBB or IJBC) under ROOT/meta, checked against each
  other."""
  t = target.lower()
  meta = os.path.join(root, 'meta')
  points = _rows(os.path.join(meta, f'{t}_name_5pts_score.txt'), 12,
                 'NAME x1 y1 ... x5 y5 faceness per image')
  tid_mid = _rows(os.path.join(meta, f'{t}_face_tid_mid.txt'), 3, 'NAME template media')
  pairs = _rows(os.path.join(meta, f'{t}_template_pair_label.txt'), 3, 'template template label')
  if len(points) != len(tid_mid) or any(a[0] != b[0] for a, b in zip(points, tid_mid)):
    raise IJBError(f'{meta}: {t}_name_5pts_score.txt and {t}_face_tid_mid.txt do not list the '
                   f'same images in the same order; use the files of one release')
  try:
    values = np.array([[float(v) for v in p[1:]] for p in points], np.float64)
    ids = np.array([[int(r[1]), int(r[2])] for r in tid_mid], np.int64)
    pair_ids = np.array([[int(p[0]), int(p[1]), int(p[2])] for p in pairs], np.int64)
  except ValueError as e:
    raise IJBError(f'{meta}: a number does not parse ({e})') from e
  known = set(ids[:, 0].tolist())
  unknown = sorted(set(pair_ids[:, :2].ravel().tolist()) - known)
  if unknown:
    raise IJBError(f'{meta}: {len(unknown)} templates of the pair list have no image, e.g. '
                   f'{unknown[0]}')
  return Metadata(names=[p[0] for p in points], landmarks=values[:, :10].reshape(-1, 5, 2),
                  faceness=values[:, 10], templates=ids[:, 0], medias=ids[:, 1],
                  pairs=pair_ids[:, :2], labels=pair_ids[:, 2])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2x3 similarity transform (rotation, uniform scale, translation) that maps the points
  `src` [k, 2] onto `dst` [k, 2] in the least-squares sense (Umeyama 1991; what scikit-image's
  SimilarityTransform.estimate computes)."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s, d = src - mu_s, dst - mu_d
  cov = d.T @ s / len(src)
  u, sigma, vt = np.linalg.svd(cov)
  sign = np.eye(2)
  if np.linalg.det(u) * np.linalg.det(vt) < 0:
    sign[1, 1] = -1
  rotation = u @ sign @ vt
  scale = np.trace(np.diag(sigma) @ sign) / s.var(0).sum()
  return np.concatenate([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]], axis=1)


def align(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """The 112x112 crop of `image` [H, W, C] (uint8 RGB) whose 5 landmarks (x, y) land on
  ARCFACE_TEMPLATE: bilinear, 0 outside the image. uint8."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  m = similarity_transform(landmarks, ARCFACE_TEMPLATE)
  # Output (x, y) = A (x, y) + t; ndimage wants input (row, col) from output (row, col).
  a_inv = np.linalg.inv(m[:, :2])
  swap = np.array([[0, 1], [1, 0]])
  matrix = swap @ a_inv @ swap
  offset = swap @ (-a_inv @ m[:, 2])
  image = np.asarray(image, np.float64)
  out = np.stack([ndimage.affine_transform(image[..., c], matrix, offset=offset,
                                           output_shape=(IMAGE_SIZE, IMAGE_SIZE), order=1,
                                           mode='constant', cval=0.0)
                  for c in range(image.shape[-1])], axis=-1)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def image_features(embed: Callable[[np.ndarray], np.ndarray], root: str, meta: Metadata, *,
                   batch: int = 256, flip: bool = True, log=None) -> np.ndarray:
  """[n, D] float32: each image's embedding (+ its mirror image's with `flip`), unnormalized.
  `embed` maps float32 [b, 112, 112, 3] (RGB / 127.5 - 1, as the face models train on) to
  [b, D]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for start in range(0, len(meta.names), batch):
    crops = []
    for i in range(start, min(start + batch, len(meta.names))):
      path = os.path.join(root, 'loose_crop', meta.names[i])
      try:
        with Image.open(path) as img:
          rgb = np.asarray(img.convert('RGB'))
      except OSError as e:
        raise IJBError(f'{path}: the image cannot be read ({e}); copy loose_crop/ again') from e
      crops.append(align(rgb, meta.landmarks[i]))
    x = np.stack(crops).astype(np.float32) / 127.5 - 1.0
    feats = np.asarray(embed(x), np.float32)
    if flip:
      feats = feats + np.asarray(embed(x[:, :, ::-1]), np.float32)
    out.append(feats)
    if log is not None:
      log(min(start + batch, len(meta.names)), len(meta.names))
  return np.concatenate(out)


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(L2-normalized template features [t, D], their template ids [t], sorted): per template, the
  mean feature of each of its media, summed over the media, normalized."""
  feats = np.asarray(feats, np.float64)
  unique_t, t_index = np.unique(templates, return_inverse=True)
  # One row per (template, media): the mean of its images.
  keys = np.stack([t_index, medias], axis=1)
  _, tm_index = np.unique(keys, axis=0, return_inverse=True)
  tm_index = tm_index.ravel()
  count = np.bincount(tm_index).astype(np.float64)
  media = np.zeros((len(count), feats.shape[1]))
  np.add.at(media, tm_index, feats)
  media /= count[:, None]
  tm_template = np.zeros(len(count), np.int64)
  tm_template[tm_index] = t_index
  out = np.zeros((len(unique_t), feats.shape[1]))
  np.add.at(out, tm_template, media)
  norm = np.sqrt(np.sum(out**2, axis=1, keepdims=True))
  return out / np.maximum(norm, 1e-12), unique_t


def pair_scores(template_feats: np.ndarray, template_ids: np.ndarray, pairs: np.ndarray
                ) -> np.ndarray:
  """Cosine similarity of each pair of templates [m]."""
  row = {int(t): i for i, t in enumerate(template_ids)}
  a = template_feats[[row[int(t)] for t in pairs[:, 0]]]
  b = template_feats[[row[int(t)] for t in pairs[:, 1]]]
  return np.sum(a * b, axis=1)


def tar_at_far(labels: np.ndarray, scores: np.ndarray, fars=FARS) -> dict[str, float]:
  """TAR at each FAR, read off the ROC as InsightFace reads it (the ROC point whose FAR is
  nearest; among equally near points the one of largest TAR), and the ROC's AUC."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  fpr, tpr, _ = metrics.roc_curve(labels, scores)
  out = {'auc': float(metrics.auc(fpr, tpr))}
  fpr, tpr = np.flipud(fpr), np.flipud(tpr)
  for far in fars:
    out[f'tar_at_far_{far:.0e}'.replace('e-0', 'e-')] = float(tpr[np.argmin(np.abs(fpr - far))])
  return out


def evaluate(embed: Callable[[np.ndarray], np.ndarray], root: str, target: str, *,
             batch: int = 256, flip: bool = True, use_norm: bool = True,
             use_faceness: bool = True, log=None) -> dict[str, float]:
  """The 1:1 protocol of `target` with `embed` (image_features' contract). use_norm keeps each
  image feature's norm (InsightFace's default), use_faceness weighs it by the detector score."""
  meta = read_metadata(root, target)
  feats = image_features(embed, root, meta, batch=batch, flip=flip, log=log)
  if not use_norm:
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
  if use_faceness:
    feats = feats * meta.faceness[:, None]
  template_feats, ids = template_features(feats, meta.templates, meta.medias)
  scores = pair_scores(template_feats, ids, meta.pairs)
  out = tar_at_far(meta.labels, scores)
  out.update(images=float(len(meta.names)), templates=float(len(ids)),
             pairs=float(len(meta.labels)))
  return out


def embed_fn(path: str) -> Callable[[np.ndarray], np.ndarray]:
  """The embedding function of a bigbatch export directory or workdir (bigbatch/export.py)."""
  # pylint: disable=g-import-not-at-top
  import jax
  if os.path.isfile(os.path.join(path, 'model.jax_export')):
    import flax.serialization
    with open(os.path.join(path, 'model.jax_export'), 'rb') as f:
      exported = jax.export.deserialize(f.read())
    with open(os.path.join(path, 'variables.msgpack'), 'rb') as f:
      variables = flax.serialization.msgpack_restore(f.read())
    call = jax.jit(exported.call)
    return lambda x: np.asarray(call(variables, x))
  from bigbatch import export
  config, model, variables, _, _ = export.load(path)
  if config.task != 'face':
    raise IJBError(f'{path} is a {config.task} run; IJB evaluates face models')
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return lambda x: np.asarray(apply(variables, x))


def _progress(every: int) -> Callable[[int, int], None]:
  """A `log` for image_features: `done/total images` on stderr every `every` images."""
  def log(done: int, total: int) -> None:
    if done % every == 0 or done == total:
      print(f'{done}/{total} images', file=sys.stderr, flush=True)
  return log


def main(argv) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m bigbatch.face.ijb', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('model', help='a face run\'s --workdir, or a bigbatch.export directory')
  parser.add_argument('--root', required=True, help='the IJB-B or IJB-C directory')
  parser.add_argument('--target', default='IJBC', choices=['IJBB', 'IJBC'])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--out', help='a directory to write the metrics to (TARGET.json)')
  args = parser.parse_args(argv)
  try:
    result = evaluate(embed_fn(args.model), args.root, args.target, batch=args.batch,
                      log=_progress(every=20 * args.batch))
  except IJBError as e:
    print(f'bigbatch.face.ijb: {e}', file=sys.stderr)
    return 6
  print(f'{args.target} 1:1 verification, {int(result["templates"])} templates, '
        f'{int(result["pairs"])} pairs: ' + ', '.join(
            f'TAR@FAR={k[len("tar_at_far_"):]} {100 * v:.2f}%' for k, v in result.items()
            if k.startswith('tar_at_far_')) + f', AUC {100 * result["auc"]:.2f}%')
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    workdir_lib.write_json(os.path.join(args.out, f'{args.target.lower()}.json'), result)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
