"""Face recognition: the model gives embeddings; the classifier is a margin softmax over class
centers sharded across every device (Partial FC, bigbatch/face/partial_fc.py); evaluation is
pair verification (bigbatch/face/verification.py) on held-out synthetic identities or the
InsightFace .bin pair files."""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
from jax import lax
import numpy as np

from bigbatch import fields
from bigbatch import optim
from bigbatch import sharding
from bigbatch.data import faces
from bigbatch.face import ijb
from bigbatch.face import losses
from bigbatch.face import partial_fc
from bigbatch.face import verification
from bigbatch.tasks import base

def loss_fn(params, batch_stats, image_MxHxWxC, label_M, key, *, model,
            face: partial_fc.Config, dropout: bool):
  """Partial FC margin softmax of one microbatch (per-device code; the gradient contract is in
  bigbatch/face/partial_fc.py). params: {'backbone': ..., 'centers': this device's rows}."""
  variables = {'params': params['backbone']}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  # Dropout masks differ per device: the key is folded with the device's index.
  rngs = ({'dropout': jax.random.fold_in(jax.random.fold_in(key, 1), lax.axis_index('data'))}
          if dropout else None)
  embeddings, updates = model.apply(variables, image_MxHxWxC, train=True,
                                    mutable=['batch_stats'], rngs=rngs)
  loss, aux = partial_fc.loss(params['centers'], embeddings, label_M, key, config=face)
  # partial_fc_overflow: 1 where some shard's positives exceeded its sample S (then all of them
  # were in its softmax; the step's metric sums its microbatches).
  return loss, (updates.get('batch_stats', {}),
                {'accuracy': aux['accuracy'], 'partial_fc_overflow': aux['overflow']})


@functools.lru_cache(maxsize=8)
def objective(model, face: partial_fc.Config):
  """The margin softmax over every class (what Partial FC samples; equal to it at sample rate 1)
  of the backbone with BN in inference mode and no dropout (Task.objective). The centers' padding
  rows (partial_fc.padded_num_classes) are left out."""

  def loss(params, batch_stats, images, labels):
    variables = {'params': params['backbone']}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    embeddings = model.apply(variables, images, train=False)
    return losses.margin_softmax_loss(
        embeddings, params['centers'][:face.num_classes], labels, s=face.s, m1=face.m1,
        m2=face.m2, m3=face.m3, straight_through=face.straight_through)

  return loss


