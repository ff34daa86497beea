"""A small local TFDS data set of random JPEGs, for tests and benchmarks (no download).

Importing this module registers the builder `bigbatch_fake_images` with TFDS, so that
`bigbatch.data.images.prepare('bigbatch_fake_images/tiny', ...)` (or config.data.tfds_name) can
build it. Tests import it as `fake_tfds` (tests/ is on pytest's path); benchmarks as
`tests.fake_tfds` from the repository root.
"""
from __future__ import annotations

import math

from etils import epath
import numpy as np
import tensorflow_datasets as tfds


class FakeImagesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, num_train: int, num_eval: int, min_size: int, max_size: int,
               num_classes: int, **kwargs):
    super().__init__(version=tfds.core.Version('1.0.0'), **kwargs)
    self.num_train, self.num_eval = num_train, num_eval
    self.min_size, self.max_size, self.num_classes = min_size, max_size, num_classes


class BigbatchFakeImages(tfds.core.GeneratorBasedBuilder):
  """Random JPEGs of varied sizes; example i of a split is generated from (split, i).

  Configs: 'tiny' (40 train / 12 test, 40..80 px; label = index, so a label names its example)
  and 'bench' (320 / 32, about ImageNet's mean size of ~400x350; 1000 classes). Smooth random
  fields plus noise, so the JPEGs are about as large as photographs of the same size.
  """

  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for a builder's metadata in its package; this module is loaded as a top-level
  # module (no package), so name the directory itself.
  pkg_dir_path = epath.Path(__file__).parent
  BUILDER_CONFIGS = [
      FakeImagesConfig(name='tiny', num_train=40, num_eval=12, min_size=40, max_size=80,
                       num_classes=40),
      FakeImagesConfig(name='bench', num_train=320, num_eval=32, min_size=330, max_size=420,
                       num_classes=1000),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Random JPEGs for tests and benchmarks.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
        }),
        supervised_keys=('image', 'label'),
        # Records in index order, so record i is example i (and has label i in 'tiny').
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated
    c = self.builder_config
    return {'train': self._generate_examples(1, c.num_train),
            'test': self._generate_examples(2, c.num_eval)}

  def _generate_examples(self, split: int, n: int):
    c = self.builder_config
    for i in range(n):
      rng = np.random.default_rng([split, i])
      h, w = rng.integers(c.min_size, c.max_size + 1, size=2)
      yield i, {'image': fake_image(rng, h, w), 'label': i % c.num_classes}


def fake_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3]: a bilinearly upsampled coarse random field plus pixel noise."""
  coarse = rng.uniform(0, 255, size=(math.ceil(h / 16) + 1, math.ceil(w / 16) + 1, 3))
  ys, xs = np.linspace(0, coarse.shape[0] - 1, h), np.linspace(0, coarse.shape[1] - 1, w)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, coarse.shape[0] - 1), np.minimum(x0 + 1, coarse.shape[1] - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  smooth = ((1 - fy) * ((1 - fx) * coarse[y0][:, x0] + fx * coarse[y0][:, x1]) +
            fy * ((1 - fx) * coarse[y1][:, x0] + fx * coarse[y1][:, x1]))
  return np.clip(smooth + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
