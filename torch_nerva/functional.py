"""``sparse_linear``: the functional form of :class:`torch_nerva.SparseLinear`.

``y = x W^T + bias`` for a CSR weight W (out x in) given by ``values`` (nnz, trainable) and the
topology ``crow, col`` (and its cached transpose ``crow_t, col_t, perm``). ``x`` may have any
leading dimensions, like ``torch.nn.functional.linear``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends, ops
from .layout import CSRLayout, csr_tensor

_ops = torch.ops.torch_nerva


#: Value types stored in 16 bits and accumulated in float32 by the native and cusparse backends.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes a linear layer on ``x`` in, or None when no autocast
    region is active for x's device type or autocast leaves x alone (float64, as for
    ``aten::linear``)."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not x.is_floating_point() \
            or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _check_input(x: Tensor, values: Tensor, bias: Optional[Tensor], in_features: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"sparse_linear: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"sparse_linear: expected input of shape (*, in_features={in_features}), "
                         f"got {tuple(x.shape)}")
    # Under torch.autocast the op casts x, values and bias to the region's dtype (csrc/
    # autocast.cpp; the dense backend through F.linear), as nn.Linear does: different floating
    # dtypes are expected there (e.g. a bfloat16 activation into float32 values).
    if x.dtype != values.dtype and not (_autocast_dtype(x) is not None
                                        and values.dtype != torch.float64
                                        and values.is_floating_point()):
        raise TypeError(f"sparse_linear: input dtype {x.dtype} does not match the layer's dtype "
                        f"{values.dtype}; cast the input or the layer (layer.to(dtype))")
    if x.device != values.device:
        raise ValueError(f"sparse_linear: input is on {x.device} but the layer is on "
                         f"{values.device}; move one of them")
    if bias is not None and (bias.dtype != values.dtype or bias.device != values.device):
        raise TypeError(f"sparse_linear: bias ({bias.dtype}, {bias.device}) does not match values "
                        f"({values.dtype}, {values.device})")


def sparse_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], crow: Tensor, col: Tensor,
                  crow_t: Tensor, col_t: Tensor, perm: Tensor, *, backend: str = "auto",
                  dense: bool = False, positions: Optional[Tensor] = None) -> Tensor:
    """``backend="auto"`` resolves with ``dense`` (the layer's :func:`backends.prefer_dense`);
    ``positions`` (flat row-major, int64) saves the dense path recomputing them."""
    in_features = crow_t.shape[0] - 1
    out_features = crow.shape[0] - 1
    _check_input(x, values, bias, in_features)
    flat = x.dim() == 2
    x2 = x if flat else x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)  # (batch, in)
    if x.is_cpu and (backend == "native" or (backend == "auto" and not dense)):
        # the common case, without the general resolution below
        y = _ops.sparse_linear.default(x2, values, bias, crow, col, crow_t, col_t, perm)[0]
        return y if flat else y.reshape(*x.shape[:-1], out_features)
    which = backends.resolve(backend, x.device, dense)
    if which == "dense" and backend == "auto" and not isinstance(x2.shape[0], torch.SymInt) \
            and x2.shape[0] <= backends.DENSE_MIN_BATCH and x.device.type == "cpu" \
            and values.numel() < out_features * in_features:
        # A tiny batch costs the native kernel ~nnz work; the dense path a scatter of in x out
        # (a full layout is the dense weight already: no scatter, dense stays best). Not for a
        # symbolic batch (torch.export, dynamic shapes): the graph keeps the layer's choice
        # instead of being specialised to one side of the threshold.
        which = "native"
    if which == "dense":
        if positions is None or positions.numel() != values.numel():
            positions = CSRLayout(crow, col, (out_features, in_features)).positions()
        y = dense_linear(x2, values, bias, positions, out_features, in_features)
    elif which in ("native", "cusparse"):  # one op: CPU and CUDA kernels
        y = ops.sparse_linear(x2, values, bias, crow, col, crow_t, col_t, perm)
    elif which in ("torch", "mkl"):
        autocast = _autocast_dtype(x2)
        _check_library_dtype(which, autocast or x2.dtype, x2.device, autocast is not None)
        if autocast is not None:
            # as nn.Linear under autocast: inputs cast to the region's dtype (differentiable,
            # so a float32 values Parameter gets a float32 gradient), computed in that dtype
            x2, values = x2.to(autocast), values.to(autocast)
            bias = None if bias is None else bias.to(autocast)
        with torch.autocast(x2.device.type, enabled=False):
            if which == "torch":
                y = _TorchSparseLinear.apply(x2, values, bias, crow, col, crow_t, col_t, perm)
            else:
                y = _MklSparseLinear.apply(x2, values, bias, crow, col)
    else:  # pragma: no cover - backends.check refuses unbuilt names earlier
        raise RuntimeError(f"backend {which!r} is not available")
    return y if flat else y.reshape(*x.shape[:-1], out_features)


def _check_library_dtype(which: str, dtype: torch.dtype, device: torch.device,
                         autocast: bool) -> None:
    """The torch and mkl backends compute with torch.sparse and MKL, which have no bfloat16 or
    float16 sparse kernels on the CPU (MKL has none at all): refuse instead of computing
    something else than the layer's dtype (or autocast's) would."""
    if dtype in LOW_PRECISION and (which == "mkl" or device.type == "cpu"):
        where = "MKL's sparse BLAS" if which == "mkl" else f"torch.sparse on {device.type}"
        raise RuntimeError(
            f"sparse_linear: backend {which!r} cannot compute in {dtype}"
            + (" (the dtype of the active torch.autocast region)" if autocast else "")
            + f": {where} has no {dtype} kernels. Use backend='native' (bfloat16/float16 "
              "storage, float32 accumulation) or backend='dense'")


def dense_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], positions: Tensor,
                 out_features: int, in_features: int) -> Tensor:
    """The ``dense`` backend: scatter the values into a dense weight, one matmul. Autograd
    gives dvalues as the dense dY^T X gathered at the nonzeros. A full layout is already the
    row-major dense weight: no scatter."""
    if values.numel() == out_features * in_features:
        return torch.nn.functional.linear(x, values.view(out_features, in_features), bias)
    w = values.new_zeros(out_features * in_features).scatter(0, positions, values)
    return torch.nn.functional.linear(x, w.view(out_features, in_features), bias)


def dense_nonfinite(y: Tensor, x: Tensor, crow: Tensor, col: Tensor, n_cols: int) -> Tensor:
    """Dense math's NaN/Inf semantics for ``y = x W^T`` computed by a sparse product that skips
    absent weights (see csrc/nonfinite.h, the native kernels' version): ``y[b, r]`` is nan where
    row b of x holds a non-finite entry in a column that row r of W is not connected to (0 x inf
    = nan in dense math). Costs one isfinite pass; a count SpMM only when x is not all finite."""
    bad = ~torch.isfinite(x)
    if not torch.compiler.is_compiling() and not bool(bad.any()):
        return y  # (a compiled graph takes no data-dependent branch: it always applies the rule)
    # exact integer counts: float32 (or float64), never a 16-bit type (see csrc/nonfinite.h)
    count_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    indicator = bad.to(count_dtype)
    ones = torch.ones(col.numel(), dtype=count_dtype, device=x.device)
    if x.is_cpu:  # the native op: traceable by torch.compile, no torch.sparse tensor
        connected = _ops.csr_spmm.default(indicator, ones, crow, col, None, None)
    else:
        connected = (csr_tensor(crow, col, ones, (crow.shape[0] - 1, n_cols)) @ indicator.t()).t()
    return y.masked_fill(connected < indicator.sum(1, keepdim=True), float("nan"))


class _TorchSparseLinear(torch.autograd.Function):
    """The ``torch`` backend: what a user would write with ``torch.sparse`` alone.

    Forward and dX use CSR x dense products; dvalues uses ``torch.sparse.sampled_addmm``.
    A comparator for tests and benchmarks, not a fast path.
    """

    @staticmethod
    def forward(ctx, x, values, bias, crow, col, crow_t, col_t, perm):
        out_features, in_features = crow.shape[0] - 1, crow_t.shape[0] - 1
        w = csr_tensor(crow, col, values, (out_features, in_features))
        y = dense_nonfinite((w @ x.t()).t(), x, crow, col, in_features)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, values, crow, col, crow_t, col_t, perm)
        ctx.has_bias = bias is not None
        return y.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, values, crow, col, crow_t, col_t, perm = ctx.saved_tensors
        out_features, in_features = crow.shape[0] - 1, crow_t.shape[0] - 1
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            wt = csr_tensor(crow_t, col_t, values[perm.long()],
                                         (in_features, out_features))
            grad_x = dense_nonfinite((wt @ grad.t()).t(), grad, crow_t, col_t, out_features)
        if ctx.needs_input_grad[1]:
            pattern = csr_tensor(crow, col, torch.zeros_like(values),
                                              (out_features, in_features))
            if values.numel() == 0 or x.shape[0] == 0:
                grad_values = torch.zeros_like(values)
            else:
                grad_values = torch.sparse.sampled_addmm(
                    pattern, grad.t().contiguous(), x.contiguous(), beta=0.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_values, grad_bias, None, None, None, None, None


class _MklSparseLinear(torch.autograd.Function):
    """The ``mkl`` backend: forward and dX through the MKL inside torch (``mkl_spmm``, on the
    row-major tensors as they are), dvalues through our SDDMM (torch's MKL has none).

    MKL's LP64 interface takes int32 indices: an int64 layout is converted on every call (an
    O(nnz) copy; build layers with ``index_dtype=torch.int32``, the default when it fits)."""

    @staticmethod
    def forward(ctx, x, values, bias, crow, col):
        if crow.dtype != torch.int32:
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        in_features = x.shape[1]
        y = _ops.mkl_spmm.default(x, values, crow, col, in_features, False)
        y = dense_nonfinite(y, x, crow, col, in_features)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, values, crow, col)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, values, crow, col = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _ops.mkl_spmm.default(grad, values, crow, col, x.shape[1], True)
            crow_t, col_t, _ = _ops.csr_transpose.default(crow, col, x.shape[1])
            grad_x = dense_nonfinite(grad_x, grad, crow_t, col_t, crow.shape[0] - 1)
        if ctx.needs_input_grad[1]:
            grad_values = _ops.csr_sddmm.default(grad, x, crow, col)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_values, grad_bias, None, None
