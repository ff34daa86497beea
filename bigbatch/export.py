"""python -m bigbatch.export WORKDIR --out=DIR [--step=N] [--ema]

Writes the trained network of a run, in evaluation mode, in two forms that load without
bigbatch: DIR/model.jax_export with DIR/variables.msgpack (jax.export), and DIR/saved_model/
(jax2tf), with DIR/export.json describing inputs and outputs. Only the network's arrays are read
from the checkpoint. How to load each form: docs/design.md, "Reading a run afterwards: plots
and exports".
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

_OUT = flags.DEFINE_string('out', None, 'Directory to write the exported model to (created).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the newest).')
_EMA = flags.DEFINE_bool('ema', False, 'Export the moving average of the parameters '
                         '(runs with config.ema_decay).')

# What the evaluation feeds the model, per task and data set (export.json).
_FACE_INPUT = 'RGB uint8 / 127.5 - 1, aligned faces (bigbatch/data/faces.py: normalize)'


class ExportError(RuntimeError):
  """The workdir cannot be exported (no run, no checkpoint, a damaged one)."""


def _input_note(config) -> str:
  if config.task == 'face':
    return _FACE_INPUT
  return (f'the preprocessing of data set {config.data.name!r} for evaluation '
          f'(bigbatch/data/)')


def _locate_backbone(full: Any, backbone: Any) -> tuple[str, ...]:
  """The key path of the network's parameters inside the trained parameters (the task may hold
  more, e.g. Partial FC's centers next to them)."""
  if backbone is full:
    return ()
  if isinstance(full, dict):
    for key, value in full.items():
      if value is backbone:
        return (key,)
  raise ExportError('the task keeps its network parameters in a layout export does not know')


def _nest(path: tuple[str, ...], tree: Any) -> Any:
  for key in reversed(path):
    tree = {key: tree}
  return tree


def _unnest(path: tuple[str, ...], tree: Any) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def load(workdir: str, *, step: int | None = None, ema: bool = False):
  """(config, model, variables, step, image_shape) of the run in `workdir`: the network in
  evaluation mode and its verified arrays from the checkpoint (the newest, or `step`)."""
  # pylint: disable=g-import-not-at-top  (TensorFlow and jax are imported only when needed)
  import jax
  import jax.numpy as jnp
  import ml_collections
  import orbax.checkpoint as ocp
  from bigbatch import checkpoint as checkpoint_lib
  from bigbatch import derive
  from bigbatch import models
  from bigbatch import tasks
  from bigbatch import workdir as workdir_lib

  recorded = workdir_lib.recorded_config(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if recorded is None or not workdir_lib.isdir(ckpt_dir):
    raise ExportError(f'{workdir} is not a bigbatch workdir (no config.json or checkpoints/); '
                      f'pass the --workdir of a run')
  config = ml_collections.ConfigDict(recorded)
  facts = derive.data_facts(config)
  task = tasks.get(config.task)(config, facts.num_classes)
  model = models.build(config.model, task.outputs, axis_name=None)
  key = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(
      lambda: model.init(key, jnp.zeros((1, *facts.image_shape), jnp.float32), train=False))
  full = jax.eval_shape(lambda: task.init_params(key, abstract['params'], 1))
  path = _locate_backbone(full, task.backbone(full))
  params_name = 'ema_params' if ema else 'params'
  item = {params_name: _nest(path, abstract['params'])}
  if abstract.get('batch_stats'):
    item['batch_stats'] = abstract['batch_stats']
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                      item)

  manager = ocp.CheckpointManager(ckpt_dir, item_names=('state', 'meta'),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ExportError(f'{ckpt_dir} holds no checkpoint; train first')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ExportError(f'--step={step}: no such checkpoint in {ckpt_dir}; it has '
                        f'{", ".join(map(str, steps))}')
    meta = workdir_lib.read_json(os.path.join(ckpt_dir, str(step), 'meta', 'metadata'))
    wanted = checkpoint_lib.layout(item)
    missing = [k for k, v in wanted.items() if (meta.get('layout') or {}).get(k) != v]
    if missing:
      what = 'no moving average (config.ema_decay was not set)' if ema and not any(
          k.startswith('ema_params/') for k in meta.get('layout') or {}) else (
              f'{len(missing)} arrays that differ from the model of its config.json, e.g. '
              f'{missing[0]}')
      raise ExportError(f'the checkpoint at step {step} in {ckpt_dir} has {what}')
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))['state']
    except Exception as e:  # pylint: disable=broad-except  (any read failure: unusable)
      raise ExportError(f'the checkpoint at step {step} in {ckpt_dir} cannot be read '
                        f'({type(e).__name__}: {e})') from e
  finally:
    manager.close()
  # orbax does not checksum data; the fingerprints recorded at save time do.
  actual = checkpoint_lib.fingerprints(restored)
  wrong = [k for k, v in actual.items() if meta['fingerprints'].get(k) != v]
  if wrong:
    raise ExportError(f'the checkpoint at step {step} in {ckpt_dir} is damaged: {len(wrong)} '
                      f'arrays do not match their recorded fingerprint, e.g. {wrong[0]}')
  variables = {'params': _unnest(path, restored[params_name])}
  if 'batch_stats' in restored:
    variables['batch_stats'] = restored['batch_stats']
  return config, model, variables, step, tuple(facts.image_shape)


