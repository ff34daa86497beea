"""CIFAR-10 ResNet-20 at batch 128: the small-batch side of the CIFAR pair (He et al. 2016).

Command:  python -m bigbatch.main --config=configs/cifar10_small_batch.py --workdir=/tmp/c10_128
Hardware: one GPU (about 30 minutes) or a TPU v3-8; CPU works but takes many hours.
  Needs the TFDS cifar10 data prepared (tfds build cifar10, or a copy under data.data_dir).
Expected: 91.25% top-1 for ResNet-20 (He et al. 2016, Table 6: 8.75% error).
CPU smoke run: configs/cifar10_small_batch.py:runlocal

Recipe: SGD momentum 0.9, lr 0.1, weight decay 1e-4, lr / 10 at 32k and 48k iterations of 64k
(epochs 82 and 123 of 164 at 390 steps per epoch), pad-4 random crop and flip.
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False, batch=128)
  c = config_lib.base_config()
  c.data.name = 'cifar10'
  c.data.image_size = 32
  c.model.name = 'cifar_resnet'
  c.model.depth = 20
  c.model.width = 16
  c.model.norm = 'batch'
  c.model.zero_init_last_gamma = False  # He et al. 2016 did not
  c.global_batch = args.batch
  c.num_epochs = 164.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.lr.base_lr = 0.1
  c.lr.base_batch = 128
  c.lr.scaling = 'linear'
  c.lr.decay = 'step'
  c.lr.boundaries_epochs = (82.0, 123.0)
  c.lr.decay_factor = 0.1
  c.eval_batch = 1000
  c.eval_every_epochs = 4.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  if args.runlocal:
    config_lib.runlocal(c)
  return c
