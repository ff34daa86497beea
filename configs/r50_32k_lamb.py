"""ResNet-50 on ImageNet at batch 32,768 with LAMB (You et al. 2019).

Command:  python -m bigbatch.main --config=configs/r50_32k_lamb.py --workdir=gs://BUCKET/r50_lamb
Hardware: a TPU v3-256 (128 examples per device), a TPU v3-512 (64 per device) or 256 x A100 40GB
  (128 per device); bf16 compute. Estimated peak per device (benchmarks/fit.py): 13.2 GiB at 128
  (17% headroom on a 16 GiB v3 core, 64% on an A100 40GB), 6.8 GiB at 64 (57% on v3).
Expected: 76.3% top-1 at 32k (the LAMB authors' repository README; docs/references.md).
CPU smoke run: configs/r50_32k_lamb.py:runlocal

LAMB: Adam moments with bias correction, r = m / (sqrt(v) + eps), update
lr * ||w|| / ||r + wd w|| * (r + wd w), biases and BN parameters without weight decay and with
ratio 1. The peak lr and weight decay are NOT taken from that source: the values below (sqrt
scaling from 0.004 at batch 256 -> 0.045 at 32k, wd 0.01, 5 warmup epochs, polynomial decay)
are our starting point, to be swept with the study tool before trusting a number.

Epochs are counted in examples and rounded up, as the authors' run.sh counts them: 90 epochs of
1,281,167 examples at 32,768 are ceil(3,518.8) = 3,519 steps (the README's 3,519 iterations;
their 64k run: ceil(1,759.4) = 1,760), where 39 whole batches per epoch would give 3,510. The
5 warmup epochs are ceil(195.5) = 196 steps (the authors warm up 782 steps, 20 epochs).
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=32768)
  c = config_lib.imagenet_resnet50(config_lib.base_config())
  c.global_batch = args.batch
  c.num_epochs = 90.0
  c.lr.epoch_steps = 'total_examples_ceil'  # fastalgo/imagenet_resnet50_lamb run.sh: 3,519 steps
  c.model.dtype = 'bfloat16'
  c.model.norm = 'batch'
  c.model.bn_group_size = 64
  c.optimizer.name = 'lamb'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.lr.base_lr = 0.004
  c.lr.base_batch = 256
  c.lr.scaling = 'sqrt'
  c.lr.warmup_epochs = 5.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.label_smoothing = 0.1
  if args.runlocal:
    config_lib.runlocal(c)
  return c
