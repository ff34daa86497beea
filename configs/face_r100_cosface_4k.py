"""The public face-recognition recipe at batch 4,096: iResNet-100, CosFace, Partial FC 0.2, SGD.

Command:  python -m bigbatch.main --config=configs/face_r100_cosface_4k.py --workdir=DIR \
            --config.data.face_root=/data/webface42m   # train.rec / train.idx (InsightFace)
Hardware: 8 x A100 80GB or 8 x H100 80GB (512 images per device; estimated peak 57.6 GiB, 23%
          headroom, benchmarks/fit.py). A TPU v4-32 is 16 chips (256 per device: 29.2 GiB of
          32, 9% headroom, too little): add --config.accumulation_steps=2 there (15.7 GiB, 51%).
          On fewer devices add --config.accumulation_steps=N (the update is the same).
Data:     InsightFace RecordIO of WebFace42M (about 2.06M identities, 42.5M images: the
          WebFace260M paper's counts, unverified here) or MS1MV3 (set face_root accordingly);
          verification on lfw.bin, cfp_fp.bin and agedb_30.bin next to train.rec.
Expected: the InsightFace arcface_torch recipe (docs/references.md, "Face recognition"):
          SGD momentum 0.9, lr 0.1 per 1k images (0.4 at 4k; arcface_torch's own 4k run used
          0.3), weight decay 5e-4 on every parameter, 20 epochs with polynomial decay, CosFace
          s=64 m=0.4, Partial FC sample rate 0.2 (which loses nothing against 1.0: IJB-C
          TAR@FAR=1e-4 97.60 vs 97.59 on WebFace12M). arcface_torch reports IJB-C 97.85 for
          this run; bigbatch evaluates LFW / CFP-FP / AgeDB-30, where LFW accuracy above 99.8%
          is the usual sanity check for this backbone.
This is the baseline that configs/face_64k_lamb.py is studied against.
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
  c.model.dtype = 'bfloat16'
  c.face.s = 64.0
  c.face.m1, c.face.m2, c.face.m3 = 1.0, 0.0, 0.4  # CosFace
  c.face.sample_rate = 0.2
  c.face.verify_batch = 1024
  c.global_batch = 4096
  c.eval_batch = 1024
  c.num_epochs = 20.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_exclude = None  # the reference decays every parameter
  c.lr.base_lr = 0.1
  c.lr.base_batch = 1024
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 1.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.eval_every_epochs = 1.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.checkpoint_every_minutes = 10.0  # a hard kill loses at most ~10 minutes
  c.compilation_cache_dir = '~/.cache/bigbatch/jax'
  c.target.metric = 'verify/lfw/accuracy'
  if args.runlocal:
    config_lib.runlocal(c)
  return c
