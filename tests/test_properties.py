"""Property-based tests (hypothesis): every op against the dense reference over random shapes,
densities, dtypes, index widths, strides and batch sizes; and sizes past int32."""
import pytest
import torch

import torch_nerva as tn
from torch_nerva import ops

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from reference import random_layout  # noqa: E402

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, density=st.sampled_from([0.0, 0.05, 0.3, 1.0]), batch=st.integers(0, 40),
       f64=st.booleans(), i64=st.booleans(), transposed_input=st.booleans(),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_sparse_linear_matches_dense(shape, density, batch, f64, i64, transposed_input, bias,
                                     seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if f64 else torch.float32
    n_out, n_in = shape
    layout, _ = random_layout(n_out, n_in, density, gen, torch.int64 if i64 else torch.int32)
    crow_t, col_t, perm = layout.transpose()
    v = torch.randn(layout.nnz, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(n_out, dtype=dtype, generator=gen, requires_grad=True) if bias else None
    x = torch.randn(n_in, batch, dtype=dtype, generator=gen).t() if transposed_input \
        else torch.randn(batch, n_in, dtype=dtype, generator=gen)
    x.requires_grad_()
    w = torch.zeros(n_out * n_in, dtype=dtype).scatter(0, layout.positions(), v).view(n_out, n_in)
    y = ops.sparse_linear(x, v, b, layout.crow, layout.col, crow_t, col_t, perm)
    ref = x @ w.t() + (b if bias else 0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, ref, **tol)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, v], g, allow_unused=True)
    want = torch.autograd.grad(ref, [x, v], g, allow_unused=True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(e), e, **tol)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), batch=st.integers(0, 20),
       seed=st.integers(0, 2**16))
def test_spmm_and_sddmm_match_dense(shape, density, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    n_out, n_in = shape
    layout, _ = random_layout(n_out, n_in, density, gen)
    v = torch.randn(layout.nnz, dtype=torch.float64, generator=gen)
    w = torch.zeros(n_out * n_in, dtype=torch.float64).scatter(0, layout.positions(), v)
    w = w.view(n_out, n_in)
    x = torch.randn(batch, n_in, dtype=torch.float64, generator=gen)
    dy = torch.randn(batch, n_out, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(ops.csr_spmm(x, v, layout.crow, layout.col), x @ w.t())
    torch.testing.assert_close(ops.csr_sddmm(dy, x, layout.crow, layout.col),
                               (dy.t() @ x).flatten()[layout.positions()])


def test_layers_past_int32_positions_work():
    # 70000 x 70000 > 2^31 flat positions: positions are int64, indices int32 still fit
    layer = tn.SparseLinear(70000, 70000, nnz=50, generator=torch.Generator().manual_seed(0))
    assert layer.layout.positions().dtype == torch.int64
    assert int(layer.layout.positions().max()) < 70000 * 70000
    x = torch.zeros(2, 70000)
    x[:, 69999] = 1.0
    y = layer(x)
    col = layer.col_indices.long()
    expected = torch.zeros(70000).index_add_(
        0, layer.layout.row_indices()[col == 69999], layer.flat_values().detach()[col == 69999])
    torch.testing.assert_close(y[0] - layer.bias.detach(), expected)


# -- malformed input: a clear exception or the correct result, never a crash ------------------
CORRUPTIONS = ["none", "crow_value", "col_value", "swap", "duplicate", "short_col",
               "short_crow", "long_crow"]


def _corrupt(crow, col, how, data, n_cols):
    crow, col = crow.clone(), col.clone()
    nnz = col.numel()
    if how == "crow_value":
        crow[data.draw(st.integers(0, crow.numel() - 1))] = data.draw(st.integers(-3, nnz + 3))
    elif how == "col_value" and nnz:
        col[data.draw(st.integers(0, nnz - 1))] = data.draw(st.integers(-3, n_cols + 3))
    elif how in ("swap", "duplicate") and nnz > 1:
        k = data.draw(st.integers(0, nnz - 2))
        if how == "swap":
            col[k], col[k + 1] = col[k + 1].clone(), col[k].clone()
        else:
            col[k + 1] = col[k]
    elif how == "short_col" and nnz:
        col = col[:-1]
    elif how == "short_crow":
        crow = crow[:-1]
    elif how == "long_crow":
        crow = torch.cat([crow, crow[-1:]])
    return crow, col


def _structure(crow, col, n_cols):
    """(readable, sorted): whether the kernels can read this CSR (row pointer from 0 to nnz,
    non-decreasing, columns in range) and whether it is also sorted and duplicate-free."""
    c, k = crow.tolist(), col.tolist()
    readable = (len(c) >= 1 and c[0] == 0 and c[-1] == len(k)
                and all(a <= b for a, b in zip(c, c[1:])) and all(0 <= j < n_cols for j in k))
    strict = readable and all(k[i] < k[i + 1] for r in range(len(c) - 1)
                              for i in range(c[r], c[r + 1] - 1))
    return readable, strict


def _triplet_dense(crow, col, values, n_cols):
    """The dense matrix a readable CSR stands for: duplicates add up, order does not matter."""
    n_rows = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows), (crow[1:] - crow[:-1]).long())
    w = torch.zeros(n_rows * n_cols, dtype=values.dtype)
    return w.index_add_(0, rows * n_cols + col.long(), values).view(n_rows, n_cols)


