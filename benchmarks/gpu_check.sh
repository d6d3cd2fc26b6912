#!/usr/bin/env bash
# Everything that needs a GPU, most wanted first: the throughput benchmark (DiT-XL/2- and MAR-B-sized, random
# weights; speedups, share of bf16 peak, ImageNet-1K projection), the determinism tolerance, the GPU-marked tests
# (the first CUDA-kernel test builds the extension: minutes), and torch.compile on both models. Each stage is
# capped by `timeout` so one that hangs leaves the next its turn; name stages to run only those (two calls of
# about 5 minutes each on one H100-class GPU: `throughput determinism`, then `tests compile`).
# Run from the repository root after `make test` has built .venv:
#   bash benchmarks/gpu_check.sh [throughput] [determinism] [tests] [compile]
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
STAGES=${*:-throughput determinism tests compile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for stage in $STAGES; do
  echo "== $stage"
  case $stage in
    throughput)  timeout 300 $PY benchmarks/throughput.py 2>&1 | tail -20 ;;
    determinism) timeout 180 $PY benchmarks/gpu_determinism.py 2>&1 | tail -8 ;;
    tests)       timeout 300 $PY -m pytest -q -m gpu tests 2>&1 | tail -15 ;;
    compile)     # DiT: inductor; MAR: CUDA graphs too (its sampling makes diffloss_steps small head calls per step)
                 timeout 150 $PY benchmarks/throughput.py --models dit-xl --compile default 2>&1 | tail -4
                 timeout 240 $PY benchmarks/throughput.py --models mar-b --compile reduce-overhead 2>&1 | tail -4 ;;
    *) echo "unknown stage $stage: use throughput, determinism, tests or compile" >&2; exit 2 ;;
  esac
done
