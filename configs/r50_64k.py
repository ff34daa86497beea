"""ResNet-50 on ImageNet at batch 65,536 with LARS: the headline large-batch experiment.

Command:  python -m bigbatch.main --config=configs/r50_64k.py --workdir=gs://BUCKET/r50_64k
Hardware: a TPU v3-1024 pod slice (64 examples per device) or 512 x A100 40GB (128 per device);
  estimated peak 6.7 GiB per device on the v3 (58% headroom), 13.1 GiB on the A100 (65%)
  (benchmarks/fit.py). With fewer devices add --config.accumulation_steps=K. bf16 compute,
  float32 parameters.
Expected: about 75% top-1 (Ying et al. 2018 report ~75.2% at 64k with LARS, label smoothing and
  distributed BN; unverified, docs/references.md). LARS alone: 72.5% at 32k (You et al. 2017).
  Goyal et al.'s SGD recipe at 64k: 66.04% (33.96% error). Variants: configs/r50_64k.py:batch=32768.
CPU smoke run: configs/r50_64k.py:runlocal

Recipe (tensorflow/tpu models/official/resnet/lars_util.py; docs/references.md): LARS in the
reference form, eta = 0.001, momentum 0.9, ratio eta ||w|| / (||g|| + wd ||w||), lr inside the
momentum, biases and BN parameters skipped (no ratio, no decay); peak lr and warmup epochs from
the TPU table by batch: <= 16k: 25 / 5 epochs, 32k: 34 / 12, above: 41 / 16; warmup from 0, then
polynomial decay of power 2 to 0; label smoothing 0.1; weight decay 1e-4 (the tensorflow/tpu
ResNet default); BN statistics over groups of 64 examples; 90 epochs.

Epochs are counted in examples, as the reference counts them: warmup steps are
w_epochs * 1,281,167 // batch (lars_util.py), and 90 epochs of 1,281,167 examples, in whole
batches, are floor(90 * 1,281,167 / batch) steps. At 64k: 312 warmup steps (16 x 19.55) and
1,759 steps in all, where 19 whole batches per epoch would give 304 and 1,710 (2.8% fewer
examples). The data order is unchanged: 19 batches of each epoch's permutation, then the next.
"""
from bigbatch import config_lib

# tensorflow/tpu lars_util.py: (largest batch, peak lr, warmup epochs).
TPU_LARS_TABLE = ((16384, 25.0, 5.0), (32768, 34.0, 12.0), (1 << 30, 41.0, 16.0))


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=65536)
  c = config_lib.imagenet_resnet50(config_lib.base_config())
  c.global_batch = args.batch
  c.num_epochs = 90.0
  c.model.dtype = 'bfloat16'
  c.model.norm = 'batch'
  c.model.bn_group_size = 64
  c.optimizer.name = 'lars'
  c.optimizer.momentum = 0.9
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.weight_decay = 1e-4
  c.optimizer.weight_decay_exclude = r'(^|/)(bias|scale)$'
  c.optimizer.trust_ratio_exclude = r'(^|/)(bias|scale)$'
  c.lr.epoch_steps = 'total_examples_floor'  # lars_util.py: w_epochs * N // batch
  c.lr.scaling = 'table'
  c.lr.table = TPU_LARS_TABLE
  c.lr.warmup_init_lr = 0.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.lr.end_lr = 0.0
  c.label_smoothing = 0.1
  c.eval_every_epochs = 2.0
  if args.runlocal:
    config_lib.runlocal(c)
  return c
