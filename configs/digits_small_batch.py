"""Digits at a small global batch (32): the baseline of the digits batch-size pair.

Command:  python -m bigbatch.main --config=configs/digits_small_batch.py --workdir=/tmp/bb_small
Hardware: any (2 CPU cores: about a minute).
Expected: ~98% top-1 on the held-out digits after 30 epochs (1,320 steps).
Pair with configs/digits_large_batch.py: same epochs, 16x the batch, 22x fewer steps (2 per
epoch at 512: each epoch's last partial batch is dropped).
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, batch=32)
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.model.name = 'cnn'
  c.model.norm = 'batch'
  c.global_batch = args.batch
  c.num_epochs = 30.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.05
  c.lr.base_batch = 32
  c.lr.scaling = 'linear'
  c.lr.decay = 'cosine'
  c.eval_every_epochs = 5.0
  c.log_every_steps = 50
  return c
