"""Accuracy at a fixed epoch budget vs batch size on the synthetic teacher source, batch 32 to
4,096 (the whole training set).

Command:  python -m bigbatch.study --config=configs/study_epochs_synthetic.py \
            --workdir=/tmp/bb_epochs_synthetic
Hardware: 2 CPU cores, one device: 60 trials in 17 min 54 s of wall time and 303 s of CPU
          time, measured on a shared machine (load average ~10 on the 2 cores, the digits study
          beside it), so less on idle cores; the 15 adascale trials in 56 s more;
          docs/study_epochs_synthetic/ has the report.
          `:quick` is a 2 batch x 2 variant x 2 seed sweep (3 min 20 s under that load).
Data:     'synthetic': 8x8 standard-normal inputs labelled by a fixed random tanh-MLP teacher
          (10 balanced classes). A finite training set of 4,096 examples (the examples are
          generated from their index, so any size is possible), reused for EPOCHS epochs, so
          that held-out accuracy measures generalization and the largest batch, 4,096, is
          full-batch training; 4,096 held-out examples.
Expected: as configs/study_epochs_digits.py: at the same number of epochs the unchanged
          small-batch lr loses held-out accuracy as the batch grows (Keskar et al. 2017); linear
          scaling with warmup holds it up to some batch and then falls off (Goyal et al. 2017
          Fig. 1); LARS and ghost BN as the large-batch remedies.

Every trial trains the same number of epochs (study.kind='fixed_epochs' counts them as total
examples / batch, rounded down) with a cosine decay to 0, evaluated every EVAL epochs. No lr
search. An MLP with two 256-wide hidden layers and BatchNorm (over the whole batch, except in
ghost_bn), SGD with Nesterov momentum 0.9, weight decay 5e-4:
  no_remedy      lr 0.05 at every batch (the batch-32 lr unchanged), no warmup
  linear_warmup  lr 0.05 x B/32 (linear scaling), gradual warmup over the first WARMUP epochs
  lars           LARS (eta 0.001), lr 0.5 x B/32, the same warmup
  ghost_bn       linear_warmup with ghost BatchNorm: statistics over groups of 32 examples
  adascale       AdaScale SGD (optimizer.adascale): lr 0.05 at batch 32 times the gain r in
                 [1, B/32] from the noise measurement (two microbatches, so BN over B/2), the
                 schedule stretched by the gains; a trial ends when its stretched schedule does,
                 after EPOCHS to EPOCHS x B/32 epochs (it does not keep the epochs equal)
"""
import ml_collections

from bigbatch import config_lib
from bigbatch.study import run

NUM_TRAIN = 4_096
EPOCHS = 10.0
WARMUP = 1.0  # 10% of the run (Goyal et al.: 5 of 90 epochs)
EVAL = 2.0
# AdaScale SGD: the gain uses the noise measurement, which needs two microbatches on one device.
ADASCALE = {'optimizer': {'adascale': True}, 'lr': {'scaling': 'none'},
            'noise_scale': {'enabled': True}, 'accumulation_steps': 2}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, seeds=3, epochs=EPOCHS)
  s = run.base_study()
  s.title = (f'Accuracy at a fixed budget of {args.epochs:g} epochs vs batch size: MLP on the '
             f'synthetic teacher source ({NUM_TRAIN:,} training examples)')
  c = s.base
  c.data.name = 'synthetic'
  c.data.num_train = NUM_TRAIN
  c.data.num_eval = 4096
  c.model.name = 'mlp'
  c.model.width = 256
  c.model.norm = 'batch'
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.05
  c.lr.base_batch = 32
  c.lr.scaling = 'linear'
  c.lr.decay = 'cosine'
  c.eval_batch = 4096
  s.batch_sizes = (32, 128, 512, 2048, 4096)
  s.num_seeds = args.seeds
  run.fixed_epochs_comparison(s, epochs=args.epochs, warmup_epochs=WARMUP)
  s.variants.adascale = ADASCALE
  s.eval_every_epochs = EVAL
  s.log_every_steps = 20
  s.notes = (
      f'Data: the synthetic teacher source, {NUM_TRAIN:,} training examples reused every epoch '
      f'and 4,096 held-out. Every trial trains {args.epochs:g} epochs ({args.epochs:g} x '
      f'{NUM_TRAIN:,} examples, in floor(total / batch) steps) with a cosine decay, evaluated '
      f'every {EVAL:g} epoch(s); one lr per variant, set by its rule (no search). no_remedy '
      f'keeps lr 0.05 at every batch; linear_warmup and ghost_bn scale it linearly from batch '
      f'32 with a {WARMUP:g}-epoch gradual warmup; lars starts from 0.5 at 32, scaled the same '
      f'way. BatchNorm over the whole batch, except ghost_bn (groups of 32). The spread is over '
      f'seeds (init and data order; the data set itself is the same).')
  if args.quick:  # a fast end-to-end sweep: 2 batch sizes x 2 variants x 2 seeds
    s.title = 'Fixed-epoch study (quick): synthetic'
    s.base.data.num_train = 2048
    s.base.data.num_eval = 512
    s.base.eval_batch = 512
    s.batch_sizes = (32, 256)
    s.num_seeds = 2
    s.budget.epochs = 1.0
    s.eval_every_epochs = 0.5
    s.variants = ml_collections.ConfigDict({
        'no_remedy': {'lr': {'scaling': 'none'}},
        'ghost_bn': {'lr': {'scaling': 'linear', 'warmup_epochs': 0.25},
                     'model': {'bn_group_size': 32}}})
    s.notes = 'A quick sweep: 2,048 training examples, 1 epoch, evaluated every half epoch.'
  return s
