"""ResNet-50 on ImageNet at batch 32,768 with plain Nesterov momentum (Nado et al. 2021).

Nado et al.'s point: LARS/LAMB are not required at this batch size; tuned Nesterov momentum
reaches 75.9% top-1 in 2,512 steps (64.25 epochs of 1,281,167 examples at 32,768).
Command:  python -m bigbatch.main --config=configs/r50_32k_nesterov.py --workdir=gs://BUCKET/r50_nag
Hardware: a TPU v3-256 (128 examples per device), a TPU v3-512 (64 per device) or 256 x A100 40GB
  (128 per device); bf16 compute. Estimated peak per device (benchmarks/fit.py): 13.1 GiB at 128
  (18% headroom on a 16 GiB v3 core, 65% on an A100 40GB), 6.7 GiB at 64 (58% on v3).
Expected: 75.9% top-1 at 2,512 steps (Nado et al. 2021; docs/references.md).
CPU smoke run: configs/r50_32k_nesterov.py:runlocal

The paper's tuned lr, warmup and decay values are not reproduced here. The schedule here
(linear warmup then polynomial decay of power 2, label smoothing 0.1, no decay on BN/bias) has
the paper's shape; the peak lr (linear rule from 0.1 at 256, 12.8 at 32k, scaled down by 0.5)
and the 5-epoch warmup are our starting point, to be swept with the study tool. The run length
is the paper's, in steps; the warmup's epochs are counted in examples like the other TPU
recipes here: floor(5 * 1,281,167 / 32,768) = 195 steps.
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=32768)
  c = config_lib.imagenet_resnet50(config_lib.base_config())
  c.global_batch = args.batch
  c.num_steps = 2512
  c.lr.epoch_steps = 'total_examples_floor'  # as configs/r50_64k.py; 195 warmup steps either way
  c.model.dtype = 'bfloat16'
  c.model.norm = 'batch'
  c.model.bn_group_size = 64
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-5
  c.lr.base_lr = 0.05
  c.lr.base_batch = 256
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 5.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.label_smoothing = 0.1
  c.eval_every_epochs = 4.0
  if args.runlocal:
    config_lib.runlocal(c)
  return c
