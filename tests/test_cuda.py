"""The cuSPARSE backend on a GPU. Built here (CI compiles it) but skipped without a GPU; run
`bash benchmarks/gpu.sh` on a machine that has one. The op matrix every backend runs (cuda-
cusparse included) is tests/test_backends.py; the checks that need no GPU are at the end."""
import pytest
import torch
from torch import nn

import torch_nerva as tn
from conftest import tol
from reference import assert_twins_train_alike, random_layout

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or "cusparse" not in tn.backends.available(),
    reason="needs a CUDA GPU and the cuSPARSE backend")

DEV = "cuda"


def _layer_inputs(n_out, n_in, batch, density, gen, index_dtype, dtype=torch.float64):
    layout, _ = random_layout(n_out, n_in, density, gen, index_dtype, empty_rows=1, empty_cols=1)
    crow_t, col_t, perm = layout.transpose()
    idx = [t.to(DEV) for t in (layout.crow, layout.col, crow_t, col_t, perm)]
    x = torch.randn(batch, n_in, dtype=dtype, generator=gen).to(DEV).requires_grad_()
    v = torch.randn(layout.nnz, dtype=dtype, generator=gen).to(DEV).requires_grad_()
    b = torch.randn(n_out, dtype=dtype, generator=gen).to(DEV).requires_grad_()
    return layout, idx, x, v, b


@needs_gpu
@pytest.mark.parametrize("shape,batch,density", [
    ((7, 11), 1, 0.4), ((30, 20), 5, 0.2), ((16, 16), 3, 1.0), ((9, 12), 4, 0.0),
])
def test_gradcheck_on_cuda(shape, batch, density, index_dtype, gen):
    _, idx, x, v, b = _layer_inputs(*shape, batch, density, gen, index_dtype)
    assert torch.autograd.gradcheck(
        lambda x, v, b: tn.sparse_linear(x, v, b, *idx, backend="cusparse"), (x, v, b))


@needs_gpu
def test_cuda_matches_cpu_and_is_deterministic(dtype, index_dtype):
    layer = tn.SparseLinear(300, 200, density=0.05, dtype=dtype, index_dtype=index_dtype,
                            generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 300, dtype=dtype)
    y_cpu = layer(x)
    y_cpu.sum().backward()
    g_cpu = layer.values.grad.view(-1).clone()
    gpu = layer.to(DEV)
    gpu.values.grad = None
    runs = []
    for _ in range(2):
        gpu.values.grad = None
        xg = x.to(DEV).requires_grad_()
        y = gpu(xg)
        y.sum().backward()
        runs.append((y.detach(), xg.grad, gpu.values.grad.view(-1).clone()))
    assert gpu.resolved_backend == "cusparse"
    torch.testing.assert_close(runs[0][0].cpu(), y_cpu.detach(), **tol(dtype))
    torch.testing.assert_close(runs[0][2].cpu(), g_cpu, **tol(dtype))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # non-transposed SpMM and SDDMM: run-to-run reproducible


@needs_gpu
def test_cuda_twins_train_identically():
    dense = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 5))
    sparse = tn.sparsify(dense, 0.2, generator=torch.Generator().manual_seed(0)).to(DEV)
    assert_twins_train_alike(
        sparse, tn.to_masked(sparse),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), device=DEV)


@needs_gpu
def test_opcheck_cuda_ops(gen):
    _, idx, x, v, b = _layer_inputs(9, 14, 4, 0.3, gen, torch.int32)
    crow, col, crow_t, col_t, perm = idx
    x, v, b = x.detach(), v.detach(), b.detach()
    torch.library.opcheck(torch.ops.torch_nerva.sparse_linear.default,
                          (x, v, b, crow, col, crow_t, col_t, perm, "cusparse"))
    torch.library.opcheck(torch.ops.torch_nerva.csr_spmm.default, (x, v, crow, col, None, b))
    torch.library.opcheck(torch.ops.torch_nerva.csr_sddmm.default,
                          (torch.randn(4, 9, dtype=x.dtype, device=DEV), x, crow, col))


@needs_gpu
def test_malformed_layout_raises_instead_of_faulting(gen):
    layout, _ = random_layout(8, 10, 0.5, gen, torch.int32)
    col = layout.col.clone()
    col[0] = 10
    x = torch.randn(3, 10, device=DEV)
    v = torch.randn(layout.nnz, device=DEV)
    with pytest.raises(RuntimeError, match="column index out of range"):
        torch.ops.torch_nerva.csr_spmm(x, v, layout.crow.to(DEV), col.to(DEV), None, None)
    torch.cuda.synchronize()  # the context is still usable
    assert torch.ones(1, device=DEV).item() == 1


@needs_gpu
def test_native_on_cuda_says_which_backend_to_use():
    layer = tn.SparseLinear(10, 5, density=0.5, backend="native").to(DEV)
    with pytest.raises(RuntimeError, match="runs on the CPU only"):
        layer(torch.randn(2, 10, device=DEV))


# ---- without a GPU: what the build compiled --------------------------------------------------

def test_cuda_kernels_are_registered_in_every_build():
    """Every op with a CUDA path has a CUDA kernel: cuSPARSE's when built, otherwise one that
    raises with the build command (never the dispatcher's "could not run ... CUDA backend")."""
    for name in ("csr_spmm", "csr_sddmm", "sparse_linear", "sparse_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_nerva::{name}", "CUDA")
    assert tn.ops.cusparse_built() == ("cusparse" in tn._build_info.BACKENDS)
