#!/usr/bin/env bash
# The H200 run of the GPU check (see bench/gpu_check.py): needs a token store prepared beforehand on a CPU machine
#   tst data prepare --no-ray data.source=outputs/gpu_check/corpus data.tokenizer=gpt2 data.store=outputs/gpu_check/stores
# and TST_STORE set to the store folder it prints. Extra arguments pass through (e.g. --only correctness,kernels).
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" bench/gpu_check.py \
  --data "${TST_STORE:?set TST_STORE to the token store folder printed by tst data prepare}" \
  --out "${TST_GPU_OUT:-outputs/gpu_check/h200}" "$@"
