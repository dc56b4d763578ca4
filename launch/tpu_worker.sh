#!/usr/bin/env bash
# One TPU VM worker's side of launch/tpu_pod.sh, which starts it detached (setsid nohup) on
# every worker: runs samtone-train, appending its output to LOG_DIR/worker-<N>.log, and runs
# it again after a preemption exit (143: checkpoint written) until it finishes (exit 0) or has
# been rerun MAX_RETRIES times. Any other exit status stops it: a rerun would fail the same way.
#
#   launch/tpu_worker.sh CONFIG.gin [--gin.NAME=VALUE ...]
#
# Environment: PYTHON (default ~/samtone/venv/bin/python, where tpu_pod.sh --setup installs),
# LOG_DIR (~/samtone/logs), MAX_RETRIES (20), RETRY_DELAY seconds (10), WORKER_ID (default the
# TPU VM's worker number from the metadata server), SAMTONE_EXPECTED_LOCAL_DEVICES (default:
# the TPU chips this host has; samtone-train exits 2 if JAX sees another number).
# SIGTERM (tpu_pod.sh --stop) ends training with a checkpoint and no rerun; SIGHUP is ignored
# here (samtone-train itself checkpoints and exits 143 on one, and is rerun).
set -uo pipefail
config=${1:?usage: $0 CONFIG.gin [--gin.NAME=VALUE ...]}
shift
python=${PYTHON:-$HOME/samtone/venv/bin/python}
log_dir=${LOG_DIR:-$HOME/samtone/logs}
max_retries=${MAX_RETRIES:-20}
retry_delay=${RETRY_DELAY:-10}
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes

tpu_metadata() {
  curl -sf --max-time 10 -H Metadata-Flavor:Google "$metadata/$1"
}

# JAX devices of this host: one per chip, two per chip on v2 and v3 (a device per TensorCore).
tpu_local_devices() {
  local chips
  chips=$(find /dev -maxdepth 2 \( -path '/dev/accel[0-9]*' -o -path '/dev/vfio/[0-9]*' \) \
    2>/dev/null | wc -l)
  ((chips > 0)) || return 1
  case $(tpu_metadata accelerator-type) in
    v2-* | v3-*) echo $((2 * chips)) ;;
    *) echo "$chips" ;;
  esac
}

worker=${WORKER_ID:-$(tpu_metadata agent-worker-number || hostname)}
mkdir -p "$log_dir"
log="$log_dir/worker-$worker.log"
pid_file="$log_dir/worker-$worker.pid"
if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "tpu_worker: worker $worker is already training (pid $(cat "$pid_file"))" >>"$log"
  exit 1
fi
echo $$ >"$pid_file"
trap 'rm -f "$pid_file"' EXIT
if [[ -z ${SAMTONE_EXPECTED_LOCAL_DEVICES:-} ]] && devices=$(tpu_local_devices); then
  export SAMTONE_EXPECTED_LOCAL_DEVICES=$devices
fi

note() { echo "tpu_worker: $(date -u '+%F %T') worker $worker: $*" >>"$log"; }
stop_requested=0
trap 'stop_requested=1' TERM  # runs once the training process has exited
trap '' HUP

for ((attempt = 1; ; attempt++)); do
  note "attempt $attempt:$(printf ' %q' "$python" -m samtone.cli.train --gin_file="$config" "$@")"
  status=0
  "$python" -m samtone.cli.train --gin_file="$config" "$@" >>"$log" 2>&1 </dev/null || status=$?
  if ((status == 0)); then
    note "finished (exit 0)"
    exit 0
  elif ((status != 143)); then
    note "stopped: exit $status is not a preemption, a rerun would fail the same way"
    exit "$status"
  elif ((stop_requested)); then
    note "stopped on request after a checkpoint (exit 143); the same command resumes"
    exit 143
  elif ((attempt > max_retries)); then
    note "gave up: preempted (exit 143) $attempt times, MAX_RETRIES=$max_retries"
    exit 143
  fi
  note "preempted (exit 143) after a checkpoint; rerunning in ${retry_delay}s to resume"
  sleep "$retry_delay" &
  wait $! || true
  if ((stop_requested)); then
    note "stopped on request; the same command resumes"
    exit 143
  fi
done
