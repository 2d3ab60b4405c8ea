"""fuse_for_inference: runs of SparseLinear (+ ReLU) computed feature-major in inference,
equal to the ordinary model (NaN/Inf semantics, hooks, training and topology changes)."""
import copy

import pytest
import torch
from torch import nn

import torch_nerva as tn
from torch_nerva import dst

F64 = torch.float64


def _model(dtype=F64, density=0.2, seed=0):
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(),
                          nn.LayerNorm(20), nn.Linear(20, 7), nn.Linear(7, 5))
    return tn.sparsify(model.to(dtype), density, generator=torch.Generator().manual_seed(seed),
                       backend="native")


@pytest.mark.parametrize("shape", [(1, 30), (3, 30), (15, 30), (16, 30), (40, 30), (30,),
                                   (2, 3, 30), (0, 30)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fused_equals_the_ordinary_model(shape, mode):
    model = _model()
    fused = tn.fuse_for_inference(model)
    assert type(fused) is tn.nn.FusedSequential and type(model) is nn.Sequential
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(*shape, dtype=F64)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_fused_runs_the_feature_major_kernel_for_small_batches():
    fused = tn.fuse_for_inference(_model())
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.name())
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Spy():
        fused(torch.randn(1, 30, dtype=F64))
    assert calls.count("torch_nerva::csr_spmm_fm") == 4
    assert "torch_nerva::sparse_linear" not in calls


@pytest.mark.parametrize("where", [0, 7, 29])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_follow_dense_math(where, bad):
    model = _model()
    fused = tn.fuse_for_inference(model)
    x = torch.randn(2, 30, dtype=F64)
    x[1, where] = bad
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tn.densify(model)(x), equal_nan=True)


def test_overflow_inside_the_chain_follows_dense_math():
    model = _model()
    with torch.no_grad():
        model[0].values.mul_(1e300)  # float64 overflow in the first layer's outputs
    fused = tn.fuse_for_inference(model)
    x = torch.randn(1, 30, dtype=F64) * 1e10
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tn.densify(model)(x), equal_nan=True)


def test_training_hooks_and_topology_changes_take_the_ordinary_path():
    model = _model()
    fused = tn.fuse_for_inference(model)
    x = torch.randn(3, 30, dtype=F64)
    fused(x).sum().backward()  # autograd records: the ordinary layers
    model(x).sum().backward()
    for a, b in zip(fused.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    seen = []
    fused[2].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    with torch.no_grad():
        fused(x[:1])
    assert seen == [(1, 20)]  # a hooked layer still runs (and fires) as a module
    dst.prune_and_regrow(fused, drop_fraction=0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(x[:1]), tn.densify(fused)(x[:1]))
    copied = copy.deepcopy(fused)
    with torch.no_grad():
        torch.testing.assert_close(copied(x[:1]), fused(x[:1]))


def test_autocast_and_16_bit_layers():
    model = _model(dtype=torch.float32)
    fused = tn.fuse_for_inference(model)
    x = torch.randn(1, 30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(x), model(x))
    half = tn.fuse_for_inference(_model(dtype=torch.float32).to(torch.bfloat16))
    with torch.no_grad():
        out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
