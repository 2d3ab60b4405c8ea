"""Every op against a dense PyTorch reference; gradcheck; opcheck; malformed layouts."""
import pytest
import torch

from torch_nerva import CSRLayout, ops

from conftest import tol
from reference import OpLog, dense, random_layout

SHAPES = [(1, 1), (5, 3), (17, 33), (64, 9), (3, 0), (0, 4)]
DENSITIES = [0.0, 0.1, 0.5, 1.0]


def _transpose_args(layout):
    crow_t, col_t, perm = layout.transpose()
    return crow_t, col_t, perm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch", [0, 1, 6, 16, 37])
def test_spmm_forward_and_transpose(shape, density, batch, dtype, index_dtype, gen, isa):
    out_f, in_f = shape
    layout, _ = random_layout(out_f, in_f, density, gen, index_dtype,
                              empty_rows=out_f // 4, empty_cols=in_f // 4)
    values = torch.randn(layout.nnz, dtype=dtype, generator=gen)
    bias = torch.randn(out_f, dtype=dtype, generator=gen)
    x = torch.randn(batch, in_f, dtype=dtype, generator=gen)
    w = dense(layout, values)
    torch.testing.assert_close(ops.csr_spmm(x, values, layout.crow, layout.col), x @ w.t(),
                               **tol(dtype))
    torch.testing.assert_close(ops.csr_spmm(x, values, layout.crow, layout.col, bias=bias),
                               x @ w.t() + bias, **tol(dtype))
    # The same kernel on the cached transpose gives dX = dY W.
    crow_t, col_t, perm = _transpose_args(layout)
    dy = torch.randn(batch, out_f, dtype=dtype, generator=gen)
    torch.testing.assert_close(ops.csr_spmm(dy, values, crow_t, col_t, perm), dy @ w, **tol(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch", [0, 1, 6, 16, 37, 70])
def test_sddmm(shape, density, batch, dtype, index_dtype, gen, isa):
    out_f, in_f = shape
    layout, mask = random_layout(out_f, in_f, density, gen, index_dtype, empty_rows=out_f // 3)
    dy = torch.randn(batch, out_f, dtype=dtype, generator=gen)
    x = torch.randn(batch, in_f, dtype=dtype, generator=gen)
    expected = (dy.t() @ x)[mask]  # row-major order == CSR order
    torch.testing.assert_close(ops.csr_sddmm(dy, x, layout.crow, layout.col), expected,
                               **tol(dtype))


@pytest.mark.parametrize("shape", SHAPES + [(40, 70)])
@pytest.mark.parametrize("density", DENSITIES)
def test_transpose_is_sorted_csr_of_wt(shape, density, index_dtype, gen):
    layout, mask = random_layout(*shape, density, gen, index_dtype, empty_cols=shape[1] // 3)
    values = torch.randn(layout.nnz, dtype=torch.float64, generator=gen)
    crow_t, col_t, perm = layout.transpose()
    assert crow_t.dtype == col_t.dtype == perm.dtype == index_dtype
    t_layout = CSRLayout.from_tensors(crow_t, col_t, (shape[1], shape[0]))  # validates sortedness
    torch.testing.assert_close(dense(t_layout, values[perm.long()]), dense(layout, values).t())
    assert sorted(perm.tolist()) == list(range(layout.nnz))


def test_noncontiguous_inputs(gen):
    layout, _ = random_layout(12, 20, 0.3, gen)
    values = torch.randn(layout.nnz * 2, dtype=torch.float64, generator=gen)[::2]
    x = torch.randn(20, 9, dtype=torch.float64, generator=gen).t()  # (9, 20), not contiguous
    assert not x.is_contiguous() and not values.is_contiguous()
    torch.testing.assert_close(ops.csr_spmm(x, values, layout.crow, layout.col),
                               x @ dense(layout, values).t())
    dy = torch.randn(12, 9, dtype=torch.float64, generator=gen).t()
    torch.testing.assert_close(ops.csr_sddmm(dy, x, layout.crow, layout.col),
                               (dy.t() @ x)[layout.to_mask()])


def _linear_inputs(out_f, in_f, batch, density, gen, index_dtype, bias=True):
    layout, _ = random_layout(out_f, in_f, density, gen, index_dtype,
                              empty_rows=out_f // 4, empty_cols=in_f // 4)
    crow_t, col_t, perm = layout.transpose()
    x = torch.randn(batch, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(layout.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(out_f, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    return x, values, b, layout.crow, layout.col, crow_t, col_t, perm


@pytest.mark.parametrize("shape,batch,density", [
    ((7, 5), 3, 0.5), ((1, 1), 1, 1.0), ((9, 13), 1, 0.3), ((6, 4), 2, 0.0), ((8, 8), 4, 1.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_sparse_linear(shape, batch, density, bias, index_dtype, gen, isa):
    args = _linear_inputs(*shape, batch, density, gen, index_dtype, bias)
    assert torch.autograd.gradcheck(ops.sparse_linear, args)


def test_sparse_linear_gradients_match_dense(dtype, index_dtype, gen, isa):
    x, values, b, crow, col, crow_t, col_t, perm = _linear_inputs(30, 50, 11, 0.2, gen, index_dtype)
    x, values, b = (t.detach().to(dtype).requires_grad_() for t in (x, values, b))
    y = ops.sparse_linear(x, values, b, crow, col, crow_t, col_t, perm)
    g = torch.randn_like(y)
    y.backward(g)
    layout = CSRLayout(crow, col, (30, 50))
    w = dense(layout, values.detach()).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    y2 = x2 @ w.t() + b2
    y2.backward(g)
    torch.testing.assert_close(y, y2, **tol(dtype))
    torch.testing.assert_close(x.grad, x2.grad, **tol(dtype))
    torch.testing.assert_close(values.grad, w.grad[layout.to_mask()], **tol(dtype))
    torch.testing.assert_close(b.grad, b2.grad, **tol(dtype))


@pytest.mark.parametrize("x_grad,v_grad", [(False, True), (True, False), (True, True)])
def test_backward_computes_only_requested_gradients(x_grad, v_grad, gen):
    x, values, b, crow, col, crow_t, col_t, perm = _linear_inputs(20, 30, 5, 0.3, gen, torch.int32)
    x.requires_grad_(x_grad)
    values.requires_grad_(v_grad)
    y = ops.sparse_linear(x, values, b, crow, col, crow_t, col_t, perm)
    with OpLog() as log:
        y.sum().backward()
    (call,) = [c for c in log.calls if "sparse_linear_backward" in c[0]]
    _, args, (grad_x, grad_values) = call
    assert tuple(args[-2:]) == (x_grad, v_grad)
    assert grad_x.numel() == (5 * 30 if x_grad else 0)  # not asked for: not computed
    assert grad_values.numel() == (values.numel() if v_grad else 0)
    assert (x.grad is not None) == x_grad and (values.grad is not None) == v_grad


@pytest.mark.parametrize("n_out,n_in", [(7, 11), (133, 200)])
def test_forward_saves_padded_transpose(gen, dtype, isa, n_out, n_in):
    # (133, 200): several 64-feature panels, edges in both directions, partial vector tiles
    lanes = 64 // torch.empty((), dtype=dtype).element_size()
    layout, dense = random_layout(n_out, n_in, 0.4, gen)
    crow_t, col_t, perm = layout.transpose()
    v = torch.randn(layout.nnz, dtype=dtype, generator=gen)
    w = torch.zeros(n_out * n_in, dtype=dtype).scatter(0, layout.positions(), v)
    for batch in (1, lanes - 1, lanes, lanes + 1, 3 * lanes + 2, 3 * lanes + 4, 100):
        x = torch.randn(batch, n_in, dtype=dtype, generator=gen)
        y, xt = torch.ops.torch_nerva.sparse_linear(x, v, None, layout.crow, layout.col, crow_t,
                                                    col_t, perm)
        assert xt.shape == (n_in, ops.padded_ld(batch, dtype))
        assert torch.equal(xt[:, :batch], x.t()) and not xt[:, batch:].any()
        torch.testing.assert_close(y, x @ w.view(n_out, n_in).t())


# ---- opcheck: schema, fake kernel, autograd registration, dynamic shapes -------------------

def _opcheck_cases(gen):
    layout, _ = random_layout(9, 14, 0.3, gen, torch.int32, empty_rows=2)
    crow_t, col_t, perm = layout.transpose()
    x = torch.randn(4, 14, dtype=torch.float64, generator=gen)
    v = torch.randn(layout.nnz, dtype=torch.float64, generator=gen)
    b = torch.randn(9, dtype=torch.float64, generator=gen)
    dy = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    return [
        (torch.ops.torch_nerva.csr_spmm.default, (x, v, layout.crow, layout.col, None, b)),
        (torch.ops.torch_nerva.csr_spmm.default, (dy, v, crow_t, col_t, perm, None)),
        (torch.ops.torch_nerva.csr_sddmm.default, (dy, x, layout.crow, layout.col)),
        (torch.ops.torch_nerva.csr_transpose.default, (layout.crow, layout.col, 14)),
        (torch.ops.torch_nerva.csr_check.default, (layout.crow, layout.col, 9, 14)),
        (torch.ops.torch_nerva.sparse_linear.default,
         (x.clone().requires_grad_(), v.clone().requires_grad_(), b.clone().requires_grad_(),
          layout.crow, layout.col, crow_t, col_t, perm)),
        (torch.ops.torch_nerva.sparse_linear.default,
         (x.detach(), v, None, layout.crow, layout.col, crow_t, col_t, perm)),
        (torch.ops.torch_nerva.sparse_linear_backward.default,
         (dy, torch.ops.torch_nerva.sparse_linear(x.detach(), v, None, layout.crow, layout.col,
                                                  crow_t, col_t, perm)[1],
          v, layout.crow, layout.col, crow_t, col_t, perm, True, True)),
        (torch.ops.torch_nerva.sparse_linear_backward.default,
         (dy, v.new_empty(0, 0), v, layout.crow, layout.col, crow_t, col_t, perm, True, False)),
    ]


def test_opcheck_all_ops(gen):
    checked = set()
    for op, args in _opcheck_cases(gen):
        torch.library.opcheck(op, args)
        checked.add(op._schema.name)
    registered = {f"torch_nerva::{n}" for n in
                  ("csr_spmm", "csr_sddmm", "csr_transpose", "csr_check", "sparse_linear",
                   "sparse_linear_backward")}
    assert checked == registered


# ---- malformed input: clear errors, never a crash or silent wrong answer ---------------------

def _good(gen):
    layout, _ = random_layout(6, 8, 0.5, gen, torch.int64, empty_rows=0)
    return layout.crow.clone(), layout.col.clone()


@pytest.mark.parametrize("corrupt,message", [
    (lambda crow, col: (crow.index_fill(0, torch.tensor([0]), 1), col), "crow\\[0\\] must be 0"),
    (lambda crow, col: (crow.index_fill(0, torch.tensor([6]), 999), col), "must equal nnz"),
    (lambda crow, col: (crow[:-1], col), "n_rows \\+ 1"),
    (lambda crow, col: (crow.index_fill(0, torch.tensor([3]), 10**6), col), "row pointer"),
    (lambda crow, col: (crow, col.index_fill(0, torch.tensor([2]), 8)), "out of range"),
    (lambda crow, col: (crow, col.index_fill(0, torch.tensor([2]), -1)), "out of range"),
    (lambda crow, col: (crow, col.flip(0)), "not sorted|duplicate|out of range"),
    (lambda crow, col: (crow, col.int()), "same index dtype|one index dtype"),
    (lambda crow, col: (crow.float(), col), "int32 or int64"),
])
def test_csr_check_names_the_problem(corrupt, message, gen):
    crow, col = corrupt(*_good(gen))
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        CSRLayout.from_tensors(crow, col, (6, 8))


def test_duplicates_and_unsorted_detected():
    crow = torch.tensor([0, 2, 2])
    with pytest.raises(RuntimeError, match="duplicate column index 3 in row 0"):
        ops.csr_check(crow, torch.tensor([3, 3]), 2, 5)
    with pytest.raises(RuntimeError, match="row 0 are not sorted: 4 then 1"):
        ops.csr_check(crow, torch.tensor([4, 1]), 2, 5)


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_kernels_raise_on_malformed_layouts_instead_of_reading_out_of_bounds(gen, batch, isa):
    crow, col = _good(gen)
    x = torch.randn(batch, 8)
    v = torch.randn(col.numel())
    bad_col = col.clone()
    bad_col[1] = 10**9
    with pytest.raises(RuntimeError, match="column index out of range"):
        ops.csr_spmm(x, v, crow, bad_col)
    with pytest.raises(RuntimeError, match="column index out of range"):
        ops.csr_sddmm(torch.randn(batch, 6), x, crow, bad_col)
    with pytest.raises(RuntimeError, match="column index out of range"):
        ops.csr_transpose(crow, bad_col, 8)
    bad_crow = crow.clone()
    bad_crow[2] = -5
    with pytest.raises(RuntimeError, match="row pointer"):
        ops.csr_spmm(x, v, bad_crow, col)
    with pytest.raises(RuntimeError, match="row pointer"):
        ops.csr_sddmm(torch.randn(batch, 6), x, bad_crow, col)
    perm = torch.arange(col.numel())
    perm[0] = col.numel() + 3
    with pytest.raises(RuntimeError, match="perm index out of range"):
        ops.csr_spmm(x, v, crow, col, perm)


def test_op_argument_errors(gen):
    crow, col = _good(gen)
    v = torch.randn(col.numel())
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.csr_spmm(torch.randn(8), v, crow, col)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.csr_spmm(torch.randn(2, 8, dtype=torch.float64), v, crow, col)
    with pytest.raises(RuntimeError, match="values has"):
        ops.csr_spmm(torch.randn(2, 8), v[:-1], crow, col)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.csr_spmm(torch.randn(2, 8), v, crow, col, bias=torch.randn(5))
    with pytest.raises(RuntimeError, match="only float32, float64, bfloat16 and float16"):
        ops.csr_spmm(torch.randn(2, 8).to(torch.complex64), v.to(torch.complex64), crow, col)
    with pytest.raises(RuntimeError, match="batch"):
        ops.csr_sddmm(torch.randn(3, 6), torch.randn(2, 8), crow, col)
    crow_t, col_t, perm = ops.csr_transpose(crow, col, 8)
    with pytest.raises(RuntimeError, match="in_features = 8"):
        ops.sparse_linear(torch.randn(2, 7), v, None, crow, col, crow_t, col_t, perm)


@pytest.mark.parametrize("row_len", [31, 32, 33, 47, 48, 64, 100, 300])
def test_batch_one_long_rows_match_dense(row_len, dtype, index_dtype, gen, isa):
    """Batch-1 rows long enough for the vector-gather dot product (>= 32 nonzeros), with every
    tail length, against dense math; and an out-of-range column inside such a row (in a full
    block and in the tail) is reported with its position."""
    n_in = 320
    cols = [torch.randperm(n_in, generator=gen)[:row_len].sort().values for _ in range(3)]
    crow = torch.tensor([0, row_len, row_len, 2 * row_len, 3 * row_len], dtype=index_dtype)
    col = torch.cat([cols[0], cols[1], cols[2]]).to(index_dtype)
    values = torch.randn(col.numel(), dtype=dtype, generator=gen)
    layout = CSRLayout(crow, col, (4, n_in))
    x = torch.randn(1, n_in, dtype=dtype, generator=gen)
    w = dense(layout, values)
    torch.testing.assert_close(ops.csr_spmm(x, values, crow, col), x @ w.t(), **tol(dtype))
    fm = torch.ops.torch_nerva.csr_spmm_fm(x.t().contiguous(), values, crow, col)
    torch.testing.assert_close(fm, (x @ w.t()).t(), **tol(dtype))
    for pos in (row_len + 5, 2 * row_len - 1):  # row 2: a full block, then the row's tail
        bad = col.clone()
        bad[pos] = n_in + 7
        with pytest.raises(RuntimeError, match=f"column index out of range at position {pos}:"):
            ops.csr_spmm(x, values, crow, bad)
