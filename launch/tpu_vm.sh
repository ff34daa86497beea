#!/usr/bin/env bash
# Cloud TPU VMs and pod slices: create, install, train on every worker, resubmit after
# preemption, delete.
#
# Usage: launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE [options] [bigbatch flags]
#        launch/tpu_vm.sh --help
#
#   launch/tpu_vm.sh up --name=bb-64k --zone=us-central2-b --accelerator_type=v4-128 --spot \
#       --config=configs/r50_64k.py --workdir=gs://BUCKET/r50_64k
#
# Commands:
#   create  create the TPU VM (one host) or pod slice (several hosts, "workers"); with --spot
#           or --queued through a queued resource, waiting until it is ACTIVE
#   setup   copy this checkout to every worker and install it there (bigbatch[tpu]) into a
#           fresh virtual environment ~/bigbatch-venv on Python --python, with the versions CI
#           verified (.ci/constraints.txt, .ci/constraints-extras.txt for libtpu). The image's own python3
#           (3.10 on tpu-ubuntu2204-base) is too old for jax; uv, installed with it, provides
#           the newer interpreter (downloaded when the image has none) and the venv.
#   run     start `~/bigbatch-venv/bin/python -m bigbatch.main --distributed=on --config=...`
#           on every worker, detached (nohup setsid: it outlives this launcher and its ssh
#           sessions; output in ~/bigbatch-run.log, exit status in ~/bigbatch-run.status on each
#           worker), then attach to worker 0's log until the run ends. JAX finds the other
#           workers itself (Cloud TPU metadata). When the run stops for a preemption (exit 75
#           after SIGTERM, or the VM was preempted), it recreates the VM if needed (deleting and
#           requesting the queued resource again), sets it up again and starts the same
#           command, which resumes from the newest checkpoint in --workdir; at most
#           --max_restarts times. If this launcher dies (a laptop that sleeps), the trainers go
#           on; `attach` (or `run` again, which attaches to a run in progress) takes over.
#   up      create + setup + run
#   attach  follow worker 0's log of the running trainers until they end, then restart them
#           after a preemption as `run` does
#   logs    follow worker 0's ~/bigbatch-run.log (never ends by itself; ^C leaves the run)
#   stop    SIGTERM to the trainers on every worker: they checkpoint and exit 75; a `run` or
#           `attach` still following them then ends without restarting
#   status  print the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...;
#           not with --direct), then the VM's (READY, PREEMPTED, ...)
#   delete  delete the queued resource and its VM (with --direct: the VM)
#
# Options:
#   --name=NAME               TPU VM name (required)
#   --zone=ZONE               e.g. us-central2-b (v4), us-west4-a (v5e) (required)
#   --project=PROJECT         default: gcloud's configured project
#   --accelerator_type=TYPE   e.g. v4-8 (one host), v4-128, v5litepod-256, v5p-128, v6e-256
#                             (default v4-8)
#   --runtime_version=VER     TPU VM software version; default from the accelerator type, as
#                             Cloud TPU's "TPU software versions" page lists them for JAX:
#                             v6e-* v2-alpha-tpuv6e, v5p-* v2-alpha-tpuv5, v5litepod-*
#                             v2-alpha-tpuv5-lite, v2/v3/v4-* tpu-ubuntu2204-base; other types
#                             need this flag
#   --python=VER              Python of the workers' venv (default 3.11, as CI; >= 3.11)
#   Capacity is requested through a queued resource (`gcloud compute tpus queued-resources
#   create NAME --node-id=NAME ...`), which waits in Cloud TPU's queue until capacity is free
#   instead of failing when there is none, and is polled until ACTIVE.
#   --spot                    Spot capacity: cheaper, may be preempted (the run then resumes)
#   --direct                  create the VM directly (`gcloud compute tpus tpu-vm create`)
#                             instead: fails at once when there is no capacity
#   --valid_until=DURATION    give up a queued request not filled within DURATION (e.g. 6h, 2d;
#                             gcloud's --valid-until-duration)
#   --no_autocheckpoint       do not ask for Autocheckpoint. By default it is requested where
#                             Cloud TPU offers it (v2, v3, v4 and v5e, a Preview feature of
#                             `gcloud alpha`): before a maintenance event Cloud TPU then sends
#                             SIGTERM to the trainers and waits up to 5 minutes for them to
#                             exit, so they checkpoint the current step. Without it maintenance
#                             starts at once, with no signal
#   --max_restarts=N          resubmissions after preemption (default 10)
#   --config=... --workdir=...  and any other bigbatch flag, passed to bigbatch.main; the
#                             workdir must be shared by all workers and survive the VM: gs://
#   --dry-run                 print every command instead of running it
#   --help                    print this and exit
# Environment: TPU_VM_POLL_SECONDS, seconds between checks of a queued request (default 60).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

