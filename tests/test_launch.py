"""The launch scripts (launch/local.sh, slurm.sbatch, tpu_vm.sh), run for real against fakes.

`sbatch`, `srun`, `scontrol`, `gcloud` and `python3` on PATH are one fake program that records
each call (its arguments and the environment variables the scripts set) and answers as a test's
rules say, so these tests see exactly what a launcher would start, submit or create, and that
`--help` starts nothing. The --dry-run tests check the printed commands word for word.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
FAKES = ('sbatch', 'srun', 'scontrol', 'gcloud', 'python3', 'python')
RECORDED_ENV = ('SRUN_CPUS_PER_TASK', 'JAX_LOCAL_DEVICE_IDS', 'XLA_FLAGS', 'JAX_PLATFORMS')

# The fake: appends {"argv": [...], "env": {...}} to $FAKE_LOG, then answers by the first rule in
# $FAKE_RULES ({substring of the command line: [[status, stdout], ...]}) whose key occurs in the
# command line, consuming one answer per call; no rule (or none left): status 0, no output.
# Its interpreter is this Python by absolute path: a fake python3 first on PATH must not run
# itself.
FAKE = f'''#!{sys.executable}
import fcntl, json, os, sys
argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
line = ' '.join(argv)
with open(os.environ['FAKE_LOG'], 'a') as log:
  fcntl.flock(log, fcntl.LOCK_EX)
  log.write(json.dumps({{'argv': argv, 'env': {{k: os.environ[k] for k in {RECORDED_ENV!r}
                                             if k in os.environ}}}}) + '\\n')
  status, out = 0, ''
  rules_path = os.environ.get('FAKE_RULES')
  if rules_path and os.path.exists(rules_path):
    with open(rules_path) as f:
      rules = json.load(f)
    for key, answers in rules.items():
      if key in line:
        if answers:
          status, out = answers.pop(0)
          with open(rules_path, 'w') as f:
            json.dump(rules, f)
        break
if argv[0].startswith('python') and '-c' in argv:
  out = out or '12345'  # the free-port question of local.sh
if out:
  print(out)
sys.exit(status)
'''


class Fakes:
  """A PATH with the fakes first, their call log and their rules."""

  def __init__(self, tmp_path):
    self.bin = tmp_path / 'bin'
    self.bin.mkdir()
    program = self.bin / 'fake'
    program.write_text(FAKE)
    program.chmod(0o755)
    for name in FAKES:
      (self.bin / name).symlink_to(program)
    self.log = tmp_path / 'calls.jsonl'
    self.rules = tmp_path / 'rules.json'
    self.tmp = tmp_path

  def run(self, script, *args, env=None, rules=None):
    if rules is not None:
      self.rules.write_text(json.dumps(rules))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(('SLURM_', 'SRUN_', 'PYTHON', 'BIGBATCH_', 'TPU_VM_'))}
    base.update(PATH=f'{self.bin}{os.pathsep}{os.environ["PATH"]}', FAKE_LOG=str(self.log),
                FAKE_RULES=str(self.rules), TMPDIR=str(self.tmp), TPU_VM_POLL_SECONDS='0')
    base.pop('XLA_FLAGS', None)  # conftest's 8 devices are for this process only
    base.update(env or {})
    # As a user types it, from the checkout (the path shows in what slurm.sbatch submits).
    return subprocess.run(['bash', f'launch/{script}', *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=120)

  def calls(self):
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def argvs(self):
    return [c['argv'] for c in self.calls()]


@pytest.fixture
def fakes(tmp_path):
  return Fakes(tmp_path)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


# ----------------------------------------------------------------------------- every script


@pytest.mark.parametrize('name', ['local.sh', 'tpu_vm.sh', 'slurm.sbatch'])
def test_launch_script_parses(name):
  proc = subprocess.run(['bash', '-n', os.path.join(LAUNCH, name)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize('script,args,env', [
    ('local.sh', ['--help'], {}),
    ('local.sh', ['-h'], {}),
    ('local.sh', ['--processes=2', '--config=configs/quickstart.py', '--help'], {}),
    ('slurm.sbatch', ['--help'], {}),
    ('slurm.sbatch', ['--config=configs/r50_64k.py', '--help'], {}),
    # Inside a job too (`sbatch launch/slurm.sbatch --help`): no srun, no requeue.
    ('slurm.sbatch', ['--help'], {'SLURM_JOB_ID': '42', 'SLURM_CPUS_PER_TASK': '12'}),
    ('tpu_vm.sh', ['--help'], {}),
    ('tpu_vm.sh', ['-h'], {}),
    ('tpu_vm.sh', ['help'], {}),
    ('tpu_vm.sh', ['up', '--name=bb', '--zone=us-central2-b', '--spot', '--help'], {}),
])
def test_help_prints_usage_and_starts_nothing(fakes, script, args, env):
  proc = _ok(fakes.run(script, *args, env=env))
  assert 'Usage: ' in proc.stdout
  assert f'launch/{script}' in proc.stdout
  assert proc.stderr == ''
  assert fakes.calls() == []  # no python, sbatch, srun, scontrol or gcloud was called


def test_help_lists_every_option_the_scripts_parse():
  # An option the parser knows but --help omits is one a user cannot find.
  for script in ('local.sh', 'tpu_vm.sh', 'slurm.sbatch'):
    text = open(os.path.join(LAUNCH, script)).read()
    usage = subprocess.run(['bash', os.path.join(LAUNCH, script), '--help'], cwd=ROOT,
                           capture_output=True, text=True, timeout=60).stdout
    parsed = re.findall(r'^ +(--[a-z][a-z_-]*)(?:=\*)?(?:\|-[-\w]+)*\) ', text, flags=re.M)
    assert len(parsed) >= 2, script
    for option in parsed:
      if option != '--dry_run':  # the spelling --dry-run's alias
        assert option in usage, (script, option)


# ----------------------------------------------------------------------------- local.sh


def test_local_dry_run(fakes):
  proc = _ok(fakes.run('local.sh', '--processes=3', '--devices_per_process=2', '--port=5555',
                       '--dry-run', '--', '--config=configs/quickstart.py', '--workdir=/tmp/bb',
                       '--config.lr.base_lr=0.2', env={'PYTHON': 'python3'}))
  assert proc.stdout.splitlines() == [
      f'XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python3 -m '
      f'bigbatch.main --coordinator_address=127.0.0.1:5555 --num_processes=3 --process_id={i} '
      f'--config=configs/quickstart.py --workdir=/tmp/bb --config.lr.base_lr=0.2'
      for i in range(3)]
  assert fakes.calls() == []


def test_local_starts_one_trainer_per_process_on_a_free_port(fakes):
  proc = _ok(fakes.run('local.sh', '--processes=2', '--devices_per_process=3',
                       f'--log_dir={fakes.tmp / "logs"}', '--config=configs/quickstart.py',
                       '--workdir=/tmp/bb', rules={'--process_id=0': [[0, 'zero']],
                                                   '--process_id=1': [[0, 'one']]}))
  calls = fakes.calls()
  assert calls[0]['argv'][:2] == ['python3', '-c']  # asks for a free port first
  trainers = sorted(calls[1:], key=lambda c: c['argv'][-3])
  assert [c['argv'] for c in trainers] == [
      ['python3', '-m', 'bigbatch.main', '--coordinator_address=127.0.0.1:12345',
       '--num_processes=2', f'--process_id={i}', '--config=configs/quickstart.py',
       '--workdir=/tmp/bb'] for i in range(2)]
  for c in trainers:
    assert c['env'] == {'XLA_FLAGS': '--xla_force_host_platform_device_count=3',
                        'JAX_PLATFORMS': 'cpu'}
  # Each trainer's output arrives prefixed with its process id, and unprefixed in its log.
  assert sorted(proc.stdout.splitlines()) == ['[0] zero', '[1] one']
  assert (fakes.tmp / 'logs' / 'process_0.log').read_text() == 'zero\n'
  assert (fakes.tmp / 'logs' / 'process_1.log').read_text() == 'one\n'


def test_local_exits_with_the_first_failing_process_status(fakes):
  proc = fakes.run('local.sh', '--processes=3', '--config=configs/quickstart.py',
                   rules={'--process_id=1': [[3, 'process one fails']],
                          '--process_id=2': [[75, '']]})
  assert proc.returncode == 3
  assert '[1] process one fails' in proc.stdout
  assert 'local.sh: process 1 exited with status 3' in proc.stderr
  assert 'local.sh: process 2 exited with status 75' in proc.stderr


# ----------------------------------------------------------------------------- slurm.sbatch

SRUN = ('srun --label --unbuffered --kill-on-bad-exit=1 python3 -m bigbatch.main '
        '--distributed=on --config=configs/r50_64k.py --workdir=/shared/r50_64k')
FLAGS = ['--config=configs/r50_64k.py', '--workdir=/shared/r50_64k']
OVERLAP = '--xla_gpu_enable_latency_hiding_scheduler=true'


@pytest.mark.parametrize('env,expected', [
    ({}, ['sbatch launch/slurm.sbatch --config=configs/r50_64k.py --workdir=/shared/r50_64k']),
    ({'SLURM_JOB_ID': '42', 'SLURM_NTASKS_PER_NODE': '8', 'SLURM_GPUS_ON_NODE': '8',
      'SLURM_CPUS_PER_TASK': '12'},
     ['export SRUN_CPUS_PER_TASK=12', f'export XLA_FLAGS={OVERLAP}', SRUN,
      '# on exit 75 (SIGTERM: preemption or the time limit), restart 1 of 20:',
      'scontrol requeue 42']),
    ({'SLURM_JOB_ID': '42', 'SLURM_NTASKS_PER_NODE': '1', 'SLURM_GPUS_ON_NODE': '4',
      'SLURM_RESTART_COUNT': '3'},
     ['export JAX_LOCAL_DEVICE_IDS=0,1,2,3', f'export XLA_FLAGS={OVERLAP}', SRUN,
      '# on exit 75 (SIGTERM: preemption or the time limit), restart 4 of 20:',
      'scontrol requeue 42']),
])
def test_slurm_dry_run(fakes, env, expected):
  proc = _ok(fakes.run('slurm.sbatch', '--dry-run', *FLAGS, env=dict(env, PYTHON='python3')))
  assert proc.stdout.splitlines() == expected
  assert fakes.calls() == []


def test_slurm_outside_a_job_submits_itself_once(fakes):
  _ok(fakes.run('slurm.sbatch', *FLAGS))
  assert fakes.argvs() == [['sbatch', 'launch/slurm.sbatch', *FLAGS]]


@pytest.mark.parametrize('env,srun_cpus', [
    # Whole nodes (--exclusive): the smallest node's CPUs over the tasks per node.
    ({'SLURM_JOB_CPUS_PER_NODE': '224(x2)'}, '28'),
    ({'SLURM_JOB_CPUS_PER_NODE': '224(x2),96'}, '12'),
    ({'SLURM_JOB_CPUS_PER_NODE': '4'}, '1'),  # fewer CPUs than tasks: at least one
    ({'SLURM_JOB_CPUS_PER_NODE': '224', 'SLURM_CPUS_PER_TASK': '12'}, '12'),  # sbatch -c wins
    ({'SLURM_CPUS_PER_TASK': '12', 'SRUN_CPUS_PER_TASK': '4'}, '4'),  # the user's own wins
    ({}, None),  # nothing known: srun's default
])
def test_slurm_gives_each_task_its_share_of_the_nodes_cpus(fakes, env, srun_cpus):
  _ok(fakes.run('slurm.sbatch', *FLAGS,
                env=dict(env, SLURM_JOB_ID='42', SLURM_NTASKS_PER_NODE='8')))
  [srun] = fakes.calls()
  assert srun['argv'] == shlex.split(SRUN)
  assert srun['env'].get('SRUN_CPUS_PER_TASK') == srun_cpus


def test_slurm_tasks_per_node_from_the_task_layout(fakes):
  # --ntasks without --ntasks-per-node: SLURM_TASKS_PER_NODE gives the layout.
  _ok(fakes.run('slurm.sbatch', *FLAGS, env={'SLURM_JOB_ID': '42', 'SLURM_TASKS_PER_NODE':
                                             '4(x2),2', 'SLURM_JOB_CPUS_PER_NODE': '96(x3)'}))
  assert fakes.calls()[0]['env'].get('SRUN_CPUS_PER_TASK') == '24'


@pytest.mark.parametrize('env,xla_flags', [
    ({}, OVERLAP),
    ({'XLA_FLAGS': '--xla_dump_to=/tmp/d'}, f'--xla_dump_to=/tmp/d {OVERLAP}'),
    # The user's own setting of the flag stays as it is.
    ({'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=false'},
     '--xla_gpu_enable_latency_hiding_scheduler=false'),
])
def test_slurm_turns_on_collective_overlap(fakes, env, xla_flags):
  _ok(fakes.run('slurm.sbatch', *FLAGS, env=dict(env, SLURM_JOB_ID='42')))
  assert fakes.calls()[0]['env']['XLA_FLAGS'] == xla_flags


@pytest.mark.parametrize('env', [{'SLURM_GPUS_PER_TASK': '1'},
                                 {'SLURM_TRES_PER_TASK': 'cpu=8,gres/gpu=1'}])
def test_slurm_refuses_gpus_per_task_in_one_line(fakes, env):
  proc = fakes.run('slurm.sbatch', *FLAGS, env=dict(env, SLURM_JOB_ID='42'))
  assert proc.returncode == 2
  [line] = proc.stderr.splitlines()
  assert '--gpus-per-task is not supported' in line and '--ntasks-per-node' in line
  assert fakes.calls() == []  # nothing started, nothing requeued


@pytest.mark.parametrize('status,restarts,expected_status,requeued', [
    (0, '0', 0, False),
    (75, '0', 0, True),  # preempted: every process checkpointed; requeue
    (75, '20', 75, False),  # preempted once too often
    (1, '0', 1, False),  # a failure is not requeued
])
def test_slurm_requeues_only_after_a_preemption(fakes, status, restarts, expected_status,
                                                requeued):
  proc = fakes.run('slurm.sbatch', *FLAGS, rules={'srun': [[status, '']]},
                   env={'SLURM_JOB_ID': '42', 'SLURM_RESTART_COUNT': restarts})
  assert proc.returncode == expected_status, proc.stderr
  argvs = fakes.argvs()
  assert argvs[0][0] == 'srun'
  assert argvs[1:] == ([['scontrol', 'requeue', '42']] if requeued else [])


def test_slurm_requests_requeue_and_an_early_sigterm():
  directives = [line.split()[1] for line in open(os.path.join(LAUNCH, 'slurm.sbatch'))
                if line.startswith('#SBATCH')]
  assert '--requeue' in directives and '--signal=TERM@300' in directives
  # Whole nodes, so that each task's share of the CPUs is the node's over its tasks.
  assert '--exclusive' in directives
  assert not any(d.startswith('--cpus-per-task=') for d in directives)


# ----------------------------------------------------------------------------- tpu_vm.sh

TPU = ['--name=bb-64k', '--zone=us-central2-b', '--project=my-proj', '--accelerator_type=v4-128',
       '--runtime_version=tpu-ubuntu2204-base', '--config=configs/r50_64k.py',
       '--workdir=gs://bucket/r50_64k']
WHERE = '--zone=us-central2-b --project=my-proj'
TPU_CREATE = (f'gcloud compute tpus tpu-vm create bb-64k {WHERE} --accelerator-type=v4-128 '
              '--version=tpu-ubuntu2204-base')
QR_CREATE = (f'gcloud compute tpus queued-resources create bb-64k --node-id=bb-64k {WHERE} '
             '--accelerator-type=v4-128 --runtime-version=tpu-ubuntu2204-base')
QR_STATE = f"gcloud compute tpus queued-resources describe bb-64k {WHERE} '--format=value(state.state)'"
QR_WAIT = ['# repeated every 60s until the state is ACTIVE:', QR_STATE]
QR_DELETE = f'gcloud compute tpus queued-resources delete bb-64k {WHERE} --force --quiet'


def _tpu_setup(tmp):
  return [
      f'tar -czf {tmp}/bigbatch-bb-64k.tar.gz -C {ROOT} --exclude=__pycache__ '
      "'--exclude=*.egg-info' pyproject.toml README.md .ci/constraints.txt "
      '.ci/constraints-extras.txt bigbatch configs launch',
      f'gcloud compute tpus tpu-vm scp {tmp}/bigbatch-bb-64k.tar.gz bb-64k:bigbatch.tar.gz '
      f'{WHERE} --worker=all',
      f'gcloud compute tpus tpu-vm ssh bb-64k {WHERE} --worker=all "--command=rm -rf ~/bigbatch '
      '&& mkdir -p ~/bigbatch && tar -xzf ~/bigbatch.tar.gz -C ~/bigbatch && '
      'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user --upgrade uv && '
      'python3 -m uv venv -q --clear --python 3.11 ~/bigbatch-venv && cd ~/bigbatch && '
      'python3 -m uv pip install -q --python ~/bigbatch-venv/bin/python -c .ci/constraints.txt '
      "-c .ci/constraints-extras.txt -e '.[tpu]'\""]


TPU_RUN = (f"gcloud compute tpus tpu-vm ssh bb-64k {WHERE} --worker=all '--command=set -o "
           'pipefail; cd ~/bigbatch && TF_CPP_MIN_LOG_LEVEL=3 ~/bigbatch-venv/bin/python -m '
           'bigbatch.main --distributed=on --config=configs/r50_64k.py '
           "--workdir=gs://bucket/r50_64k 2>&1 | tee ~/bigbatch-run.log'")


@pytest.mark.parametrize('command,expected', [
    (['up'], [TPU_CREATE, 'SETUP', TPU_RUN]),
    (['up', '--spot'], [QR_CREATE + ' --spot', *QR_WAIT, 'SETUP', TPU_RUN]),
    (['create', '--queued', '--valid_until=6h'],
     [QR_CREATE + ' --valid-until-duration=6h', *QR_WAIT]),
    (['create'], [TPU_CREATE]),
    (['setup'], ['SETUP']),
    (['run'], [TPU_RUN]),
    (['logs'], [f'gcloud compute tpus tpu-vm ssh bb-64k {WHERE} --worker=0 '
                "'--command=tail -n +1 -F ~/bigbatch-run.log'"]),
    (['status'], [f"gcloud compute tpus tpu-vm describe bb-64k {WHERE} '--format=value(state)'"]),
    (['status', '--spot'],
     [QR_STATE, f"gcloud compute tpus tpu-vm describe bb-64k {WHERE} '--format=value(state)'"]),
    (['delete'], [f'gcloud compute tpus tpu-vm delete bb-64k {WHERE} --quiet']),
    (['delete', '--spot'], [QR_DELETE]),
])
def test_tpu_vm_dry_run(fakes, command, expected):
  proc = _ok(fakes.run('tpu_vm.sh', command[0], '--dry-run', *TPU, *command[1:],
                       env={'TPU_VM_POLL_SECONDS': '60'}))
  setup = _tpu_setup(fakes.tmp)
  assert proc.stdout.splitlines() == [line for e in expected
                                      for line in (setup if e == 'SETUP' else [e])]
  # The printed lines are valid shell: the remote command keeps the trainer's flags as words.
  for line in proc.stdout.splitlines():
    shlex.split(line)
  assert fakes.calls() == []


def test_tpu_vm_needs_a_name_and_a_command(fakes):
  assert fakes.run('tpu_vm.sh', 'up', '--zone=z').returncode == 1
  proc = fakes.run('tpu_vm.sh', 'launch', '--name=a', '--zone=z')
  assert proc.returncode == 1 and 'Commands:' in proc.stderr and proc.stdout == ''
  proc = fakes.run('tpu_vm.sh', 'create', '--name=a', '--zone=z', '--valid_until=6h')
  assert proc.returncode == 1 and '--valid_until needs --spot or --queued' in proc.stderr
  assert fakes.calls() == []


def test_tpu_vm_spot_waits_for_its_queued_resource_then_sets_up_and_trains(fakes):
  proc = _ok(fakes.run('tpu_vm.sh', 'up', *TPU, '--spot', rules={
      'queued-resources describe': [[0, 'WAITING_FOR_RESOURCES'], [0, 'PROVISIONING'],
                                    [0, 'ACTIVE']]}))
  argvs = [a for a in fakes.argvs() if a[0] == 'gcloud']
  expected = [QR_CREATE + ' --spot', QR_STATE, QR_STATE, QR_STATE,
              *_tpu_setup(fakes.tmp)[1:], TPU_RUN]
  assert argvs == [shlex.split(line) for line in expected]
  assert ('queued resource bb-64k: WAITING_FOR_RESOURCES' in proc.stderr
          and 'queued resource bb-64k: ACTIVE' in proc.stderr)
  assert (fakes.tmp / 'bigbatch-bb-64k.tar.gz').exists()  # the archive it copied


def test_tpu_vm_stops_when_the_queued_request_fails(fakes):
  proc = fakes.run('tpu_vm.sh', 'up', *TPU, '--spot', rules={
      'queued-resources describe': [[0, 'WAITING_FOR_RESOURCES'], [0, 'FAILED']]})
  assert proc.returncode == 1
  assert 'the queued resource bb-64k is FAILED' in proc.stderr
  # Neither setup nor training ran on a VM that does not exist.
  assert not any('tpu-vm' in a for a in fakes.argvs())


def test_tpu_vm_tolerates_a_few_failed_checks_of_the_request_but_not_many(fakes):
  create = ['create', *TPU, '--queued']
  _ok(fakes.run('tpu_vm.sh', *create, rules={
      'queued-resources describe': [[1, ''], [0, ''], [0, 'ACTIVE']]}))
  proc = fakes.run('tpu_vm.sh', *create, rules={'queued-resources describe': [[1, '']] * 5})
  assert proc.returncode == 1 and 'the queued resource bb-64k is UNKNOWN' in proc.stderr
  assert sum('describe' in a for a in fakes.argvs()) == 3 + 5


def test_tpu_vm_requests_a_preempted_spot_slice_again_and_resumes(fakes):
  # The first run ends as the VM is preempted (ssh fails: 255); the VM is PREEMPTED.
  proc = _ok(fakes.run('tpu_vm.sh', 'run', *TPU, '--spot', '--max_restarts=2', rules={
      'ssh bb-64k --zone=us-central2-b --project=my-proj --worker=all --command=set':
          [[255, ''], [0, '']],
      'tpu-vm describe': [[0, 'PREEMPTED']],
      'queued-resources describe': [[0, 'ACTIVE']]}))
  argvs = [a for a in fakes.argvs() if a[0] == 'gcloud']
  describe = shlex.split(f"gcloud compute tpus tpu-vm describe bb-64k {WHERE} "
                         "'--format=value(state)'")
  assert argvs == [shlex.split(TPU_RUN), describe, shlex.split(QR_DELETE),
                   shlex.split(QR_CREATE + ' --spot'), shlex.split(QR_STATE),
                   *[shlex.split(line) for line in _tpu_setup(fakes.tmp)[1:]],
                   shlex.split(TPU_RUN)]
  assert 'preempted (exit 255, VM PREEMPTED); restart 1 of 2' in proc.stderr


def test_tpu_vm_does_not_resubmit_a_failure_on_a_healthy_vm(fakes):
  proc = fakes.run('tpu_vm.sh', 'run', *TPU, '--spot', rules={
      '--command=set': [[1, '']], 'tpu-vm describe': [[0, 'READY']],
      '--command=tail': [[1, '']]})  # the log does not say "stopped: preempted"
  assert proc.returncode == 1
  assert 'failed (exit 1) on a healthy VM; not resubmitting' in proc.stderr
  assert not any('create' in a or 'delete' in a for a in fakes.argvs())
