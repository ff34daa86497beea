"""The ('data', 'model') device mesh and placement of state leaves by path rules."""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigbatch import config_lib

AXES = ('data', 'model')
# Batches are laid out [microbatch, examples, ...] and split over 'data' on the examples axis.
BATCH_SPEC = P(None, 'data')
EVAL_SPEC = P('data')


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of the config over `devices` (default: all). Auto axes: shardings are explicit
  on jit and shard_map boundaries, not carried in types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = config_lib.mesh_shape(config, len(devices))
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
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))
