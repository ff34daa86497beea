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
import signal
import subprocess
import sys
import time

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
# Autocheckpoint (v2-v4, v5e) is a `gcloud alpha` flag of both create commands.
TPU_CREATE = (f'gcloud alpha compute tpus tpu-vm create bb-64k {WHERE} --accelerator-type=v4-128 '
              '--version=tpu-ubuntu2204-base --autocheckpoint-enabled')
QR_CREATE_BARE = (f'gcloud compute tpus queued-resources create bb-64k --node-id=bb-64k {WHERE} '
                  '--accelerator-type=v4-128 --runtime-version=tpu-ubuntu2204-base')
QR_CREATE = QR_CREATE_BARE.replace('gcloud compute', 'gcloud alpha compute')
QR_STATE = f"gcloud compute tpus queued-resources describe bb-64k {WHERE} '--format=value(state.state)'"
QR_WAIT = ['# repeated every 60s until the state is ACTIVE:', QR_STATE]
QR_DELETE = f'gcloud compute tpus queued-resources delete bb-64k {WHERE} --force --quiet'
VM_STATE = f"gcloud compute tpus tpu-vm describe bb-64k {WHERE} '--format=value(state)'"


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


SSH = f'gcloud compute tpus tpu-vm ssh bb-64k {WHERE}'
TPU_START = (
    f"{SSH} --worker=all '--command=rm -f ~/bigbatch-run.pid ~/bigbatch-run.status "
    "~/bigbatch-run.stopped; setsid nohup bash -c '\\''(cd ~/bigbatch && TF_CPP_MIN_LOG_LEVEL=3 "
    'exec ~/bigbatch-venv/bin/python -m bigbatch.main --distributed=on '
    '--config=configs/r50_64k.py --workdir=gs://bucket/r50_64k) >~/bigbatch-run.log 2>&1 '
    '</dev/null & echo $! >~/bigbatch-run.pid; wait $!; echo $? >~/bigbatch-run.status'
    "'\\'' >/dev/null 2>&1 </dev/null &'")
TPU_FOLLOW = (f"{SSH} --worker=0 '--command=while [ ! -s ~/bigbatch-run.pid ]; do sleep 1; done; "
              'tail -n +1 -F --pid="$(cat ~/bigbatch-run.pid)" ~/bigbatch-run.log; sleep 1; '
              'exit "$(cat ~/bigbatch-run.status 2>/dev/null || echo 255)"\'')
TPU_STOP = (f"{SSH} --worker=all '--command=touch ~/bigbatch-run.stopped; test -s "
            '~/bigbatch-run.pid && kill -TERM "$(cat ~/bigbatch-run.pid)" 2>/dev/null; true\'')


