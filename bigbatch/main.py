"""Entry point: python -m bigbatch.main --config=configs/X.py[:arg] --workdir=DIR

Intentionally short: parse flags, start jax.distributed when multi-host, validate the config,
hand over to loop.train_and_evaluate. Multi-host (docs/multihost.md): automatic on Cloud TPU
VMs and inside SLURM steps; elsewhere --coordinator_address, --num_processes, --process_id.
"""
from __future__ import annotations

if __name__ == '__main__':
  # `python -m bigbatch.main`: a SIGTERM, SIGHUP or SIGINT during the imports below (seconds)
  # finds nothing started: one line and the documented exit code, not a silent 143 or a
  # traceback. The handlers only record; a watcher thread acts (bigbatch/signals.py imports
  # only the standard library).
  from bigbatch import signals as _signals
  _signals.start(hard_exit=True)

import functools
import os
import sys
import time

# TensorFlow (the input pipeline) prints C++ start-up lines (CPU instruction sets, oneDNN, no
# CUDA driver) that are not the user's business: its errors only, unless the user set it. Before
# anything imports jax, which sets its own default (1, which lets TensorFlow's INFO lines out).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from bigbatch import config_lib
from bigbatch import console
from bigbatch import distributed
from bigbatch import exits
from bigbatch import fields
from bigbatch import signals


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/quickstart.py or configs/x.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_RESTART = flags.DEFINE_bool(
    'restart_from_scratch', False,
    'Move an existing workdir aside (to DIR.old-<time>) and start a new run in DIR.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', list(distributed.MODES),
    'Multi-host: "auto" initializes jax.distributed when the coordinator flags below are given, '
    'inside a SLURM step of several tasks and on Cloud TPU VMs; "on" always (JAX detects what '
    'the flags leave out); "off" never.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, reachable from every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes - 1.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 100,
    'A process silent this long is declared dead and the others abort (no hang).')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout_seconds', 300,
    'How long to wait for all processes to reach the coordinator at startup.')
_PRINT_DERIVED = flags.DEFINE_bool(
    'print_derived', False,
    'Print what the config will do on these devices (schedule, mesh, batch per device, eval and '
    'checkpoint steps, parameter count) and exit 0 without writing anything; no --workdir.')
_PRINT_DERIVED_MEMORY = flags.DEFINE_bool(
    'print_derived_memory', False,
    'With --print_derived: also compile the train step on abstract inputs and print XLA\'s '
    'memory analysis per device (seconds for small models; long for full-size ones on CPU).')
_PRINT_DERIVED_JSON = flags.DEFINE_bool(
    'print_derived_json', False, 'With --print_derived: print JSON instead of text.')
flags.mark_flags_as_required(['config'])  # and --workdir unless --print_derived (_parse_flags)

# Exit codes: bigbatch/exits.py holds them (README "Resuming and preemption", docs/errors.md).
EXIT_FLAG_ERROR = exits.FLAG_ERROR
EXIT_CONFIG_ERROR = exits.CONFIG_ERROR
EXIT_NONFINITE = exits.NONFINITE
EXIT_CHECKPOINT_ERROR = exits.CHECKPOINT_ERROR
EXIT_SAVE_ERROR = exits.SAVE_ERROR
EXIT_DATA_ERROR = exits.DATA_ERROR
EXIT_PREEMPTED = exits.PREEMPTED
EXIT_INTERRUPTED = exits.INTERRUPTED


def _signal_exit(signum: int) -> int:
  return signals.exit_code(signum)  # SIGHUP is a SIGTERM: 75


