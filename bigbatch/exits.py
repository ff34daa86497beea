"""Exit codes, and the one line of each error a user can fix: one mapping for the trainer
(bigbatch/main.py) and the study command (bigbatch/study/__main__.py), so both keep the contract
of docs/errors.md. Imports nothing heavy: an error's class is looked up only in the modules that
are already loaded (an error of a module never imported cannot have been raised)."""
from __future__ import annotations

import sys

FLAG_ERROR = 1  # a bad flag; also jax.distributed failing to start (docs/multihost.md)
CONFIG_ERROR = 2  # invalid config, or a workdir holding another experiment
NONFINITE = 3  # loss/gradients non-finite for too many consecutive steps
CHECKPOINT_ERROR = 4  # no readable checkpoint, or one that does not fit the model
SAVE_ERROR = 5  # a checkpoint or another workdir file could not be written (disk full, ...)
DATA_ERROR = 6  # the data set cannot be read
PREEMPTED = 75  # SIGTERM or SIGHUP (bigbatch/signals.py); launch/slurm.sbatch requeues
INTERRUPTED = 130  # SIGINT (^C)


def _loaded(module: str, name: str):
  m = sys.modules.get(module)
  return getattr(m, name, None) if m is not None else None


def classify(e: BaseException) -> tuple[str, str, int] | None:
  """(kind, message, exit code) of the line `bigbatch: KIND: MESSAGE`, or None for an error that
  is not the user's to fix (a bug: its traceback is wanted)."""
  # pylint: disable=g-import-not-at-top
  from bigbatch import signals
  from bigbatch.fields import ConfigError
  if isinstance(e, signals.Interrupted):
    return 'stopped', str(e), signals.exit_code(e.signum)
  table = [
      (_loaded('bigbatch.loop', 'Preempted'), 'stopped', None),
      (ConfigError, 'config error', CONFIG_ERROR),
      (_loaded('bigbatch.workdir', 'WorkdirError'), 'workdir error', CONFIG_ERROR),
      # metrics, TensorBoard, config.json, the lock, a study's results ...
      (_loaded('bigbatch.workdir', 'StorageError'), 'storage error', SAVE_ERROR),
      (_loaded('bigbatch.checkpoint', 'CheckpointError'), 'checkpoint error', CHECKPOINT_ERROR),
      (_loaded('bigbatch.checkpoint', 'SaveError'), 'checkpoint not written', SAVE_ERROR),
      (_loaded('bigbatch.data.common', 'DataError'), 'data error', DATA_ERROR),
      (_loaded('bigbatch.loop', 'NonFiniteError'), 'non-finite values', NONFINITE),
  ]
  for cls, kind, code in table:
    if cls is None or not isinstance(e, cls):
      continue
    if kind == 'stopped':
      return kind, str(e), signals.exit_code(e.signum)
    if kind == 'checkpoint not written':
      return kind, (f'{e}; free space or fix permissions, then rerun the same command: it '
                    f'resumes from the last checkpoint that was written'), code
    return kind, str(e), code
  return None


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def flag_error_message(e: Exception, config_arg: str) -> str:
  """The one line (after `flag error: `) of a failure to parse the flags or load the config file
  (`config_arg`: the `--config=...` argument as given): a bad flag, a missing or failing config
  file, a bad config argument, an unknown --config.field; never the chained traceback."""
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from bigbatch.fields import ConfigError
  cause = _root_cause(e)
  reason = ' '.join(str(cause).replace("\\'", "'").split()).strip('\'"')
  if 'Error whilst parsing config file' in str(e):
    # get_config raised (a bad `file.py:ARG`, or a bug in the file): ml_collections puts the
    # reason after a traceback on the following lines; it is the root cause.
    detail = ' '.join(str(cause).split())
    return f'{config_arg}: the config file\'s get_config failed: {detail}' + (
        '' if isinstance(cause, ConfigError) else f' ({type(cause).__name__})')
  if isinstance(cause, AttributeError) and 'get_config' in str(cause):
    return f'{config_arg}: the config file defines no get_config(arg=None) function'
  if isinstance(e, flags.Error) and not isinstance(cause, (OSError, KeyError, AttributeError)):
    return str(e).splitlines()[0]
  if 'Failed loading config file' in str(cause):
    last = str(cause).strip().splitlines()[-1].strip()
    return f'{config_arg}: the config file cannot be loaded ({last})'
  if isinstance(cause, (KeyError, AttributeError)):
    detail = ' '.join(str(cause.args[0] if cause.args else cause).split())
    return f'a --config.* override names no config field: {detail}'
  return f'{reason} ({type(cause).__name__})'