command="${1:-}"
[[ $# -gt 0 ]] && shift
name=''
zone=''
project=''
accelerator_type='v4-8'
runtime_version=''
python='3.11'
spot=0
queued=1
autocheckpoint=1
valid_until=''
max_restarts=10
dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime_version=*) runtime_version="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;  # the default; kept for older command lines
    --direct) queued=0 ;;
    --no_autocheckpoint) autocheckpoint=0 ;;
    --valid_until=*) valid_until="${1#*=}" ;;
    --help|-h) command=help ;;
    --max_restarts=*) max_restarts="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    --) shift; train_args+=("$@"); break ;;
    *) train_args+=("$1") ;;
  esac
  shift
done

# The comment block above, as text: on stdout for --help (exit 0), on stderr for a mistake.
usage() {
  local text
  text="$(sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//')"
  if [[ $1 -eq 0 ]]; then echo "$text"; else echo "$text" >&2; fi
  exit "$1"
}
case "$command" in
  help|--help|-h) usage 0 ;;
  create|setup|run|up|attach|logs|stop|status|delete) ;;
  *) usage 1 ;;
esac
if [[ -z "$name" || -z "$zone" ]]; then
  echo "tpu_vm.sh: --name and --zone are required" >&2
  exit 1
fi
if [[ -n "$valid_until" && $queued -eq 0 ]]; then
  echo "tpu_vm.sh: --valid_until needs a queued resource; leave out --direct" >&2
  exit 1
fi
# The runtime (TPU software version) for JAX by TPU generation, from Cloud TPU's "TPU software
# versions" page (cloud.google.com/tpu/docs/runtimes, read 2026-12-06; docs/multihost.md).
if [[ -z "$runtime_version" ]]; then
  case "$accelerator_type" in
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) runtime_version=tpu-ubuntu2204-base ;;
    *)
      echo "tpu_vm.sh: no documented runtime version for --accelerator_type=$accelerator_type;" \
           "pass --runtime_version=VERSION (see cloud.google.com/tpu/docs/runtimes)" >&2
      exit 1 ;;
  esac
fi
# Autocheckpoint: offered for v2-v4 and v5e created through the Cloud TPU API (Cloud TPU's
# "Autocheckpoint" page), as a `gcloud alpha` flag of the create commands.
case "$accelerator_type" in
  v2-*|v3-*|v4-*|v5litepod-*|v5e-*) ;;
  *) autocheckpoint=0 ;;
esac
poll_seconds="${TPU_VM_POLL_SECONDS:-60}"

