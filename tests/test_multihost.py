"""Multi-host on one machine: 2 processes x 4 emulated CPU devices against 1 process x 8.

The processes are real `python -m bigbatch.main` commands joined by jax.distributed through a
loopback coordinator (launch/local.sh, or started here when one process needs its own fault).
Per-process rows of the input pipeline (disjoint, complete, the same global batches for 1, 2 and
4 processes, eval counting every example once) are pure functions, tested in
tests/test_input_pipeline.py (`test_process_rows_partition_each_global_batch`,
`test_batch_sequence_does_not_depend_on_process_count`, `test_eval_counts_every_example_once`).

Run alone: pytest tests/test_multihost.py -m "multihost or slow or not slow"
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from bigbatch import checkpoint
from bigbatch import distributed
from bigbatch import loop
from bigbatch import sharding
from bigbatch import trainer as trainer_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)
from configs import quickstart  # noqa: E402

pytestmark = pytest.mark.multihost

DOC_ROWS = ('multihost-peer-failed',)  # docs/errors.md rows these tests stand for

# 1437 digits / 128 = 11 steps per epoch; two microbatches of 64 (32 per process, 8 per device);
# checkpoints at 3 and 6; eval only at the end (eval_every_epochs is far away).
STEPS = 6
FIELDS = {'accumulation_steps': 2, 'model.width': 8, 'log_every_steps': 1,
          'checkpoint_every_steps': 3, 'eval_every_epochs': 1000.0}
CONFIG_ARG = f'--config=configs/quickstart.py:steps={STEPS}'
OVERRIDES = [f'--config.{k}={v}' for k, v in FIELDS.items()]
# float32 sums in another order (gloo's all-reduce across processes against XLA's in-process one).
RTOL, ATOL = 2e-5, 1e-6


def _config():
  """The config the command line above builds, for in-process runs (same config.json)."""
  c = quickstart.get_config(f'steps={STEPS}')
  for key, value in FIELDS.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHON=sys.executable)
  env.pop('BIGBATCH_FAULT', None)
  env.pop('XLA_FLAGS', None)  # conftest's 8 devices are for this process only
  env.update(extra)
  return env


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items()
             if 'per_sec' not in k and not k.startswith('perf/')} for line in f]


def _assert_records_close(a, b):
  assert [r['step'] for r in a] == [r['step'] for r in b]
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_allclose(y[k], x[k], rtol=RTOL, atol=ATOL, err_msg=f'{k} at {x["step"]}')


def _restore(workdir, step):
  """The checkpoint of `step` restored on this process's 8 devices (fingerprints verified)."""
  config = _config()
  trainer = trainer_lib.build(config, sharding.make_mesh(config), num_train=1437,
                        image_shape=(8, 8, 1), num_classes=10)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    return jax.device_get(ckpt.restore(step, trainer.state))
  finally:
    ckpt.close()


