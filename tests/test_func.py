"""torch.func over sparse layers: grad, vjp, jacrev, vmap (per-sample gradients, batched
inputs, model ensembles), jvp, jacfwd, hessian; checked against the dense model
(``torch_nerva.densify``, gradients gathered at the nonzeros) in float64, or against ordinary
eager backward calls one sample at a time."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state
from torch.func import vjp, vmap

import torch_nerva
from torch_nerva import CSRLayout, SparseLinear, functional, ops

F64 = torch.float64


def sparse_mlp(bias=True, backend="native", density=0.3, sizes=(7, 6, 5, 3), act=nn.ReLU,
               seed=0):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(n_in, n_out, bias=bias, dtype=F64)] + [act()] * (i < len(sizes) - 2)
    return torch_nerva.sparsify(nn.Sequential(*layers), density, backend=backend,
                                generator=torch.Generator().manual_seed(seed))


def sparse_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def loss_fn(out, target):
    return nn.functional.cross_entropy(out, target)


def at_nonzeros(dense_grads, model):
    """The dense model's gradients (a dict over its parameter names) as the sparse model's
    parameters: weight gradients gathered at each layer's nonzeros, in the values' shape."""
    params = dict(model.named_parameters())
    out = {}
    for name, p in params.items():
        layer, _, leaf = name.rpartition(".")
        if leaf == "values":
            positions = model.get_submodule(layer).layout.positions()
            g = dense_grads[f"{layer}.weight"]
            out[name] = g.flatten(-2)[..., positions].reshape(*g.shape[:-2], *p.shape)
        else:
            out[name] = dense_grads[name]
    return out


def dense_param_grads(dense, x, target):
    dense.zero_grad()
    loss_fn(dense(x), target).backward()
    return {n: p.grad for n, p in dense.named_parameters()}


def data(n, n_in=7, n_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g, dtype=F64), torch.randint(0, n_out, (n,), generator=g)


@pytest.fixture(autouse=True)
def no_loop_fallback():
    """A vmapped op without a batching rule warns and runs once per sample: make it fail."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        yield


# ---- grad, vjp, jacrev -------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend,density", [("native", 0.3), ("auto", 0.3), ("auto", 0.8),
                                             ("dense", 0.3)])
def test_grad_matches_dense(bias, backend, density):
    model = sparse_mlp(bias, backend, density)
    dense = torch_nerva.densify(model)
    x, target = data(5)
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = grad(lambda p: loss_fn(functional_call(model, p, (x,)), target))(params)
    want = at_nonzeros(dense_param_grads(dense, x, target), model)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", ["native", "auto"])
def test_vjp_matches_dense(bias, backend):
    model = sparse_mlp(bias, backend)
    dense = torch_nerva.densify(model)
    x, _ = data(4)
    cot = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    out, pullback = vjp(lambda p, x: functional_call(model, p, (x,)), params, x)
    got_params, got_x = pullback(cot)

    xd = x.clone().requires_grad_()
    want_out = dense(xd)
    want_out.backward(cot)
    torch.testing.assert_close(out, want_out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_x, xd.grad, rtol=1e-12, atol=1e-12)
    want = at_nonzeros({n: p.grad for n, p in dense.named_parameters()}, model)
    for name in want:
        torch.testing.assert_close(got_params[name], want[name], rtol=1e-12, atol=1e-12)


def test_jacrev_matches_dense():
    model = sparse_mlp(sizes=(4, 5, 3), act=nn.Tanh)
    dense = torch_nerva.densify(model)
    x, _ = data(2, n_in=4)
    params = {n: p.detach() for n, p in model.named_parameters()}
    dparams = {n: p.detach() for n, p in dense.named_parameters()}
    got_p, got_x = jacrev(lambda p, x: functional_call(model, p, (x,)), argnums=(0, 1))(params, x)
    want_p, want_x = jacrev(lambda p, x: functional_call(dense, p, (x,)), argnums=(0, 1))(dparams,
                                                                                         x)
    torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
    want_p = at_nonzeros(want_p, model)
    for name in want_p:
        torch.testing.assert_close(got_p[name], want_p[name], rtol=1e-12, atol=1e-12)


