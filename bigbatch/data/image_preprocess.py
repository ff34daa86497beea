"""Preprocessing of the TFDS image sets (imagenet2012 inception crop, cifar10 pad-and-crop, mnist
none; random flips; per-channel standardization): tf functions of one example, run in parallel
tf.data maps, with stateless per-example randomness (`example_key`). The table of what each set
gets is in docs/design.md, "Sources and readers, data set by data set".

Imports TensorFlow (seconds): bigbatch/data/images.py imports it when an image set is read.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bigbatch import fields
from bigbatch.data import common

common.quiet_tf()  # JAX owns the accelerators: hide them from TF before its first op

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per-channel mean and std of the 50k CIFAR-10 training images (the true std; the often copied
# (0.2023, 0.1994, 0.2010) is the mean of per-image stds).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: center crop S of the image resized to S / 0.875
CIFAR_PAD = 4


def imagenet_style(name: str) -> bool:
  """Whether data set `name` gets ImageNet's preprocessing (inception crop, resize to S)."""
  return name == 'imagenet2012'


# ---------------------------------------------------------------------------------------------
# Preprocessing: tf functions of one example, run in parallel tf.data maps.

def example_key(seed, epoch, index) -> tf.Tensor:
  """The stateless RNG key [2] of one example's augmentation: a function of these three only.

  Philox named explicitly: 'auto_select' may pick another algorithm on another device.
  """
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64), alg='philox')


def subkey(key: tf.Tensor, i: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, i, alg='philox')


def normalize(image_HxWxC: tf.Tensor, mean, std) -> tf.Tensor:
  """(x / 255 - mean) / std per channel (`mean`, `std` on the 0..1 scale).

  As one multiply and one subtract: four passes over a 224x224x3 image cost ~0.8 ms of the
  ~3 ms an ImageNet example takes; two cost ~0.25 ms.
  """
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  scale = tf.constant(1.0 / (255.0 * std), tf.float32)
  return tf.cast(image_HxWxC, tf.float32) * scale - tf.constant(mean / std, tf.float32)


