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
        0, layer.layout.row_indices()[col == 69999], layer.values.detach()[col == 69999])
    torch.testing.assert_close(y[0] - layer.bias.detach(), expected)
