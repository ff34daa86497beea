"""Face recognition on CPU: a small iResNet with ArcFace and Partial FC on synthetic identities,
verified on identities held out from training.

Command:  python -m bigbatch.main --config=configs/face_synthetic.py --workdir=/tmp/bb_face
Hardware: any CPU (2 shared cores: 14 min, 526 s of CPU time; README "Results" has the run).
Data:     face_synthetic: 1,000 training identities x 16 images (32x32x3, generated from each
          identity's latent prototype, per-image noise and nuisance factors); 3,000 verification
          pairs from 500 other identities, half of them same-identity.
Expected: >= 0.90 verification accuracy (10-fold protocol, flip test) on the held-out
          identities; the model never saw them, so this measures the embedding, not the
          classifier.
`:steps=N` shortens the run (the test suite runs a short form).
"""
from bigbatch import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=0, batch=256, sample_rate=0.5)
  c = config_lib.base_config()
  c.task = 'face'
  c.data.name = 'face_synthetic'
  c.data.image_size = 32
  c.data.channels = 3
  c.data.num_identities = 1000
  c.data.images_per_identity = 16
  c.data.verification_pairs = 3000
  c.data.verification_identities = 500
  c.model.name = 'iresnet'
  c.model.depth = 18
  c.model.stage_depths = (1, 1, 1, 1)
  c.model.width = 16
  c.model.embedding_dim = 64
  c.model.norm = 'batch'
  c.face.s = 32.0  # a smaller scale than 64 suits the 64-d embedding and 1,000 classes
  c.face.m1, c.face.m2, c.face.m3 = 1.0, 0.3, 0.0  # ArcFace
  c.face.sample_rate = args.sample_rate
  c.face.verify_batch = 512
  c.global_batch = args.batch
  c.num_epochs = 8.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.lr.base_lr = 0.1
  c.lr.base_batch = 1024  # InsightFace: 0.1 per 1k images
  c.lr.scaling = 'linear'
  c.lr.warmup_epochs = 1.0
  c.lr.decay = 'polynomial'
  c.lr.power = 2.0
  c.eval_every_epochs = 2.0
  c.log_every_steps = 25
  c.checkpoint_every_steps = 250
  c.target.metric = 'verify/synthetic/accuracy'
  if args.steps:
    c.num_epochs = None
    c.num_steps = args.steps
    c.lr.warmup_epochs = None
    c.lr.warmup_steps = max(1, args.steps // 8)
    c.eval_every_epochs = None
    c.data.verification_pairs = 600
  return c
