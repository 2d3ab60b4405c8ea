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
    """``backend``: a concrete name (a layer passes the one it resolved when its topology was
    set) or ``"auto"``, resolved here with ``dense`` (the layer's
    :func:`backends.prefer_dense`); see :mod:`torch_nerva.backends`. ``native``, ``mkl`` and
    ``cusparse`` are one op call with that backend; ``dense`` and ``torch`` are computed here.
    ``positions`` (flat row-major, int64) saves the dense path recomputing them."""
    if _functorch_active():  # torch.func transform: Python autograd (below), ~40 ns to ask
        return _sparse_linear_func(x, values, bias, crow, col, crow_t, col_t, perm, backend,
                                   dense, positions)
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
    elif which in ("native", "mkl", "cusparse"):  # the op, its backend chosen in C++
        if which == "mkl":  # (the op raises too; this message also names an autocast region)
            autocast = _autocast_dtype(x2)
            _check_library_dtype(which, autocast or x2.dtype, x2.device, autocast is not None)
        y = _ops.sparse_linear.default(x2, values, bias, crow, col, crow_t, col_t, perm,
                                       which)[0]
    elif which == "torch":
        autocast = _autocast_dtype(x2)
        _check_library_dtype(which, autocast or x2.dtype, x2.device, autocast is not None)
        if autocast is not None:
            # as nn.Linear under autocast: inputs cast to the region's dtype (differentiable,
            # so a float32 values Parameter gets a float32 gradient), computed in that dtype
            x2, values = x2.to(autocast), values.to(autocast)
            bias = None if bias is None else bias.to(autocast)
        with torch.autocast(x2.device.type, enabled=False):
            y = _TorchSparseLinear.apply(x2, values, bias, crow, col, crow_t, col_t, perm)
    else:  # pragma: no cover - backends.check refuses unbuilt names earlier
        raise RuntimeError(f"backend {which!r} is not available")
    return y if flat else y.reshape(*x.shape[:-1], out_features)


def _check_library_dtype(which: str, dtype: torch.dtype, device: torch.device,
                         autocast: bool) -> None:
    """The torch and mkl backends compute with torch.sparse and MKL, which have no bfloat16 or
    float16 sparse kernels on the CPU (MKL has none at all): refuse instead of computing
    something else than the layer's dtype (or autocast's) would. (The op's mkl kernel refuses
    too; this message also names the autocast region.)"""
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


# ---------------------------------------------------------------------------------------------
# torch.func (grad, vjp, jacrev, vmap, jvp, jacfwd, hessian)
#
# The eager layer's autograd is a C++ autograd::Function (csrc/autograd.cpp), which functorch
# refuses. While a transform is active, sparse_linear computes through the two Python Functions
# below instead: y = x W^T + b with the SpMM op, dx = dy W with the SpMM op on the transposed
# layout, dvalues = SDDMM(dy, x) at W's nonzeros, dbias = sum_b dy, and forward-mode
# (jvp) rules. Each backward and jvp calls the two Functions again, so every order of
# differentiation works. Their vmap rules fold a vmapped input into the rows of one call; give
# per-sample value gradients of one-row samples by two row gathers (B x nnz work and memory);
# otherwise make one call on the block-diagonal layout of ops.block_diagonal_layout (samples of
# several rows; vmapped values or topologies: model ensembles). See docs/torch_func.md.

_functorch_active = torch._C._are_functorch_transforms_active