# ---- vmap: per-sample gradients, batched forward, ensembles ------------------------------------

@pytest.mark.parametrize("rows", [1, 3], ids=["sample=1row", "sample=3rows"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_per_sample_grads_equal_one_backward_per_sample(rows, bias):
    """The DP-SGD / Opacus recipe: vmap(grad(loss), in_dims=(None, 0, 0))."""
    model = sparse_mlp(bias)
    x, target = data(6 * rows)
    x, target = x.view(6, rows, 7), target.view(6, rows)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p, xs, ts):
        return loss_fn(functional_call(model, p, (xs,)), ts)

    got = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(6):
        model.zero_grad()
        out = model(x[i])
        assert "SparseLinear" in out.grad_fn.name() or "CppNode" in out.grad_fn.name()
        loss_fn(out, target[i]).backward()
        for name, p in model.named_parameters():
            assert got[name].shape == (6, *p.shape)
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-12, atol=1e-12)


def test_per_sample_grads_of_1d_samples_and_inputs():
    """Samples without a batch dimension (the recipe's ``x.unsqueeze(0)`` left out) and the
    per-sample input gradient."""
    model = sparse_mlp()
    dense = torch_nerva.densify(model)
    x, target = data(5)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p, xs, ts):
        return loss_fn(functional_call(model, p, (xs,)), ts)

    got_p, got_x = vmap(grad(sample_loss, argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, target)
    for i in range(5):
        xi = x[i].clone().requires_grad_()
        dense.zero_grad()
        loss_fn(dense(xi), target[i]).backward()
        torch.testing.assert_close(got_x[i], xi.grad, rtol=1e-12, atol=1e-12)
        want = at_nonzeros({n: p.grad for n, p in dense.named_parameters()}, model)
        for name in want:
            torch.testing.assert_close(got_p[name][i], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["native", "auto", "dense"])
def test_vmap_forward_over_inputs(backend):
    model = sparse_mlp(backend=backend)
    dense = torch_nerva.densify(model)
    x = torch.randn(4, 2, 7, generator=torch.Generator().manual_seed(3), dtype=F64)
    torch.testing.assert_close(vmap(model)(x), dense(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vmap(model)(x[:, 0]), dense(x[:, 0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vmap(vmap(model))(x), dense(x), rtol=1e-12, atol=1e-12)


def test_vmap_forward_nonfinite_stays_in_its_sample():
    """Dense math's NaN/Inf semantics per sample: an inf in one sample never reaches another."""
    model = sparse_mlp(sizes=(7, 6))
    dense = torch_nerva.densify(model)
    x = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(4), dtype=F64)
    x[1, 0, 2] = float("inf")
    params = {n: p.detach() for n, p in model.named_parameters()}
    batched_params = {n: p.expand(3, *p.shape) for n, p in params.items()}
    want = dense(x)
    for got in (vmap(model)(x),  # folded into rows
                vmap(lambda p, x: functional_call(model, p, (x,)))(batched_params, x)):  # blocks
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert got[0].isfinite().all() and got[2].isfinite().all()


def _check_ensemble(models, backend):
    params, buffers = stack_module_state(models)
    x, target = data(4)

    def fmodel(p, b, x):
        return functional_call(models[0], (p, b), (x,))

    out = vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)
    grads = vmap(grad(lambda p, b, x: loss_fn(fmodel(p, b, x), target)),
                 in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        m.zero_grad()
        y = m(x)
        torch.testing.assert_close(out[i], y.detach(), rtol=1e-12, atol=1e-12)
        loss_fn(y, target).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["native", "dense"])
def test_ensemble_of_one_topology(backend):
    """stack_module_state over copies of a model with their own values and biases."""
    models = [sparse_mlp(backend=backend) for _ in range(3)]
    for s, m in enumerate(models):
        for layer in sparse_layers(m).values():
            layer.reset_parameters(torch.Generator().manual_seed(100 + s))
    assert not torch.equal(models[0][0].values, models[1][0].values)
    _check_ensemble(models, backend)


# Ensembles whose models have different topologies are not supported: the topology is not a
# buffer (so that averaging utilities never touch it), stack_module_state does not stack it, and
# functional_call runs every model on the topology of the module it is given (docs/torch_func.md).


# ---- forward mode and higher orders ------------------------------------------------------------

def test_jvp_and_jacfwd_match_dense():
    model = sparse_mlp(sizes=(4, 5, 3), act=nn.Tanh)
    dense = torch_nerva.densify(model)
    x, _ = data(2, n_in=4)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in params.items()}
    tx = torch.randn(x.shape, generator=gen, dtype=F64)
    # the same direction for the dense model: the values' tangent scattered into the weight
    dparams, dtangents = {}, {}
    for name, p in dense.named_parameters():
        layer, _, leaf = name.rpartition(".")
        dparams[name] = p.detach()
        if leaf == "weight":
            w = torch.zeros(p.numel(), dtype=F64)
            w[model.get_submodule(layer).layout.positions()] = tangents[f"{layer}.values"].flatten()
            dtangents[name] = w.view(p.shape)
        else:
            dtangents[name] = tangents[name]

    out, t_out = jvp(lambda p, x: functional_call(model, p, (x,)), (params, x), (tangents, tx))
    want, want_t = jvp(lambda p, x: functional_call(dense, p, (x,)), (dparams, x), (dtangents, tx))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_out, want_t, rtol=1e-12, atol=1e-12)

    f = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    fwd, rev = jacfwd(f, argnums=(0, 1))(params, x), jacrev(f, argnums=(0, 1))(params, x)
    torch.testing.assert_close(fwd[1], rev[1], rtol=1e-12, atol=1e-12)
    for name in params:
        torch.testing.assert_close(fwd[0][name], rev[0][name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("second", [hessian, lambda f: jacrev(jacrev(f))],
                         ids=["fwd-over-rev", "rev-over-rev"])
def test_hessian_matches_dense(second):
    """The Hessian of the loss in all parameters at once (mixed terms between layers included)
    and in the input."""
    model = sparse_mlp(sizes=(4, 5, 3), act=nn.Tanh)
    dense = torch_nerva.densify(model)
    x, target = data(3, n_in=4)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    dnames = [n for n, _ in dense.named_parameters()]
    dshapes = [p.shape for _, p in dense.named_parameters()]
    theta = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])
    dtheta = torch.cat([p.detach().flatten() for _, p in dense.named_parameters()])
    index, start = [], 0  # where each sparse parameter entry sits in the dense vector
    for name, dshape in zip(names, dshapes):
        layer, _, leaf = name.rpartition(".")
        pos = model.get_submodule(layer).layout.positions() if leaf == "values" else \
            torch.arange(dshape.numel())
        index.append(start + pos)
        start += dshape.numel()
    index = torch.cat(index)

    def unflatten(t, names, shapes):
        return dict(zip(names, t.split([s.numel() for s in shapes])))

    def sparse_loss(t, x):
        p = {n: v.view(s) for (n, v), s in zip(unflatten(t, names, shapes).items(), shapes)}
        return loss_fn(functional_call(model, p, (x,)), target)

    def dense_loss(t, x):
        p = {n: v.view(s) for (n, v), s in zip(unflatten(t, dnames, dshapes).items(), dshapes)}
        return loss_fn(functional_call(dense, p, (x,)), target)

    got = second(sparse_loss)(theta, x)
    want = hessian(dense_loss)(dtheta, x)
    torch.testing.assert_close(got, want[index][:, index], rtol=1e-10, atol=1e-12)
    got_x = second(lambda x: sparse_loss(theta, x))(x)
    torch.testing.assert_close(got_x, hessian(lambda x: dense_loss(dtheta, x))(x), rtol=1e-10,
                               atol=1e-12)


