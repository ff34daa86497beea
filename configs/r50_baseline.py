"""ResNet-50 on ImageNet at batch 256: the small-batch baseline (Goyal et al. 2017 recipe).

Command:  python -m bigbatch.main --config=configs/r50_baseline.py --workdir=gs://BUCKET/r50_256
Hardware: 8 x V100 16GB or a TPU v3-8 (32 examples per device, BN over those 32); about a day
  on 8 V100s. Estimated peak 2.9 GiB per device, 80%+ headroom on both (benchmarks/fit.py).
Expected: 76.4% top-1 (23.60% error, Goyal et al. 2017, Table 1, batch 256, 90 epochs).
CPU smoke run: configs/r50_baseline.py:runlocal

Recipe: 90 epochs; lr 0.1 x B/256 (linear rule); divided by 10 at epochs 30, 60, 80; Nesterov
momentum 0.9; weight decay 1e-4, not on BN gamma/beta or biases; BN statistics over 32 examples;
gamma = 0 in the last BN of each residual block. At batch 256 the 5-epoch warmup from 0.1 to
0.1 is a no-op, kept so the baseline and the 8k run differ only in the batch.

Epochs are floor(1,281,167 / B) steps (5,004 at 256, 156 at 8k): the paper states every
duration in epochs, and FAIR's public implementation of this recipe (facebookresearch/pycls)
trains each epoch through a loader that drops the last partial batch, setting the lr by epoch.
"""
from bigbatch import config_lib


def goyal(c, batch: int):
  """The Goyal et al. recipe at global batch `batch` (shared with r50_8k_goyal.py)."""
  config_lib.imagenet_resnet50(c)
  c.global_batch = batch
  c.num_epochs = 90.0
  c.lr.epoch_steps = 'floor_per_epoch'  # whole batches per epoch, as pycls's drop_last loader
  c.model.norm = 'batch'
  c.model.bn_group_size = 32  # BN over 32 examples, as each of Goyal et al.'s workers
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.weight_decay_exclude = r'(^|/)(bias|scale)$'  # no decay on BN gamma/beta, biases
  c.lr.base_lr = 0.1
  c.lr.base_batch = 256
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 5.0
  c.lr.warmup_init_lr = 0.1  # gradual warmup starts at the base lr (Goyal et al. 2.2)
  c.lr.decay = 'step'
  c.lr.boundaries_epochs = (30.0, 60.0, 80.0)
  c.lr.decay_factor = 0.1
  c.label_smoothing = 0.0
  return c


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=256)
  c = goyal(config_lib.base_config(), args.batch)
  if args.runlocal:
    config_lib.runlocal(c)
  return c
