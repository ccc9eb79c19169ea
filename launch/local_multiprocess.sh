#!/usr/bin/env bash
# Several medbench_jax processes on this machine, joined over 127.0.0.1 by
# jax.distributed (gloo collectives between CPU processes): multi-host code paths
# without a cluster.
#
#   launch/local_multiprocess.sh [--processes=2] [--devices=2] [--port=PORT] \
#       [--logs=DIR] -- MAIN_FLAGS...
#   e.g. launch/local_multiprocess.sh -- --config=configs/swin.py --workdir=/tmp/mp
#
# Each process runs on the CPU (JAX_PLATFORMS=cpu: on a GPU or TPU host every process
# would otherwise claim every accelerator) with --devices simulated CPU devices
# (XLA_FLAGS), and writes its output to DIR/process_K.log (default: a new temporary
# folder, printed); a failed process's last lines are shown. Ctrl-C or SIGTERM to this
# script makes every process save its state at the same step and exit with 75. Exit
# status: 0 when every process succeeded, else the first failure's (75: preempted,
# rerun the same command to resume).
#
# --dry_run (or DRY_RUN=1) prints the commands instead of running them.
set -euo pipefail

# medbench_jax.main's status after saving its state on SIGTERM or SIGINT (rerun to resume).
readonly EXIT_PREEMPTED=75

usage() {
  sed -n '/^#!/d; /^#/!q; s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
  echo "local_multiprocess.sh: $*" >&2
  echo "Run 'launch/local_multiprocess.sh --help' for usage." >&2
  exit 2
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

processes=2
devices=2
port=""
logs=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --processes=*) processes="${1#*=}" ;;
    --devices=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --logs=*) logs="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (medbench_jax.main's flags go after --)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "give medbench_jax.main's flags after --"
[[ "${processes}" =~ ^[1-9][0-9]*$ ]] || die "--processes=${processes} must be a positive integer"
[[ "${devices}" =~ ^[1-9][0-9]*$ ]] || die "--devices=${devices} must be a positive integer"
port="${port:-$(free_port)}"
[[ "${port}" =~ ^[0-9]+$ ]] || die "--port=${port} must be a number"

if [[ -n "${DRY_RUN:-}" ]]; then
  for ((i = 0; i < processes; i++)); do
    printf 'JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=%s ' "${devices}"
    printf '%q ' python3 -m medbench_jax.main "$@" --coordinator_address="127.0.0.1:${port}" \
      --num_processes="${processes}" --process_id="${i}"
    printf '\n'
  done
  exit 0
fi

logs="${logs:-$(mktemp -d -t medbench_mp.XXXXXX)}"
mkdir -p "${logs}"
echo "Logs: ${logs}/process_K.log"
pids=()
for ((i = 0; i < processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    PYTHONUNBUFFERED=1 python3 -m medbench_jax.main "$@" --coordinator_address="127.0.0.1:${port}" \
    --num_processes="${processes}" --process_id="${i}" > "${logs}/process_${i}.log" 2>&1 &
  pids+=("$!")
done
# Ctrl-C or SIGTERM reaches every process: they agree on a step, save their state there
# and exit with EXIT_PREEMPTED.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM

first_failure=0
for i in "${!pids[@]}"; do
  while true; do
    status=0
    wait "${pids[$i]}" || status=$?
    # A trapped signal interrupts `wait` while the process still runs: wait again.
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if [[ "${status}" -eq "${EXIT_PREEMPTED}" ]]; then
    echo "process ${i} was preempted with its state saved (status ${status}): rerun the" \
      "same command to resume." >&2
    [[ "${first_failure}" -ne 0 ]] || first_failure="${status}"
  elif [[ "${status}" -ne 0 ]]; then
    echo "process ${i} exited with status ${status}; last lines of ${logs}/process_${i}.log:" >&2
    tail -n 20 "${logs}/process_${i}.log" >&2
    [[ "${first_failure}" -ne 0 ]] || first_failure="${status}"
  fi
done
exit "${first_failure}"