# Shell-quotes one word only where it needs it, so dry-run lines read naturally and paste back.
quote() {
  local plain='^[A-Za-z0-9_./:=,@%+-]+$' double_safe='^[^$`"\\!]*$'
  if [[ "$1" =~ $plain ]]; then
    printf '%s' "$1"
  elif [[ "$1" == *\'* && "$1" =~ $double_safe ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quoted() {
  local out='' word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}
# Runs a command, or prints it with --dry-run.
run_cmd() {
  if [[ $dry_run -eq 1 ]]; then
    quoted "$@"
    echo
  else
    "$@"
  fi
}

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
archive="${TMPDIR:-/tmp}/bigbatch-$name.tar.gz"

create() {
  local extra=() base
  [[ $spot -eq 1 ]] && extra+=(--spot)
  [[ $autocheckpoint -eq 1 ]] && extra+=(--autocheckpoint-enabled)
  if [[ $queued -eq 0 ]]; then
    base=("${tpu[@]}")
    [[ $autocheckpoint -eq 1 ]] && base=(gcloud alpha compute tpus tpu-vm)
    run_cmd "${base[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator_type" \
        --version="$runtime_version" ${extra[@]+"${extra[@]}"}
    return
  fi
  [[ -n "$valid_until" ]] && extra+=(--valid-until-duration="$valid_until")
  base=("${qr[@]}")
  [[ $autocheckpoint -eq 1 ]] && base=(gcloud alpha compute tpus queued-resources)
  run_cmd "${base[@]}" create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" \
      ${extra[@]+"${extra[@]}"}
  wait_active
}

queued_state() {
  local out
  out="$("${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)' 2>/dev/null)" ||
      out=''
  echo "${out:-UNKNOWN}"
}

# A queued request is filled when capacity frees up: minutes to hours for a large Spot slice.
wait_active() {
  if [[ $dry_run -eq 1 ]]; then
    echo "# repeated every ${poll_seconds}s until the state is ACTIVE:"
    run_cmd "${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
    return
  fi
  local current last='' unknown=0
  while :; do
    current="$(queued_state)"
    if [[ "$current" != "$last" ]]; then
      echo "tpu_vm.sh: queued resource $name: $current" >&2
      last="$current"
    fi
    # UNKNOWN: describe failed; tolerated a few times (a network error), not forever (no such
    # request).
    [[ "$current" == UNKNOWN ]] && unknown=$((unknown + 1)) || unknown=0
    case "$current" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|UNKNOWN)
        if [[ "$current" != UNKNOWN || $unknown -ge 5 ]]; then
          echo "tpu_vm.sh: the queued resource $name is $current; see" \
              "\`gcloud compute tpus queued-resources describe $name --zone=$zone\`" >&2
          return 1
        fi ;;
    esac
    sleep "$poll_seconds"
  done
}

delete() {
  if [[ $queued -eq 1 ]]; then
    # --force deletes the VM first; a request still waiting or suspended has none.
    run_cmd "${qr[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    run_cmd "${tpu[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

setup() {
  # The working tree as it is (uncommitted edits included), without caches or run outputs.
  run_cmd tar -czf "$archive" -C "$root" --exclude=__pycache__ --exclude='*.egg-info' \
      pyproject.toml README.md .ci/constraints.txt .ci/constraints-extras.txt bigbatch configs \
      launch
  run_cmd "${tpu[@]}" scp "$archive" "$name:bigbatch.tar.gz" "${where[@]}" --worker=all
  # uv comes from PyPI through the image's pip (PIP_BREAK_SYSTEM_PACKAGES: images whose Python
  # is marked externally managed; older pips ignore it). `uv venv --python` uses an interpreter
  # of that version if the image has one, else downloads a standalone CPython build; --clear
  # rebuilds the venv on every setup (packages come from uv's cache after the first).
  run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="rm -rf ~/bigbatch && \
mkdir -p ~/bigbatch && tar -xzf ~/bigbatch.tar.gz -C ~/bigbatch && \
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user --upgrade uv && \
python3 -m uv venv -q --clear --python $(quote "$python") ~/bigbatch-venv && cd ~/bigbatch && \
python3 -m uv pip install -q --python ~/bigbatch-venv/bin/python -c .ci/constraints.txt \
-c .ci/constraints-extras.txt -e '.[tpu]'"
}

# Starts the trainer on every worker, detached from the ssh session (setsid nohup), so that it
# outlives this launcher. ~/bigbatch-run.pid holds the trainer's PID while it runs and
# ~/bigbatch-run.status its exit status once it has ended; ~/bigbatch-run.stopped marks a `stop`.
start_detached() {
  local trainer inner
  trainer="cd ~/bigbatch && TF_CPP_MIN_LOG_LEVEL=3 exec ~/bigbatch-venv/bin/python -m"
  trainer+=" bigbatch.main --distributed=on"
  [[ ${#train_args[@]} -gt 0 ]] && trainer+=" $(quoted "${train_args[@]}")"
  inner="($trainer) >~/bigbatch-run.log 2>&1 </dev/null & echo \$! >~/bigbatch-run.pid;"
  inner+=" wait \$!; echo \$? >~/bigbatch-run.status"
  run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="rm -f \
~/bigbatch-run.pid ~/bigbatch-run.status ~/bigbatch-run.stopped; setsid nohup bash -c $(quote "$inner") \
>/dev/null 2>&1 </dev/null &"
}

# Worker 0's log until its trainer ends; exits with the trainer's status (255: unknown, e.g.
# the ssh connection dropped while the trainer goes on).
follow() {
  local remote='while [ ! -s ~/bigbatch-run.pid ]; do sleep 1; done; '
  remote+='tail -n +1 -F --pid="$(cat ~/bigbatch-run.pid)" ~/bigbatch-run.log; sleep 1; '
  remote+='exit "$(cat ~/bigbatch-run.status 2>/dev/null || echo 255)"'
  run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="$remote"
}

# Whether worker 0's trainer is still running (the VM is up and it wrote no status yet).
running() {
  "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
      --command='test -s ~/bigbatch-run.pid && ! test -e ~/bigbatch-run.status' 2>/dev/null
}

stopped_by_user() {
  "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
      --command='test -e ~/bigbatch-run.stopped' 2>/dev/null
}

# The trainers' exit status: followed to their end, reattaching while the VM is up and they are
# still running (a dropped ssh connection).
train_once() {
  local status
  [[ "${1:-start}" == start ]] && start_detached
  while :; do
    status=0
    follow || status=$?
    if [[ $dry_run -eq 1 || $status -ne 255 ]]; then
      return "$status"
    fi
    if [[ "$(state)" == READY ]] && running; then
      echo "tpu_vm.sh: lost the connection to worker 0; the trainers go on; reattaching" >&2
      sleep "$poll_seconds"
      continue
    fi
    return "$status"
  done
}

stop() {
  local remote='touch ~/bigbatch-run.stopped; '
  remote+='test -s ~/bigbatch-run.pid && kill -TERM "$(cat ~/bigbatch-run.pid)" 2>/dev/null; true'
  run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote"
}

state() {
  "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || echo UNKNOWN
}

stopped_for_preemption() {
  "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
      --command="tail -n 20 ~/bigbatch-run.log | grep -q 'bigbatch: stopped: preempted'"
}

train() {
  local restarts=0 status current how="${1:-start}"
  while :; do
    status=0
    train_once "$how" || status=$?
    how=start
    [[ $status -eq 0 || $dry_run -eq 1 ]] && return "$status"
    current="$(state)"
    if [[ "$current" == READY ]] && stopped_by_user; then
      echo "tpu_vm.sh: stopped by \`tpu_vm.sh stop\` (exit $status); rerun \`run\` to resume" >&2
      return "$status"
    fi
    # gcloud may report a worker's exit 75 as its own failure status: the log says for sure.
    if [[ $status -ne 75 && "$current" == READY ]] && stopped_for_preemption; then
      status=75
    fi
    if [[ $status -ne 75 && "$current" == READY ]]; then
      echo "tpu_vm.sh: the run failed (exit $status) on a healthy VM; not resubmitting" >&2
      return "$status"
    fi
    if [[ $restarts -ge $max_restarts ]]; then
      echo "tpu_vm.sh: preempted again after $max_restarts restarts; giving up" >&2
      return "$status"
    fi
    restarts=$((restarts + 1))
    echo "tpu_vm.sh: preempted (exit $status, VM $current); restart $restarts of $max_restarts" >&2
    if [[ "$current" != READY ]]; then
      # A preempted Spot VM cannot be restarted; it is deleted and created anew (a suspended
      # queued resource likewise: deleted and requested again).
      delete || true
      create
      setup
    fi
  done
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run)
    # A run already in progress (this launcher died and was started again): attach to it.
    if [[ $dry_run -eq 0 ]] && running; then
      echo "tpu_vm.sh: the trainers are already running on $name; attaching" >&2
      train attach
    else
      train
    fi ;;
  up) create; setup; train ;;
  attach) train attach ;;
  stop) stop ;;
  logs) run_cmd "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 \
            --command='tail -n +1 -F ~/bigbatch-run.log' ;;
  status)
    if [[ $queued -eq 1 ]]; then
      run_cmd "${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)'
    fi
    run_cmd "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' ;;
  delete) delete ;;
esac
