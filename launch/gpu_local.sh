#!/usr/bin/env bash
# Train on the GPUs of this machine (one process; all visible GPUs form the mesh).
#
#   launch/gpu_local.sh configs/paper_base_ade_spl_samtone.gin \
#     --gin.MODEL_DIR="'/runs/base'" --gin.TRAIN_DATA="'train.jsonl'" ...
#
# Pick GPUs with CUDA_VISIBLE_DEVICES. Extra arguments go to samtone-train unchanged.
# Needs the CUDA build of JAX: pip install 'samtone[cuda]' (a plain install is CPU-only).
set -euo pipefail
config=${1:?usage: $0 CONFIG.gin [--gin.NAME=VALUE ...]}
shift

# The latency-hiding scheduler overlaps gradient all-reduces with compute; Triton GEMM off
# keeps cuBLAS for the large matmuls; 90% of GPU memory goes to XLA's allocator.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

exec "${PYTHON:-python}" -m samtone.cli.train --gin_file="$config" "$@"