def _assert_states_close(a, b):
  assert int(a.step) == int(b.step)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=RTOL, atol=ATOL,
                               err_msg=sharding.path_str(path))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """1 process x 8 devices, in this process: checkpoints 3 and 6, metrics of every step."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  loop.train_and_evaluate(_config(), workdir)
  return workdir


def _spawn(workdir, *, port, processes=2, faults=None, extra=()):
  """`processes` trainers with 4 devices each; faults: {process id: BIGBATCH_FAULT}."""
  procs = []
  for i in range(processes):
    env = _env(XLA_FLAGS='--xla_force_host_platform_device_count=4')
    if faults and i in faults:
      env['BIGBATCH_FAULT'] = faults[i]
    entry = ['tests/fault_main.py'] if faults and i in faults else ['-m', 'bigbatch.main']
    procs.append(subprocess.Popen(
        [sys.executable, *entry, CONFIG_ARG, f'--workdir={workdir}', *OVERRIDES,
         f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
         f'--process_id={i}', *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  return procs


def _wait_all(procs, timeout):
  """[(returncode, stderr, seconds until exit)], killing everything left after `timeout`."""
  start, ends = time.monotonic(), [None] * len(procs)
  errs = [''] * len(procs)
  # Drain stderr as we go, so a chatty process never blocks on a full pipe.
  def drain(i):
    errs[i] = procs[i].stderr.read()
  readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
  for r in readers:
    r.start()
  while any(e is None for e in ends) and time.monotonic() - start < timeout:
    for i, p in enumerate(procs):
      if ends[i] is None and p.poll() is not None:
        ends[i] = time.monotonic() - start
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  for r in readers:
    r.join(10)
  return [(p.returncode, errs[i], ends[i]) for i, p in enumerate(procs)]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_processes_continue_a_one_process_run_and_match_it(reference, tmp_path):
  """(a) 2x4 steps equal 1x8 steps; (c) 1x8 -> 2x4 -> 1x8 through checkpoints; one writer.

  The 2-process run (through launch/local.sh) resumes from the checkpoint of step 3 that the
  1-process run wrote, trains steps 4..6 and writes step 6; its losses, eval and parameters
  match the 1-process run's, and its checkpoint restores (verified) on 1 process x 8 devices.
  """
  workdir, logs = str(tmp_path / 'wd'), str(tmp_path / 'logs')
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  proc = subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'local.sh'), '--processes=2',
       '--devices_per_process=4', f'--port={_free_port()}', f'--log_dir={logs}', '--',
       CONFIG_ARG, f'--workdir={workdir}', *OVERRIDES],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  log0 = open(os.path.join(logs, 'process_0.log')).read()
  log1 = open(os.path.join(logs, 'process_1.log')).read()
  assert 'Resumed from the checkpoint at step 3' in log0
  assert 'Topology: 2 process(es) x 4 local cpu device(s) = 8 devices; mesh data=8 x model=1; ' \
         'global batch 128 = 2 microbatch(es) of 64; per process 64 examples per step (32 per ' \
         'microbatch); per device 16 per step (8 per microbatch)' in log0
  # Process 1 logs warnings only: progress, eval and topology appear once, from process 0.
  for line in ('step 4/6', 'eval at step 6', 'Topology:'):
    assert line in log0 and line not in log1
  assert '[0] ' in proc.stdout and '[1] ' in proc.stdout  # streamed with a prefix per process

  _assert_records_close(_records(reference), _records(workdir))  # each step once, same values
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  _assert_states_close(_restore(reference, 6), _restore(workdir, 6))


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_all_at_one_step(reference, tmp_path):
  """(e) SIGTERM to process 1 only: both write the checkpoint of the same step and exit 75; the
  2-process run from scratch matches 1x8 at that step, and 1x8 resumes it to the same end."""
  workdir = str(tmp_path / 'wd')
  results = _wait_all(_spawn(workdir, port=_free_port(), faults={1: 'term_after_step:2'}),
                      timeout=400)
  for i, (code, err, _) in enumerate(results):
    assert code == 75, f'process {i}: {code}\n{err[-3000:]}'
    # The flag of step 2 reaches everyone with step 3's all-reduce: all stop after step 3.
    assert 'checkpoint written at step 3' in err
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3']
  _assert_states_close(_restore(reference, 3), _restore(workdir, 3))
  # 2x4 -> 1x8: this process (8 devices) finishes the preempted run.
  loop.train_and_evaluate(_config(), workdir)
  _assert_records_close(_records(reference), _records(workdir))
  _assert_states_close(_restore(reference, 6), _restore(workdir, 6))


@pytest.mark.slow
def test_a_dead_process_ends_the_others_within_the_heartbeat_timeout(tmp_path):
  """(d) SIGKILL to process 1: process 0 exits with an error (SIGABRT from JAX's coordination
  service, measured ~4 s after the death) within the heartbeat timeout plus a margin, never
  hangs. Killing process 0 instead takes the coordination service with it: the survivor aborts
  at once (measured 0.4 s); not repeated here, to keep the slow suite short."""
  heartbeat, victim = 5, 1
  results = _wait_all(
      _spawn(str(tmp_path / 'wd'), port=_free_port(), faults={victim: 'kill_after_step:2'},
             extra=[f'--heartbeat_timeout_seconds={heartbeat}']),
      timeout=400)
  (dead_code, _, died), (code, err, ended) = results[victim], results[1 - victim]
  assert dead_code == -signal.SIGKILL
  assert code is not None and code != 0, err[-3000:]
  assert ended - died < heartbeat + 60, (died, ended, err[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize('victim', [1, 0])  # 0 also hosts the coordination service
def test_a_data_error_on_one_process_stops_every_process_with_its_cause(tmp_path, victim):
  """A data error on one process alone: it exits 6 with its line; the other, waiting in the next
  step's collectives, learns it from the coordination service's key-value store and exits 6
  within seconds, naming that process and the error; neither waits for the heartbeat timeout."""
  heartbeat = 300  # far beyond the bound below: the heartbeat is not what stops the other
  results = _wait_all(
      _spawn(str(tmp_path / 'wd'), port=_free_port(),
             faults={victim: 'data_error_after_step:2'},
             extra=[f'--heartbeat_timeout_seconds={heartbeat}']),
      timeout=400)
  (code_v, err_v, end_v), (code_o, err_o, end_o) = results[victim], results[1 - victim]
  error = 'data error: injected: the record of step 3 cannot be read'
  for code, err, line in ((code_v, err_v, f'bigbatch: {error}'),
                          (code_o, err_o, f'bigbatch: stopped: process {victim} failed: {error}')):
    assert code == 6, err[-3000:]
    assert [l for l in err.splitlines() if l.startswith('bigbatch:')] == [line], err[-3000:]
    assert 'Traceback' not in err
  assert abs(end_o - end_v) < 30, (end_o, end_v)


# ----------------------------------------------------------------------------- startup


def _main(*flags, timeout=60):
  return subprocess.run(
      [sys.executable, '-m', 'bigbatch.main', CONFIG_ARG, '--workdir=/nonexistent/bb', *flags],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('flags,words', [
    (['--distributed=off', '--num_processes=2'], ['contradicts', '--num_processes']),
    (['--num_processes=2', '--process_id=2', '--coordinator_address=127.0.0.1:1'],
     ['--process_id=2', 'outside 0..1']),
    (['--num_processes=2'], ['without --coordinator_address, --process_id']),
    (['--coordinator_address=localhost:1', '--num_processes=2', '--process_id=0',
      '--heartbeat_timeout_seconds=0'], ['--heartbeat_timeout_seconds=0']),
])
def test_contradicting_distributed_flags_are_one_line_and_exit_1(flags, words):
  proc = _main(*flags)
  assert proc.returncode == 1
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith('bigbatch: flag error:') and all(w in line for w in words), proc.stderr
  assert 'Traceback' not in proc.stderr


def test_unreachable_coordinator_is_one_line_not_an_abort():
  """JAX aborts (SIGABRT, C++ stack) when it cannot reach the coordinator; a probe first turns
  that into one line and exit 1."""
  proc = _main(f'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2',
               '--process_id=1', '--initialization_timeout_seconds=1')
  assert proc.returncode == 1, proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith('bigbatch: distributed error: the coordinator 127.0.0.1:')
  assert 'did not accept a connection within 1 s' in line


_SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '16',
          'SLURM_PROCID': '3', 'SLURM_LOCALID': '3'}


@pytest.mark.parametrize('mode,flags,env,tpu,expected', [
    ('auto', {}, {}, False, (False, 'single process')),
    ('auto', {}, _SLURM, False, (True, 'SLURM step of 16 tasks')),
    # The batch shell of sbatch is one process, though the job has 16 tasks.
    ('auto', {}, {k: v for k, v in _SLURM.items() if 'STEP' not in k}, False,
     (False, 'single process')),
    ('auto', {}, dict(_SLURM, SLURM_NTASKS='1'), False, (False, 'single process')),
    ('auto', {}, {}, True, (True, 'Cloud TPU VM')),
    ('auto', dict(coordinator_address='h:1', num_processes=2, process_id=1), {}, False,
     (True, 'flags: coordinator_address=h:1, num_processes=2, process_id=1')),
    ('on', {}, {}, False, (True, '--distributed=on')),
    ('off', {}, _SLURM, True, (False, '--distributed=off')),
    # Inside SLURM, JAX fills in what the flags leave out.
    ('auto', dict(process_id=0), _SLURM, False, (True, 'flags: process_id=0')),
])
def test_plan_decides_when_to_initialize(mode, flags, env, tpu, expected):
  p = distributed.plan(mode, env=env, on_cloud_tpu_vm=lambda: tpu, heartbeat_timeout_seconds=7,
                       **flags)
  assert (p.initialize, p.why[:len(expected[1])]) == expected
  if p.initialize:
    assert p.kwargs == dict(flags, heartbeat_timeout_seconds=7, initialization_timeout=300)


def test_topology_splits_the_global_batch():
  config = _config()
  config.global_batch = 512
  config.accumulation_steps = 4
  t = distributed.topology(config, sharding.make_mesh(config))
  assert t == {
      'processes': 1, 'process_index': 0, 'local_devices': 8, 'global_devices': 8,
      'platform': 'cpu', 'mesh': {'data': 8, 'model': 1}, 'global_batch': 512,
      'accumulation_steps': 4, 'examples_per_microbatch': 128,
      'examples_per_process_per_step': 512, 'examples_per_process_per_microbatch': 128,
      'examples_per_device_per_step': 64, 'examples_per_device_per_microbatch': 16}
  assert distributed.topology_line(t).startswith(
      'Topology: 1 process(es) x 8 local cpu device(s) = 8 devices; mesh data=8 x model=1; '
      'global batch 512 = 4 microbatch(es) of 128;')


def test_restore_falls_back_together_when_one_process_cannot_read(monkeypatch, caplog):
  """The agreement of restore_latest, with the collectives replaced: process 1 cannot read
  step 6, so every process takes step 3, and nobody raises alone."""
  class FakeCheckpointer:
    directory = '/ckpt'
    def all_steps(self):
      return [3, 6]
    def restore(self, step, like):
      return {'restored': step}
    def reload(self):
      pass
    def present(self, step):
      return True
  outcomes = {6: [True, False], 3: [True, True]}
  tried = []
  def all_processes(ok):
    tried.append(ok)
    return outcomes[[6, 3][len(tried) - 1]]
  monkeypatch.setattr(distributed, '_multi', lambda: True)
  monkeypatch.setattr(distributed, 'from_process_0', lambda value: value)
  monkeypatch.setattr(distributed, 'all_processes', all_processes)
  assert distributed.restore_latest(FakeCheckpointer(), None) == ({'restored': 3}, 3)
  assert 'step 6 in /ckpt is unusable on process(es) [1]' in caplog.text
  outcomes[3] = [False, True]
  tried.clear()
  with pytest.raises(checkpoint.CheckpointError, match='readable on every process'):
    distributed.restore_latest(FakeCheckpointer(), None)


def test_single_process_agreement_is_the_local_value():
  assert distributed.from_process_0(True) is True
  assert distributed.from_process_0([3, 6]) == [3, 6]
  assert distributed.all_processes(False) == [False]
  sync = distributed.PreemptionSync()
  assert [sync(False), sync(True), sync(False)] == [False, True, False]  # at once, no lag
