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
    assert calls.count("torch_nerva::csr_chain_fm") == 2  # the two runs around the LayerNorm
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


def _chain_args(layers, relu):
    return ([l.flat_values().detach() for l in layers], [l.crow_indices for l in layers],
            [l.col_indices for l in layers],
            [None if l.bias is None else l.bias.detach() for l in layers], relu)


def _chain_reference(xt, layers, relu):
    y = xt.t()
    for layer, r in zip(layers, relu):
        y = torch.nn.functional.linear(y, layer.to_dense().detach(),
                                       None if layer.bias is None else layer.bias.detach())
        if r:
            y = torch.relu(y)
    return y.t()


@pytest.mark.parametrize("ld", [1, 2, 7, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chain_op_matches_dense_math_with_empty_rows_and_columns(ld, dtype):
    """csr_chain_fm against dense float64 math: random shapes and densities (0, a few, 1),
    a layer without bias, empty rows and columns, ReLU on some layers; opcheck."""
    g = torch.Generator().manual_seed(ld)
    sizes = [37, 50, 1, 33, 12]
    densities = [0.3, 0.0, 1.0, 0.05]
    layers = []
    for k, (n_in, n_out, d) in enumerate(zip(sizes, sizes[1:], densities)):
        layer = tn.SparseLinear(n_in, n_out, density=d, bias=k != 1, dtype=dtype,
                                generator=g, backend="native")
        if d > 0 and n_out > 3:  # an empty row and an empty column
            w = layer.to_dense().detach()
            w[1] = 0
            w[:, 0] = 0
            layer = tn.SparseLinear.from_dense(torch.nn.Linear(n_in, n_out, dtype=dtype)
                                               .requires_grad_(False), mask=w != 0)
        layers.append(layer)
    relu = [1, 0, 1, 0]
    xt = torch.randn(37, ld, dtype=dtype, generator=g)
    if ld >= 16:
        xt[:, ld - 3:] = 0  # padding columns of a padded batch
    got = torch.ops.torch_nerva.csr_chain_fm(xt, *_chain_args(layers, relu))
    ref = _chain_reference(xt.double(), [copy.deepcopy(l).double() for l in layers], relu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got.double(), ref, **tol)
    assert got.shape == (12, ld) and got.dtype == dtype
    torch.library.opcheck(torch.ops.torch_nerva.csr_chain_fm.default,
                          (xt, *_chain_args(layers, relu)))


def test_chain_op_empty_run_returns_a_new_tensor_and_checks_its_arguments():
    ops = torch.ops.torch_nerva
    xt = torch.randn(5, 1)
    out = ops.csr_chain_fm(xt, [], [], [], [], [])
    assert torch.equal(out, xt) and out.data_ptr() != xt.data_ptr()
    layer = tn.SparseLinear(5, 4, density=0.5)
    args = _chain_args([layer], [1])
    with pytest.raises(RuntimeError, match="one entry per layer"):
        ops.csr_chain_fm(xt, args[0], args[1], args[2], args[3], [1, 0])
    with pytest.raises(RuntimeError, match="contiguous 2-D"):
        ops.csr_chain_fm(torch.randn(5), *args)
    with pytest.raises(RuntimeError, match="fewer than 16 or a multiple"):
        ops.csr_chain_fm(torch.randn(5, 17), *args)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.csr_chain_fm(xt.double(), *args)
    with pytest.raises(RuntimeError, match="column index out of range"):
        ops.csr_chain_fm(torch.randn(3, 1), *args)  # 5 input features expected
    bad_col = args[2][0].clone()
    bad_col[0] = 99
    with pytest.raises(RuntimeError, match="column index out of range"):
        ops.csr_chain_fm(xt, args[0], args[1], [bad_col], args[3], args[4])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_chain_op_applies_dense_non_finite_rule_at_every_layer(bad):
    model = _model()
    fused = tn.fuse_for_inference(model)
    for layer_input in (0, 2):  # in the input, and in a weight (reaching layer 2's input)
        x = torch.randn(1, 30, dtype=F64)
        m = copy.deepcopy(model)
        if layer_input == 0:
            x[0, 3] = bad
        else:
            with torch.no_grad():
                m[0].values.view(-1)[0] = bad
        f = tn.fuse_for_inference(m)
        with torch.no_grad():
            torch.testing.assert_close(f(x), tn.densify(m)(x), equal_nan=True)
