"""Config errors and the checks every module uses on its own config fields.

The bottom of the import graph: it imports nothing from bigbatch, so any module (data sources,
tasks, the optimizer, the study) can own its defaults and validation without importing
`config_lib`, which gathers them (`config_lib.base_config`, `config_lib.validate`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
  """An invalid config. The message names the field and the fix, in one line."""


# The one walk of a dotted config path ('optimizer.name'): reading, setting, removing, flattening
# and overlaying nested values all go through these.


def get(config, path: str) -> Any:
  """config['a']['b'] for path 'a.b'; raises KeyError if a part is missing."""
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def parent(config, path: str) -> tuple[Any, str] | None:
  """(the mapping that holds the field `path`, the field's last name), or None if a parent is
  missing or not a mapping. The field itself may be missing."""
  node = config
  *parents, leaf = path.split('.')
  for p in parents:
    if not hasattr(node, 'keys') or p not in node:
      return None
    node = node[p]
  return (node, leaf) if hasattr(node, 'keys') else None


def has(config, path: str) -> bool:
  """Whether `path` names a field of `config`."""
  found = parent(config, path)
  return found is not None and found[1] in found[0]


def set_path(config, path: str, value: Any) -> None:
  """config['a']['b'] = value for path 'a.b'; the parents must exist (KeyError otherwise)."""
  found = parent(config, path)
  if found is None:
    raise KeyError(path)
  found[0][found[1]] = value


def pop(tree: dict, path: str) -> None:
  """Removes `path` from nested dicts if it is there."""
  found = parent(tree, path)
  if found is not None:
    found[0].pop(found[1], None)


def flatten(tree, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} for nested mappings (a ConfigDict or dicts); empty mappings vanish."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'keys'):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def overlay(config, overrides, where: str) -> None:
  """Sets `overrides` (nested mappings, or dotted keys) into `config`; a field the config does not
  have is a ConfigError naming `where` and the field."""
  for path, value in flatten(overrides).items():
    if not has(config, path):
      raise ConfigError(f'{where}.{path}: the experiment config has no field {path!r}; check '
                        f'the spelling against bigbatch/config_lib.base_config()')
    set_path(config, path, value)


# The largest magnitudes a number may have: integers become int32 in jax (without x64) and
# int64 in numpy, floats become float32 (the lr, BN statistics, margins). Past these a value
# would overflow in a library (OverflowError, inf) instead of being refused here.
INT_MAX = 2**31 - 1
FLOAT_MAX = 3.4028234663852886e38  # float32's largest finite value


def _too_large(path: str, value) -> None:
  if isinstance(value, int) and abs(value) > INT_MAX:
    raise ConfigError(f'config.{path}={value!r}: too large; integers must lie within '
                      f'+-(2**31 - 1) (int32, as jax keeps them); set --config.{path}=...')
  if isinstance(value, float) and abs(value) > FLOAT_MAX:
    raise ConfigError(f'config.{path}={value!r}: too large; numbers must lie within +-3.4e38 '
                      f'(float32); set --config.{path}=...')


def positive(config, path: str, allow_none: bool = False) -> None:
  """The field is a finite number > 0 (or None with allow_none), representable in int32 (an
  int) or float32 (a float)."""
  value = get(config, path)
  if value is None and allow_none:
    return
  if (value is None or isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or not value > 0):
    raise ConfigError(f'config.{path}={value!r}: must be a positive, finite number; set '
                      f'--config.{path}=...')
  _too_large(path, value)


def finite(config, path: str, *, low: float | None = None, high: float | None = None,
           high_open: bool = False, allow_none: bool = False) -> None:
  """The field is a finite number in [low, high] (or [low, high) with high_open), representable
  in int32 (an int) or float32 (a float)."""
  value = get(config, path)
  if value is None and allow_none:
    return
  ok = (value is not None and not isinstance(value, bool) and isinstance(value, (int, float))
        and math.isfinite(value) and (low is None or value >= low)
        and (high is None or (value < high if high_open else value <= high)))
  if not ok:
    bounds = f'[{"-inf" if low is None else low}, {"inf" if high is None else high}' + (
        ')' if high_open or high is None else ']')
    raise ConfigError(f'config.{path}={value!r}: must be a finite number in {bounds}')
  _too_large(path, value)


def integer(config, path: str, *, low: int, high: int = INT_MAX) -> None:
  """The field is an integer (not a bool) in [low, high]."""
  value = get(config, path)
  if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
    top = '2**31 - 1' if high == INT_MAX else high
    raise ConfigError(f'config.{path}={value!r}: must be an integer in [{low}, {top}]; set '
                      f'--config.{path}=...')


def choice(config, path: str, choices: Sequence[str]) -> None:
  """ConfigError unless the field at `path` is one of `choices`."""
  value = get(config, path)
  if value not in choices:
    raise ConfigError(f'config.{path}={value!r} is unknown; choose one of {", ".join(choices)}')


_HOST_ONLY: set[str] = set()


def declare_host_only(*paths: str) -> None:
  """Declares fields (or whole groups, e.g. 'target') that only the host reads: the loop, the
  data reader, the initial state. A change to them never changes the compiled train step, so
  trainer.CompileCache leaves them out of its key. Each owner declares its own at import."""
  _HOST_ONLY.update(paths)


def host_only() -> tuple[str, ...]:
  """The declared host-only fields, sorted."""
  return tuple(sorted(_HOST_ONLY))


def merge(into: ml_collections.ConfigDict, fields: dict[str, Any], owner: str) -> None:
  """Adds dotted `fields` (defaults owned by `owner`) to `into`; a field that already exists is a
  programming error (two modules claiming one field), raised at once rather than silently
  overwritten (init2winit merges its hparams the same way)."""
  for key, value in fields.items():
    *parents, _ = key.split('.')
    for i in range(1, len(parents) + 1):
      if not has(into, '.'.join(parents[:i])):
        set_path(into, '.'.join(parents[:i]), ml_collections.ConfigDict())
    if has(into, key):
      raise ValueError(f'config field {key!r} of {owner} is already defined by another module')
    set_path(into, key, value)
