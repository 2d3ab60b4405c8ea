#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (after the README's set-up): the cuSPARSE tests, DDP over
# nccl (needs two GPUs), then the layer benchmark on CUDA (masked twin, torch.sparse Function
# and torch_nerva's cusparse backend, forward+backward at the issue's layer shapes). Results in
# results/kernels_cuda/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, torch_nerva as tn; assert torch.cuda.is_available(), 'no GPU'; \
assert 'cusparse' in tn.backends.available(), 'built without cuSPARSE'"
python -m pytest -q tests/test_cuda.py
# DDP over nccl (needs two GPUs; skips otherwise)
python -m pytest -q tests/test_ecosystem.py -k "ddp and nccl" -rs
python benchmarks/kernels.py --config configs/kernels.toml --device cuda \
    --modes fwd_bwd forward infer1 --out results/kernels_cuda "$@"
