"""Multi-host runs: starting JAX's distributed runtime, the topology, and agreement helpers.

Every topology (a TPU pod slice, a SLURM GPU cluster, N local CPU processes) calls
`jax.distributed.initialize` and runs the same trainer. The rules that keep processes in step
(decisions that choose collectives come from a collective; only process 0 writes the workdir's
own files; a dead process makes its peers abort) are in docs/multihost.md. Importing this module
costs only numpy and absl: main.py parses flags and loads the config before jax is touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

MODES = ('auto', 'on', 'off')


class DistributedError(RuntimeError):
  """The distributed runtime could not start. The message says what to check."""


# ----------------------------------------------------------------------------- initialization


@dataclasses.dataclass(frozen=True)
class Plan:
  """How (and whether) to call jax.distributed.initialize; `why` is logged."""
  initialize: bool
  why: str
  kwargs: dict = dataclasses.field(default_factory=dict)


def _slurm_step_tasks(env) -> int:
  """Tasks in this SLURM job step (srun), or 0 outside one. The batch shell of `sbatch` carries
  SLURM_JOB_ID and SLURM_NTASKS too but is a single process: JAX's own SLURM detection requires
  the step variables, and so does this."""
  needed = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
            'SLURM_LOCALID')
  if not all(k in env for k in needed):
    return 0
  try:
    return int(env['SLURM_NTASKS'])
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (libtpu found TPU chips). JAX decides this when it is imported,
  without initializing a backend; the attribute is private, so a failure means 'no'."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except Exception:  # pylint: disable=broad-except
    return False


def plan(mode: str, *, coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, heartbeat_timeout_seconds: int = 100,
         initialization_timeout_seconds: int = 300, env=None,
         on_cloud_tpu_vm: Callable[[], bool] = _on_cloud_tpu_vm) -> Plan:
  """Decides whether to initialize, and with which arguments. Pure apart from `env` and the
  TPU probe, so every branch is testable without a cluster.

  mode 'off': never (one process). 'on': always; explicit flags where given, JAX's own detection
  (Cloud TPU, SLURM, Open MPI) for the rest. 'auto': when flags name a coordinator or several
  processes, inside a SLURM step of several tasks, or on a Cloud TPU VM (where initializing one
  host is harmless and a pod slice needs it); otherwise a single process.
  Raises ValueError for flags that contradict each other (a flag error).
  """
  env = os.environ if env is None else env
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r}: choose one of {", ".join(MODES)}')
  explicit = {k: v for k, v in (('coordinator_address', coordinator_address),
                                ('num_processes', num_processes),
                                ('process_id', process_id)) if v is not None}
  if mode == 'off':
    if explicit:
      raise ValueError(f'--distributed=off contradicts --{", --".join(explicit)}; drop them '
                       f'or use --distributed=auto')
    return Plan(False, '--distributed=off')
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes={num_processes}: must be at least 1')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} is outside 0..{num_processes - 1} '
                     f'(--num_processes={num_processes})')
  for name, value in (('heartbeat_timeout_seconds', heartbeat_timeout_seconds),
                      ('initialization_timeout_seconds', initialization_timeout_seconds)):
    if value < 1:
      raise ValueError(f'--{name}={value}: must be at least 1 second')
  kwargs = dict(explicit, heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                initialization_timeout=initialization_timeout_seconds)
  if explicit:
    # Outside a cluster JAX can fill in nothing, so a partial set is a mistake worth naming;
    # inside SLURM or on a TPU VM, JAX detects the missing ones.
    missing = [k for k in ('coordinator_address', 'num_processes', 'process_id')
               if k not in explicit]
    if missing and not _slurm_step_tasks(env) and not on_cloud_tpu_vm():
      raise ValueError(f'--{", --".join(explicit)} given without --{", --".join(missing)}; '
                       f'outside SLURM and Cloud TPU all three are needed')
    return Plan(True, 'flags: ' + ', '.join(f'{k}={v}' for k, v in explicit.items()), kwargs)
  if mode == 'on':
    return Plan(True, '--distributed=on (cluster detected by JAX)', kwargs)
  tasks = _slurm_step_tasks(env)
  if tasks > 1:
    return Plan(True, f'SLURM step of {tasks} tasks', kwargs)
  if on_cloud_tpu_vm():
    return Plan(True, 'Cloud TPU VM', kwargs)
  return Plan(False, 'single process (no coordinator flags, SLURM step or Cloud TPU VM)')


def wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once `address` (host:port) accepts a TCP connection; DistributedError after
  `timeout` seconds. JAX aborts the process (SIGABRT, a C++ stack trace) when it cannot reach the
  coordinator; probing first turns the common mistakes (wrong address or port, process 0 not
  started, a firewall) into one line."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
        return
    except (OSError, ValueError) as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f'the coordinator {address} (process 0) did not accept a connection within '
            f'{timeout:g} s ({e}); check --coordinator_address, that process 0 is running and that '
            f'the port is open between the hosts') from None
    time.sleep(0.25)


def initialize(p: Plan) -> None:
  """Carries out `p`: jax.distributed.initialize, before anything touches jax devices.

  JAX's preemption service is turned off: it installs its own SIGTERM handler (in C++), which
  would swallow a SIGTERM that arrives before the trainer installs its handler, and the trainer
  agrees on a preemption step itself (PreemptionSync). Non-zero processes then log at WARNING
  only, so the console of a pod shows process 0's progress once, and everyone's problems.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not p.initialize:
    logging.info('jax.distributed not initialized: %s.', p.why)
    return
  jax.config.update('jax_enable_preemption_service', False)
  logging.info('jax.distributed.initialize (%s).', p.why)
  address = p.kwargs.get('coordinator_address')
  if address and p.kwargs.get('process_id', 0) != 0:
    wait_for_coordinator(address, p.kwargs['initialization_timeout'])
  try:
    jax.distributed.initialize(**p.kwargs)
  except Exception as e:  # pylint: disable=broad-except  (jaxlib raises its own error types)
    detail = ' '.join(str(e).split())[:300]
    raise DistributedError(
        f'jax.distributed.initialize failed ({type(e).__name__}: {detail}). Outside SLURM and '
        f'Cloud TPU pass --coordinator_address, --num_processes and --process_id; every process '
        f'needs the same --num_processes and its own --process_id (docs/multihost.md)') from e
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