class Task(base.Task):
  """Margin-softmax face recognition with Partial FC over every device."""

  eval_prefix = 'verify'
  # Partial FC runs over every device (both axes; 'model' has size 1 for faces): the batch and
  # the backbone are device-varying over both, so gradients stay local until the pmean.
  axes = ('data', 'model')

  def __init__(self, config, num_classes: int):
    super().__init__(config, num_classes)
    f = config.face
    self.partial_fc = partial_fc.Config(
        num_classes=num_classes, sample_rate=f.sample_rate, s=f.s, m1=f.m1, m2=f.m2, m3=f.m3,
        straight_through=f.straight_through, cap_loss=f.cap_loss)
    self._verification = None  # {name: (images, issame)}, read once

  @staticmethod
  def defaults():
    return {
        # Target logit s * (cos(m1 * theta + m2) - m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4).
        'face.s': 64.0,
        'face.m1': 1.0,
        'face.m2': 0.5,
        'face.m3': 0.0,
        # arcface_torch's CombinedMarginLoss (its no_grad margin: gradient as if there were no
        # margin; ArcFace without the theta + m > pi fallback; bigbatch/face/losses.py); False:
        # the true gradient of the margin with the fallback.
        'face.straight_through': False,
        # Report arcface_torch's loss value: each row's cross-entropy capped at -log(1e-30)
        # (gradient unchanged); False: the uncapped mean.
        'face.cap_loss': False,
        'face.sample_rate': 0.1,  # Partial FC: fraction of each device's centers in the softmax
        # Momentum and weight decay only on the rows sampled in the step (partial_fc v1);
        # False: all rows (arcface_torch's partial_fc_v2).
        'face.sampled_rows_only': False,
        'face.verify_batch': 256,  # global batch of the verification embedding pass
    }

  @staticmethod
  def validate(config, num_devices: int) -> None:
    if config.task != 'face':
      return
    if config.data.name not in faces.FACE_DATASETS:
      raise fields.ConfigError(f'config.task=face needs a face data set '
                               f'({", ".join(faces.FACE_DATASETS)}); '
                               f'config.data.name is {config.data.name!r}')
    if config.mesh.model != 1:
      raise fields.ConfigError(
          f'config.mesh.model={config.mesh.model}: task=face runs the backbone data-parallel '
          f'over every device and splits the class centers over all of them; set '
          f'--config.mesh.model=1')
    fields.finite(config, 'face.sample_rate', low=0.0, high=1.0)
    if not config.face.sample_rate > 0:
      raise fields.ConfigError(f'config.face.sample_rate={config.face.sample_rate}: must be in '
                               f'(0, 1]')
    fields.positive(config, 'face.s')
    for m in ('face.m1', 'face.m2', 'face.m3'):
      fields.finite(config, m)
    if config.face.straight_through:
      try:
        losses.check_straight_through(config.face.m1, config.face.m2, config.face.m3)
      except ValueError as e:
        raise fields.ConfigError(f'config.face.{e}') from None
    fields.positive(config, 'model.embedding_dim')
    fields.positive(config, 'face.verify_batch')
    data_parallel, _ = sharding.mesh_shape(config, num_devices)
    if config.face.verify_batch % data_parallel:
      raise fields.ConfigError(f'config.face.verify_batch={config.face.verify_batch} is not '
                               f'divisible by mesh.data ({data_parallel}); choose a multiple of '
                               f'{data_parallel}')
    if config.optimizer.clip_grad_norm is not None:
      raise fields.ConfigError('config.optimizer.clip_grad_norm with task=face: global-norm '
                               'clipping is not supported (the class centers are sharded); '
                               'unset it')
    if config.optimizer.name in ('lars', 'lamb') and not re.search(
        config.optimizer.trust_ratio_exclude or '$^', 'centers'):
      raise fields.ConfigError(
          f'config.optimizer.name={config.optimizer.name} with task=face: the class centers are '
          f'split over devices, and a trust ratio over one device\'s rows would depend on the '
          f'device count; exclude them, e.g. --config.optimizer.trust_ratio_exclude='
          f'"(^|/)(bias|scale|centers)$"')
    fields.finite(config, 'model.dropout', low=0.0, high=1.0, high_open=True)

  @staticmethod
  def runlocal(config) -> None:
    """Synthetic identities; verification on held-out ones."""
    c = config
    c.data.name = 'face_synthetic'
    c.data.num_identities = 100
    c.data.images_per_identity = 41
    c.data.verification_pairs = 64
    c.data.verification_identities = 20
    c.data.verification_bins = ()
    c.model.embedding_dim = 16
    c.face.verify_batch = 64
    c.target.metric = 'verify/synthetic/accuracy'

  @property
  def outputs(self) -> int:
    return self.config.model.embedding_dim  # iresnet's head; any other model's last layer

  def param_rules(self):
    # The class centers: contiguous row blocks over every device, their optimizer state too.
    return ((r'(^|/)centers$', partial_fc.centers_spec()),)

  def init_params(self, key, model_params, num_devices: int):
    return {'backbone': model_params, 'centers': partial_fc.init_centers(
        jax.random.fold_in(key, 1), self.num_classes, self.config.model.embedding_dim,
        num_devices)}

  def backbone(self, params):
    return params['backbone']

  def wrap_optimizer(self, optimizer: optim.Optimizer) -> optim.Optimizer:
    if not self.config.face.sampled_rows_only:
      return optimizer
    only_centers = lambda p: {'backbone': jax.tree.map(lambda _: False, p['backbone']),
                              'centers': True}
    return dataclasses.replace(
        optimizer, tx=partial_fc.sampled_rows_update(optimizer.tx, mask=only_centers))

  def loss_fn(self, model):
    dropout = self.config.model.dropout > 0
    return lambda *args: loss_fn(*args, model=model, face=self.partial_fc, dropout=dropout)

  def objective(self, model):
    return objective(model, self.partial_fc)

  def eval_fn(self, model):
    """(state, images [n, H, W, C]) -> embeddings of the current backbone."""
    def embed(state, images):
      variables = {'params': state.params['backbone']}
      if state.batch_stats:
        variables['batch_stats'] = state.batch_stats
      return model.apply(variables, images, train=False)
    return embed

  def verification_sets(self) -> dict:
    if self._verification is None:
      self._verification = faces.verification_sets(self.config, as_uint8=True)
    return self._verification

  def check_startup(self) -> None:
    self.verification_sets()
    if self.config.data.ijb_root:  # its metadata read and checked now, not at the first eval
      self._ijb_metadata()

  def _ijb_metadata(self):
    try:
      return ijb.read_metadata(self.config.data.ijb_root, self.config.data.ijb_target)
    except ijb.IJBError as e:
      raise faces.FaceDataError(str(e)) from e

  def evaluate(self, trainer, state, dataset, prefix: str) -> dict[str, float]:
    """The verification protocol (10 folds, flip test, TAR at FAR 1e-3) on each pair set of the
    config (held-out synthetic identities, or the .bin files), with the current backbone."""
    del dataset
    batch = self.config.face.verify_batch
    embed = lambda x: trainer.eval_step(state, jax.device_put(x, trainer.eval_sharding))
    out = {}
    for name, (images, issame) in self.verification_sets().items():
      preprocess = faces.normalize if images.dtype == np.uint8 else None
      emb = verification.embed_pairs(embed, images, batch, preprocess=preprocess)
      result = verification.evaluate(emb, issame)
      out[f'{prefix}/{name}/accuracy'] = result['accuracy_mean']
      out[f'{prefix}/{name}/accuracy_std'] = result['accuracy_std']
      out[f'{prefix}/{name}/tar_at_far_1e-3'] = result['tar_at_far_1e-3']
      out[f'{prefix}/{name}/pairs'] = float(len(issame))
    if self.config.data.ijb_root:
      d = self.config.data
      self._ijb_metadata()

      def embed_padded(x):  # every call `batch` images: one compilation of the eval step
        m = len(x)
        if m < batch:
          x = np.concatenate([x, np.zeros((batch - m, *x.shape[1:]), x.dtype)])
        return np.asarray(embed(x))[:m]
      try:
        result = ijb.evaluate(embed_padded, d.ijb_root, d.ijb_target, batch=batch)
      except ijb.IJBError as e:
        raise faces.FaceDataError(str(e)) from e
      name = d.ijb_target.lower()
      for k in ('tar_at_far_1e-6', 'tar_at_far_1e-5', 'tar_at_far_1e-4', 'tar_at_far_1e-3',
                'tar_at_far_1e-2', 'tar_at_far_1e-1', 'auc', 'pairs'):
        out[f'{prefix}/{name}/{k}'] = result[k]
    return out
