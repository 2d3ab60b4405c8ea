"""Typed wrappers over ``torch.ops.torch_nerva``, their fake kernels and autograd.

The ops (schemas in ``csrc/torch_nerva.cpp``):

- ``csr_spmm(x, values, crow, col, perm=None, bias=None)``: ``Y = X W^T (+ bias)`` for a CSR
  ``W`` of shape ``(len(crow) - 1) x x.shape[1]``; with ``perm`` the value of nonzero ``k`` is
  ``values[perm[k]]`` (the transposed layout reads the forward values in place).
- ``csr_sddmm(grad_out, x, crow, col)``: ``dvalues[k] = sum_b grad_out[b, row(k)] x[b, col(k)]``,
  the weight gradient at W's nonzeros only.
- ``csr_transpose(crow, col, n_cols)``: CSR of ``W^T`` and ``perm`` with ``values_t = values[perm]``.
- ``sparse_linear(x, values, bias, crow, col, crow_t, col_t, perm)``: the differentiable layer.
  Its backward calls only the ops above and computes only the gradients autograd asks for.
  Double backward is not supported.
- ``csr_check(crow, col, n_rows, n_cols)``: full O(nnz) validation with a clear error.

The kernels check every index they read (a malformed layout raises, it is never read out of
bounds); sortedness and duplicates are checked by ``csr_check`` when a layout is built.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_ops = torch.ops.torch_nerva


def csr_spmm(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, perm: Optional[Tensor] = None,
             bias: Optional[Tensor] = None) -> Tensor:
    return _ops.csr_spmm(x, values, crow, col, perm, bias)


def csr_sddmm(grad_out: Tensor, x: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    return _ops.csr_sddmm(grad_out, x, crow, col)


def csr_transpose(crow: Tensor, col: Tensor, n_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _ops.csr_transpose(crow, col, n_cols)


def csr_check(crow: Tensor, col: Tensor, n_rows: int, n_cols: int) -> None:
    _ops.csr_check(crow, col, n_rows, n_cols)


def sparse_linear(x: Tensor, values: Tensor, bias: Optional[Tensor], crow: Tensor, col: Tensor,
                  crow_t: Tensor, col_t: Tensor, perm: Tensor) -> Tensor:
    return _ops.sparse_linear(x, values, bias, crow, col, crow_t, col_t, perm)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, never data; fresh contiguous outputs.

@torch.library.register_fake("torch_nerva::csr_spmm")
def _csr_spmm_fake(x, values, crow, col, perm=None, bias=None):
    torch._check(x.dim() == 2, lambda: f"csr_spmm: x must be 2-D, got {x.dim()}-D")
    torch._check(values.dtype == x.dtype, lambda: "csr_spmm: values and x dtypes differ")
    return x.new_empty((x.shape[0], crow.shape[0] - 1))


@torch.library.register_fake("torch_nerva::csr_sddmm")
def _csr_sddmm_fake(grad_out, x, crow, col):
    torch._check(grad_out.dim() == 2 and x.dim() == 2, lambda: "csr_sddmm: inputs must be 2-D")
    return x.new_empty((col.shape[0],))


@torch.library.register_fake("torch_nerva::csr_transpose")
def _csr_transpose_fake(crow, col, n_cols):
    return crow.new_empty((n_cols + 1,)), col.new_empty(col.shape), col.new_empty(col.shape)


@torch.library.register_fake("torch_nerva::csr_check")
def _csr_check_fake(crow, col, n_rows, n_cols):
    return None


@torch.library.register_fake("torch_nerva::sparse_linear")
def _sparse_linear_fake(x, values, bias, crow, col, crow_t, col_t, perm):
    torch._check(x.dim() == 2, lambda: f"sparse_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(values.dtype == x.dtype, lambda: "sparse_linear: values and x dtypes differ")
    torch._check(x.shape[1] == crow_t.shape[0] - 1,
                 lambda: f"sparse_linear: x has {x.shape[1]} features, layer expects "
                         f"{crow_t.shape[0] - 1}")
    return x.new_empty((x.shape[0], crow.shape[0] - 1))


@torch.library.register_fake("torch_nerva::_parallel_probe")
def _parallel_probe_fake(n):
    return torch.empty((), dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Autograd of sparse_linear: dX = dY W (csr_spmm on the cached transpose, no atomics),
# dvalues = SDDMM(dY, X) at W's nonzeros, dbias = sum_b dY.

def _sparse_linear_setup(ctx, inputs, output):
    x, values, bias, crow, col, crow_t, col_t, perm = inputs
    ctx.has_bias = bias is not None
    # Keep only what the requested gradients need: X for dvalues, values for dX.
    needs = ctx.needs_input_grad
    ctx.save_for_backward(x if needs[1] else None, values if needs[0] else None,
                          crow, col, crow_t, col_t, perm)


@once_differentiable  # double backward raises instead of silently returning zeros
def _sparse_linear_backward(ctx, grad):
    x, values, crow, col, crow_t, col_t, perm = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x = _ops.csr_spmm(grad, values, crow_t, col_t, perm, None) if needs[0] else None
    grad_values = _ops.csr_sddmm(grad, x, crow, col) if needs[1] else None
    grad_bias = grad.sum(0) if (ctx.has_bias and needs[2]) else None
    return grad_x, grad_values, grad_bias, None, None, None, None, None


torch.library.register_autograd("torch_nerva::sparse_linear", _sparse_linear_backward,
                                setup_context=_sparse_linear_setup)