# ----------------------------------------------------------------------------- topology


def topology(config, mesh) -> dict[str, Any]:
  """Processes, devices, mesh and how one global batch splits: per process, per device, per
  microbatch. The same numbers on every process."""
  import jax  # pylint: disable=g-import-not-at-top
  processes = jax.process_count()
  data = mesh.shape['data']
  k = config.accumulation_steps
  microbatch = config.global_batch // k
  return {
      'processes': processes,
      'process_index': jax.process_index(),
      'local_devices': jax.local_device_count(),
      'global_devices': jax.device_count(),
      'platform': jax.devices()[0].platform,
      'mesh': dict(mesh.shape),
      'global_batch': config.global_batch,
      'accumulation_steps': k,
      'examples_per_microbatch': microbatch,
      'examples_per_process_per_step': config.global_batch // processes,
      'examples_per_process_per_microbatch': microbatch // processes,
      'examples_per_device_per_step': config.global_batch // data,
      'examples_per_device_per_microbatch': microbatch // data,
  }


def topology_line(t: dict[str, Any]) -> str:
  """The one log line of a `topology(...)` dict: processes, devices, mesh and the batch split."""
  mesh = ' x '.join(f'{name}={size}' for name, size in t['mesh'].items())
  return (f'Topology: {t["processes"]} process(es) x {t["local_devices"]} local '
          f'{t["platform"]} device(s) = {t["global_devices"]} devices; mesh {mesh}; global batch '
          f'{t["global_batch"]} = {t["accumulation_steps"]} microbatch(es) of '
          f'{t["examples_per_microbatch"]}; per process {t["examples_per_process_per_step"]} '
          f'examples per step ({t["examples_per_process_per_microbatch"]} per microbatch); per '
          f'device {t["examples_per_device_per_step"]} per step '
          f'({t["examples_per_device_per_microbatch"]} per microbatch)')


def log_topology(config, mesh) -> dict[str, Any]:
  """Logs the topology once (process 0; the others log WARNING and above only)."""
  t = topology(config, mesh)
  logging.info('%s', topology_line(t))
  return t


# ----------------------------------------------------------------------------- agreement


def _multi() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1


def sync(name: str) -> None:
  """A barrier across processes (no-op with one): e.g. nobody reads the workdir before process 0
  has set it aside or created it."""
  if _multi():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'bigbatch:{name}')


def from_process_0(value: bool | Sequence[int]) -> Any:
  """Process 0's `value` on every process: a bool, or a list of ints (e.g. checkpoint steps).

  Used where processes could see a shared directory differently (an eventually consistent
  bucket, an NFS cache): acting on different views would run different collectives.
  """
  if not _multi():
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if isinstance(value, (bool, np.bool_)):
    return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))
  values = np.asarray(list(value), np.int32)
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
  padded = np.zeros((n,), np.int32)
  padded[:min(n, len(values))] = values[:n]
  return [int(v) for v in multihost_utils.broadcast_one_to_all(padded)]


# ----------------------------------------------------------------------------- fatal errors

# A process that fails (a data error, a full disk, a bug) exits; the others would wait in their
# next collective until JAX's heartbeat timeout (minutes) and then abort without saying why.
# Instead the failing process writes its line under this key prefix of the coordination
# service's key-value store, and every process polls it: the first failure it sees from another
# process becomes its own line and exit code within seconds. JAX has no public key-value API;
# `jax._src.distributed.global_state.client` is the client jax.distributed.initialize made (orbax
# reaches the same object for its barriers).
FAILURE_PREFIX = 'bigbatch/failed/'
FAILURE_POLL_SECONDS = 1.0


