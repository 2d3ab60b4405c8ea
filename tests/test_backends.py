"""The sparse_linear op family over (device, backend): every backend of the op runs the same
matrix of checks (forward and gradients against dense float64, gradcheck, opcheck, outputs that
never alias an input, errors), so a new backend inherits them by adding one fixture entry.
The layers' side: ``auto`` resolved once and stored, the stored choice reaching the op."""
import pytest
import torch

import torch_nerva as tn
from torch_nerva import ops

from reference import OpLog, dense, random_layout

_OP = torch.ops.torch_nerva.sparse_linear.default
_BACKWARD = torch.ops.torch_nerva.sparse_linear_backward.default


def _has_gpu_backend():
    return torch.cuda.is_available() and ops.cusparse_built()


# (device, backend) of every kernel of the op; skipped where not built or no device.
DEVICE_BACKENDS = [
    pytest.param(("cpu", "native"), id="cpu-native"),
    pytest.param(("cpu", "mkl"), id="cpu-mkl", marks=pytest.mark.skipif(
        not ops.mkl_available(), reason="built without the MKL backend (pip install mkl-include)")),
    pytest.param(("cuda", "cusparse"), id="cuda-cusparse", marks=pytest.mark.skipif(
        not _has_gpu_backend(), reason="needs a CUDA GPU and the cuSPARSE backend")),
]


@pytest.fixture(params=DEVICE_BACKENDS)
def device_backend(request):
    return request.param


