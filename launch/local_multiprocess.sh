#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N CPU processes joined over gloo, each with
# DEVICES fake CPU devices, exactly as N hosts would run (each reads its slice of the batch).
#
#   launch/local_multiprocess.sh 2 configs/smoke.gin --gin.MODEL_DIR="'/tmp/smoke_mp'"
set -euo pipefail
num_processes=${1:?usage: $0 NUM_PROCESSES CONFIG.gin [--gin.NAME=VALUE ...]}
config=${2:?usage: $0 NUM_PROCESSES CONFIG.gin [--gin.NAME=VALUE ...]}
shift 2
devices=${DEVICES:-2}
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  "${PYTHON:-python}" -m samtone.cli.train --gin_file="$config" \
    --gin.distributed.coordinator_address="'localhost:$port'" \
    --gin.distributed.num_processes="$num_processes" --gin.distributed.process_id="$i" \
    --gin.distributed.cpu_collectives="'gloo'" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
