"""Data sets by name: a registry of sources, and `create(config)` for the one that
config.data.name names.

`register(name, source)` adds a source from any module; the built-in ones (digits, synthetic,
the TFDS image sets in images.py, the face sets in faces.py) are registered below the same way.
What a source provides, and the table of built-in names, are in docs/design.md, "Adding a data
set or a model: one file". Shared helpers are in common.py.
"""
from __future__ import annotations

from typing import Any

from ml_collections import config_dict

from bigbatch import fields
from bigbatch import input_pipeline
from bigbatch.data import common
from bigbatch.data import digits
from bigbatch.data import faces
from bigbatch.data import images
from bigbatch.data import synthetic

DataFacts = common.DataFacts
# name -> source, in the order of registration (the order the choices are listed in).
_SOURCES: dict[str, Any] = {}


def register(name: str, source: Any) -> None:
  """Adds data set `name` (config.data.name), read by `source`: a module or object with `create`
  and `facts`, and optionally `defaults`, `validate`, `runlocal`, `prepared_dir` (docs/design.md,
  "Adding a data set or a model: one file"). Registering the same source again is a no-op;
  another source under a registered name is a ValueError, one without create/facts a TypeError."""
  missing = [f for f in ('create', 'facts') if not callable(getattr(source, f, None))]
  if missing:
    raise TypeError(f'data source {name!r} ({source!r}) has no {" or ".join(missing)}')
  known = _SOURCES.get(name)
  if known is not None and known is not source:
    raise ValueError(f'data set {name!r} is already registered ({known!r})')
  _SOURCES[name] = source


def unregister(name: str) -> None:
  """Removes data set `name` (nothing if it is not registered)."""
  _SOURCES.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered data set names."""
  return tuple(_SOURCES)


def get(name: str) -> Any:
  """The source of data set `name`; ConfigError naming config.data.name if it is unknown."""
  if name not in _SOURCES:
    raise fields.ConfigError(f'config.data.name={name!r} is unknown; choose one of '
                             f'{", ".join(_SOURCES)}')
  return _SOURCES[name]


def _shared_defaults() -> dict[str, Any]:
  return dict(
      name='digits',  # one of names()
      # TFDS data directory (digits and the image sets); None: $TFDS_DATA_DIR or
      # ~/tensorflow_datasets.
      data_dir=config_dict.placeholder(str),
      # Evaluation examples of the generated sets (synthetic, face_synthetic) and of the closed-set
      # check of the real face sets; TFDS sets evaluate their whole eval split.
      num_eval=10_000,
      # Image side S: the synthetic sets' size, the ImageNet crop (set 224), the face sets' size
      # (112 for the public ones); cifar10 and mnist keep their stored size.
      image_size=8,
      prefetch=2,  # batches prepared ahead of the device, on a host thread
      num_parallel_calls=-1,  # tf.data decode/augment parallelism; -1: AUTOTUNE
  )


# Where and how the data is read, not what it is: no change to the compiled step.
fields.declare_host_only('data.prefetch', 'data.data_dir', 'data.tfds_name', 'data.train_split',
                         'data.eval_split', 'data.file_format', 'data.num_parallel_calls',
                         'data.shuffle_buffer')


def _sources_once() -> list[tuple[Any, str]]:
  """Each registered source once (one may serve several names), with its first name."""
  out = []
  for name, source in _SOURCES.items():
    if not any(source is seen for seen, _ in out):
      out.append((source, name))
  return out


def defaults() -> dict[str, Any]:
  """Every config.data field with its default, keyed relative to config.data: the shared ones
  and each registered source's own."""
  out = dict(_shared_defaults())
  owners = dict.fromkeys(out, 'bigbatch.data')
  for source, name in _sources_once():
    for key, value in (source.defaults() if hasattr(source, 'defaults') else {}).items():
      if key in out:  # two sources claiming one field: a programming error
        raise ValueError(f'config.data.{key} of data set {name!r} is already defined by '
                         f'{owners[key]}')
      out[key] = value
      owners[key] = f'data set {name!r}'
  return out


def validate(config) -> None:
  """Checks config.data (for the data set it names) without reading data. Raises ConfigError."""
  d = config.data
  fields.choice(config, 'data.name', names())
  fields.integer(config, 'data.prefetch', low=0)  # batches prepared ahead
  if d.num_parallel_calls != -1 and not (isinstance(d.num_parallel_calls, int)
                                         and 1 <= d.num_parallel_calls <= fields.INT_MAX):
    raise fields.ConfigError(f'config.data.num_parallel_calls={d.num_parallel_calls}: must be '
                             '-1 (AUTOTUNE) or positive')
  source = get(d.name)
  if hasattr(source, 'validate'):
    source.validate(config)


def facts(config) -> DataFacts:
  """What the run will find about config.data's set (DataFacts), without reading or preparing
  it: the source's own `facts`."""
  return get(config.data.name).facts(config)


def runlocal(config) -> None:
  """config_lib.runlocal's part for the data: the source's own CPU smoke form, or the synthetic
  set in place of a source without one (data a CPU cannot read in seconds), whose own fields
  then go back to their defaults."""
  source = get(config.data.name)
  if not hasattr(source, 'runlocal'):
    own = source.defaults() if hasattr(source, 'defaults') else {}
    for key, value in own.items():
      fields.set_path(config, f'data.{key}',
                      value.get() if isinstance(value, config_dict.FieldReference) else value)
    config.data.name = 'synthetic'
  get(config.data.name).runlocal(config)


def prepared_dir(config) -> str | None:
  """Where the config's data set keeps prepared files that are rebuilt when deleted (a TFDS
  directory), or None for a source that reads its files as they are or generates its data."""
  source = get(config.data.name)
  return source.prepared_dir(config) if hasattr(source, 'prepared_dir') else None


def create(config, *, process_index: int | None = None,
           process_count: int | None = None) -> input_pipeline.Dataset:
  """The data set named by config.data.name, batched per `config` (validated first).

  process_index / process_count default to jax.process_index() / jax.process_count(); tests pass
  them to simulate several processes in one.
  """
  validate(config)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # not needed to validate a config
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return get(config.data.name).create(
      config, global_batch=config.global_batch, accumulation_steps=config.accumulation_steps,
      eval_batch=config.eval_batch, seed=config.seed, process_index=process_index,
      process_count=process_count, prefetch=config.data.prefetch)


register('digits', digits)
register('synthetic', synthetic)
for _name in images.NAMES:
  register(_name, images)
for _name in faces.FACE_DATASETS:
  register(_name, faces)