@settings(max_examples=150, deadline=None)
@given(shape=st.tuples(st.integers(1, 10), st.integers(1, 10)),
       density=st.sampled_from([0.0, 0.3, 1.0]), batch=st.integers(0, 5),
       how=st.sampled_from(CORRUPTIONS), i64=st.booleans(), seed=st.integers(0, 2**16),
       data=st.data())
def test_malformed_layouts_raise_clearly_or_compute_correctly(shape, density, batch, how, i64,
                                                              seed, data):
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_cols = shape
    layout, _ = random_layout(n_rows, n_cols, density, gen, torch.int64 if i64 else torch.int32)
    crow, col = _corrupt(layout.crow, layout.col, how, data, n_cols)
    readable, strict = _structure(crow, col, n_cols)
    valid = strict and crow.numel() == n_rows + 1
    # the validator: exactly the valid layouts pass
    if valid:
        tn.CSRLayout.from_tensors(crow, col, shape)
    else:
        with pytest.raises((RuntimeError, ValueError), match="torch_nerva|crow|col|must"):
            tn.CSRLayout.from_tensors(crow, col, shape)
    # the kernels: readable layouts give the dense answer, unreadable ones raise
    v = torch.randn(col.numel(), dtype=torch.float64, generator=gen)
    x = torch.randn(batch, n_cols, dtype=torch.float64, generator=gen)
    dy = torch.randn(batch, crow.numel() - 1, dtype=torch.float64, generator=gen)
    checks = [
        (lambda: ops.csr_spmm(x, v, crow, col),
         lambda: x @ _triplet_dense(crow, col, v, n_cols).t(), batch > 0 and crow.numel() > 1),
        (lambda: ops.csr_sddmm(dy, x, crow, col),
         lambda: (dy.t() @ x)[torch.repeat_interleave(
             torch.arange(crow.numel() - 1), (crow[1:] - crow[:-1]).long()), col.long()],
         col.numel() > 0),
    ]
    for run, reference, does_work in checks:
        if readable:
            torch.testing.assert_close(run(), reference())
        elif does_work:
            with pytest.raises(RuntimeError, match="torch_nerva"):
                run()
        else:  # nothing to compute: an error or an empty result of the right shape
            try:
                assert run().numel() == 0
            except RuntimeError as e:
                assert "torch_nerva" in str(e)
    if readable:
        crow_t, col_t, perm = ops.csr_transpose(crow, col, n_cols)
        torch.testing.assert_close(_triplet_dense(crow_t, col_t, v[perm.long()], crow.numel() - 1),
                                   _triplet_dense(crow, col, v, n_cols).t())
    else:
        with pytest.raises(RuntimeError, match="torch_nerva"):
            ops.csr_transpose(crow, col, n_cols)


@settings(max_examples=80, deadline=None)
@given(lead=st.lists(st.integers(0, 3), max_size=3), last=st.integers(3, 7),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64,
                              torch.bool]),
       layer_f64=st.booleans(), seed=st.integers(0, 2**16))
def test_module_inputs_raise_clearly_or_match_nn_linear(lead, last, dtype, layer_f64, seed):
    gen = torch.Generator().manual_seed(seed)
    layer_dtype = torch.float64 if layer_f64 else torch.float32
    layer = tn.SparseLinear(5, 4, density=0.5, generator=gen, dtype=layer_dtype)
    x = (torch.randn(*lead, last, generator=gen) * 3).to(dtype)
    if last == 5 and dtype == layer_dtype:
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(
            x, layer.dense_weight(), layer.bias))
    else:
        with pytest.raises((TypeError, ValueError), match="sparse_linear"):
            layer(x)