def _fail(kind: str, error: Exception, code: int):
  # Whatever other threads logged goes out first, then the line in one write, so it is never
  # split or interleaved with a library's background log (orbax's save threads log while a
  # failing run ends).
  console.release()
  logging.flush()
  sys.stdout.flush()
  # A signal stops every process together (hooks.Preemption); any other failure is told to the
  # other processes of a multi-process run, which stop on it (distributed.watch_failures).
  published = kind != 'stopped' and distributed.publish_failure(f'{kind}: {error}', code)
  if not signals.write_line(f'bigbatch: {kind}: {error}\n'):
    signals.wait_for_exit()  # the signal watcher wrote the line and is ending the process
  if published:
    # jax's exit handler would wait at its shutdown barrier for the processes that are now
    # stopping on this failure (or abort when the coordinator goes first): leave without it.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def train(config, workdir: str, *, restart_from_scratch: bool = False, hooks=()) -> dict:
  """Validates, then trains (`hooks`: extra loop hooks, bigbatch/hooks.py). Errors a user can
  fix, and SIGTERM or SIGINT at any moment, become one line on stderr and an exit code."""
  # Signals are recorded, never raised from a handler (bigbatch/signals.py). In-process (the
  # tests) the main thread acts at its check points; under main() a watcher thread also stops
  # setup and compilation at once.
  with signals.watching():
    try:
      return _run(config, workdir, restart_from_scratch=restart_from_scratch, hooks=hooks)
    except signals.Interrupted as e:
      _fail('stopped', e, _signal_exit(e.signum))


def _run(config, workdir: str, *, restart_from_scratch: bool, hooks) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    # Before TensorFlow is imported or anything is written.
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    _fail('config error', e, EXIT_CONFIG_ERROR)
  # pylint: disable=g-import-not-at-top  (these import TensorFlow)
  from bigbatch import checkpoint
  from bigbatch import loop
  try:
    from bigbatch.study import hooks as study_hooks
    return loop.train_and_evaluate(config, workdir, restart_from_scratch=restart_from_scratch,
                                   hooks=[*study_hooks.hooks_for(config, workdir), *hooks])
  except Exception as e:  # pylint: disable=broad-except
    # One mapping for the trainer and the study command (bigbatch/exits.py): config (also
    # those that need the data set's size), workdir, storage, checkpoint, save, data and
    # non-finite errors, and loop.Preempted. Anything else is a bug: its traceback.
    failure = exits.classify(e)
    if failure is None:
      # A bug: its traceback here, and the other processes stop with its name.
      distributed.publish_failure(f'crashed: {type(e).__name__}: {e}', 1)
      raise
    if isinstance(e, checkpoint.SaveError):
      console.discard()  # orbax's own error lines about this save: the line says it all
    if isinstance(e, loop.Preempted):
      _leave_distributed()
    _fail(*failure)


def _leave_distributed() -> None:
  """Multi-host, after a preemption: every process stopped at the same update (the Preemption
  hook's sync) and leaves jax.distributed together, before its line. The exit after the line
  skips the interpreter's teardown, where this would otherwise happen, and a process whose peer
  vanished without it aborts (SIGABRT) instead of exiting 75."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    try:
      jax.distributed.shutdown()
    except Exception as e:  # pylint: disable=broad-except  (the line and 75 matter more)
      logging.warning('jax.distributed.shutdown after the preemption failed: %s', e)


def _unset_overrides(argv) -> tuple[list[str], list[str]]:
  """argv without its `--config.FIELD=None` arguments, and those FIELDs. config_flags parses an
  override by the field's type and refuses None for a number, yet a field such as num_epochs
  must be unset to set num_steps instead: main sets them to None after loading."""
  prefix = f'--{_CONFIG.name}.'
  rest, unset = [], []
  for a in argv:
    if a.startswith(prefix) and a.endswith('=None'):
      unset.append(a[len(prefix):-len('=None')])
    else:
      rest.append(a)
  return rest, unset


def _flag_error(message: str):
  print(f'bigbatch: flag error: {message}', file=sys.stderr)
  sys.exit(EXIT_FLAG_ERROR)


def _parse_flags(argv):
  """absl's parser, with the config file loaded here: a bad flag, a missing or failing config
  file, a bad config argument or an unknown --config.field becomes one line naming the reason
  and exit code 1 instead of a chained traceback."""
  argv, unset = _unset_overrides(argv)
  config_arg = next((a for a in argv if a.startswith('--config=')), '--config')
  original, sys.argv = sys.argv, list(argv)  # config_flags finds --config.* overrides there
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG.value  # config_flags defers a load failure to the first use
    config.get('seed')
  except Exception as e:  # pylint: disable=broad-except
    _flag_error(exits.flag_error_message(e, config_arg))  # shared with bigbatch.study
  finally:
    sys.argv = original
  if _WORKDIR.value is None and not _PRINT_DERIVED.value:
    _flag_error('--workdir is required: the directory for checkpoints, metrics and logs (only '
                '--print_derived runs without one)')
  if _WORKDIR.value is not None:
    from bigbatch import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    if not _WORKDIR.value.strip():  # --workdir=$UNSET: never the current directory by accident
      _flag_error(f'--workdir={_WORKDIR.value!r} is empty (an unset shell variable?); give the '
                  f'directory for checkpoints, metrics and logs')
    flags.FLAGS.workdir = workdir_lib.absolute(_WORKDIR.value)  # one place: the rest sees it
  for path in unset:
    if not fields.has(config, path):
      _flag_error(f'a --config.* override names no config field: --config.{path}=None')
    fields.set_path(config, path, None)
  return rest


def _another_process_failed(process: int, line: str, code: int) -> None:
  """Another process of this run failed (distributed.watch_failures): its line, as this
  process's, and its exit code, at once (this process is likely blocked in a collective)."""
  console.release()
  logging.flush()
  if signals.write_line(f'bigbatch: stopped: process {process} failed: {line}\n'):
    os._exit(code)  # pylint: disable=protected-access