@pytest.mark.parametrize('command,expected', [
    (['up'], [QR_CREATE + ' --autocheckpoint-enabled', *QR_WAIT, 'SETUP', TPU_START,
              TPU_FOLLOW]),
    (['up', '--spot'], [QR_CREATE + ' --spot --autocheckpoint-enabled', *QR_WAIT, 'SETUP',
                        TPU_START, TPU_FOLLOW]),
    (['up', '--direct'], [TPU_CREATE, 'SETUP', TPU_START, TPU_FOLLOW]),
    (['create', '--valid_until=6h'],
     [QR_CREATE + ' --autocheckpoint-enabled --valid-until-duration=6h', *QR_WAIT]),
    (['create', '--no_autocheckpoint'], [QR_CREATE_BARE, *QR_WAIT]),
    (['create', '--direct', '--spot', '--no_autocheckpoint'],
     [f'gcloud compute tpus tpu-vm create bb-64k {WHERE} --accelerator-type=v4-128 '
      '--version=tpu-ubuntu2204-base --spot']),
    (['setup'], ['SETUP']),
    (['run'], [TPU_START, TPU_FOLLOW]),
    (['attach'], [TPU_FOLLOW]),
    (['stop'], [TPU_STOP]),
    (['logs'], [f"{SSH} --worker=0 '--command=tail -n +1 -F ~/bigbatch-run.log'"]),
    (['status'], [QR_STATE, VM_STATE]),
    (['status', '--direct'], [VM_STATE]),
    (['delete'], [QR_DELETE]),
    (['delete', '--direct'], [f'gcloud compute tpus tpu-vm delete bb-64k {WHERE} --quiet']),
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
  proc = fakes.run('tpu_vm.sh', 'create', '--name=a', '--zone=z', '--direct', '--valid_until=6h')
  assert proc.returncode == 1 and '--valid_until needs a queued resource' in proc.stderr
  proc = fakes.run('tpu_vm.sh', 'create', '--name=a', '--zone=z', '--accelerator_type=v7x-8')
  assert proc.returncode == 1
  assert 'no documented runtime version for --accelerator_type=v7x-8' in proc.stderr
  assert fakes.calls() == []


@pytest.mark.parametrize('accelerator_type,runtime,alpha_flag', [
    # Cloud TPU's "TPU software versions" table for JAX; Autocheckpoint where it is offered.
    ('v6e-256', 'v2-alpha-tpuv6e', False),
    ('v5p-128', 'v2-alpha-tpuv5', False),
    ('v5litepod-256', 'v2-alpha-tpuv5-lite', True),
    ('v4-128', 'tpu-ubuntu2204-base', True),
    ('v3-32', 'tpu-ubuntu2204-base', True),
])
def test_tpu_vm_runtime_and_autocheckpoint_follow_the_accelerator(fakes, accelerator_type,
                                                                  runtime, alpha_flag):
  proc = _ok(fakes.run('tpu_vm.sh', 'create', '--dry-run', '--name=a', '--zone=z',
                       f'--accelerator_type={accelerator_type}'))
  create = shlex.split(proc.stdout.splitlines()[0])
  assert f'--runtime-version={runtime}' in create
  assert ('--autocheckpoint-enabled' in create) == alpha_flag == (create[1] == 'alpha')
  # An explicit version still wins.
  proc = _ok(fakes.run('tpu_vm.sh', 'create', '--dry-run', '--name=a', '--zone=z',
                       f'--accelerator_type={accelerator_type}', '--runtime_version=mine'))
  assert '--runtime-version=mine' in shlex.split(proc.stdout.splitlines()[0])


NOT_RUNNING = {'--command=test -s ~/bigbatch-run.pid': [[1, '']]}


def test_tpu_vm_spot_waits_for_its_queued_resource_then_sets_up_and_trains(fakes):
  proc = _ok(fakes.run('tpu_vm.sh', 'up', *TPU, '--spot', rules={
      'queued-resources describe': [[0, 'WAITING_FOR_RESOURCES'], [0, 'PROVISIONING'],
                                    [0, 'ACTIVE']]}))
  argvs = [a for a in fakes.argvs() if a[0] == 'gcloud']
  expected = [QR_CREATE + ' --spot --autocheckpoint-enabled', QR_STATE, QR_STATE, QR_STATE,
              *_tpu_setup(fakes.tmp)[1:], TPU_START, TPU_FOLLOW]
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
  create = ['create', *TPU]
  _ok(fakes.run('tpu_vm.sh', *create, rules={
      'queued-resources describe': [[1, ''], [0, ''], [0, 'ACTIVE']]}))
  proc = fakes.run('tpu_vm.sh', *create, rules={'queued-resources describe': [[1, '']] * 5})
  assert proc.returncode == 1 and 'the queued resource bb-64k is UNKNOWN' in proc.stderr
  assert sum('describe' in a for a in fakes.argvs()) == 3 + 5


def test_tpu_vm_requests_a_preempted_spot_slice_again_and_resumes(fakes):
  # The first run ends as the VM is preempted (ssh fails: 255); the VM is PREEMPTED.
  proc = _ok(fakes.run('tpu_vm.sh', 'run', *TPU, '--spot', '--max_restarts=2', rules={
      **NOT_RUNNING, '--command=while': [[255, ''], [0, '']],
      'tpu-vm describe': [[0, 'PREEMPTED'], [0, 'PREEMPTED']],
      'queued-resources describe': [[0, 'ACTIVE']]}))
  argvs = [a for a in fakes.argvs() if a[0] == 'gcloud']
  running = shlex.split(f"{SSH} --worker=0 '--command=test -s ~/bigbatch-run.pid && ! test -e "
                        "~/bigbatch-run.status'")
  assert argvs == [running, shlex.split(TPU_START), shlex.split(TPU_FOLLOW),
                   shlex.split(VM_STATE), shlex.split(VM_STATE), shlex.split(QR_DELETE),
                   shlex.split(QR_CREATE + ' --spot --autocheckpoint-enabled'),
                   shlex.split(QR_STATE),
                   *[shlex.split(line) for line in _tpu_setup(fakes.tmp)[1:]],
                   shlex.split(TPU_START), shlex.split(TPU_FOLLOW)]
  assert 'preempted (exit 255, VM PREEMPTED); restart 1 of 2' in proc.stderr


def test_tpu_vm_does_not_resubmit_a_failure_on_a_healthy_vm(fakes):
  proc = fakes.run('tpu_vm.sh', 'run', *TPU, '--spot', rules={
      **NOT_RUNNING, '--command=while': [[1, '']], 'tpu-vm describe': [[0, 'READY']],
      '--command=test -e ~/bigbatch-run.stopped': [[1, '']],
      '--command=tail -n 20': [[1, '']]})  # the log does not say "stopped: preempted"
  assert proc.returncode == 1
  assert 'failed (exit 1) on a healthy VM; not resubmitting' in proc.stderr
  assert not any('create' in a or 'delete' in a for a in fakes.argvs())


def test_tpu_vm_does_not_restart_what_stop_stopped(fakes):
  proc = fakes.run('tpu_vm.sh', 'run', *TPU, rules={
      **NOT_RUNNING, '--command=while': [[75, '']], 'tpu-vm describe': [[0, 'READY']]})
  assert proc.returncode == 75
  assert 'stopped by `tpu_vm.sh stop` (exit 75)' in proc.stderr
  assert sum('--command=rm -f' in ' '.join(a) for a in fakes.argvs()) == 1  # started once


def test_tpu_vm_reattaches_after_a_dropped_connection_and_to_a_running_run(fakes):
  # ssh drops (255) while the VM is READY and the trainer still runs: follow it again.
  proc = _ok(fakes.run('tpu_vm.sh', 'run', *TPU, rules={
      **{'--command=test -s ~/bigbatch-run.pid': [[1, ''], [0, '']]},
      '--command=while': [[255, ''], [0, '']], 'tpu-vm describe': [[0, 'READY']]}))
  assert 'lost the connection to worker 0; the trainers go on; reattaching' in proc.stderr
  lines = [' '.join(a) for a in fakes.argvs()]
  assert sum('--command=rm -f' in line for line in lines) == 1
  assert sum('--command=while' in line for line in lines) == 2
  # `run` on a slice whose trainers are already running attaches instead of starting again.
  fakes.log.unlink()
  proc = _ok(fakes.run('tpu_vm.sh', 'run', *TPU, rules={}))
  assert 'already running on bb-64k; attaching' in proc.stderr
  assert not any('--command=rm -f' in ' '.join(a) for a in fakes.argvs())


# A gcloud whose `ssh --command=C` runs C here (HOME = the fake worker's home) and whose
# `describe` answers READY: the detached start, follow and stop run for real.
LOCAL_GCLOUD = f'''#!{sys.executable}
import subprocess, sys
args = sys.argv[1:]
if 'ssh' in args:
  command = next(a for a in args if a.startswith('--command='))[len('--command='):]
  sys.exit(subprocess.run(['bash', '-c', command]).returncode)
if 'describe' in args:
  print('READY')
'''
# The trainer stand-in: prints, then waits; SIGTERM makes it print the trainer's line, exit 75.
FAKE_TRAINER = '''#!/usr/bin/env bash
trap 'echo "bigbatch: stopped: preempted (SIGTERM)"; exit 75' TERM
echo "training $*"
while :; do sleep 0.1; done
'''


def test_tpu_vm_trainers_outlive_the_launcher_and_stop_checkpoints_them(tmp_path):
  home = tmp_path / 'home'
  (home / 'bigbatch').mkdir(parents=True)
  (home / 'bigbatch-venv' / 'bin').mkdir(parents=True)
  trainer = home / 'bigbatch-venv' / 'bin' / 'python'
  trainer.write_text(FAKE_TRAINER)
  trainer.chmod(0o755)
  bindir = tmp_path / 'bin'
  bindir.mkdir()
  (bindir / 'gcloud').write_text(LOCAL_GCLOUD)
  (bindir / 'gcloud').chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TPU_VM_', 'XLA_'))}
  env.update(HOME=str(home), PATH=f'{bindir}{os.pathsep}{os.environ["PATH"]}',
             TPU_VM_POLL_SECONDS='0', TMPDIR=str(tmp_path))
  launcher = subprocess.Popen(['bash', 'launch/tpu_vm.sh', 'run', *TPU], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
  pid_file, log = home / 'bigbatch-run.pid', home / 'bigbatch-run.log'
  try:
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text().strip() and log.exists()
               and 'training' in log.read_text()):
      assert time.monotonic() < deadline, 'the trainer did not start'
      time.sleep(0.1)
    pid = int(pid_file.read_text())
    # The launcher dies (a laptop that sleeps, a closed terminal): the trainer goes on.
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=10)
    time.sleep(0.5)
    os.kill(pid, 0)  # still running
    assert 'training -m bigbatch.main --distributed=on --config=configs/r50_64k.py' in (
        log.read_text())
    # `stop`: SIGTERM to the trainer, which checkpoints and exits 75; `attach` follows it to
    # its end and does not restart it.
    subprocess.run(['bash', 'launch/tpu_vm.sh', 'stop', *TPU], cwd=ROOT, env=env, check=True,
                   timeout=30)
    attach = subprocess.run(['bash', 'launch/tpu_vm.sh', 'attach', *TPU], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert attach.returncode == 75, attach.stderr
    assert 'bigbatch: stopped: preempted (SIGTERM)' in attach.stdout
    assert 'stopped by `tpu_vm.sh stop`' in attach.stderr
    assert (home / 'bigbatch-run.status').read_text().strip() == '75'
  finally:
    if pid_file.exists() and pid_file.read_text().strip():
      try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass
