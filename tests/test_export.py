"""python -m bigbatch.export: the exported network, loaded by jax alone and by TensorFlow alone (in
processes that never import bigbatch), gives the trainer's evaluation outputs of the checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bigbatch import checkpoint as checkpoint_lib
from bigbatch import config_lib
from bigbatch import export
from bigbatch import loop
from bigbatch import sharding
from bigbatch import trainer as trainer_lib
from bigbatch import derive

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402

# Each loader runs in a fresh interpreter and checks that it never imported bigbatch (the jax one
# not TensorFlow either; TensorFlow 2.21 imports jax itself).
JAX_LOADER = '''
import sys, numpy as np, jax, flax.serialization
out = sys.argv[1]
exp = jax.export.deserialize(open(f"{out}/model.jax_export", "rb").read())
variables = flax.serialization.msgpack_restore(open(f"{out}/variables.msgpack", "rb").read())
np.save(sys.argv[3], np.asarray(exp.call(variables, np.load(sys.argv[2]))))
assert not any(m.split(".")[0] in ("bigbatch", "tensorflow") for m in sys.modules), "imported"
'''
TF_LOADER = '''
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(f"{sys.argv[1]}/saved_model")
np.save(sys.argv[3], model.serve(tf.constant(np.load(sys.argv[2]))).numpy())
assert not any(m.split(".")[0] == "bigbatch" for m in sys.modules), "imported"
'''


def _load_outside(tmp_path, out, images) -> dict[str, np.ndarray]:
  np.save(tmp_path / 'images.npy', images)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  results = {}
  for name, code in (('jax', JAX_LOADER), ('tensorflow', TF_LOADER)):
    target = tmp_path / f'{name}.npy'
    # cwd outside the checkout: `import bigbatch` would not find the source tree either.
    proc = subprocess.run([sys.executable, '-c', code, str(out), str(tmp_path / 'images.npy'),
                           str(target)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (name, proc.stderr[-3000:])
    results[name] = np.load(target)
  return results


def _restored(config, workdir):
  """The trainer and its state at the newest checkpoint, as a resumed run restores them."""
  facts = derive.data_facts(config)
  mesh = sharding.make_mesh(config, jax.devices())
  trainer = trainer_lib.build(config, mesh, num_train=facts.num_train,
                              image_shape=facts.image_shape, num_classes=facts.num_classes)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    state, step = ckpt.restore_latest(trainer.state)
  finally:
    ckpt.close()
  return trainer, state, step


def test_classification_export_loads_without_bigbatch_and_gives_the_checkpoints_logits(
    tmp_path):
  config = quickstart.get_config('steps=4')
  config_lib.override(config, **{'model.width': 4, 'eval_every_epochs': 1000.0})
  workdir = str(tmp_path / 'wd')
  loop.train_and_evaluate(config, workdir)
  out = tmp_path / 'export'
  record = export.export(workdir, str(out))
  assert record['step'] == 4 and record['task'] == 'classification'
  assert json.loads((out / 'export.json').read_text())['image_shape'] == [8, 8, 1]

  trainer, state, step = _restored(config, workdir)
  assert step == 4
  images = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)  # b = 5
  variables = {'params': trainer.task.backbone(state.params), 'batch_stats': state.batch_stats}
  reference = np.asarray(trainer.model.apply(jax.device_get(variables), images, train=False))
  assert reference.shape == (5, 10)
  for name, outputs in _load_outside(tmp_path, out, images).items():
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_face_export_gives_the_trainers_evaluation_embeddings(tmp_path):
  c = config_lib.base_config()
  config_lib.override(c, **{
      'task': 'face', 'data.name': 'face_synthetic', 'data.image_size': 16,
      'data.num_identities': 37, 'data.images_per_identity': 4, 'data.verification_pairs': 40,
      'model.name': 'iresnet', 'model.depth': 18, 'model.stage_depths': (1, 1, 1, 1),
      'model.width': 4, 'model.embedding_dim': 8, 'model.bn_group_size': 4,
      'face.s': 16.0, 'face.m2': 0.3, 'face.sample_rate': 0.5, 'global_batch': 32,
      'num_epochs': None, 'num_steps': 3, 'eval_every_epochs': 1000.0,
      'lr.base_lr': 0.1, 'lr.base_batch': 32})
  workdir = str(tmp_path / 'wd')
  loop.train_and_evaluate(c, workdir)
  out = tmp_path / 'export'
  record = export.export(workdir, str(out))
  assert record['task'] == 'face' and 'embeddings' in record['output']

  trainer, state, _ = _restored(c, workdir)
  images = np.random.default_rng(1).uniform(-1, 1, size=(8, 16, 16, 3)).astype(np.float32)
  # The trainer's evaluation step (the verification protocol's embedding function).
  reference = np.asarray(trainer.eval_step(state, jax.device_put(images,
                                                                 trainer.eval_sharding)))
  assert reference.shape == (8, 8)
  for name, outputs in _load_outside(tmp_path, out, images).items():
    np.testing.assert_allclose(outputs, reference, rtol=1e-4, atol=1e-5, err_msg=name)


def test_export_refuses_what_it_cannot_export(tmp_path):
  with pytest.raises(export.ExportError, match='not a bigbatch workdir'):
    export.load(str(tmp_path))
