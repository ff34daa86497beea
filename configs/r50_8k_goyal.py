"""ResNet-50 on ImageNet at batch 8,192 in 1 hour: Goyal et al. 2017.

Command:  python -m bigbatch.main --config=configs/r50_8k_goyal.py --workdir=gs://BUCKET/r50_8k
Hardware: 256 GPUs (32 per device) as in the paper, e.g. 256 x V100 16GB, or a TPU v3-256;
  estimated peak 2.9 GiB per device, 80%+ headroom on both (benchmarks/fit.py). On fewer
  devices add --config.accumulation_steps=K: the update is the same (BN stays over 32 examples).
Expected: 76.26% top-1 (23.74% error, Goyal et al. 2017, Table 1; 23.60% at batch 256).
  Without warmup 24.84% error; constant warmup 25.88%; no lr scaling 41.67%; sqrt scaling 26.22%.
  Each ablation is one override, e.g. --config.lr.scaling=sqrt or --config.lr.warmup_epochs=0.
CPU smoke run: configs/r50_8k_goyal.py:runlocal

Derived (156 steps per epoch = floor(1,281,167 / 8,192)): peak lr 3.2; lr 0.1, 1.65, 3.2, 3.2,
0.32, 0.032, 0.0032 at epochs 0, 2.5, 5, 29.9, 30, 60, 80; 780 warmup steps.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from bigbatch import config_lib  # noqa: E402
import r50_baseline  # noqa: E402  (the same recipe, one batch size)


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=8192)
  c = r50_baseline.goyal(config_lib.base_config(), args.batch)
  if args.runlocal:
    config_lib.runlocal(c)
  return c
