"""Which backends were built, and what ``backend="auto"`` resolves to.

| name | where | built |
|---|---|---|
| ``native`` | torch_nerva's OpenMP CSR kernels, CPU, float32/float64, int32/int64 indices | always |
| ``torch`` | pure ``torch.sparse`` (CSR matmul, ``sampled_addmm``): a comparator | always |
| ``mkl`` | Intel MKL sparse BLAS | not yet (planned) |
| ``cusparse`` | cuSPARSE on CUDA tensors | not yet (planned) |

``auto`` resolves per call from the input's device: ``native`` on CPU; on CUDA, ``cusparse``
when built, else ``torch``.
"""
from __future__ import annotations

from typing import List

import torch

from . import _build_info

NAMES = ("auto", "native", "torch", "mkl", "cusparse")

_HOW_TO_BUILD = {
    "mkl": "the MKL backend is not implemented in this version of torch_nerva",
    "cusparse": "the cuSPARSE backend is not implemented in this version of torch_nerva",
}


def available() -> List[str]:
    """Backends usable in this build (``"auto"`` not included)."""
    return list(_build_info.BACKENDS) + ["torch"]


def check(name: str) -> str:
    """Validate a backend name at construction; unbuilt backends raise with how to get them."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name != "auto" and name not in available():
        raise RuntimeError(f"backend {name!r} is not available in this build "
                           f"(available: {available()}): {_HOW_TO_BUILD[name]}")
    return name


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend used for a tensor on ``device``."""
    if name == "auto":
        if device.type == "cpu":
            return "native"
        return "cusparse" if "cusparse" in available() else "torch"
    if name == "native" and device.type != "cpu":
        raise RuntimeError(f"backend 'native' runs on the CPU only, got a tensor on {device}")
    return name


def num_threads() -> int:
    """Threads the native kernels use: the ones ``torch.set_num_threads`` sets."""
    return torch.get_num_threads()
