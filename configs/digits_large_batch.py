"""Digits at a large global batch (512, a third of the training set): the large-batch side of
the digits pair, with the usual remedies: LARS, linear scaling, gradual warmup, ghost BN.

Command:  python -m bigbatch.main --config=configs/digits_large_batch.py --workdir=/tmp/bb_large
Hardware: any; on 8 devices each sees 64 examples (ghost BN groups of 16), on 1 device the same
update is computed with groups of 16 as well. Add `--config.accumulation_steps=4` to hold 128
examples per microbatch: the update is the same.
Expected: lower accuracy than the batch-32 baseline at the same 30 epochs (60 steps vs 1,320);
more epochs close the gap (measured: see README "Results").
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, batch=512, epochs=30.0)
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.model.name = 'cnn'
  c.model.norm = 'batch'
  c.model.bn_group_size = 16  # ghost BN: statistics of 16 examples, whatever the batch
  c.global_batch = args.batch
  c.num_epochs = args.epochs
  c.optimizer.name = 'lars'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.trust_coefficient = 0.001
  c.lr.base_lr = 0.5
  c.lr.base_batch = 32
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 5.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.eval_every_epochs = 5.0
  c.log_every_steps = 5
  return c