# ---- edge cases ---------------------------------------------------------------------------------

def _layer(kind):
    g = torch.Generator().manual_seed(6)
    if kind == "empty-rows-cols":
        mask = torch.rand(5, 6, generator=g) < 0.5
        mask[[0, 3]] = False
        mask[:, [1, 4]] = False
        return SparseLinear(6, 5, mask=mask, dtype=F64, generator=g, backend="native")
    density = {"density-0": 0.0, "density-1": 1.0, "int64": 0.4}[kind]
    index_dtype = torch.int64 if kind == "int64" else None
    return SparseLinear(6, 5, density=density, dtype=F64, generator=g, backend="native",
                        index_dtype=index_dtype)


@pytest.mark.parametrize("kind", ["empty-rows-cols", "density-0", "density-1", "int64"])
@pytest.mark.parametrize("batch", [1, 4])
def test_edge_layouts_grad_and_per_sample(kind, batch):
    layer = _layer(kind)
    w = layer.dense_weight().detach()
    pos = layer.layout.positions()
    x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(7), dtype=F64)
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p, x):
        return functional_call(layer, p, (x,)).sin().sum()

    got = grad(loss)(params, x)
    wd, bd = w.clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    (x @ wd.T + bd).sin().sum().backward()
    torch.testing.assert_close(got["values"], wd.grad.flatten()[pos].view_as(layer.values),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["bias"], bd.grad, rtol=1e-12, atol=1e-12)

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for i in range(batch):
        wd.grad = None
        (x[i:i + 1] @ wd.T + layer.bias.detach()).sin().sum().backward()
        torch.testing.assert_close(per_sample["values"][i],
                                   wd.grad.flatten()[pos].view_as(layer.values),
                                   rtol=1e-12, atol=1e-12)


