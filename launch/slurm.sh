#!/usr/bin/env bash
# Train on a SLURM cluster of GPU nodes: one task per host, all of a host's GPUs per task.
# JAX reads the job layout from SLURM (distributed.auto=True). MODEL_DIR must be on a shared
# file system. A preempted job exits with status 143 after a checkpoint; with --requeue SLURM
# starts it again and it resumes.
#
#   sbatch --nodes=4 launch/slurm.sh configs/paper_large_ade_spl_samtone.gin \
#     --gin.MODEL_DIR="'/shared/runs/large'" ...
#
#SBATCH --job-name=samtone
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -euo pipefail
config=${1:?usage: sbatch $0 CONFIG.gin [--gin.NAME=VALUE ...]}
shift

export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "${PYTHON:-python}" -m samtone.cli.train --gin_file="$config" --gin.distributed.auto=True "$@"
