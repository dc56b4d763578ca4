#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker (one process per host).
# JAX finds the other hosts itself (distributed.auto=True); each host reads its slice of every
# global batch; process 0 writes logs and summaries, orbax writes checkpoints from all hosts.
# MODEL_DIR must be storage every host sees (a gs:// bucket). A preempted slice exits with
# status 143 after a checkpoint: run this script again to resume.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh \
#     configs/paper_xxl_ade_spl_samtone.gin --gin.MODEL_DIR="'gs://bucket/runs/xxl'" ...
#
# Assumes samtone is installed on every worker (e.g. `pip install -e .` in REPO_DIR).
set -euo pipefail
config=${1:?usage: TPU_NAME=... ZONE=... $0 CONFIG.gin [--gin.NAME=VALUE ...]}
shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
repo_dir=${REPO_DIR:-'~/samtone'}  # expanded on the workers

args=$(printf ' %q' --gin_file="$config" --gin.distributed.auto=True "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all --command="cd $repo_dir && python3 -m samtone.cli.train$args"
