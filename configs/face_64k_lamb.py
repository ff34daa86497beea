"""Face recognition at an ultra-large batch: 65,536 images per update with LAMB, square-root
lr scaling and warmup, to study against the batch-4,096 recipe (configs/face_r100_cosface_4k.py).

Command:  python -m bigbatch.main --config=configs/face_64k_lamb.py --workdir=DIR \
            --config.data.face_root=/data/webface42m
Hardware: a TPU v4-128 (64 chips) or 64 x H100 80GB, 1,024 images per device, which fits
          neither as it is (estimated peak 108.9 GiB per device, benchmarks/fit.py). Add
          --config.accumulation_steps=2 on 64 x H100 80GB (512 per microbatch: 55.6 GiB, 25%
          headroom) and --config.accumulation_steps=4 on the TPU v4-128 (256: 28.7 GiB of 32,
          10% headroom, at the limit; 8 leaves more); on fewer devices raise it accordingly.
Expected: no published result at this batch for faces; this is the experiment. What to compare
          with the baseline: LFW / CFP-FP / AgeDB-30 accuracy and TAR@FAR=1e-3 at equal epochs
          (20), and the steps to a verification target. Starting point, not a tuned recipe: LAMB
          (trust ratio per layer; class centers and BN/bias excluded, as the centers are split
          over devices) with lr 2e-3 at batch 4,096 scaled by sqrt(B/4096) (x4 here, You et al.
          2019's rule for LAMB), 2 warmup epochs from 0, polynomial decay; Partial FC 0.1
          (the rate at which Partial FC loses nothing, docs/references.md);
          `--config.optimizer.name=lars` with `--config.lr.base_lr=...` for the LARS variant.
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config()
  c.task = 'face'
  c.data.name = 'face_recordio'
  c.data.image_size = 112
  c.data.verification_bins = ('lfw.bin', 'cfp_fp.bin', 'agedb_30.bin')
  c.model.name = 'iresnet'
  c.model.depth = 100
  c.model.width = 64
  c.model.embedding_dim = 512
  c.model.norm = 'batch'
  c.model.bn_group_size = 128  # BN statistics over 128 images, whatever the batch
  c.model.dtype = 'bfloat16'
  c.face.s = 64.0
  c.face.m1, c.face.m2, c.face.m3 = 1.0, 0.0, 0.4  # CosFace, as the baseline
  c.face.sample_rate = 0.1
  c.face.verify_batch = 1024
  c.global_batch = 65536
  c.eval_batch = 1024
  c.num_epochs = 20.0
  c.optimizer.name = 'lamb'
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-6
  c.optimizer.weight_decay_exclude = r'(^|/)(bias|scale)$'
  c.optimizer.trust_ratio_exclude = r'(^|/)(bias|scale|centers)$'
  c.lr.base_lr = 2e-3
  c.lr.base_batch = 4096
  c.lr.scaling = 'sqrt'
  c.lr.warmup_epochs = 2.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.eval_every_epochs = 1.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.checkpoint_every_minutes = 10.0  # a hard kill loses at most ~10 minutes
  c.compilation_cache_dir = '~/.cache/bigbatch/jax'
  c.target.metric = 'verify/lfw/accuracy'
  if args.runlocal:
    config_lib.runlocal(c)
  return c