# ---- the raw ops under vmap --------------------------------------------------------------------

def _dense_of(layout, values):
    w = torch.zeros(*values.shape[:-1], layout.shape[0] * layout.shape[1], dtype=values.dtype)
    w[..., layout.positions()] = values
    return w.view(*values.shape[:-1], *layout.shape)


@pytest.mark.parametrize("batched", ["x", "values", "bias", "x+values+bias", "perm"])
def test_vmap_raw_csr_spmm(batched):
    gen = torch.Generator().manual_seed(8)
    layout = CSRLayout.random(5, 6, 12, generator=gen)
    crow_t, col_t, perm = layout.transpose()
    B = 3
    x = torch.randn(B, 2, 6, generator=gen, dtype=F64)
    values = torch.randn(B, 12, generator=gen, dtype=F64)
    bias = torch.randn(B, 5, generator=gen, dtype=F64)
    dims = {"x": 0 if "x" in batched else None, "values": 0 if "values" in batched else None,
            "bias": 0 if "bias" in batched else None}
    xa, va, ba = (t if dims[k] is not None else t[0]
                  for k, t in (("x", x), ("values", values), ("bias", bias)))
    if batched == "perm":  # y = x W with W^T's layout reading values[perm], values vmapped
        xw = torch.randn(B, 2, 5, generator=gen, dtype=F64)
        got = vmap(lambda x, v: ops.csr_spmm(x, v, crow_t, col_t, perm))(xw, values)
        torch.testing.assert_close(got, xw @ _dense_of(layout, values), rtol=1e-12, atol=1e-12)
        return
    got = vmap(lambda x, v, b: ops.csr_spmm(x, v, layout.crow, layout.col, None, b),
               in_dims=(dims["x"], dims["values"], dims["bias"]))(xa, va, ba)
    xs = x if dims["x"] is not None else x[0].expand(B, 2, 6)
    vs = values if dims["values"] is not None else values[0].expand(B, 12)
    bs = bias if dims["bias"] is not None else bias[0].expand(B, 5)
    torch.testing.assert_close(got, xs @ _dense_of(layout, vs).transpose(1, 2) + bs.unsqueeze(1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3], ids=["1row", "3rows"])  # gathers / block kernel
