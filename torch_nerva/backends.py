"""Which backends were built, and what ``backend="auto"`` resolves to.

| name | where | built |
|---|---|---|
| ``native`` | torch_nerva's OpenMP CSR kernels, CPU, float32/float64 and bfloat16/float16 (float32 accumulation), int32/int64 indices | always |
| ``torch`` | pure ``torch.sparse`` (CSR matmul, ``sampled_addmm``): a comparator | always |
| ``dense`` | CSR storage, dense compute: the weight is scattered into a dense matrix for one matmul, and its gradient gathered at the nonzeros | always |
| ``mkl`` | Intel MKL sparse BLAS | not yet (planned) |
| ``cusparse`` | cuSPARSE on CUDA tensors | not yet (planned) |

``auto`` is decided per layer when its topology is set (no timing at import or at run time):
``dense`` when :func:`prefer_dense` says the layer is dense enough that one dense matmul beats
the sparse kernels (see the constants below, calibrated by measurement),
otherwise ``native`` on CPU and, on CUDA, ``cusparse`` when built, else ``torch``.
"""
from __future__ import annotations

from typing import List

import torch

from . import _build_info

NAMES = ("auto", "native", "torch", "dense", "mkl", "cusparse")

#: ``auto`` computes densely from this density on (the measured native/dense crossover was
#: 0.27-0.35 for layers of 131k to 3.1M weights at batch 100 on 2 cores) ...
DENSE_DENSITY = 0.3
#: ... or, for layers of fewer than SMALL_SIZE weights (crossover 0.45-0.7: per-call costs
#: weigh more there), from this density on.
SMALL_SIZE = 1 << 17
DENSE_DENSITY_SMALL = 0.5
#: Batches of at most this many rows use ``native`` under ``auto`` on CPU (batch-1 inference):
#: the sparse kernel does ~nnz work, the dense path a scatter of in x out. Full layouts (density
#: 1) stay dense: their values are the dense weight already.
DENSE_MIN_BATCH = 4

_HOW_TO_BUILD = {
    "mkl": ("it is built when MKL's headers are present at build time and uses the MKL inside "
            "torch: pip install mkl-include, then rebuild with "
            "pip install --no-build-isolation -e . (TORCH_NERVA_MKL=1 makes a missing header "
            "an error)"),
    "cusparse": ("it is built when torch is a CUDA build and a CUDA toolkit with cusparse.h is "
                 "found (CUDA_HOME, default /usr/local/cuda; pip torch's nvidia wheels provide "
                 "cusparse.h): rebuild with pip install --no-build-isolation -e . "
                 "(TORCH_NERVA_CUDA=1 makes a missing toolkit an error)"),
}


def _mkl_usable() -> bool:
    """Built with MKL, and the MKL inside this torch exports the sparse BLAS it needs."""
    return "mkl" in _build_info.BACKENDS and bool(torch.ops.torch_nerva._mkl_available())


def available() -> List[str]:
    """Backends usable in this build (``"auto"`` not included)."""
    built = [b for b in _build_info.BACKENDS if b != "mkl" or _mkl_usable()]
    return built + ["torch", "dense"]


def prefer_dense(in_features: int, out_features: int, nnz: int) -> bool:
    """Whether ``auto`` computes this layer densely (see the module docstring)."""
    size = in_features * out_features
    threshold = DENSE_DENSITY_SMALL if size < SMALL_SIZE else DENSE_DENSITY
    return size > 0 and nnz >= threshold * size


def check(name: str) -> str:
    """Validate a backend name at construction; unbuilt backends raise with how to get them."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name != "auto" and name not in available():
        raise RuntimeError(f"backend {name!r} is not available in this build "
                           f"(available: {available()}): {_HOW_TO_BUILD[name]}")
    return name


def resolve(name: str, device: torch.device, dense: bool = False) -> str:
    """The concrete backend used for a tensor on ``device``; ``dense`` is the layer's
    :func:`prefer_dense`."""
    if name == "auto":
        if dense:
            return "dense"
        if device.type == "cpu":
            return "native"
        return "cusparse" if "cusparse" in available() else "torch"
    if name in ("native", "mkl") and device.type != "cpu":
        raise RuntimeError(f"backend {name!r} runs on the CPU only, got a tensor on {device}")
    if name == "cusparse" and device.type != "cuda":
        raise RuntimeError(f"backend 'cusparse' runs on CUDA tensors only, got one on {device}")
    return name


def num_threads() -> int:
    """Threads the native kernels use: the ones ``torch.set_num_threads`` sets."""
    return torch.get_num_threads()
