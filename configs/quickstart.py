"""Quickstart: a small BatchNorm CNN on scikit-learn's handwritten digits, no download.

Command:  python -m bigbatch.main --config=configs/quickstart.py --workdir=/tmp/bb
Hardware: any; runs on whatever devices exist (2 CPU cores: about a minute).
Expected: >= 97% top-1 on the 360 held-out digits (measured: see README "Results").

Variants: configs/quickstart.py:steps=N shortens the run (used by the test suite).
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=0)
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.model.name = 'cnn'
  c.model.width = 32
  c.model.norm = 'batch'
  c.global_batch = 128
  c.num_epochs = 40.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.1
  c.lr.base_batch = 128
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 2.0
  c.lr.decay = 'cosine'
  c.eval_every_epochs = 10.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  if args.steps:  # a shortened run keeps the warmup within it (at most the usual 2 epochs)
    c.num_epochs = None
    c.num_steps = args.steps
    c.lr.warmup_epochs = None
    c.lr.warmup_steps = min(22, args.steps // 4)
  return c
