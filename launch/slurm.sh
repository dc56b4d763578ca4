#!/usr/bin/env bash
# Train on a SLURM cluster of GPU nodes: one task per node, driving all of the node's GPUs.
#
#   sbatch --nodes=4 launch/slurm.sh configs/paper_large_ade_spl_samtone.gin \
#     --gin.MODEL_DIR="'/shared/runs/large'" ...
#
# Install on the nodes (or in a shared venv, named by PYTHON): pip install 'samtone[cuda]'
# (jax with CUDA 12; a plain install is CPU-only). MODEL_DIR must be on a shared file system.
# Runbook: docs/multi_host.md.
#
# Why one task per node: JAX's SLURM detection (distributed.auto=True) gives each process one
# GPU, [SLURM_LOCALID], unless told otherwise, and --gpus-per-task binds each task to a GPU that
# it sees as device 0, which that default then misses (jax-ml/jax#16788, #28194). One process
# per node with local_device_ids = all of its GPUs keeps a model-parallel axis (MODEL_PARALLEL
# up to 8) inside a node's NVLink and has one input pipeline per host, as on TPU pods. Each
# process checks that it sees the SAMTONE_EXPECTED_LOCAL_DEVICES GPUs given here (exit 2 if not).
#
# Preemption: SLURM sends SIGTERM 120 s before the time limit (--signal); training writes a
# checkpoint and exits 143, and this script requeues the job, which resumes from it (SLURM's
# MaxBatchRequeue caps the requeues). A failed node is requeued by SLURM itself (--requeue).
#
#SBATCH --job-name=samtone
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
set -euo pipefail
config=${1:?usage: sbatch $0 CONFIG.gin [--gin.NAME=VALUE ...]}
shift

gpus=${SLURM_GPUS_ON_NODE:-}
if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
  gpus=${SLURM_GPUS_PER_NODE##*:}  # it may carry a type: "a100:8"
fi
if [[ ! $gpus =~ ^[1-9][0-9]*$ ]]; then
  echo "slurm.sh: the job has no GPUs on this node (SLURM_GPUS_ON_NODE='$gpus'): ask for them" \
    "with sbatch --gpus-per-node=N" >&2
  exit 2
fi
export SAMTONE_EXPECTED_LOCAL_DEVICES=$gpus
device_ids=$(seq -s, 0 $((gpus - 1)))

export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

status=0
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "${PYTHON:-python}" -m samtone.cli.train --gin_file="$config" --gin.distributed.auto=True \
  --gin.distributed.local_device_ids="[$device_ids]" "$@" || status=$?
if ((status == 143)); then
  echo "slurm.sh: preempted (exit 143) after a checkpoint; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
