import pytest
import torch

import torch_nerva  # noqa: F401  (loads the ops)

DTYPES = [torch.float32, torch.float64]
INDEX_DTYPES = [torch.int32, torch.int64]


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(params=INDEX_DTYPES, ids=["i32", "i64"])
def index_dtype(request):
    return request.param


@pytest.fixture(params=["native", "dense", "torch", "mkl"])
def backend(request):
    if request.param not in torch_nerva.backends.available():
        pytest.skip(f"backend {request.param} not built")
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(params=["avx512", "avx2", "base"])
def isa(request):
    """Runs the test with the native kernels built for each instruction set this CPU has."""
    from torch_nerva import ops

    if request.param not in ops.supported_isas():
        pytest.skip(f"this CPU does not support {request.param}")
    old = ops.kernel_isa()
    ops.kernel_isa(request.param)
    yield request.param
    ops.kernel_isa(old)
