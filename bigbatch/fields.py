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


def get(config, path: str) -> Any:
  """config['a']['b'] for path 'a.b'."""
  node = config
  for part in path.split('.'):
    node = node[part]
  return node


def positive(config, path: str, allow_none: bool = False) -> None:
  """The field is a finite number > 0 (or None with allow_none)."""
  value = get(config, path)
  if value is None and allow_none:
    return
  if (value is None or isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or not value > 0):
    raise ConfigError(f'config.{path}={value!r}: must be a positive, finite number; set '
                      f'--config.{path}=...')


def finite(config, path: str, *, low: float | None = None, high: float | None = None,
           high_open: bool = False, allow_none: bool = False) -> None:
  """The field is a finite number in [low, high] (or [low, high) with high_open)."""
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


def choice(config, path: str, choices: Sequence[str]) -> None:
  value = get(config, path)
  if value not in choices:
    raise ConfigError(f'config.{path}={value!r} is unknown; choose one of {", ".join(choices)}')


def merge(into: ml_collections.ConfigDict, fields: dict[str, Any], owner: str) -> None:
  """Adds dotted `fields` (defaults owned by `owner`) to `into`; a field that already exists is a
  programming error (two modules claiming one field), raised at once rather than silently
  overwritten (init2winit merges its hparams the same way)."""
  for key, value in fields.items():
    node = into
    *parents, leaf = key.split('.')
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    if leaf in node:
      raise ValueError(f'config field {key!r} of {owner} is already defined by another module')
    node[leaf] = value
