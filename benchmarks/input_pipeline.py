"""Input pipeline throughput per CPU core, and the cores it takes to feed an accelerator.

    python benchmarks/input_pipeline.py [--seconds=8] [--target=3000]

Pipelines, each through the real code path, timed after warmup batches:
  digits            `Dataset.train_batch` of the in-memory 8x8 digits (numpy gather).
  cifar10-style     a synthetic uint8 32x32x3 source (in memory) through the cifar10 train
                    augmentation (zero pad 4, random crop, flip, normalize) in the same parallel
                    tf.data map and batching as the readers; no PNG decode, unlike real CIFAR-10.
  imagenet2012-style
                    `Dataset.train_batch` of a temporary TFDS set of a few hundred random JPEGs of
                    330..420 px (about ImageNet's mean size), decoded with the inception crop to
                    224x224 and flipped, read from array_record (by global index) and TFRecord.
Per core = examples / CPU seconds of this process (all threads) while measuring, with every
core in the affinity mask allowed. CPU time rather than wall time, because it holds on a machine
whose other processes take cores; the wall rate is shown too, with the cores it kept busy
(CPU seconds / wall second). Cores needed = target / per core.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from bigbatch import config_lib  # noqa: E402
from bigbatch import data  # noqa: E402

# Training throughput of ResNet-50 on one current GPU (mixed precision, A100/H100 class).
TARGET_IMAGES_PER_SEC = 3000


def measure(next_batch, batch_size: int, seconds: float, warmup: int = 3) -> tuple[float, float]:
  """(examples / wall second, examples / CPU second) of `next_batch()` after `warmup` calls."""
  for _ in range(warmup):
    next_batch()
  n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - wall0 < seconds:
    next_batch()
    n += batch_size
  return n / (time.perf_counter() - wall0), n / (time.process_time() - cpu0)


def config(name: str, data_dir: str, **overrides):
  c = config_lib.base_config()
  c.data.name, c.data.data_dir = name, data_dir
  c.seed = 0
  for path, value in overrides.items():
    node, _, leaf = path.rpartition('.')
    (c[node] if node else c)[leaf] = value
  return c


def stepper(dataset):
  steps = iter(range(10**9))
  return lambda: dataset.train_batch(next(steps))


def cifar_style(batch: int):
  """The cifar10 train augmentation over an in-memory uint8 source, batched as the readers do."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bigbatch.data import common  # pylint: disable=g-import-not-at-top
  from bigbatch.data import image_preprocess as images  # pylint: disable=g-import-not-at-top
  n = 4096
  pixels = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  source = tf.data.Dataset.from_tensor_slices(pixels).enumerate().repeat()

  def augment(index, image):
    key = images.example_key(0, index // n, index % n)
    return {'image': images.cifar_train(image, key), 'label': tf.cast(index % 10, tf.int32)}

  batches = common.map_and_batch(source, lambda i, x: augment(i, x), batch, -1)
  return batches.as_numpy_iterator().__next__


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--seconds', type=float, default=8.0, help='measured time per pipeline')
  parser.add_argument('--target', type=float, default=TARGET_IMAGES_PER_SEC)
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from bigbatch.data import images  # pylint: disable=g-import-not-at-top
  from tests import fake_tfds  # pylint: disable=g-import-not-at-top,unused-import  # the builder
  tfds.disable_progress_bar()
  cores = len(os.sched_getaffinity(0))
  intra = tf.config.threading.get_intra_op_parallelism_threads() or cores  # 0: one per core

  rows, notes = [], []
  with tempfile.TemporaryDirectory() as tmp:
    pipelines = []
    digits = data.create(config('digits', os.path.join(tmp, 'digits'), global_batch=256),
                         process_index=0, process_count=1)
    pipelines.append(('digits 8x8x1', 256, stepper(digits)))
    pipelines.append(('cifar10-style 32x32x3 (in-memory uint8)', 256, cifar_style(256)))
    for fmt in ('array_record', 'tfrecord'):
      data_dir = os.path.join(tmp, fmt)
      t0 = time.perf_counter()
      builder = images.prepare('bigbatch_fake_images/bench', data_dir, file_format=fmt)
      split = builder.info.splits['train']
      if fmt == 'array_record':
        notes.append(f'{split.num_examples} JPEGs, {split.num_bytes / split.num_examples / 1e3:.0f}'
                     f' kB each on average, written in {time.perf_counter() - t0:.1f} s')
      dataset = data.create(
          config('imagenet2012', data_dir, global_batch=64, **{
              'data.tfds_name': 'bigbatch_fake_images/bench', 'data.image_size': 224}),
          process_index=0, process_count=1)
      pipelines.append((f'imagenet2012-style 224 ({fmt})', 64, stepper(dataset)))

    for name, batch, next_batch in pipelines:
      wall, per_cpu = measure(next_batch, batch, args.seconds)
      rows.append((name, f'{wall:,.0f}', f'{wall / per_cpu:.2f}', f'{per_cpu:,.0f}',
                   f'{math.ceil(args.target / per_cpu)}'))
      print(rows[-1], flush=True)

  header = ('pipeline', f'examples/s (wall, {cores} cores allowed)', 'cores busy',
            'examples/s per core (CPU time)',
            f'cores for {args.target:,.0f} img/s')
  text = report.table(header, rows)
  print(text)
  report.update_section(
      'input-pipeline', 'Input pipeline throughput per CPU core',
      f'`python benchmarks/input_pipeline.py`: {cores} cores in the affinity mask, TF intra-op '
      f'threads {intra}, tf.data maps AUTOTUNE; {args.seconds:.0f} s per pipeline after 3 warmup '
      f'batches. Per core = examples / CPU seconds of the process (all threads), which holds '
      f'when other processes share the machine (cores busy = CPU s per wall s); cores needed = {args.target:,.0f} images/s '
      f'(ResNet-50 training on one GPU) / per core. ImageNet-style data: {"; ".join(notes)}, '
      f'330..420 px, inception crop + flip to 224x224 float32.\n\n' + text)


if __name__ == '__main__':
  main()
