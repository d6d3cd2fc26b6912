#!/usr/bin/env bash
# Everything that needs a GPU, in one go, most wanted first (about 5-10 minutes on one H100-class GPU): the
# throughput benchmark (DiT-XL/2- and MAR-B-sized, random weights; speedups, share of bf16 peak, ImageNet-1K
# projection), the determinism tolerance, the GPU-marked tests (the first CUDA-kernel test builds the
# extension: minutes), and torch.compile on the DiT-XL/2-sized model.
# Run from the repository root after `make test` has built .venv:   bash benchmarks/gpu_check.sh
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== throughput"; $PY benchmarks/throughput.py 2>&1 | tail -20
echo "== determinism"; $PY benchmarks/gpu_determinism.py 2>&1 | tail -8
echo "== GPU tests"; $PY -m pytest -q -m gpu tests 2>&1 | tail -15
echo "== torch.compile (DiT-XL/2-sized)"; $PY benchmarks/throughput.py --models dit-xl --compile default 2>&1 | tail -4
