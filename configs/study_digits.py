"""Batch-size study on the embedded digits: steps to 97% held-out accuracy from batch 16 to 1024.

Command:  python -m bigbatch.study --config=configs/study_digits.py --workdir=/tmp/bb_study
Hardware: 2 CPU cores, one device; about 24 minutes: the first four variants' 98 trials in
          19 min 54 s, the noise_schedule and adascale trials (20) in 3 min 39 s more (README
          "Batch-size study" has the figures). `:quick` is the 2 x 2 sweep the test suite runs.
Data:     the scikit-learn digits (1,437 training examples), so the largest batch here is 1,024:
          beyond that the batch is the whole set (configs/study_synthetic.py goes further).
Expected: the regimes of Shallue et al. 2018 (docs/references.md): steps-to-target halves with the
          batch up to a knee, then flattens; linear scaling with warmup tracks the tuned lr up
          to the knee; the knee is near the measured gradient noise scale (McCandlish et al.).

Variants (every one: the small CNN, ghost BN over groups of 8, Nesterov momentum 0.9 or LARS,
weight decay 5e-4, 8 examples per microbatch so that the noise scale has a small batch):
  sgd_tuned    peak lr tuned per batch size: 4 quasi-random trials, log-uniform in [0.01, 2]
  sgd_linear   lr 0.05 at batch 32 scaled linearly, 3-epoch gradual warmup, not tuned
  sgd_sqrt     the same with square-root scaling
  lars_linear  LARS (eta 0.001) with lr 0.5 at batch 32, linear scaling and warmup, not tuned
  noise_schedule  batch 16 growing with the measured noise scale: the schedule that
               `python -m bigbatch.advise --config=configs/study_digits.py` derived from its
               probe (batch 64 from epoch 1: the largest power-of-two multiple of 16 under the
               B_simple the probe measured over its first epoch); lr tuned as sgd_tuned's
  adascale     AdaScale SGD (optimizer.adascale): lr 0.05 at batch 32 times the gain r in
               [1, B/32] from the in-step noise measurement, the schedule's time stretched by
               the gains; not tuned
"""
import ml_collections

from bigbatch import config_lib
from bigbatch.study import run

# The advisor's noise-driven batch schedule from batch 16 (docs/advisor.md): ((epoch, multiplier),
# ...) for config.batch_schedule.
NOISE_SCHEDULE = ((1, 4),)


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, seeds=2)
  s = run.base_study()
  s.title = 'Batch-size study: CNN on the scikit-learn digits, target 97% held-out top-1'
  c = s.base
  c.data.name = 'digits'
  c.model.name = 'cnn'
  c.model.width = 32
  c.model.norm = 'batch'
  c.model.bn_group_size = 8
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.05
  c.lr.base_batch = 32
  c.lr.scaling = 'linear'
  c.lr.decay = 'constant'
  c.eval_batch = 360  # the whole held-out split in one batch
  s.microbatch = 8
  s.batch_sizes = (16, 32, 64, 128, 256, 512, 1024)
  s.num_seeds = args.seeds
  s.target.metric, s.target.value, s.target.mode = 'eval/top1', 0.97, 'max'
  s.budget.epochs = 150.0
  s.eval_every_epochs = 1.0
  s.log_every_steps = 5
  s.lr_search.mode = 'quasirandom'
  s.lr_search.relative_to = 'absolute'
  s.lr_search.num_trials = 4
  s.lr_search.range = (0.01, 2.0)
  untuned = {'mode': 'grid', 'num_trials': 1, 'range': (1.0, 1.0), 'relative_to': 'rule'}
  warmup = {'warmup_epochs': 3.0}
  s.variants = ml_collections.ConfigDict({
      'sgd_tuned': {},
      'sgd_linear': {'lr': {'scaling': 'linear', **warmup}, 'lr_search': untuned},
      'sgd_sqrt': {'lr': {'scaling': 'sqrt', **warmup}, 'lr_search': untuned},
      'lars_linear': {'optimizer': {'name': 'lars', 'trust_coefficient': 0.001},
                      'lr': {'base_lr': 0.5, 'scaling': 'linear', **warmup},
                      'lr_search': untuned},
      'noise_schedule': {'batch_schedule': NOISE_SCHEDULE, 'batch_sizes': (16,)},
      # AdaScale's S = B / 32 must be >= 1: no batch 16.
      'adascale': {'optimizer': {'adascale': True}, 'lr': {'scaling': 'none'},
                   'lr_search': untuned, 'batch_sizes': (32, 64, 128, 256, 512, 1024)},
  })
  s.notes = (
      'Data: the scikit-learn digits (1,437 training, 360 held-out examples, 8x8). One trial '
      'is one run of the trainer stopped at the first evaluation (every epoch) with held-out '
      'top-1 >= 97%, or at 150 epochs. Steps-to-target per point is the fewest steps over its '
      'learning-rate trials (Shallue et al. 2018); spread is over seeds.')
  if args.quick:  # the suite's end-to-end sweep: 2 batch sizes x 2 learning rates, 1 seed
    s.title = 'Batch-size study (quick): digits, target 80% held-out top-1'
    s.batch_sizes = (32, 128)
    s.num_seeds = 1
    s.lr_search.num_trials = 2
    s.lr_search.range = (0.05, 0.2)
    s.lr_search.mode = 'grid'
    s.variants = ml_collections.ConfigDict({'sgd_tuned': {}})
    s.target.value = 0.8
    s.budget.epochs = 3.0
    s.base.sharpness.num_examples = 64
    s.base.sharpness.num_iters = 5
  return s
