"""SparseLinear and MaskedLinear: API, twins, state, compile, bad input."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import torch_nerva as tn
from torch_nerva.init import xavier_bound

from conftest import tol


def twins(in_f, out_f, seed=0, **kw):
    s = tn.SparseLinear(in_f, out_f, generator=torch.Generator().manual_seed(seed), **kw)
    m = tn.MaskedLinear(in_f, out_f, generator=torch.Generator().manual_seed(seed), **kw)
    return s, m


def test_attributes_and_repr():
    layer = tn.SparseLinear(300, 200, density=0.05)
    assert (layer.in_features, layer.out_features) == (300, 200)
    assert layer.nnz == 3000 and layer.density == pytest.approx(0.05)
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert layer.values.shape == (1, 3000) and layer.flat_values().shape == (3000,)
    assert layer.crow_indices.dtype == torch.int32 and layer.crow_indices.shape == (201,)
    r = repr(layer)
    for part in ("in_features=300", "out_features=200", "nnz=3000", "density=0.05", "backend=auto"):
        assert part in r
    sd = layer.state_dict()
    assert set(sd) == {"values", "bias", "crow_indices", "col_indices"}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd._metadata[""]["shape"] == (200, 300)


@pytest.mark.parametrize("density", [0.0, 0.013, 0.5, 1.0])
def test_exact_nnz_and_init_bound(density):
    layer = tn.SparseLinear(97, 41, density=density, dtype=torch.float64)
    assert layer.nnz == math.floor(density * 97 * 41 + 0.5)
    assert layer.layout.to_mask().sum() == layer.nnz  # distinct positions
    if layer.nnz:
        a = xavier_bound(layer.nnz, 97, 41)
        assert layer.values.abs().max() <= a
        assert layer.values.abs().max() > 0.8 * a  # really spread over U(-a, a)
    assert layer.bias.abs().max() <= 1 / math.sqrt(97)


def test_xavier_bound_is_glorot_at_full_density():
    assert xavier_bound(30 * 20, 30, 20) == pytest.approx(math.sqrt(6 / 50))
    assert xavier_bound(6, 30, 20) == pytest.approx(math.sqrt(6 / 50) / math.sqrt(0.01))


def test_same_generator_same_layer():
    a = tn.SparseLinear(50, 40, density=0.1, generator=torch.Generator().manual_seed(3))
    b = tn.SparseLinear(50, 40, density=0.1, generator=torch.Generator().manual_seed(3))
    c = tn.SparseLinear(50, 40, density=0.1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.col_indices, b.col_indices) and torch.equal(a.values, b.values)
    assert not torch.equal(a.col_indices, c.col_indices)


def test_large_layer_sampling_is_exact_without_dense_buffers():
    layer = tn.SparseLinear(8192, 8192, density=0.001, bias=False)  # 67M positions: sampled path
    assert layer.nnz == round(0.001 * 8192 * 8192)
    tn.CSRLayout.from_tensors(layer.crow_indices, layer.col_indices, (8192, 8192))
    rows = layer.layout.row_indices()
    # Roughly uniform over rows and columns (each has ~8.2 expected nonzeros).
    assert rows.bincount(minlength=8192).float().mean() == pytest.approx(8.19, rel=0.01)
    assert layer.col_indices.long().bincount(minlength=8192).max() < 40


def test_twins_hold_identical_weights_and_outputs(dtype):
    s, m = twins(40, 30, density=0.2, dtype=dtype)
    assert torch.equal(s.dense_weight(), m.weight * m.mask)
    assert torch.equal(s.mask, m.mask) and torch.equal(s.bias, m.bias)
    assert torch.equal(s.weight.to_dense(), m.dense_weight())
    x = torch.randn(8, 40, dtype=dtype)
    torch.testing.assert_close(s(x), m(x), **tol(dtype))


def test_input_shapes_like_nn_linear(backend):
    s, m = twins(16, 8, density=0.3, backend=backend)
    for shape in [(16,), (1, 16), (3, 5, 16), (2, 3, 4, 16), (0, 16)]:
        x = torch.randn(*shape)
        assert s(x).shape == shape[:-1] + (8,)
        torch.testing.assert_close(s(x), m(x))
    x = torch.randn(16, 6).t()  # non-contiguous
    torch.testing.assert_close(s(x), m(x))


@pytest.mark.parametrize("in_f,out_f", [(0, 4), (5, 0), (0, 0)])
def test_empty_features(in_f, out_f):
    s, m = twins(in_f, out_f, density=0.5)
    x = torch.randn(3, in_f, requires_grad=True)
    y = s(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert x.grad.shape == x.shape and s.bias.grad.shape == (out_f,)


def test_gradients_match_masked_twin_3d(dtype, backend):
    s, m = twins(20, 10, density=0.4, dtype=dtype, backend=backend)
    x = torch.randn(2, 3, 20, dtype=dtype)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    s(xs).pow(2).sum().backward()
    m(xm).pow(2).sum().backward()
    torch.testing.assert_close(xs.grad, xm.grad, **tol(dtype))
    torch.testing.assert_close(s.values.grad.view(-1), m.weight.grad[m.mask], **tol(dtype))
    torch.testing.assert_close(s.bias.grad, m.bias.grad, **tol(dtype))
    assert torch.all(m.weight.grad[~m.mask] == 0)  # the masked baseline masks gradients too


def test_float64_gradcheck_through_module(index_dtype):
    layer = tn.SparseLinear(6, 5, density=0.5, dtype=torch.float64, index_dtype=index_dtype)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: tn.sparse_linear(
        x, v, b, layer.crow_indices, layer.col_indices, layer.crow_indices_t,
        layer.col_indices_t, layer.perm_t), (x, layer.flat_values().detach().requires_grad_(), layer.bias))


def test_backends_agree(backend, dtype):
    s, m = twins(33, 17, density=0.25, dtype=dtype, backend=backend)
    x = torch.randn(5, 33, dtype=dtype, requires_grad=True)
    xm = x.detach().clone().requires_grad_()
    s(x).sum().backward()
    m(xm).sum().backward()
    torch.testing.assert_close(x.grad, xm.grad, **tol(dtype))
    torch.testing.assert_close(s.values.grad.view(-1), m.weight.grad[m.mask], **tol(dtype))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses, outs = [], []
    for _ in range(steps):
        x = torch.randn(16, 24, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        outs.append(out.detach())
    return torch.stack(losses), torch.stack(outs)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["sgd_nesterov", "adam"])
@pytest.mark.parametrize("backend_name", ["auto", "native", "dense"])
def test_twins_train_identically_for_20_steps(make_opt, backend_name):
    dense = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 5))
    sparse = tn.sparsify(dense, 0.2, generator=torch.Generator().manual_seed(0),
                         backend=backend_name)
    masked = tn.to_masked(sparse)
    ls, os_ = _train(sparse, make_opt(sparse.parameters()), 20)
    lm, om = _train(masked, make_opt(masked.parameters()), 20)
    torch.testing.assert_close(ls, lm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(os_, om, rtol=1e-4, atol=1e-4)
    for a, b in zip(sparse, masked):
        if isinstance(a, tn.SparseLinear):
            torch.testing.assert_close(a.dense_weight(), b.dense_weight(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ls[0], ls[-1])  # it really trained


def test_state_dict_save_load_deepcopy():
    layer = tn.SparseLinear(30, 20, density=0.2)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = tn.SparseLinear(30, 20, density=0.2)  # different random topology
    assert not torch.equal(other.col_indices, layer.col_indices)
    other.load_state_dict(sd)  # adopts the saved topology and rebuilds the transpose
    x = torch.randn(4, 30, requires_grad=True)
    torch.testing.assert_close(other(x), layer(x))
    other(x).sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(g1, x.grad)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), layer(x))
    assert clone.values is not layer.values
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    torch.testing.assert_close(whole(x), layer(x))


def test_load_with_different_nnz_adopts_and_keeps_parameter_object():
    src = tn.SparseLinear(30, 20, density=0.5)
    dst = tn.SparseLinear(30, 20, density=0.1)
    param = dst.values
    dst.load_state_dict(src.state_dict())
    assert dst.values is param and dst.nnz == src.nnz
    x = torch.randn(3, 30)
    torch.testing.assert_close(dst(x), src(x))


def test_load_rejects_malformed_layout_and_wrong_shape():
    layer = tn.SparseLinear(30, 20, density=0.2)
    sd = layer.state_dict()
    bad = dict(sd)
    bad["col_indices"] = sd["col_indices"].clone()
    bad["col_indices"][0] = 1000
    with pytest.raises(RuntimeError, match="column index out of range"):
        tn.SparseLinear(30, 20, density=0.2).load_state_dict(bad)
    with pytest.raises((RuntimeError, ValueError), match="shape"):
        tn.SparseLinear(31, 20, density=0.2).load_state_dict(sd)


def test_to_dtype_and_indices_follow():
    layer = tn.SparseLinear(10, 8, density=0.5).to(torch.float64)
    assert layer.values.dtype == torch.float64 and layer.crow_indices.dtype == torch.int32
    x = torch.randn(2, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias)


def test_from_dense_keeps_largest_or_masked_or_nonzero():
    lin = nn.Linear(20, 10)
    s = tn.SparseLinear.from_dense(lin, density=0.25)
    m = tn.MaskedLinear.from_dense(lin, density=0.25)
    assert s.nnz == 50 and m.nnz == 50
    kept = lin.weight.detach().abs()[s.mask]
    dropped = lin.weight.detach().abs()[~s.mask]
    assert kept.min() >= dropped.max()
    x = torch.randn(3, 20)
    torch.testing.assert_close(s(x), m(x))
    torch.testing.assert_close(s(x), x @ (lin.weight * s.mask).t() + lin.bias)
    mask = torch.rand(10, 20) < 0.3
    s2 = tn.SparseLinear.from_dense(lin, mask=mask)
    assert torch.equal(s2.mask, mask)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    s3 = tn.SparseLinear.from_dense(lin)
    assert torch.equal(s3.mask, lin.weight != 0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(density=1.5), ValueError, r"density must be in \[0, 1\]"),
    (dict(density=-0.1), ValueError, r"density must be in \[0, 1\]"),
    (dict(density=float("nan")), ValueError, r"density must be in \[0, 1\]"),
    (dict(density="half"), TypeError, "density must be a number"),
    (dict(), TypeError, "exactly one of density=, mask= or nnz="),
    (dict(density=0.1, mask=torch.ones(4, 6, dtype=torch.bool)), TypeError, "exactly one"),
    (dict(mask=torch.ones(6, 4, dtype=torch.bool)), ValueError, r"mask must have shape"),
    (dict(nnz=25), ValueError, r"nnz must be an int in \[0, 24\]"),
    (dict(density=0.5, backend="magic"), ValueError, "backend must be one of"),
    (dict(density=0.5, index_dtype=torch.int16), TypeError, "index_dtype"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        tn.SparseLinear(6, 4, **kwargs)
    with pytest.raises(error, match=match):
        tn.MaskedLinear(6, 4, **kwargs)


def test_forward_errors():
    layer = tn.SparseLinear(6, 4, density=0.5)
    with pytest.raises(ValueError, match=r"in_features=6"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"in_features=6"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        layer([1.0] * 6)


def test_double_backward_is_refused():
    layer = tn.SparseLinear(6, 4, density=0.5, backend="native")
    x = torch.randn(3, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


def _compiled_step(model, x, compile_):
    fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_ else model
    out = fn(x)
    out.pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("backend_name", ["native", "dense"])
def test_torch_compile_fullgraph_forward_backward(backend_name):
    torch._dynamo.reset()
    model = tn.sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 0.3,
                        generator=torch.Generator().manual_seed(0), backend=backend_name)
    x = torch.randn(5, 12)
    eager_out, eager_grads = _compiled_step(model, x, False)
    comp_out, comp_grads = _compiled_step(model, x, True)
    torch.testing.assert_close(comp_out, eager_out)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # inference too, with another batch size
        x2 = torch.randn(1, 12)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x2),
                                   model(x2))


def test_auto_picks_dense_for_small_or_dense_layers_and_native_otherwise():
    assert tn.SparseLinear(512, 10, density=0.01).resolved_backend == "native"
    assert tn.SparseLinear(512, 10, density=0.6).resolved_backend == "dense"
    assert tn.SparseLinear(300, 200, density=0.9).resolved_backend == "dense"
    assert tn.SparseLinear(1024, 512, density=0.35).resolved_backend == "dense"
    assert tn.SparseLinear(1024, 512, density=0.25).resolved_backend == "native"
    big = tn.SparseLinear(300, 200, density=0.01)
    assert big.resolved_backend == "native" and "backend=auto(native)" in repr(big)
    assert big.dense_positions.numel() == 0  # no dense-path state kept for a sparse layer
    # A loaded state with another density re-decides.
    dense_sd = tn.SparseLinear(300, 200, density=0.9).state_dict()
    big.load_state_dict(dense_sd)
    assert big.resolved_backend == "dense" and big.dense_positions.numel() == big.nnz
    x = torch.randn(4, 300)
    torch.testing.assert_close(big(x), x @ big.dense_weight().t() + big.bias)


def test_dense_path_full_density_uses_values_as_weight(dtype):
    s, m = twins(30, 20, density=1.0, dtype=dtype, backend="dense")
    x = torch.randn(5, 30, dtype=dtype, requires_grad=True)
    xm = x.detach().clone().requires_grad_()
    s(x).pow(2).sum().backward()
    m(xm).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xm.grad, **tol(dtype))
    torch.testing.assert_close(s.values.grad.view(-1), m.weight.grad.flatten(), **tol(dtype))


def test_backend_switch_after_construction_still_correct():
    layer = tn.SparseLinear(300, 200, density=0.05)
    x = torch.randn(3, 300)
    ref = layer(x)
    layer.backend = "dense"  # positions were not kept: computed on the fly
    torch.testing.assert_close(layer(x), ref)


def test_auto_dense_layer_uses_native_kernel_for_tiny_batches():
    from torch.profiler import profile

    layer = tn.SparseLinear(300, 200, density=0.9)
    assert layer.resolved_backend == "dense"
    for batch, kernel_expected in ((1, True), (4, True), (5, False)):
        x = torch.randn(batch, 300)
        with profile() as prof:
            y = layer(x)
        names = {e.name for e in prof.events()}
        assert ("torch_nerva::sparse_linear" in names) == kernel_expected
        torch.testing.assert_close(y, x @ layer.dense_weight().t() + layer.bias)


def test_parametrized_bias_is_used_in_forward():
    # (``values`` itself cannot be parametrized: torch keeps parametrizations in a ModuleDict,
    # whose ``values`` method the name would shadow.)
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, v):
            return 2 * v

    layer = tn.SparseLinear(12, 5, density=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 12)
    expected = x @ layer.dense_weight().t() + 2 * layer.bias
    parametrize.register_parametrization(layer, "bias", Double())
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.parametrizations.bias.original.grad is not None


@pytest.mark.parametrize("name,how", [("mkl", "pip install mkl-include"),
                                      ("cusparse", "CUDA toolkit")])
def test_unbuilt_backend_says_how_to_build_it(monkeypatch, name, how):
    monkeypatch.setattr(tn.backends._build_info, "BACKENDS", ["native"])
    with pytest.raises(RuntimeError, match=f"not available in this build.*{how}"):
        tn.SparseLinear(4, 6, density=0.5, backend=name)


def test_cusparse_backend_refuses_cpu_tensors():
    if "cusparse" not in tn.backends.available():
        pytest.skip("built without cuSPARSE")
    layer = tn.SparseLinear(10, 5, density=0.5, backend="cusparse")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        layer(torch.randn(2, 10))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mask_is_the_same_kind_of_thing_on_both_twins(kind):
    """``layer.mask`` is a bool tensor in the weight's shape on the CSR layer (a property) and on
    its masked twin (a buffer), with equal contents; the old call form still works but warns."""
    if kind == "linear":
        sparse = tn.SparseLinear(7, 5, density=0.3, generator=torch.Generator().manual_seed(0))
        shape = (5, 7)
    else:
        sparse = tn.SparseConv2d(4, 6, 3, groups=2, density=0.3,
                                 generator=torch.Generator().manual_seed(0))
        shape = (6, 2, 3, 3)
    masked = tn.to_masked(sparse)
    assert sparse.mask.shape == masked.mask.shape == shape
    assert sparse.mask.dtype == masked.mask.dtype == torch.bool
    assert torch.equal(sparse.mask, masked.mask)
    assert int(sparse.mask.sum()) == sparse.nnz
    assert type(sparse.mask & masked.mask) is torch.Tensor  # results are plain tensors
    with pytest.warns(DeprecationWarning, match="drop the call"):
        called = sparse.mask()
    assert type(called) is torch.Tensor and torch.equal(called, masked.mask)
    with pytest.raises(AttributeError):
        sparse.mask = torch.ones(shape, dtype=torch.bool)  # read-only: the topology decides it
