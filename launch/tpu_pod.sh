#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice, one process per worker (host), over gcloud ssh.
#
#   export TPU_NAME=my-v4-128 ZONE=us-central2-b   # v4-128: 64 chips, 16 workers of 4 chips
#   launch/tpu_pod.sh --setup v0.1.0                # or --setup dist/samtone-0.1.0-py3-none-any.whl
#   launch/tpu_pod.sh configs/paper_xxl_ade_spl_samtone.gin \
#     --gin.MODEL_DIR="'gs://bucket/runs/xxl'" ...
#   launch/tpu_pod.sh --status | --logs [WORKER] | --stop
#
#   --setup REF_OR_WHEEL  on every worker: pip install 'samtone[tpu,gcs]' (jax with libtpu, and
#                         gs:// paths) into ~/samtone/venv, from a git ref of REPO_URL (default
#                         this checkout's origin) or a local wheel; copies launch/tpu_worker.sh.
#   CONFIG [FLAGS]        starts training detached (setsid nohup) on every worker, so a dropped
#                         ssh session leaves it running: launch/tpu_worker.sh logs to
#                         ~/samtone/logs/worker-<N>.log and reruns it after a preemption (143).
#   --status              per worker: training or not, and the log's last line.
#   --logs [WORKER]       follows a worker's log (default 0: the one with the progress lines).
#   --stop                every worker writes a checkpoint and stops; CONFIG [FLAGS] resumes.
#
# Environment: TPU_NAME and ZONE (required), PROJECT, REPO_URL; passed on to the workers:
# PYTHON (their Python, default ~/samtone/venv/bin/python), MAX_RETRIES, RETRY_DELAY,
# SAMTONE_EXPECTED_LOCAL_DEVICES (default: the chips of a worker). JAX finds the other workers
# itself (distributed.auto=True); MODEL_DIR must be a gs:// bucket all of them see.
# Runbook: docs/multi_host.md.
set -euo pipefail
usage="usage: $0 --setup REF_OR_WHEEL | CONFIG.gin [--gin.NAME=VALUE ...] | --status |
  --logs [WORKER] | --stop   (with TPU_NAME and ZONE set)"
(($#)) || { echo "$usage" >&2; exit 2; }
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
gcloud_flags=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then gcloud_flags+=(--project="$PROJECT"); fi

# One word for a POSIX shell, whatever it holds: the workers' login shell reads the commands.
shell_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# on_workers WORKERS SCRIPT [ARG ...]: runs SCRIPT with bash in the home folder of the workers
# (all, or one index), with ARGs as "$@"; PREFIX, if set, goes before it (VAR=value ...).
on_workers() {
  local workers=$1 command arg
  command="${PREFIX:-}bash -c $(shell_quote "cd && $2") tpu_pod"
  shift 2
  for arg in "$@"; do command+=" $(shell_quote "$arg")"; done
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker="$workers" \
    --command="$command"
}

setup() {
  local source=$1 spec files=("$here/tpu_worker.sh")
  if [[ $source == *.whl ]]; then
    [[ -f $source ]] || { echo "tpu_pod.sh: no wheel at $source" >&2; exit 2; }
    files+=("$source")
    spec="samtone/$(basename "$source")[tpu,gcs]"
  else
    local url=${REPO_URL:-$(git -C "$here" remote get-url origin 2>/dev/null || true)}
    [[ -n $url ]] || { echo "tpu_pod.sh: set REPO_URL, the git URL to install from" >&2; exit 2; }
    spec="samtone[tpu,gcs] @ git+$url@$source"
  fi
  on_workers all 'mkdir -p samtone/logs'
  gcloud compute tpus tpu-vm scp "${files[@]}" "$TPU_NAME:samtone/" "${gcloud_flags[@]}" \
    --worker=all
  on_workers all '
    set -e
    if [ -n "$1" ]; then python=$1; else
      [ -x samtone/venv/bin/python ] || python3 -m venv samtone/venv
      python=samtone/venv/bin/python
    fi
    "$python" -m pip install --upgrade "$2"
    echo "$(hostname): installed $2 for $python"' "${PYTHON:-}" "$spec"
}

start() {
  local name prefix=""
  for name in PYTHON MAX_RETRIES RETRY_DELAY SAMTONE_EXPECTED_LOCAL_DEVICES; do
    if [[ -n ${!name:-} ]]; then prefix+="$name=$(shell_quote "${!name}") "; fi
  done
  PREFIX=$prefix on_workers all '
    if [ ! -f samtone/tpu_worker.sh ]; then
      echo "$(hostname): no ~/samtone/tpu_worker.sh: run launch/tpu_pod.sh --setup first" >&2
      exit 2
    fi
    for pid_file in samtone/logs/worker-*.pid; do
      if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "$(hostname): already training (pid $(cat "$pid_file")); --stop it first" >&2
        exit 1
      fi
    done
    setsid nohup bash samtone/tpu_worker.sh "$@" </dev/null >/dev/null 2>&1 &
    echo "$(hostname): training in the background, log in ~/samtone/logs"' \
    "$@"
}

case $1 in
  --setup)
    (($# == 2)) || { echo "$usage" >&2; exit 2; }
    setup "$2" ;;
  --status)
    on_workers all '
      found=0
      for log in samtone/logs/worker-*.log; do
        [ -f "$log" ] || continue
        found=1
        pid_file=${log%.log}.pid
        if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
          state="training (pid $(cat "$pid_file"))"
        else
          state="not running"
        fi
        echo "$(hostname) $log: $state; last line: $(tail -n 1 "$log")"
      done
      [ "$found" = 1 ] || echo "$(hostname): no run started"' ;;
  --logs)
    worker=${2:-0}
    on_workers "$worker" 'tail -n 100 -F "samtone/logs/worker-$1.log"' "$worker" ;;
  --stop)
    on_workers all '
      stopping=0
      for pid_file in samtone/logs/worker-*.pid; do
        [ -f "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        if kill -TERM -- "-$pid" 2>/dev/null; then
          stopping=1
          echo "$(hostname): stopping pid $pid: a checkpoint, then exit"
        fi
      done
      [ "$stopping" = 1 ] || echo "$(hostname): not training"' ;;
  -*)
    echo "$usage" >&2
    exit 2 ;;
  *)
    config=$1
    shift
    start "$config" --gin.distributed.auto=True "$@" ;;
esac