def _sparse_linear_func(x: Tensor, values: Tensor, bias: Optional[Tensor], crow: Tensor,
                        col: Tensor, crow_t: Tensor, col_t: Tensor, perm: Tensor, backend: str,
                        dense: bool, positions: Optional[Tensor]) -> Tensor:
    """``sparse_linear`` under a torch.func transform. ``auto`` computes sparsely whatever the
    layer's density (a per-sample gradient of the dense path would be B dense weights);
    ``dense`` is pure PyTorch and composes with every transform; ``torch`` and ``mkl`` raise."""
    in_features, out_features = crow_t.shape[0] - 1, crow.shape[0] - 1
    _check_input(x, values, bias, in_features)
    which = backends.resolve(backend, x.device, dense and backend != "auto")
    x2 = x if x.dim() == 2 else x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)
    if which == "dense":
        if positions is None or positions.shape[-1] != values.shape[-1]:
            positions = CSRLayout(crow, col, (out_features, in_features)).positions()
        y = dense_linear(x2, values, bias, positions, out_features, in_features)
    elif which in ("native", "cusparse"):  # the raw ops have CPU and CUDA kernels
        y = _CsrSpmm.apply(x2, values, bias, crow, col, crow_t, col_t, perm, False, 1)
    else:
        raise RuntimeError(
            f"sparse_linear: backend {which!r} does not support torch.func transforms (grad, "
            f"vjp, jacrev, vmap, jvp, ...); use backend='native' (or 'auto'), which computes "
            f"through torch.func-compatible autograd, or backend='dense'")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def _nonfinite_blocks(y: Tensor, x: Tensor, crow: Tensor, col: Tensor, blocks: int) -> Tensor:
    """:func:`dense_nonfinite` for ``y = x W^T`` where W is ``blocks`` equal diagonal blocks
    and x their inputs side by side: a non-finite input reaches only its own block's outputs."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return y
    indicator = bad.to(x.dtype)
    ones = torch.ones(col.numel(), dtype=x.dtype, device=x.device)
    connected = _ops.csr_spmm.default(indicator, ones, crow, col, None, None)
    total = indicator.view(x.shape[0], blocks, -1).sum(2, keepdim=True)
    missing = connected.view(x.shape[0], blocks, -1) < total
    return y.masked_fill(missing.view(y.shape), float("nan"))


def _transposed_layout(crow, col, crow_t, col_t, perm, n_cols):
    if crow_t is None:  # built lazily for block-diagonal layouts (only double backward needs it)
        crow_t, col_t, perm = _ops.csr_transpose.default(crow, col, n_cols)
    return crow_t, col_t, perm


class _CsrSpmm(torch.autograd.Function):
    """``y = x W^T + bias`` (or ``x W + bias`` when ``transposed``) for the CSR W of
    ``(crow, col)`` holding ``values`` in its own order; ``(crow_t, col_t, perm)`` is W^T's
    layout with ``values[perm]`` (None when not ``transposed``: computed if a backward needs it).
    ``blocks``: W is that many equal diagonal blocks (a vmapped call), for dense NaN/Inf
    semantics per block."""

    @staticmethod
    def forward(x, values, bias, crow, col, crow_t, col_t, perm, transposed, blocks):
        if transposed:
            y = _ops.csr_spmm.default(x, values, crow_t, col_t, perm, bias)
            return _nonfinite_blocks(y, x, crow_t, col_t, blocks)
        y = _ops.csr_spmm.default(x, values, crow, col, None, bias)
        return _nonfinite_blocks(y, x, crow, col, blocks)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, bias, crow, col, crow_t, col_t, perm, transposed, blocks = inputs
        ctx.save_for_backward(x, values, crow, col, crow_t, col_t, perm)
        ctx.save_for_forward(x, values, crow, col, crow_t, col_t, perm)
        ctx.transposed, ctx.blocks, ctx.has_bias = transposed, blocks, bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, values, crow, col, crow_t, col_t, perm = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if not ctx.transposed:
                crow_t, col_t, perm = _transposed_layout(crow, col, crow_t, col_t, perm,
                                                         x.shape[1])
            grad_x = _CsrSpmm.apply(grad, values, None, crow, col, crow_t, col_t, perm,
                                    not ctx.transposed, ctx.blocks)
        if ctx.needs_input_grad[1]:
            # W's value gradient is (dY^T X) at W's pattern; for y = x W it is (X^T dY) there
            g, a = (x, grad) if ctx.transposed else (grad, x)
            grad_values = _CsrSddmm.apply(g, a, crow, col, crow_t, col_t, perm, ctx.blocks)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_values, grad_bias, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dvalues, dbias, *_):
        x, values, crow, col, crow_t, col_t, perm = ctx.saved_tensors
        terms = []
        if dx is not None:
            terms.append(_CsrSpmm.apply(dx, values, None, crow, col, crow_t, col_t, perm,
                                        ctx.transposed, ctx.blocks))
        if dvalues is not None:
            terms.append(_CsrSpmm.apply(x, dvalues, None, crow, col, crow_t, col_t, perm,
                                        ctx.transposed, ctx.blocks))
        if dbias is not None:
            terms.append(dbias.expand(x.shape[0], dbias.shape[0]))
        if not terms:  # (functorch asks only when some tangent is given)
            return x.new_zeros(x.shape[0], (crow_t if ctx.transposed else crow).shape[0] - 1)
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out

    @staticmethod
    def vmap(info, in_dims, x, values, bias, crow, col, crow_t, col_t, perm, transposed, blocks):
        x_d, values_d, bias_d, crow_d, col_d, crow_t_d, col_t_d, perm_d = in_dims[:8]
        batch = info.batch_size
        n_rows = crow.shape[-1] - 1  # W is n_rows x n_cols
        n_cols = crow_t.shape[-1] - 1 if transposed else x.shape[-1]
        if all(d is None for d in (values_d, crow_d, col_d, crow_t_d, col_t_d, perm_d)):
            if x_d is None:  # only the bias is vmapped
                y = _CsrSpmm.apply(x, values, None, crow, col, crow_t, col_t, perm, transposed,
                                   blocks)
            else:  # fold the samples into the rows of one call
                xb = x.movedim(x_d, 0)
                y = _CsrSpmm.apply(xb.reshape(-1, xb.shape[-1]), values,
                                   bias if bias_d is None else None, crow, col, crow_t, col_t,
                                   perm, transposed, blocks)
                y = y.view(xb.shape[0], xb.shape[1], y.shape[-1])
            if bias_d is not None:
                y = y + ops.stacked(bias, bias_d, batch).unsqueeze(1)
            return y, 0
        crows = ops.stacked(crow, crow_d, batch) if crow_d is not None else crow
        cols = ops.stacked(col, col_d, batch) if col_d is not None else col
        crow_b, col_b, _ = ops.block_diagonal_layout(batch, crows, cols, n_cols)
        crow_tb = col_tb = perm_b = None
        if crow_t is not None:  # W^T's layout, values[perm] of each copy
            crow_tb, col_tb, perm_b = ops.block_diagonal_layout(
                batch, ops.stacked(crow_t, crow_t_d, batch) if crow_t_d is not None else crow_t,
                ops.stacked(col_t, col_t_d, batch) if col_t_d is not None else col_t, n_rows,
                ops.stacked(perm, perm_d, batch) if perm_d is not None else perm, col.shape[-1])
        values_b = ops.stacked(values, values_d, batch).reshape(-1)
        bias_b = None if bias is None else ops.stacked(bias, bias_d, batch).reshape(-1)
        y = _CsrSpmm.apply(ops.side_by_side(x, x_d, batch), values_b, bias_b, crow_b, col_b,
                           crow_tb, col_tb, perm_b, transposed, blocks * batch)
        return y.view(y.shape[0], batch, y.shape[1] // batch), 1


class _CsrSddmm(torch.autograd.Function):
    """``out[k] = sum_b g[b, row(k)] x[b, col(k)]`` at the nonzeros of the CSR ``(crow, col)``
    (W's value order); ``(crow_t, col_t, perm)`` as in :class:`_CsrSpmm`."""

    @staticmethod
    def forward(g, x, crow, col, crow_t, col_t, perm, blocks):
        return _ops.csr_sddmm.default(g, x, crow, col)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, crow, col, crow_t, col_t, perm, blocks = inputs
        ctx.save_for_backward(g, x, crow, col, crow_t, col_t, perm)
        ctx.save_for_forward(g, x, crow, col, crow_t, col_t, perm)
        ctx.blocks = blocks

    @staticmethod
    def backward(ctx, grad):
        g, x, crow, col, crow_t, col_t, perm = ctx.saved_tensors
        grad_g = grad_x = None
        # with D the CSR of `grad` on this layout: dg = x D^T, dx = g D
        if ctx.needs_input_grad[0]:
            grad_g = _CsrSpmm.apply(x, grad, None, crow, col, crow_t, col_t, perm, False,
                                    ctx.blocks)
        if ctx.needs_input_grad[1]:
            crow_t, col_t, perm = _transposed_layout(crow, col, crow_t, col_t, perm, x.shape[1])
            grad_x = _CsrSpmm.apply(g, grad, None, crow, col, crow_t, col_t, perm, True,
                                    ctx.blocks)
        return grad_g, grad_x, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dg, dx, *_):
        g, x, crow, col, crow_t, col_t, perm = ctx.saved_tensors
        out = None
        if dg is not None:
            out = _CsrSddmm.apply(dg, x, crow, col, crow_t, col_t, perm, ctx.blocks)
        if dx is not None:
            t = _CsrSddmm.apply(g, dx, crow, col, crow_t, col_t, perm, ctx.blocks)
            out = t if out is None else out + t
        return out if out is not None else x.new_zeros(col.shape[0])

    @staticmethod
    def vmap(info, in_dims, g, x, crow, col, crow_t, col_t, perm, blocks):
        g_d, x_d, crow_d, col_d = in_dims[:4]
        batch = info.batch_size
        if crow_d is None and col_d is None and ops.rows_per_sample(x, x_d) == 1:
            # (differentiable as it is: plain gathers and a product)
            return ops.sddmm_one_row_per_sample(g, g_d, x, x_d, crow, col), 1
        crows = ops.stacked(crow, crow_d, batch) if crow_d is not None else crow
        cols = ops.stacked(col, col_d, batch) if col_d is not None else col
        crow_b, col_b, _ = ops.block_diagonal_layout(batch, crows, cols, x.shape[-1])
        out = _CsrSddmm.apply(ops.side_by_side(g, g_d, batch), ops.side_by_side(x, x_d, batch),
                              crow_b, col_b, None, None, None, blocks * batch)
        return out.view(batch, col.shape[-1]), 0
