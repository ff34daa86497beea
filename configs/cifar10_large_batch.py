"""CIFAR-10 ResNet-20 at batch 8,192 with the large-batch remedies: the large side of the pair.

Command:  python -m bigbatch.main --config=configs/cifar10_large_batch.py --workdir=/tmp/c10_8k
Hardware: 8 GPUs or a TPU v3-8 (1,024 examples per device, ghost BN over 128); on one device add
  --config.accumulation_steps=8: the same update.
Expected: below the batch-128 baseline's 91.25% at the same 164 epochs (6 steps per epoch, 984
  steps instead of 64k); the gap is what the study tool measures (configs/cifar10_small_batch.py).
CPU smoke run: configs/cifar10_large_batch.py:runlocal

Remedies: LARS (eta 0.001), linear scaling from 0.1 at 128 scaled into the trust-ratio regime (peak
lr 6.4 here is the base lr 0.1 x 8192/128), 10-epoch gradual warmup from 0, polynomial decay
(power 2), ghost BN over 128 examples (Hoffer et al. 2017), label smoothing 0.1.
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=8192)
  c = config_lib.base_config()
  c.data.name = 'cifar10'
  c.data.image_size = 32
  c.model.name = 'cifar_resnet'
  c.model.depth = 20
  c.model.width = 16
  c.model.norm = 'batch'
  c.model.bn_group_size = 128
  c.model.zero_init_last_gamma = True
  c.global_batch = args.batch
  c.num_epochs = 164.0
  c.optimizer.name = 'lars'
  c.optimizer.momentum = 0.9
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.weight_decay = 1e-4
  c.lr.base_lr = 0.1
  c.lr.base_batch = 128
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 10.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.label_smoothing = 0.1
  c.eval_batch = 1000
  c.eval_every_epochs = 8.0
  c.log_every_steps = 6
  c.checkpoint_every_minutes = 10.0  # a hard kill loses at most ~10 minutes
  if args.runlocal:
    config_lib.runlocal(c)
  return c