def export(workdir: str, out: str, *, step: int | None = None, ema: bool = False) -> dict:
  """Writes the exports of the run in `workdir` (its checkpoint at `step`, default the newest;
  the EMA parameters with `ema`) into `out` (the files: module docstring); returns what
  export.json records."""
  # pylint: disable=g-import-not-at-top
  import flax
  import jax
  from jax.experimental import jax2tf
  import tensorflow as tf
  from bigbatch import workdir as workdir_lib

  config, model, variables, step, image_shape = load(workdir, step=step, ema=ema)

  def apply(variables, images):
    return model.apply(variables, images, train=False).astype(jax.numpy.float32)

  os.makedirs(out, exist_ok=True)
  b = jax.export.symbolic_shape('b')[0]
  images_spec = jax.ShapeDtypeStruct((b, *image_shape), jax.numpy.float32)
  variables_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  exported = jax.export.export(jax.jit(apply))(variables_spec, images_spec)
  with open(os.path.join(out, 'model.jax_export'), 'wb') as f:
    f.write(exported.serialize())
  with open(os.path.join(out, 'variables.msgpack'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(variables)))

  # The SavedModel keeps the arrays as tf.Variables (not constants in the graph), the layout
  # jax2tf documents for saving: a model of any size, loaded without jax.
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
  converted = jax2tf.convert(  # inference only: no gradient to save
      apply, polymorphic_shapes=[None, f'(b, {", ".join(map(str, image_shape))})'],
      with_gradient=False)
  module.serve = tf.function(
      lambda images: converted(module.variables_tree, images), autograph=False,
      input_signature=[tf.TensorSpec((None, *image_shape), tf.float32, name='images')])
  tf.saved_model.save(module, os.path.join(out, 'saved_model'))

  record = {
      'step': int(step), 'ema': bool(ema), 'task': config.task,
      'model': config.model.name, 'image_shape': list(image_shape), 'input_dtype': 'float32',
      'input': _input_note(config),
      'output': ('embeddings (not L2-normalized; the verification protocol normalizes them)'
                 if config.task == 'face' else 'class logits'),
      'files': {'jax': ['model.jax_export', 'variables.msgpack'], 'tensorflow': 'saved_model'},
      'config': json.loads(config.to_json_best_effort()),
  }
  workdir_lib.write_json(os.path.join(out, 'export.json'), record)
  return record


def main(argv):
  """The command line (module docstring): prints what was written; exit 4 for an unusable run."""
  if not logging.vlog_is_on(1):  # orbax logs a dozen INFO lines per restore
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2:
    raise app.UsageError('usage: python -m bigbatch.export WORKDIR --out=DIR')
  if not _OUT.value:
    print('bigbatch.export: flag error: --out=DIR is required', file=sys.stderr)
    sys.exit(1)
  try:
    record = export(argv[1], _OUT.value, step=_STEP.value, ema=_EMA.value)
  except ExportError as e:
    print(f'bigbatch.export: {e}', file=sys.stderr)
    sys.exit(4)
  print(f'Exported step {record["step"]} of {argv[1]} ({record["model"]}, {record["task"]}) to '
        f'{_OUT.value}: model.jax_export + variables.msgpack (jax), saved_model/ (TensorFlow).')


if __name__ == '__main__':
  app.run(main)
