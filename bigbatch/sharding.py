"""The ('data', 'model') device mesh and placement of state leaves by path rules."""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigbatch import fields

AXES = ('data', 'model')
# Batches are laid out [microbatch, examples, ...] and split over 'data' on the examples axis.
BATCH_SPEC = P(None, 'data')
EVAL_SPEC = P('data')


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """Resolves config.mesh to the ('data', 'model') shape over `num_devices`, or raises
  fields.ConfigError."""
  data, model = config.mesh.data, config.mesh.model
  if model == -1 and data == -1:
    raise fields.ConfigError('config.mesh: at most one of mesh.data, mesh.model may be -1')
  if model == -1:
    model = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data == -1:
    data = num_devices // model if model > 0 and num_devices % model == 0 else 0
  if data <= 0 or model <= 0 or data * model != num_devices:
    raise fields.ConfigError(
        f'config.mesh=(data={config.mesh.data}, model={config.mesh.model}) does not match the '
        f'{num_devices} devices; set --config.mesh.data=-1 --config.mesh.model=1 or a product '
        f'equal to {num_devices}')
  return data, model


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of the config over `devices` (default: all). Auto axes: shardings are explicit
  on jit and shard_map boundaries, not carried in types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def path_str(path) -> str:
  """'/'-joined names of a tree path, e.g. 'params/conv0/kernel'."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def specs_for(tree: Any, rules: Sequence[tuple[str, P]] = ()) -> Any:
  """PartitionSpecs for every leaf: the first rule whose regex matches the leaf's path wins;
  leaves no rule matches (and scalars) are replicated."""
  def spec(path, leaf):
    if getattr(leaf, 'ndim', 0) == 0:
      return P()
    name = path_str(path)
    for pattern, s in rules:
      if re.search(pattern, name):
        return s
    return P()
  return jax.tree_util.tree_map_with_path(spec, tree)


def named(mesh: Mesh, specs: Any) -> Any:
  """NamedShardings on `mesh` for a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))
