"""Batch-size study beyond the digits: an MLP on the learnable synthetic source, batch 64 to 16,384.

Command:  python -m bigbatch.study --config=configs/study_synthetic.py --workdir=/tmp/bb_study_syn
Hardware: 2 CPU cores, one device: 75 trials (3 seeds) in 55 min 54 s on cores shared with the
          face study, then the 12 adascale trials in 1 min 5 s (README has the results;
          docs/study_synthetic/ the report).
          `:seeds=1` runs one seed (7 min 15 s alone).
Data:     'synthetic': 8x8 standard-normal inputs labelled by a fixed random tanh-MLP teacher
          (10 balanced classes), 1,000,000 training examples generated from their index, so the
          batch can grow far past the digits' 1,437 examples; 4,096 held-out examples.
Expected: the same regimes as configs/study_digits.py at larger batch sizes: a knee where
          doubling the batch stops halving the steps to target, near the measured noise scale.

Variants (an MLP of two 256-wide hidden layers, no normalization, so that per-device gradients
are independent and the noise scale unbiased; SGD with Nesterov momentum 0.9, constant lr):
  sgd_tuned   peak lr tuned per batch size: 4 quasi-random trials, log-uniform in [0.02, 5]
  sgd_linear  lr 0.2 at batch 256 scaled linearly, with a gradual warmup over 20,000 examples
  adascale    AdaScale SGD (optimizer.adascale): lr 0.2 at batch 256 times the gain r in
              [1, B/256] from the in-step noise measurement, no warmup, not tuned; from 256 up
              (S = B/256 >= 1)
"""
import ml_collections

from bigbatch import config_lib
from bigbatch.study import run


def get_config(arg=None):
  args = config_lib.parse_arg(arg, seeds=3)
  s = run.base_study()
  s.title = 'Batch-size study: MLP on the synthetic teacher source, target 74% held-out top-1'
  c = s.base
  c.data.name = 'synthetic'
  c.data.num_train = 1_000_000
  c.data.num_eval = 4096
  c.model.name = 'mlp'
  c.model.width = 256
  c.model.norm = 'none'
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 0.0
  c.lr.base_lr = 0.2
  c.lr.base_batch = 256
  c.lr.scaling = 'linear'
  c.lr.decay = 'constant'
  c.eval_batch = 4096
  s.microbatch = 32
  s.batch_sizes = (64, 256, 1024, 4096, 16384)
  s.num_seeds = args.seeds
  s.target.metric, s.target.value, s.target.mode = 'eval/top1', 0.74, 'max'
  s.budget.epochs, s.budget.steps = 2.0, None  # 2,000,000 examples at every batch size
  s.eval_every_epochs = 0.005  # every 5,000 examples (every step from batch 5,000 on)
  s.log_every_steps = 5
  s.sharpness = True
  s.base.sharpness.num_examples = 2048
  s.lr_search.mode = 'quasirandom'
  s.lr_search.relative_to = 'absolute'
  s.lr_search.num_trials = 4
  s.lr_search.range = (0.02, 5.0)
  untuned = {'mode': 'grid', 'num_trials': 1, 'range': (1.0, 1.0), 'relative_to': 'rule'}
  s.variants = ml_collections.ConfigDict({
      'sgd_tuned': {},
      'sgd_linear': {'lr': {'scaling': 'linear', 'warmup_epochs': 0.02}, 'lr_search': untuned},
      'adascale': {'optimizer': {'adascale': True}, 'lr': {'scaling': 'none'},
                   'lr_search': untuned, 'batch_sizes': (256, 1024, 4096, 16384)},
  })
  s.notes = (
      'Data: the synthetic teacher source (1,000,000 training examples generated from their '
      'index; 4,096 held-out), not the digits: the batch sizes here go past the digits\' '
      'whole training set. One trial is one run of the trainer stopped at the first '
      'evaluation (every 5,000 examples) with held-out top-1 >= 74%, or after 2 epochs '
      '(2,000,000 examples) at any batch size.')
  return s
