"""Accuracy at a fixed epoch budget vs batch size on the embedded digits, batch 32 to 1,024.

Command:  python -m bigbatch.study --config=configs/study_epochs_digits.py \
            --workdir=/tmp/bb_epochs_digits
Hardware: 2 CPU cores, one device: the first four variants' 60 trials in 26 min 29 s of wall
          time and 487 s of CPU time, measured on a shared machine (load average ~10 on the 2
          cores, the synthetic study beside it), so less on idle cores; the adascale trials (15)
          in 1 min 46 s more; docs/study_epochs_digits/ has the report. `:quick` is a 2 batch x 2 variant x 2 seed
          sweep (2 min 37 s under that load).
Data:     the scikit-learn digits (1,437 training, 360 held-out examples), so the largest batch
          is 1,024 (the whole set would be 1,437).
Expected: the "generalization gap" picture of Keskar et al. 2017 and Goyal et al. 2017 Fig. 1
          (docs/references.md): at the same number of epochs, the small-batch lr kept unchanged
          loses held-out accuracy as the batch grows (fewer updates of the same size); linear
          scaling with gradual warmup holds the accuracy up to some batch size and then falls
          off too; LARS and ghost BN are the published remedies at the large end.

Every trial trains for the same number of epochs (study.kind='fixed_epochs' counts them as
total examples / batch, rounded down, so every batch size sees the same examples to within one
batch) with a cosine decay to 0, and is evaluated every EVAL epochs and at the end. No lr
search: each variant's rule sets the lr. The CNN of configs/study_digits.py (width 32) with
Nesterov momentum 0.9 and weight decay 5e-4; BatchNorm over the whole batch except in ghost_bn.
  no_remedy      SGD, lr 0.05 at every batch (the batch-32 lr unchanged), no warmup
  linear_warmup  SGD, lr 0.05 x B/32 (linear scaling), gradual warmup over the first WARMUP epochs
  lars           LARS (eta 0.001), lr 0.5 x B/32, the same warmup
  ghost_bn       linear_warmup with ghost BatchNorm: statistics over groups of 32 examples
  adascale       AdaScale SGD (optimizer.adascale): lr 0.05 at batch 32 times the gain r in
                 [1, B/32] from the noise measurement (two microbatches, so BN over B/2), the
                 schedule stretched by the gains; a trial stops when tau / S reaches the
                 schedule, so it sees 10 to 10 x B/32 epochs (54-58 at 1,024 here);
                 `:quick,adascale` adds it to the quick sweep.
"""
import ml_collections

from bigbatch import config_lib
from bigbatch.study import run

EPOCHS = 10.0
WARMUP = 1.0  # 10% of the run (Goyal et al.: 5 of 90 epochs)
EVAL = 2.0
# AdaScale SGD: the gain uses the noise measurement, which needs two microbatches on one device.
ADASCALE = {'optimizer': {'adascale': True}, 'lr': {'scaling': 'none'},
            'noise_scale': {'enabled': True}, 'accumulation_steps': 2}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, seeds=3, epochs=EPOCHS, adascale=False)
  s = run.base_study()
  s.title = (f'Accuracy at a fixed budget of {args.epochs:g} epochs vs batch size: CNN on the '
             f'scikit-learn digits')
  c = s.base
  c.data.name = 'digits'
  c.model.name = 'cnn'
  c.model.width = 32
  c.model.norm = 'batch'
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.05
  c.lr.base_batch = 32
  c.lr.scaling = 'linear'
  c.lr.decay = 'cosine'
  c.eval_batch = 360  # the whole held-out split in one batch
  s.batch_sizes = (32, 128, 256, 512, 1024)
  s.num_seeds = args.seeds
  run.fixed_epochs_comparison(s, epochs=args.epochs, warmup_epochs=WARMUP)
  s.variants.adascale = ADASCALE
  s.eval_every_epochs = EVAL
  s.log_every_steps = 10
  s.notes = (
      f'Data: the scikit-learn digits (1,437 training, 360 held-out examples, 8x8). Every trial '
      f'trains {args.epochs:g} epochs ({args.epochs:g} x 1,437 examples, in floor(total / batch) '
      f'steps) with a cosine decay, evaluated every {EVAL:g} epochs and at the end; one lr per '
      f'variant, set by its rule (no search). no_remedy keeps lr 0.05 at every batch; '
      f'linear_warmup and ghost_bn scale it linearly from batch 32 with a {WARMUP:g}-epoch '
      f'gradual warmup; lars starts from 0.5 at 32, scaled the same way. BatchNorm over the '
      f'whole batch, except ghost_bn (groups of 32). adascale is AdaScale SGD from lr 0.05 at '
      f'batch 32 (two microbatches, so BN over half the batch); it ends when its stretched '
      f'schedule does, after {args.epochs:g} to {args.epochs:g} x B/32 epochs. The spread is over '
      f'seeds (init and data order).')
  if args.quick:  # the suite's end-to-end sweep: 2 batch sizes x 2 variants x 2 seeds
    s.title = 'Fixed-epoch study (quick): digits'
    s.batch_sizes = (32, 128)
    s.num_seeds = 2
    s.budget.epochs = 1.0
    s.eval_every_epochs = 0.5
    s.variants = ml_collections.ConfigDict({
        'no_remedy': {'lr': {'scaling': 'none'}},
        'linear_warmup': {'lr': {'scaling': 'linear', 'warmup_epochs': 0.25}}})
    if args.adascale:
      s.variants.adascale = ADASCALE
    s.notes = 'The quick sweep of the test suite: 1 epoch, evaluated every half epoch.'
  return s
