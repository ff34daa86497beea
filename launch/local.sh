#!/usr/bin/env bash
# N local processes on CPU with emulated devices: the multi-host code path of a pod, on one machine.
#
# Usage: launch/local.sh [options] [--] BIGBATCH_FLAGS...
#        launch/local.sh --help
#
#   launch/local.sh --processes=2 --devices_per_process=4 -- \
#       --config=configs/quickstart.py --workdir=/tmp/bb_2x4
#
# Each process runs `python -m bigbatch.main` with XLA_FLAGS giving it its own emulated CPU
# devices and the coordinator flags (127.0.0.1:PORT, process ids 0..N-1), exactly as a pod's
# hosts do; JAX's CPU collectives (gloo) connect them. Output is streamed with a "[i] " prefix
# per process (process 0 logs progress; the others log warnings and errors only) and, with
# --log_dir, also written to DIR/process_<i>.log.
#
# SIGTERM or Ctrl-C to this script is forwarded to every process as SIGTERM: they checkpoint the
# same step and exit 75, like a preempted pod; rerun the same command to resume.
# Exit status: 0 when all processes succeed, else the first non-zero status in process order.
#
# Options (before the bigbatch flags; `--` separates them where needed):
#   --processes=N            number of processes (default 2)
#   --devices_per_process=D  emulated CPU devices per process (default 4)
#   --port=P                 coordinator port (default: a free port)
#   --log_dir=DIR            also write each process's output to DIR/process_<i>.log
#   --dry-run                print the commands instead of running them
#   --help                   print this and exit (after `--`, --help goes to bigbatch.main)
# Environment: PYTHON (default python3).
# Works with bash 3.2 (macOS) and later.
set -euo pipefail

processes=2
devices=4
port=''
log_dir=''
dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes=*) processes="${1#*=}" ;;
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    --help|-h)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
python="${PYTHON:-python3}"

for value in "$processes" "$devices"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: --processes and --devices_per_process must be positive integers" >&2
    exit 1
  fi
done
if [[ -z "$port" ]]; then
  if [[ $dry_run -eq 1 ]]; then
    port=PORT  # the real run asks the OS for a free one
  else
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
  fi
fi

# Our device count replaces any in XLA_FLAGS (tests set 8 for their own process); other XLA
# flags pass through.
xla_flags=''
for flag in ${XLA_FLAGS:-}; do
  case "$flag" in --xla_force_host_platform_device_count=*) ;; *) xla_flags+="$flag " ;; esac
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

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

command_of() {  # the command of process $1, one word per line
  printf '%s\n' "$python" -m bigbatch.main "--coordinator_address=127.0.0.1:$port" \
      "--num_processes=$processes" "--process_id=$1" ${args[@]+"${args[@]}"}
}

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    line="XLA_FLAGS=$(quote "$xla_flags") JAX_PLATFORMS=cpu"
    while IFS= read -r word; do line+=" $(quote "$word")"; done < <(command_of "$i")
    echo "$line"
  done
  exit 0
fi

state_dir="$(mktemp -d "${TMPDIR:-/tmp}/bigbatch-local.XXXXXX")"
trap 'rm -rf "$state_dir"' EXIT
if [[ -n "$log_dir" ]]; then
  mkdir -p "$log_dir"
fi

# Forwards a stop to the trainers (not to the output filters, so the last lines still arrive).
stop_all() {
  for ((i = 0; i < processes; i++)); do
    if [[ -f "$state_dir/pid.$i" ]]; then
      kill -TERM "$(cat "$state_dir/pid.$i")" 2>/dev/null || true
    fi
  done
}
trap stop_all TERM INT

jobs_=()
for ((i = 0; i < processes; i++)); do
  log="${log_dir:+$log_dir/process_$i.log}"
  words=()
  while IFS= read -r word; do words+=("$word"); done < <(command_of "$i")
  # The group records the trainer's pid (for stop_all) and its exact exit status; the filter
  # prefixes each line and copies it to the log file. Both outlive a SIGTERM sent to the whole
  # process group (the trainer gets it too), so the trainer's last lines still arrive.
  {
    trap ':' TERM
    XLA_FLAGS="$xla_flags" JAX_PLATFORMS=cpu "${words[@]}" &
    pid=$!
    echo "$pid" > "$state_dir/pid.$i"
    status=0
    while :; do
      if wait "$pid"; then status=0; else status=$?; fi
      kill -0 "$pid" 2>/dev/null || break
    done
    echo "$status" > "$state_dir/status.$i"
  } 2>&1 | (trap '' TERM; exec awk -v prefix="[$i] " -v out="$log" \
      '{ print prefix $0; fflush(); if (out != "") { print $0 >> out; fflush(out) } }') &
  jobs_+=($!)
done

for job in "${jobs_[@]}"; do
  # A trapped signal interrupts `wait`; wait again until the pipeline has really finished.
  while :; do
    wait "$job" && break
    kill -0 "$job" 2>/dev/null || break
  done
done

result=0
for ((i = 0; i < processes; i++)); do
  status="$(cat "$state_dir/status.$i" 2>/dev/null || echo 1)"
  if [[ $status -ne 0 ]]; then
    echo "local.sh: process $i exited with status $status" >&2
    [[ $result -ne 0 ]] || result=$status
  fi
done
exit "$result"