@pytest.mark.parametrize("batched", ["both", "grad_out", "x"])
def test_vmap_raw_csr_sddmm(batched, rows):
    gen = torch.Generator().manual_seed(9)
    layout = CSRLayout.random(5, 6, 12, generator=gen)
    B = 4
    g = torch.randn(B, rows, 5, generator=gen, dtype=F64)
    x = torch.randn(B, rows, 6, generator=gen, dtype=F64)
    gd, xd = (0 if batched in ("both", "grad_out") else None), (0 if batched in ("both", "x")
                                                                 else None)
    got = vmap(lambda g, x: ops.csr_sddmm(g, x, layout.crow, layout.col), in_dims=(gd, xd))(
        g if gd is not None else g[0], x if xd is not None else x[0])
    gs = g if gd is not None else g[0].expand_as(g)
    xs = x if xd is not None else x[0].expand_as(x)
    want = (gs.transpose(1, 2) @ xs).flatten(1)[:, layout.positions()]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_block_diagonal_layout_is_a_valid_csr():
    gen = torch.Generator().manual_seed(10)
    layout = CSRLayout.random(4, 3, 5, generator=gen, index_dtype=torch.int32)
    crow, col, _ = ops.block_diagonal_layout(3, layout.crow, layout.col, 3)
    assert crow.dtype == col.dtype == torch.int32
    big = CSRLayout(crow, col, (12, 9)).validate()
    w = torch.block_diag(*[layout.to_mask()] * 3)
    assert torch.equal(big.to_mask(), w)


def test_block_diagonal_layout_widens_indices_that_would_overflow(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    layout = CSRLayout.random(4, 3, 5, generator=gen, index_dtype=torch.int32)
    _, _, perm = layout.transpose()
    monkeypatch.setattr(ops, "_INT32_MAX", 3 * 5 - 1)  # 3 copies of 5 nonzeros: "too many"
    crow, col, perm_b = ops.block_diagonal_layout(3, layout.crow, layout.col, 3, perm)
    assert crow.dtype == col.dtype == perm_b.dtype == torch.int64
    CSRLayout(crow, col, (12, 9)).validate()
    torch.testing.assert_close(perm_b, torch.cat([perm.long() + 5 * b for b in range(3)]))


# ---- what stays as it was, and what refuses -----------------------------------------------------

def test_eager_path_keeps_the_cpp_autograd():
    layer = SparseLinear(6, 5, density=0.3, backend="native", dtype=F64)
    y = layer(torch.randn(2, 6, dtype=F64))
    assert "SparseLinearFunction" in y.grad_fn.name()  # the C++ autograd::Function, not ours
    seen = []
    grad(lambda v: (seen.append(functional.sparse_linear(
        torch.ones(1, 6, dtype=F64), v, None, layer.crow_indices, layer.col_indices,
        layer.crow_indices_t, layer.col_indices_t, layer.perm_t, backend="native")),
        seen[-1].sum())[1])(layer.values.detach().reshape(-1))
    assert seen  # (the transform ran through the Python Function without error)


@pytest.mark.parametrize("backend", ["torch", "mkl"])
def test_unsupported_backends_raise_clearly(backend):
    if backend not in torch_nerva.backends.available():
        pytest.skip(f"backend {backend} not built")
    model = sparse_mlp(backend=backend)
    x, target = data(2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=f"backend '{backend}' does not support torch.func"):
        grad(lambda p: loss_fn(functional_call(model, p, (x,)), target))(params)
    with pytest.raises(RuntimeError, match="backend='native'"):
        vmap(model)(x)


def test_docs_recipe_runs():
    """docs/torch_func.md's per-sample-gradient recipe, run as written (it asserts its result)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "torch_func.md").read_text()
    block = text.split("## Per-sample gradients", 1)[1].split("```python\n", 1)[1]
    exec(compile(block.split("\n```", 1)[0], "docs/torch_func.md", "exec"), {})


def test_bad_input_under_a_transform_raises_the_eager_error():
    model = sparse_mlp()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(2, 5, dtype=F64)  # the model takes 7 features
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, in_features=7\)"):
        grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        vmap(model)(torch.randn(2, 7))