def _kv_client():
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(jax_distributed.global_state, 'client', None)


def publish_failure(line: str, code: int) -> bool:
  """Tells the other processes that this one is failing with `line` (its `bigbatch: ...` text
  without the prefix) and exit `code`. Process 0, which hosts the coordination service, then
  gives them time to read it before it goes. True if published (False with one process, or
  before jax.distributed started)."""
  if 'jax' not in sys.modules:  # failed before jax was imported: no run to tell
    return False
  import jax  # pylint: disable=g-import-not-at-top
  client = _kv_client()
  if client is None or jax.process_count() <= 1:
    return False
  try:
    client.key_value_set(f'{FAILURE_PREFIX}{jax.process_index()}',
                         json.dumps({'code': int(code), 'line': line}))
  except Exception:  # pylint: disable=broad-except  (the service is gone: nothing to tell)
    return False
  if jax.process_index() == 0:
    time.sleep(3 * FAILURE_POLL_SECONDS)
  return True


def watch_failures(on_failure: Callable[[int, str, int], None]) -> threading.Thread | None:
  """A daemon thread that calls on_failure(process, line, code) once, when another process has
  published a failure (publish_failure). None with one process."""
  import jax  # pylint: disable=g-import-not-at-top
  client = _kv_client()
  if jax.process_count() <= 1 or client is None:
    return None
  me = jax.process_index()

  def poll():
    while True:
      time.sleep(FAILURE_POLL_SECONDS)
      try:
        entries = client.key_value_dir_get(FAILURE_PREFIX)
      except Exception:  # pylint: disable=broad-except  (the service ended: JAX's own abort)
        return
      for key, value in sorted(entries):
        process = int(key.rsplit('/', 1)[-1])
        if process == me:
          continue
        try:
          record = json.loads(value)
          on_failure(process, str(record['line']), int(record['code']))
        except (ValueError, KeyError, TypeError):
          on_failure(process, value, 1)
        return

  thread = threading.Thread(target=poll, name='bigbatch-failure-watcher', daemon=True)
  thread.start()
  return thread


def all_processes(ok: bool) -> list[bool]:
  """Every process's `ok`, in process order, on every process."""
  if not _multi():
    return [bool(ok)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [bool(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(ok))).ravel()]


def restore_latest(ckpt, like) -> tuple[Any, int | None]:
  """(state, step) of the newest checkpoint of `ckpt` that reads and verifies on EVERY process;
  (like, None) if there is none. Raises checkpoint.CheckpointError when none is usable.

  checkpoint.restore_newest with this module's collectives: the candidates are process 0's list,
  and every process's outcome is shared before the next step is tried. Orbax ends a restore with
  a barrier; a process that failed before it leaves its peers waiting there until orbax's
  barrier timeout (300 s), after which they fail that step too and all move on together.
  """
  from bigbatch import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  if not _multi():
    return checkpoint_lib.restore_newest(ckpt, like)
  return checkpoint_lib.restore_newest(ckpt, like, from_process_0=from_process_0,
                                       all_processes=all_processes)


class AgreedMax:
  """The largest of an int that every process contributes each step, the same on every process.

  Each call dispatches an all-reduce (max) over all devices after the train step and returns the
  previous call's result, read when the loop already waits for the previous step's metrics: the
  answer comes one step late, at no extra synchronization. With one process the local value is
  the answer, at once. (0 before any result.)
  """

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self._pending = None
    self._multi = jax.process_count() > 1
    if self._multi:
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
      mesh = jax.sharding.Mesh(np.array(jax.devices()), ('all',))
      self._sharding = jax.sharding.NamedSharding(mesh, jax.P('all'))
      self._devices = jax.local_devices()
      self._reduce = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))

  def __call__(self, local: int) -> int:
    if not self._multi:
      return int(local)
    import jax  # pylint: disable=g-import-not-at-top
    previous, value = self._pending, np.array([int(local)], np.int32)
    shards = [jax.device_put(value, d) for d in self._devices]
    self._pending = self._reduce(jax.make_array_from_single_device_arrays(
        (jax.device_count(),), self._sharding, shards))
    return 0 if previous is None else int(previous)


class PreemptionSync(AgreedMax):
  """Whether any process has received SIGTERM, decided identically on every process (one step
  late with several processes: AgreedMax). So a SIGTERM to any host makes every process
  checkpoint the same step (the one after the signal's).

  Why not jax's `reached_preemption_sync_point`: it needs JAX's own C++ SIGTERM handler, which
  the trainer's Python handler replaces (and which would swallow a SIGTERM during startup).
  """

  def __call__(self, local: bool) -> bool:  # pytype: disable=signature-mismatch
    return bool(super().__call__(int(bool(local))))
