#!/usr/bin/env bash
# The H200 run of the GPU check (see bench/gpu_check.py): needs the packed corpus built beforehand on a CPU machine
#   python bench/gpu_check.py pack --source outputs/gpu_check/corpus --out outputs/gpu_check/packed.bin
# Extra arguments pass through (e.g. --only correctness,kernels, --max-minutes 4).
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" bench/gpu_check.py \
  --data "${TST_PACKED:-outputs/gpu_check/packed.bin}" --out "${TST_GPU_OUT:-outputs/gpu_check/h200}" "$@"
