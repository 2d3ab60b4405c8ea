"""Which backends were built, and what ``backend="auto"`` resolves to.

| name | where | built |
|---|---|---|
| ``native`` | torch_nerva's OpenMP CSR kernels, CPU, float32/float64 and bfloat16/float16 (float32 accumulation), int32/int64 indices | always |
| ``mkl`` | Intel MKL sparse BLAS (the MKL inside torch), CPU, float32/float64: forward and input gradient; the weight gradient by the native SDDMM | when ``mkl_spblas.h`` is found at build time (``pip install mkl-include``) |
| ``cusparse`` | cuSPARSE (generic API) on CUDA tensors | when torch is a CUDA build and a toolkit with ``cusparse.h`` is found |
| ``torch`` | pure ``torch.sparse`` (CSR matmul, ``sampled_addmm``): a comparator | always |
| ``dense`` | CSR storage, dense compute: the weight is scattered into a dense matrix for one matmul, and its gradient gathered at the nonzeros | always |

``native``, ``mkl`` and ``cusparse`` are the ``backend`` argument of the ``sparse_linear`` op
(``torch.ops.torch_nerva.sparse_linear(..., backend)``): the device's kernel switches between
them in C++, and a backend that was not built raises there with the command that builds it
(:func:`torch_nerva.ops.how_to_build`). ``torch`` and ``dense`` are computed in Python
(:mod:`torch_nerva.functional`).

``auto`` is resolved once per layer, when its topology is set and when it moves to another
device (no timing at import or at run time), and the concrete choice is stored
(``layer.resolved_backend``): ``dense`` when :func:`prefer_dense` says the layer is dense
enough that one dense matmul beats the sparse kernels (see the constants below, calibrated by
measurement), otherwise ``native`` on CPU and, on CUDA, ``cusparse`` when built, else ``torch``.
One decision is left to the call, as it depends on the batch: a layer that ``auto`` computes
densely runs the native kernel on CPU batches of at most :data:`DENSE_MIN_BATCH` rows.
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


def _how_to_build(name: str) -> str:
    """How to build backend ``name``: the text the op's kernels raise with (csrc/backend.cpp)."""
    return torch.ops.torch_nerva._how_to_build(name)


def _mkl_usable() -> bool:
    """Built with MKL, and the MKL inside this torch exports the sparse BLAS it needs."""
    return bool(torch.ops.torch_nerva._mkl_available())


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
                           f"(available: {available()}): {_how_to_build(name)}")
    return name


def resolve(name: str, device: torch.device, dense: bool = False) -> str:
    """The concrete backend used for a tensor on ``device``; ``dense`` is the layer's
    :func:`prefer_dense`. A concrete ``name`` is checked against the device."""
    if name == "auto":
        if dense:
            return "dense"
        if device.type in ("cpu", "meta"):  # (meta: shapes only, through the op's fake kernel)
            return "native"
        return "cusparse" if "cusparse" in available() else "torch"
    if device.type == "meta":  # every backend's shapes are the op's fake kernel's
        return name
    if name in ("native", "mkl") and device.type != "cpu":
        raise RuntimeError(f"backend {name!r} runs on the CPU only, got a tensor on {device}")
    if name == "cusparse" and device.type != "cuda":
        raise RuntimeError(f"backend 'cusparse' runs on CUDA tensors only, got one on {device}")
    return name


def num_threads() -> int:
    """Threads the native kernels use: the ones ``torch.set_num_threads`` sets."""
    return torch.get_num_threads()
