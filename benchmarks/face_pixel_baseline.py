"""The untrained floor of a face config's verification: raw pixels with the flip test.

python benchmarks/face_pixel_baseline.py [--config=configs/study_faces.py]

Embeds every verification image as its centered pixels plus those of its mirror image (the
flip test, as the trained runs use it), L2-normalized, and runs the same protocol as training's
evaluation (bigbatch.face.verification: 10-fold accuracy, TAR at FAR 1e-3). A trained model
must beat this to have learnt anything about identity; the face study's report quotes it.
A study config's base experiment is used (study.base); an experiment config as it is.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import numpy as np  # noqa: E402

from bigbatch.data import faces  # noqa: E402
from bigbatch.face import verification  # noqa: E402


def pixel_baseline(config) -> dict[str, dict[str, float]]:
  """{pair set name: {'accuracy', 'accuracy_std', 'tar_at_far_1e-3', 'pairs'}} of raw pixels."""
  out = {}
  for name, (images, issame) in faces.verification_sets(config).items():
    x = np.asarray(images, np.float32)
    flat = x.reshape(len(x), -1)
    emb = flat + x[:, :, ::-1].reshape(len(x), -1) - 2 * flat.mean(0)
    result = verification.evaluate(emb / np.linalg.norm(emb, axis=1, keepdims=True), issame)
    out[name] = {'accuracy': result['accuracy_mean'], 'accuracy_std': result['accuracy_std'],
                 'tar_at_far_1e-3': result['tar_at_far_1e-3'], 'pairs': len(issame)}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/study_faces.py')
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config = config.base if 'base' in config else config
  for name, r in pixel_baseline(config).items():
    print(f'{args.config}: {name}: raw pixels + flip test: verification accuracy '
          f'{100 * r["accuracy"]:.1f}% (std over folds {100 * r["accuracy_std"]:.1f}%), '
          f'TAR {r["tar_at_far_1e-3"]:.3f} at FAR 1e-3, {r["pairs"]:,} pairs')


if __name__ == '__main__':
  main()
