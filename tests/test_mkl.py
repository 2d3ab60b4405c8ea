"""The MKL backend: mkl_spmm against a dense reference, gradcheck, opcheck, bad input, and
exactly one OpenMP runtime (the MKL inside torch is used, no second MKL or runtime)."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torch_nerva as tn
from torch_nerva import ops
from conftest import tol
from reference import assert_twins_train_alike, random_layout

pytestmark = pytest.mark.skipif("mkl" not in tn.backends.available(),
                                reason="built without the MKL backend (pip install mkl-include)")


def _case(n_rows, n_cols, density, batch, dtype, gen, transpose, **kw):
    layout, mask = random_layout(n_rows, n_cols, density, gen, torch.int32, **kw)
    v = torch.randn(layout.nnz, dtype=dtype, generator=gen)
    w = torch.zeros(n_rows * n_cols, dtype=dtype).scatter(0, layout.positions(), v)
    w = w.view(n_rows, n_cols)
    x = torch.randn(batch, n_rows if transpose else n_cols, dtype=dtype, generator=gen)
    return layout, v, w, x


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape,density,batch", [
    ((7, 11), 0.4, 1), ((7, 11), 0.4, 5), ((64, 33), 0.1, 37), ((20, 30), 0.0, 4),
    ((20, 30), 1.0, 4), ((9, 13), 0.5, 0), ((1, 1), 1.0, 3), ((40, 25), 0.3, 100),
])
def test_mkl_spmm_matches_dense(shape, density, batch, transpose, dtype, gen):
    layout, v, w, x = _case(*shape, density, batch, dtype, gen, transpose, empty_rows=1,
                            empty_cols=1)
    y = ops.mkl_spmm(x, v, layout.crow, layout.col, shape[1], transpose)
    expected = x @ w if transpose else x @ w.t()
    torch.testing.assert_close(y, expected, **tol(dtype))


def test_mkl_reads_non_contiguous_input(gen):
    layout, v, w, _ = _case(12, 10, 0.5, 4, torch.float32, gen, False)
    x = torch.randn(10, 4, generator=gen).t()  # (4 x 10), not contiguous
    torch.testing.assert_close(ops.mkl_spmm(x, v, layout.crow, layout.col, 10), x @ w.t())


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gradcheck_through_the_mkl_backend(index_dtype, gen):
    layout, _ = random_layout(6, 9, 0.4, gen, index_dtype, empty_rows=1)
    crow_t, col_t, perm = layout.transpose()
    x = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(layout.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: tn.sparse_linear(
        x, v, b, layout.crow, layout.col, crow_t, col_t, perm, backend="mkl"), (x, v, b))


def test_opcheck_mkl_spmm(gen):
    layout, v, _, x = _case(9, 14, 0.3, 4, torch.float64, gen, False)
    for transpose, xx in ((False, x), (True, torch.randn(4, 9, dtype=torch.float64))):
        torch.library.opcheck(torch.ops.torch_nerva.mkl_spmm.default,
                              (xx, v, layout.crow, layout.col, 14, transpose))


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
    ("row", "malformed row pointer"), ("int64", "int32 indices"),
    ("shape", "columns, expected"), ("dtype", "dtype"),
])
def test_mkl_bad_input_raises(bad, message, gen):
    layout, v, _, x = _case(8, 10, 0.5, 3, torch.float32, gen, False)
    crow, col = layout.crow.clone(), layout.col.clone()
    if bad == "col_high":
        col[len(col) // 2] = 10
    elif bad == "col_negative":
        col[0] = -1
    elif bad == "row":
        crow[2] = crow[-1] + 0  # row 2 ends past where row 3 starts
        crow[3] = 0
    elif bad == "int64":
        crow, col = crow.long(), col.long()
    elif bad == "shape":
        x = torch.randn(3, 9)
    elif bad == "dtype":
        v = v.double()
    with pytest.raises(RuntimeError, match=message):
        ops.mkl_spmm(x, v, crow, col, 10)


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