def decode_and_crop(image_bytes: tf.Tensor, window_fn: Callable, channels: int = 3) -> tf.Tensor:
  """Decodes only the window `window_fn(shape [h, w, c]) -> (y, x, h, w)` of an encoded image.

  JPEGs decode just the window (decode_and_crop_jpeg skips most of the rest: a 8%-area crop
  decodes several times faster); other formats (PNG...) decode whole, then slice.
  """
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack(window), channels=channels)

  def other():
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    y, x, h, w = window_fn(tf.shape(image))
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def inception_window(shape: tf.Tensor, key: tf.Tensor, area=(0.08, 1.0),
                     aspect=(3 / 4, 4 / 3)) -> tuple[tf.Tensor, ...]:
  """A random crop (y, x, h, w) of an image of `shape`, as Szegedy et al. 2015 ("Inception").

  min_object_covered=0: the only constraints are the area and aspect ranges. When 10 draws all
  miss (a very elongated image), the whole image is used, as TF's reference does.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=key,
      min_object_covered=0.0, aspect_ratio_range=aspect, area_range=area, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], size[0], size[1]


def resize(image: tf.Tensor, size) -> tf.Tensor:
  # Plain bilinear, as the TF and MLPerf ResNet-50 references behind the large-batch results:
  # antialiasing would cost ~1 ms more per ImageNet example (+40% CPU) for a mild downscale
  # (a 400 px crop to 224). Returns float32 on the 0..255 scale.
  return tf.image.resize(image, size, method='bilinear')


def imagenet_train(image_bytes: tf.Tensor, key: tf.Tensor, size: int) -> tf.Tensor:
  crop = decode_and_crop(image_bytes, functools.partial(inception_window, key=subkey(key, 0)))
  image = tf.image.stateless_random_flip_left_right(resize(crop, [size, size]), subkey(key, 1))
  return normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def imagenet_eval(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  target = float(round(size / EVAL_CROP_FRACTION))
  # The shorter side becomes `target` (never below `size`), the longer one keeps the aspect.
  new_hw = tf.maximum(tf.cast(tf.round(hw * target / tf.reduce_min(hw)), tf.int32), size)
  image = resize(image, new_hw)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  image = image[top:top + size, left:left + size]
  image.set_shape([size, size, 3])
  return normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def cifar_train(image_HxWxC: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  shape = image_HxWxC.shape
  padded = tf.pad(image_HxWxC, [[CIFAR_PAD, CIFAR_PAD], [CIFAR_PAD, CIFAR_PAD], [0, 0]])
  image = tf.image.stateless_random_crop(padded, shape, seed=subkey(key, 0))
  image = tf.image.stateless_random_flip_left_right(image, subkey(key, 1))
  return normalize(image, CIFAR10_MEAN, CIFAR10_STD)


def cifar_eval(image_HxWxC: tf.Tensor) -> tf.Tensor:
  return normalize(image_HxWxC, CIFAR10_MEAN, CIFAR10_STD)


def mnist(image_HxWxC: tf.Tensor) -> tf.Tensor:
  return normalize(image_HxWxC, MNIST_MEAN, MNIST_STD)


class Preprocess:
  """Turns elements {'record': serialized tf.Example, 'index', 'epoch'[, 'mask']} into
  {'image': float32 [H, W, C], 'label': int32[, 'mask']}, for train or eval."""

  def __init__(self, name: str, info: tfds.core.DatasetInfo, image_size: int, seed: int):
    if not info.supervised_keys or len(info.supervised_keys) != 2:
      raise fields.ConfigError(
          f'TFDS data set {info.full_name} has no (image, label) supervised_keys; point '
          f'config.data.tfds_name at a classification data set')
    self.image_key, self.label_key = info.supervised_keys
    image_feature = info.features[self.image_key]
    label_feature = info.features[self.label_key]
    self.name, self.seed, self.size = name, seed, image_size
    self.num_classes = label_feature.num_classes
    stored = tuple(image_feature.shape)
    channels = stored[-1] or 3
    if imagenet_style(name):
      self.image_shape = (image_size, image_size, 3)
      self._stored_shape = None
    elif None in stored:  # a stand-in of varying sizes: resized to S x S first
      self.image_shape = (image_size, image_size, channels)
      self._stored_shape = None
    else:
      self.image_shape = self._stored_shape = stored
    self.channels = self.image_shape[-1]
    # Parse only the two features read (the image stays encoded), with the specs TFDS wrote.
    serialized = info.features.get_serialized_info()
    self._spec = {}
    for key in (self.image_key, self.label_key):
      tensor_info = serialized[key]
      if not isinstance(tensor_info, tfds.features.TensorInfo) or None in tensor_info.shape:
        raise fields.ConfigError(f'feature {key!r} of {info.full_name} is not a plain tensor')
      self._spec[key] = tf.io.FixedLenFeature(tensor_info.shape, tensor_info.tf_dtype)

  def _parse(self, record):
    example = tf.io.parse_single_example(record, self._spec)
    return example[self.image_key], tf.cast(example[self.label_key], tf.int32)

  def _decode(self, image_bytes):
    """cifar/mnist style: the whole image, uint8 [H, W, C] (float32 0..255 once resized)."""
    image = tf.io.decode_image(image_bytes, channels=self.channels, expand_animations=False)
    if self._stored_shape is None:
      return resize(image, [self.size, self.size])
    image.set_shape(self._stored_shape)
    return image

  def train(self, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image_bytes, label = self._parse(element['record'])
    key = example_key(self.seed, element['epoch'], element['index'])
    if imagenet_style(self.name):
      image = imagenet_train(image_bytes, key, self.size)
    elif self.name == 'cifar10':
      image = cifar_train(self._decode(image_bytes), key)
    else:
      image = mnist(self._decode(image_bytes))
    return {'image': tf.ensure_shape(image, self.image_shape), 'label': label}

  def eval(self, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image_bytes, label = self._parse(element['record'])
    if imagenet_style(self.name):
      image = imagenet_eval(image_bytes, self.size)
    elif self.name == 'cifar10':
      image = cifar_eval(self._decode(image_bytes))
    else:
      image = mnist(self._decode(image_bytes))
    image = tf.ensure_shape(image, self.image_shape)
    # Padding rows (mask False) are blanked here, so both readers pad alike.
    mask = element['mask']
    return {'image': tf.where(mask, image, 0.0), 'label': tf.where(mask, label, 0), 'mask': mask}
