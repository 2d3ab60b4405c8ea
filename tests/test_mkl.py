"""The MKL backend, through the sparse_linear op's backend argument: products against a dense
reference, the numerics of the MKL path (MKL forward and dX, native SDDMM dvalues), bad input,
training, compile, and exactly one OpenMP runtime (the MKL inside torch is used, no second MKL
or runtime). The op matrix every backend runs is tests/test_backends.py."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torch_nerva as tn
from conftest import tol
from reference import assert_twins_train_alike, random_layout

pytestmark = pytest.mark.skipif("mkl" not in tn.backends.available(),
                                reason="built without the MKL backend (pip install mkl-include)")

_OP = torch.ops.torch_nerva.sparse_linear.default
_BACKWARD = torch.ops.torch_nerva.sparse_linear_backward.default


def _case(n_rows, n_cols, density, batch, dtype, gen, index_dtype=torch.int32, **kw):
    layout, mask = random_layout(n_rows, n_cols, density, gen, index_dtype, **kw)
    v = torch.randn(layout.nnz, dtype=dtype, generator=gen)
    w = torch.zeros(n_rows * n_cols, dtype=dtype).scatter(0, layout.positions(), v)
    w = w.view(n_rows, n_cols)
    x = torch.randn(batch, n_cols, dtype=dtype, generator=gen)
    return layout, v, w, x, [layout.crow, layout.col, *layout.transpose()]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape,density,batch", [
    ((7, 11), 0.4, 1), ((7, 11), 0.4, 5), ((64, 33), 0.1, 37), ((20, 30), 0.0, 4),
    ((20, 30), 1.0, 4), ((9, 13), 0.5, 0), ((1, 1), 1.0, 3), ((40, 25), 0.3, 100),
])
def test_mkl_products_match_dense(shape, density, batch, index_dtype, dtype, gen):
    """y = x W^T + b and dX = dY W by MKL, dvalues by the SDDMM: against dense math."""
    layout, v, w, x, idx = _case(*shape, density, batch, dtype, gen, index_dtype, empty_rows=1,
                                 empty_cols=1)
    b = torch.randn(shape[0], dtype=dtype, generator=gen)
    y, xt = _OP(x, v, b, *idx, "mkl")
    torch.testing.assert_close(y, x @ w.t() + b, **tol(dtype))
    dy = torch.randn(batch, shape[0], dtype=dtype, generator=gen)
    dx, dv = _BACKWARD(dy, xt, v, *idx, True, True, "mkl")
    torch.testing.assert_close(dx, dy @ w, **tol(dtype))
    torch.testing.assert_close(dv, (dy.t() @ x)[layout.to_mask()], **tol(dtype))


def test_mkl_numerics_are_mkls_product_and_the_native_sddmm(gen):
    """What the former Python MKL path computed, bit for bit: the forward is MKL's product
    plus the bias, dvalues the native SDDMM (csr_sddmm), and they differ from the native
    forward only by rounding."""
    layout, v, _, x, idx = _case(64, 300, 0.1, 40, torch.float32, gen)
    b = torch.randn(64, generator=gen)
    y, xt = _OP(x, v, b, *idx, "mkl")
    y_native, xt_native = _OP(x, v, b, *idx)
    assert torch.equal(xt, xt_native)  # one saved layout on the CPU
    torch.testing.assert_close(y, y_native)
    dy = torch.randn(40, 64, generator=gen)
    _, dv = _BACKWARD(dy, xt, v, *idx, False, True, "mkl")
    assert torch.equal(dv, torch.ops.torch_nerva.csr_sddmm(dy, x, layout.crow, layout.col))


def test_mkl_reads_non_contiguous_input(gen):
    layout, v, w, _, idx = _case(12, 10, 0.5, 4, torch.float32, gen)
    x = torch.randn(10, 4, generator=gen).t()  # (4 x 10), not contiguous
    torch.testing.assert_close(_OP(x, v, None, *idx, "mkl")[0], x @ w.t())
    dy = torch.randn(12, 4, generator=gen).t()  # (4 x 12), not contiguous
    xt = _OP(x, v, None, *idx, "mkl")[1]
    torch.testing.assert_close(_BACKWARD(dy, xt, v, *idx, True, False, "mkl")[0], dy @ w)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gradcheck_through_the_mkl_backend(index_dtype, gen):
    layout, _ = random_layout(6, 9, 0.4, gen, index_dtype, empty_rows=1)
    crow_t, col_t, perm = layout.transpose()
    x = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(layout.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: tn.sparse_linear(
        x, v, b, layout.crow, layout.col, crow_t, col_t, perm, backend="mkl"), (x, v, b))


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["sgd_nesterov", "adam"])
def test_mkl_twins_train_identically_for_20_steps(make_opt):
    dense = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 5))
    sparse = tn.sparsify(dense, 0.2, generator=torch.Generator().manual_seed(0), backend="mkl")
    assert_twins_train_alike(sparse, tn.to_masked(sparse), make_opt)


def test_mkl_with_torch_compile():
    torch._dynamo.reset()
    model = tn.sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 0.3,
                        generator=torch.Generator().manual_seed(0), backend="mkl")
    x = torch.randn(5, 12)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("bad,message", [
    ("col_high", "column index out of range"), ("col_negative", "column index out of range"),
    ("row", "malformed row pointer"), ("shape", "in_features = 10"), ("dtype", "dtype"),
    ("bfloat16", "backend 'mkl' cannot compute in BFloat16.*backend='native'"),
])
def test_mkl_bad_input_raises(bad, message, gen):
    layout, v, _, x, idx = _case(8, 10, 0.5, 3, torch.float32, gen)
    crow, col = idx[0].clone(), idx[1].clone()
    if bad == "col_high":
        col[len(col) // 2] = 10
    elif bad == "col_negative":
        col[0] = -1
    elif bad == "row":
        crow[2] = crow[-1] + 0  # row 2 ends past where row 3 starts
        crow[3] = 0
    elif bad == "shape":
        x = torch.randn(3, 9)
    elif bad == "dtype":
        v = v.double()
    elif bad == "bfloat16":
        x, v = x.bfloat16(), v.bfloat16()
    with pytest.raises(RuntimeError, match=message):
        _OP(x, v, None, crow, col, *idx[2:], "mkl")
    if bad in ("col_high", "col_negative", "row"):  # dX reads the same layout through MKL
        with pytest.raises(RuntimeError, match=message):
            _BACKWARD(torch.randn(3, 8), x.new_empty(0, 0), v, crow, col, *idx[2:], True,
                      False, "mkl")


def test_int64_layout_beyond_int32_is_refused_not_wrapped(gen):
    """An int64 layout is validated before its conversion to MKL's int32: a column index that
    would wrap into range is reported."""
    layout, v, _, x, idx = _case(8, 10, 0.5, 3, torch.float32, gen, torch.int64)
    col = idx[1].clone()
    col[0] = 2 ** 32 + 1  # int32(col) would be 1, in range
    with pytest.raises(RuntimeError, match="column index out of range"):
        _OP(x, v, None, idx[0], col, *idx[2:], "mkl")


def test_exactly_one_openmp_runtime_and_no_second_mkl_after_an_mkl_call():
    code = textwrap.dedent("""
        import os, re, torch, torch_nerva as tn
        layer = tn.SparseLinear(256, 128, density=0.1, backend="mkl")
        torch.set_num_threads(2)
        layer(torch.randn(64, 256)).sum().backward()
        libs = {os.path.realpath(l.split()[-1]) for l in open("/proc/self/maps") if ".so" in l}
        omp = {p for p in libs if re.search(r"lib(gomp|iomp5|omp)[^/]*[.]so", os.path.basename(p))}
        mkl = {p for p in libs if re.search(r"libmkl", os.path.basename(p))}
        print(len(omp), len(mkl), sorted(omp), sorted(mkl))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_omp, n_mkl, rest = out.stdout.strip().split(" ", 2)
    assert n_omp == "1" and n_mkl == "0", rest