def _start_distributed():
  """jax.distributed.initialize when multi-host, before anything asks jax for its devices (run
  validates the config against the global device count)."""
  try:
    p = distributed.plan(
        _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
        initialization_timeout_seconds=_INIT_TIMEOUT.value)
  except ValueError as e:
    _fail('flag error', e, EXIT_FLAG_ERROR)
  try:
    distributed.initialize(p)
  except distributed.DistributedError as e:
    _fail('distributed error', e, EXIT_FLAG_ERROR)


def _print_derived(config) -> None:
  """--print_derived: what the run would do, on stdout (process 0); nothing is written."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    config_lib.validate(config, jax.device_count())  # before TensorFlow is imported
  except config_lib.ConfigError as e:
    _fail('config error', e, EXIT_CONFIG_ERROR)
  # pylint: disable=g-import-not-at-top  (these import TensorFlow)
  from bigbatch import derive
  from bigbatch.data import common as data_common
  try:
    text = derive.main_entry(config, memory=_PRINT_DERIVED_MEMORY.value,
                             as_json=_PRINT_DERIVED_JSON.value)
  except config_lib.ConfigError as e:  # those that need the data set's size
    _fail('config error', e, EXIT_CONFIG_ERROR)
  except (data_common.DataError, OSError) as e:  # a face set's index, a TFDS info file
    _fail('data error', e, EXIT_DATA_ERROR)
  if jax.process_index() == 0:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv, hooks=()):
  """The command's body after absl parsed the flags: starts jax.distributed where needed, then
  --print_derived or one `train` of the flags' config and workdir (`hooks` passed to the loop),
  and prints the run's summary on process 0."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.install()
  started = time.monotonic()
  signals.add_at_exit(console.flush)  # the watcher's line comes after every log line
  try:
    with signals.watching(hard_exit=True):
      try:
        _start_distributed()  # may wait minutes for the other processes
      except signals.Interrupted as e:
        _fail('stopped', e, _signal_exit(e.signum))
      distributed.watch_failures(_another_process_failed)
      if _PRINT_DERIVED.value:
        _print_derived(_CONFIG.value)
        return
      result = train(_CONFIG.value, _WORKDIR.value, restart_from_scratch=_RESTART.value,
                     hooks=hooks)
  except SystemExit as e:
    if signals.last_received():
      # The line is out: exit within a fraction of a second (a grace period before SIGKILL may
      # be short), not after seconds of interpreter and jax teardown, which a compilation still
      # running in XLA's thread can also crash (SIGSEGV instead of the exit code). Every
      # checkpoint was finished before the line (the loop closes its checkpointer first).
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(e.code if isinstance(e.code, int) else 1)
    raise
  import jax  # pylint: disable=g-import-not-at-top
  from bigbatch import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  console.release()
  if jax.process_index() == 0:
    print(metrics_lib.summary(_WORKDIR.value, result, time.monotonic() - started), flush=True)


def cli(hooks=()) -> None:
  """The command line, with extra loop hooks (the fault-injection tests install theirs)."""
  app.run(functools.partial(main, hooks=hooks), flags_parser=_parse_flags)


if __name__ == '__main__':
  cli()
