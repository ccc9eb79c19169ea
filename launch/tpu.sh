#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for medbench_jax: create, set up, run, delete.
#
#   launch/tpu.sh create NAME --zone=ZONE --type=TYPE [--version=V] [--project=P] [--spot]
#   launch/tpu.sh setup  NAME --zone=ZONE [--project=P]
#   launch/tpu.sh train  NAME --zone=ZONE [--project=P] -- MAIN_FLAGS...
#   launch/tpu.sh run    NAME --zone=ZONE [--project=P] [--worker=W] -- COMMAND...
#   launch/tpu.sh delete NAME --zone=ZONE [--project=P]
#
# create  a TPU VM (--type=v4-8, v5litepod-8, ...) or pod slice (v4-32, ...); the
#         software version defaults to tpu-ubuntu2204-base.
# setup   copies this checkout's tracked files to ~/medbench_jax on every host and
#         installs requirements.txt and requirements-tpu.txt (jax[tpu] at the jax pin)
#         into ~/medbench_jax/.venv, a Python 3.11 environment made by uv (the images'
#         own Python, 3.10 on tpu-ubuntu2204-base, is too old for the pins): uv is
#         installed with the image's pip and downloads its own build of Python 3.11.
# train   runs `python3 -m medbench_jax.main MAIN_FLAGS --multiprocess` on every host at
#         once (gcloud ssh --worker=all), in the environment of setup; jax.distributed
#         finds the other hosts itself.
#         Put the workdir on a bucket every host can write, e.g.
#         --workdir=gs://BUCKET/workdirs/swinb_cxr14.
# run     runs any command in ~/medbench_jax, in the environment of setup, on every host,
#         or on host W alone with --worker=W (the sweep runner's --backend=tpu runs a
#         point per chip that way).
# delete  deletes the VM or slice.
#
# --dry_run (or DRY_RUN=1) prints the commands instead of running them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="medbench_jax"  # below each host's home directory
PYTHON_VERSION="3.11"  # what requirements.txt is pinned for
UV_VERSION="0.13.9"
# Every remote command runs in the checkout, in the environment setup made.
REMOTE_ENV="cd ${REMOTE_DIR} && . .venv/bin/activate"

usage() {
  sed -n '/^#!/d; /^#/!q; s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() {
  echo "tpu.sh: $*" >&2
  echo "Run 'launch/tpu.sh --help' for usage." >&2
  exit 2
}

# Runs a command, or prints it (shell-quoted) with --dry_run.
run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# A command line as one string for the remote shell, each word quoted.
quoted() {
  local out=""
  local word
  for word in "$@"; do
    out+="$(printf '%q' "${word}") "
  done
  printf '%s' "${out% }"
}

main() {
  if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
  fi
  local action="$1"
  shift
  case "${action}" in
    create|setup|train|run|delete) ;;
    *) die "unknown command '${action}'" ;;
  esac
  [[ $# -gt 0 && "$1" != -* ]] || die "${action}: the TPU name is missing"
  local name="$1"
  shift
  local zone="" project="" type="" version="tpu-ubuntu2204-base" spot="" worker="all"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --zone=*) zone="${1#*=}" ;;
      --project=*) project="${1#*=}" ;;
      --type=*) type="${1#*=}" ;;
      --version=*) version="${1#*=}" ;;
      --spot) spot="--spot" ;;
      --worker=*)
        [[ "${action}" == "run" ]] || die "${action}: unknown option '$1'"
        worker="${1#*=}"
        [[ "${worker}" =~ ^[0-9]+$ ]] || die "run: --worker=${worker} must be a host index"
        ;;
      --dry_run) DRY_RUN=1 ;;
      --) shift; break ;;
      *) die "${action}: unknown option '$1'" ;;
    esac
    shift
  done
  [[ -n "${zone}" ]] || die "${action}: --zone=ZONE is required"
  local where=("--zone=${zone}")
  [[ -z "${project}" ]] || where+=("--project=${project}")
  local vm=(gcloud compute tpus tpu-vm)

  case "${action}" in
    create)
      [[ -n "${type}" ]] || die "create: --type=TYPE is required (e.g. v4-8, v4-32)"
      local extra=()
      [[ -z "${spot}" ]] || extra+=("${spot}")
      run "${vm[@]}" create "${name}" "${where[@]}" --accelerator-type="${type}" \
        --version="${version}" "${extra[@]}"
      ;;
    setup)
      local archive="/tmp/medbench_jax_$$.tar.gz"
      run bash -c "cd $(quoted "${REPO}") && git ls-files -z | tar --null -T - -czf $(quoted "${archive}")"
      run "${vm[@]}" scp "${archive}" "${name}:${REMOTE_DIR}.tar.gz" "${where[@]}" --worker=all
      # The remote shell expands the ~.
      # shellcheck disable=SC2088
      local uv="~/.local/bin/uv"
      run "${vm[@]}" ssh "${name}" "${where[@]}" --worker=all --command="mkdir -p ${REMOTE_DIR} && tar -xzf ${REMOTE_DIR}.tar.gz -C ${REMOTE_DIR} && cd ${REMOTE_DIR} && python3 -m pip install -q --user uv==${UV_VERSION} && ${uv} venv -q --allow-existing --python ${PYTHON_VERSION} .venv && ${uv} pip install -q --python .venv/bin/python -r requirements.txt -r requirements-tpu.txt && .venv/bin/python -c 'import jax; print(jax.devices())'"
      run rm -f "${archive}"
      ;;
    train)
      [[ $# -gt 0 ]] || die "train: give medbench_jax.main's flags after --"
      run "${vm[@]}" ssh "${name}" "${where[@]}" --worker=all \
        --command="${REMOTE_ENV} && $(quoted python3 -m medbench_jax.main "$@" --multiprocess)"
      ;;
    run)
      [[ $# -gt 0 ]] || die "run: give the command after --"
      run "${vm[@]}" ssh "${name}" "${where[@]}" --worker="${worker}" \
        --command="${REMOTE_ENV} && $(quoted "$@")"
      ;;
    delete)
      run "${vm[@]}" delete "${name}" "${where[@]}" --quiet
      ;;
  esac
}

main "$@"