def _inputs(out_f, in_f, batch, density, gen, index_dtype, device, bias=True,
            dtype=torch.float64):
    layout, _ = random_layout(out_f, in_f, density, gen, index_dtype,
                              empty_rows=out_f // 4, empty_cols=in_f // 4)
    crow_t, col_t, perm = layout.transpose()
    x = torch.randn(batch, in_f, dtype=dtype, generator=gen)
    values = torch.randn(layout.nnz, dtype=dtype, generator=gen)
    b = torch.randn(out_f, dtype=dtype, generator=gen) if bias else None
    idx = [t.to(device) for t in (layout.crow, layout.col, crow_t, col_t, perm)]
    return layout, x.to(device), values.to(device), None if b is None else b.to(device), idx


# ---- numerics against dense float64 -------------------------------------------------------

@pytest.mark.parametrize("shape,batch,density", [
    ((1, 1), 1, 1.0), ((7, 5), 1, 0.5), ((17, 33), 6, 0.1), ((20, 30), 4, 0.0),
    ((12, 9), 37, 1.0), ((40, 25), 100, 0.3), ((3, 0), 2, 0.5), ((0, 4), 3, 0.5),
    ((9, 13), 0, 0.5),
])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_dense(device_backend, shape, batch, density, bias,
                                           index_dtype, gen):
    device, backend = device_backend
    layout, x, v, b, idx = _inputs(*shape, batch, density, gen, index_dtype, device, bias)
    x.requires_grad_()
    v.requires_grad_()
    if b is not None:
        b.requires_grad_()
    y, saved = _OP(x, v, b, *idx, backend)
    g = torch.randn(y.shape, dtype=y.dtype, generator=gen).to(device)
    y.backward(g)
    w = dense(layout, v.detach().cpu()).requires_grad_()
    xr = x.detach().cpu().requires_grad_()
    br = None if b is None else b.detach().cpu().requires_grad_()
    yr = torch.nn.functional.linear(xr, w, br)
    yr.backward(g.cpu())
    torch.testing.assert_close(y.cpu(), yr)
    torch.testing.assert_close(x.grad.cpu(), xr.grad)
    torch.testing.assert_close(v.grad.cpu(), w.grad[layout.to_mask()])
    if b is not None:
        torch.testing.assert_close(b.grad.cpu(), br.grad)


@pytest.mark.parametrize("shape,batch,density", [((7, 5), 3, 0.5), ((9, 13), 1, 0.3),
                                                 ((6, 4), 2, 0.0), ((8, 8), 4, 1.0)])
def test_gradcheck(device_backend, shape, batch, density, index_dtype, gen):
    device, backend = device_backend
    _, x, v, b, idx = _inputs(*shape, batch, density, gen, index_dtype, device)
    args = [t.requires_grad_() for t in (x, v, b)]
    assert torch.autograd.gradcheck(lambda x, v, b: _OP(x, v, b, *idx, backend)[0], args)


@pytest.mark.parametrize("x_grad,v_grad", [(False, True), (True, False), (True, True)])
def test_backward_uses_the_forwards_backend_and_computes_only_what_is_asked(
        device_backend, x_grad, v_grad, gen):
    device, backend = device_backend
    _, x, v, b, idx = _inputs(20, 30, 5, 0.3, gen, torch.int32, device)
    x.requires_grad_(x_grad)
    v.requires_grad_(v_grad)
    y = _OP(x, v, b, *idx, backend)[0]
    with OpLog() as log:
        y.sum().backward()
    (call,) = [c for c in log.calls if "sparse_linear_backward" in c[0]]
    _, args, (grad_x, grad_values) = call
    # the dispatcher drops a trailing argument equal to its default ("native")
    assert (args[10] if len(args) > 10 else "native") == backend
    assert tuple(args[8:10]) == (x_grad, v_grad)
    assert grad_x.numel() == (5 * 30 if x_grad else 0)
    assert grad_values.numel() == (v.numel() if v_grad else 0)


def test_outputs_never_alias_an_input(device_backend, gen):
    device, backend = device_backend
    _, x, v, b, idx = _inputs(9, 14, 4, 0.3, gen, torch.int32, device)
    inputs = [x, v, b, *idx]
    for xx in (x, x[:, :14]):  # contiguous, and a view of it
        y, saved = _OP(xx, v, b, *idx, backend)
        for out in (y, saved):
            for t in inputs:
                assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    dy = torch.randn(4, 9, dtype=x.dtype, generator=gen).to(device)
    for out in _BACKWARD(dy, saved, v, *idx, True, True, backend):
        for t in [dy, saved, v, *idx]:
            assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_opcheck(device_backend, gen):
    """Schema (including: no output aliases an input), fake kernel, autograd registration and
    dynamic shapes, for the forward (with and without bias and gradients) and the backward."""
    device, backend = device_backend
    _, x, v, b, idx = _inputs(9, 14, 4, 0.3, gen, torch.int32, device)
    saved = _OP(x, v, b, *idx, backend)[1]
    dy = torch.randn(4, 9, dtype=x.dtype, generator=gen).to(device)
    cases = [
        (_OP, (x.clone().requires_grad_(), v.clone().requires_grad_(),
               b.clone().requires_grad_(), *idx, backend)),
        (_OP, (x, v, None, *idx, backend)),
        (_BACKWARD, (dy, saved, v, *idx, True, True, backend)),
        (_BACKWARD, (dy, v.new_empty(0, 0), v, *idx, True, False, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_layer_on_the_backend_matches_its_masked_twin(device_backend):
    device, backend = device_backend
    layer = tn.SparseLinear(30, 20, density=0.2, backend=backend, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0)).to(device)
    masked = tn.to_masked(layer)
    assert layer.resolved_backend == backend
    x = torch.randn(7, 30, dtype=torch.float64, device=device)
    with OpLog() as log:
        y = layer(x)
    (call,) = [c for c in log.calls if c[0].startswith("torch_nerva.sparse_linear.")]
    assert (call[1][8] if len(call[1]) > 8 else "native") == backend  # the stored choice
    torch.testing.assert_close(y, masked(x))


# ---- errors --------------------------------------------------------------------------------

def test_unknown_backend_name_is_refused_by_the_op(device_backend, gen):
    device, _ = device_backend
    _, x, v, b, idx = _inputs(6, 8, 2, 0.5, gen, torch.int32, device)
    for name in ("auto", "dense", "MKL", ""):
        with pytest.raises(RuntimeError, match="backend must be 'native', 'mkl' or 'cusparse'"):
            _OP(x, v, b, *idx, name)
        with pytest.raises(RuntimeError, match="backend must be 'native', 'mkl' or 'cusparse'"):
            _BACKWARD(torch.zeros(2, 6, dtype=x.dtype, device=device), x, v, *idx, True, False,
                      name)


def test_backend_on_the_wrong_device_names_the_right_one(gen):
    _, x, v, b, idx = _inputs(6, 8, 2, 0.5, gen, torch.int32, "cpu")
    with pytest.raises(RuntimeError, match="'cusparse' runs on CUDA tensors only"):
        _OP(x, v, b, *idx, "cusparse")
    with pytest.raises(RuntimeError, match="'cusparse' runs on CUDA tensors only"):
        _BACKWARD(torch.zeros(2, 6, dtype=x.dtype), x, v, *idx, True, False, "cusparse")
    if _has_gpu_backend():
        xc, vc, idxc = x.cuda(), v.cuda(), [t.cuda() for t in idx]
        with pytest.raises(RuntimeError, match="'mkl' runs on CPU tensors only"):
            _OP(xc, vc, None, *idxc, "mkl")
        with pytest.raises(RuntimeError, match="'native' has no CUDA kernel.*'cusparse'"):
            _OP(xc, vc, None, *idxc, "native")


def test_arguments_on_different_devices_raise(device_backend, gen):
    device, backend = device_backend
    _, x, v, b, idx = _inputs(6, 8, 2, 0.5, gen, torch.int32, device)
    with pytest.raises(RuntimeError, match="on meta|different devices"):
        _OP(x, v.to("meta"), b, *idx, backend)


def test_unbuilt_backends_say_how_to_build_them(gen):
    """The op's not-built kernels and backends.check raise with one text (csrc/backend.cpp)."""
    assert "pip install mkl-include" in ops.how_to_build("mkl")
    assert "CUDA toolkit" in ops.how_to_build("cusparse")
    with pytest.raises(RuntimeError, match="always built"):
        ops.how_to_build("native")
    _, x, v, b, idx = _inputs(6, 8, 2, 0.5, gen, torch.int32, "cpu")
    if not ops.mkl_available():
        with pytest.raises(RuntimeError, match="not available in this build.*mkl-include"):
            _OP(x, v, b, *idx, "mkl")


def test_build_facts_are_schemas_in_every_build():
    # defined unconditionally: no hasattr anywhere, the answer follows the build
    assert ops.cusparse_built() == ("cusparse" in tn._build_info.BACKENDS)
    assert ops.mkl_available() == ("mkl" in tn.backends.available())
    if ops.mkl_available():
        assert "mkl" in tn._build_info.BACKENDS
    assert not hasattr(torch.ops.torch_nerva, "mkl_spmm")  # folded into sparse_linear


# ---- the layer: auto resolved once, stored ---------------------------------------------------

def test_auto_is_resolved_when_the_topology_is_set_and_stored():
    sparse = tn.SparseLinear(300, 200, density=0.01)
    assert sparse._backend_arg == "native" and sparse.resolved_backend == "native"
    dense_ish = tn.SparseLinear(300, 200, density=0.9)
    # dense on CPU, with the tiny-batch switch to native left to the call
    assert dense_ish._backend_arg == "auto" and dense_ish.resolved_backend == "dense"
    # a new topology re-decides
    dense_ish.load_state_dict(tn.SparseLinear(300, 200, density=0.01).state_dict())
    assert dense_ish._backend_arg == "native" and dense_ish.resolved_backend == "native"
    # so does assigning a backend
    sparse.backend = "dense"
    assert sparse._backend_arg == "dense" and sparse.resolved_backend == "dense"
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse.backend = "fast"


def test_auto_is_re_resolved_on_a_device_change():
    # a dense-ish layer: on the CPU auto leaves the tiny-batch switch to the call; on any other
    # device (meta here: no GPU needed) it is plain dense
    layer = tn.SparseLinear(300, 200, density=0.9)
    assert layer._backend_arg == "auto"
    layer.to("meta")
    assert layer._backend_arg == "dense" and layer.resolved_backend == "dense"
    assert layer(torch.empty(3, 300, device="meta")).shape == (3, 200)
    sparse = tn.SparseLinear(300, 200, density=0.01, backend="native").to("meta")
    assert sparse._backend_arg == "native"  # a name asked for is kept (checked at the call)
    assert sparse(torch.empty(3, 300, device="meta")).shape == (3, 200)


def test_mkl_layer_passes_mkl_to_the_op_in_forward_and_backward():
    if not ops.mkl_available():
        pytest.skip("built without the MKL backend")
    layer = tn.SparseLinear(30, 20, density=0.3, backend="mkl")
    x = torch.randn(4, 30, requires_grad=True)
    with OpLog() as log:
        layer(x).sum().backward()
    names = [(c[0], c[1][-1]) for c in log.calls if "sparse_linear" in c[0]]
    assert names == [("torch_nerva.sparse_linear.default", "mkl"),
                     ("torch_nerva.sparse_linear_backward.default", "mkl")]


def test_pickled_layer_of_the_old_form_gets_a_stored_choice():
    import pickle

    layer = tn.SparseLinear(30, 20, density=0.3)
    state = layer.__getstate__() if hasattr(layer, "__getstate__") else dict(layer.__dict__)
    state = dict(state)
    state["backend"] = state.pop("_backend_name")
    del state["_backend_arg"]
    old = tn.SparseLinear.__new__(tn.SparseLinear)
    old.__setstate__(state)
    assert old.backend == "auto" and old._backend_arg == "native"
    x = torch.randn(3, 30)
    torch.testing.assert_close(pickle.loads(pickle.dumps(old))(x), layer(x))

