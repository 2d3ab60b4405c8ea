"""FSSL structured sparsity (torch_nerva.structured) against dense references."""
import math

import pytest
import torch
from torch import nn

import torch_nerva as tn
from torch_nerva import structured as S

from reference import random_layout
from test_dst import _MaxAlloc

F64 = torch.float64


# -- builders ----------------------------------------------------------------------------------
def sparse_linear(n_in, n_out, gen, density=0.4, empty_rows=2, empty_cols=2, bias=True,
                  index_dtype=torch.int64):
    layout, _ = random_layout(n_out, n_in, density, gen, index_dtype, empty_rows, empty_cols)
    values = torch.randn(layout.nnz, generator=gen, dtype=F64)
    b = torch.randn(n_out, generator=gen, dtype=F64) if bias else None
    return tn.SparseLinear.from_layout(layout, values, b)


def conv_mask(c_in, c_out, k, groups, gen, density=0.5, empty_out=1, empty_in=1):
    """A (out, in/groups*k*k) pattern with empty output channels and empty input channels."""
    ipg = c_in // groups
    mask = torch.rand(c_out, ipg * k * k, generator=gen) < density
    mask[torch.randperm(c_out, generator=gen)[:empty_out]] = False
    w = mask.view(c_out, ipg, k * k)
    opg = c_out // groups
    for ch in torch.randperm(c_in, generator=gen)[:empty_in].tolist():  # whole input channel
        g, c = divmod(ch, ipg)
        w[g * opg:(g + 1) * opg, c] = False
    return mask


def sparse_conv(c_in, c_out, k, gen, groups=1, padding=0, bias=True, **kw):
    mask = conv_mask(c_in, c_out, k, groups, gen, **kw)
    conv = tn.SparseConv2d(c_in, c_out, k, padding=padding, groups=groups, bias=bias, mask=mask,
                           dtype=F64, generator=gen)
    with torch.no_grad():
        conv.values.copy_(torch.randn(conv.values.shape, generator=gen, dtype=F64))
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=gen, dtype=F64))
    return conv


def dense_groups(w4, groups):
    """Dense reference: (row norms^2, input-channel norms^2, dense row size, dense col size)
    of an (out, in/groups, kh, kw) or (out, in) weight."""
    if w4.dim() == 2:
        w4 = w4[:, :, None, None]
    out, ipg, kh, kw = w4.shape
    rows = torch.stack([w4[o].pow(2).sum() for o in range(out)])
    opg = out // groups
    cols = torch.stack([w4[(ch // ipg) * opg:(ch // ipg + 1) * opg, ch % ipg].pow(2).sum()
                        for ch in range(ipg * groups)])
    return rows, cols, ipg * kh * kw, opg * kh * kw


def dense_weight(layer):
    return layer.dense_weight4d() if hasattr(layer, "dense_weight4d") else layer.dense_weight()


LAYERS = {
    "linear": lambda g: sparse_linear(11, 9, g),
    "conv": lambda g: sparse_conv(4, 6, 3, g),
    "conv-groups": lambda g: sparse_conv(4, 6, 3, g, groups=2),
}


# -- penalty -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("weights", [None, "nnz", "one"])
def test_penalty_and_gradient_match_a_dense_group_norm(kind, weights):
    gen = torch.Generator().manual_seed(3)
    layer = LAYERS[kind](gen)
    model = nn.Sequential(layer)
    coef = {"rows": 0.7, "cols": 1.3}
    pen = S.group_lasso(model, groups=coef, weights=weights)
    (grad,) = torch.autograd.grad(pen, layer.values)

    w = dense_weight(layer).detach().clone().requires_grad_(True)
    mask = (dense_weight(layer) != 0) | layer.mask.view(w.shape)
    rows, cols, row_size, col_size = dense_groups(w, layer.groups if hasattr(layer, "groups")
                                                  else 1)
    mrows, mcols, _, _ = dense_groups(mask.to(F64), getattr(layer, "groups", 1))
    if weights is None:
        sr, sc = math.sqrt(row_size), math.sqrt(col_size)
    elif weights == "nnz":
        sr, sc = mrows.sqrt(), mcols.sqrt()
    else:
        sr = sc = 1.0
    ref = 0.7 * (sr * rows.sqrt()).sum() + 1.3 * (sc * cols.sqrt()).sum()
    torch.testing.assert_close(pen, ref)
    assert bool((rows == 0).any()) and bool((cols == 0).any())  # empty groups are exercised
    # the dense gradient at the stored positions (0 for empty groups: sqrt'(0) subgradient)
    ref.backward()
    positions = layer.layout.positions()
    torch.testing.assert_close(grad.view(-1), w.grad.flatten()[positions])
    assert torch.isfinite(grad).all()
    # the masked twin gives the same penalty and gradient
    twin = tn.to_masked(model)
    pen_m = S.group_lasso(twin, groups=coef, weights=weights)
    torch.testing.assert_close(pen_m, pen)
    pen_m.backward()
    torch.testing.assert_close(twin[0]._weight().grad.flatten()[positions], grad.view(-1))


def test_penalty_gradcheck_and_empty_models():
    gen = torch.Generator().manual_seed(0)
    layer = sparse_linear(6, 5, gen, density=0.6, empty_rows=0, empty_cols=0)
    v = layer.values.detach().clone().requires_grad_(True)
    # gradcheck through the library's own function: the parameter swapped for a leaf
    model = nn.Sequential(layer)

    def pen(values):
        layer._parameters["values"] = values
        try:
            return S.group_lasso(model)
        finally:
            layer._parameters["values"] = nn.Parameter(v.detach())
    assert torch.autograd.gradcheck(pen, (v,))
    # no sparse layer: a zero penalty, prox a no-op
    assert S.group_lasso(nn.Sequential(nn.Linear(3, 2))).item() == 0
    assert S.prox_(nn.Sequential(nn.Linear(3, 2)), 0.1) == {"rows": 0, "cols": 0}


# -- prox --------------------------------------------------------------------------------------
def dense_prox(w4, step, kinds, groups, weights):
    """Group soft-threshold of each kind in turn on the dense weight."""
    w = w4.clone()
    if w.dim() == 2:
        w = w[:, :, None, None]
    out, ipg, kh, kw = w.shape
    opg = out // groups
    for kind, coef in kinds:
        if kind == "rows":
            sel = [(slice(o, o + 1), slice(None)) for o in range(out)]
            size = ipg * kh * kw
        else:
            sel = [(slice((ch // ipg) * opg, (ch // ipg + 1) * opg), slice(ch % ipg, ch % ipg + 1))
                   for ch in range(ipg * groups)]
            size = opg * kh * kw
        for s in sel:
            g = w[s]
            n = g.norm()
            lam = step * coef * (math.sqrt(size) if weights is None else 1.0)
            factor = max(0.0, 1 - lam / n.item()) if n > 0 else 0.0
            w[s] = g * factor
    return w.view(w4.shape)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("order", [("rows", "cols"), ("cols", "rows"), ("rows",), ("cols",)])
def test_prox_is_the_group_soft_threshold(kind, order):
    gen = torch.Generator().manual_seed(5)
    layer = LAYERS[kind](gen)
    model = nn.Sequential(layer)
    twin = tn.to_masked(model)
    w0 = dense_weight(layer).detach().clone()
    # a step that zeroes some groups and shrinks others
    kinds = [(k, 1.0 if k == "rows" else 0.8) for k in order]
    norms = S.group_norms(layer, order[0])
    _, _, row_size, col_size = dense_groups(w0, getattr(layer, "groups", 1))
    size = row_size if order[0] == "rows" else col_size
    step = 1.01 * float(norms[norms > 0].median()) / (kinds[0][1] * math.sqrt(size))
    zeros = S.prox_(model, step, groups=dict(kinds))
    S.prox_(twin, step, groups=dict(kinds))
    ref = dense_prox(w0, step, kinds, getattr(layer, "groups", 1), None)
    torch.testing.assert_close(dense_weight(layer).detach(), ref)
    torch.testing.assert_close(twin[0].dense_weight().detach().view(ref.shape), ref)
    assert sum(zeros.values()) > 0
    assert int((layer.values == 0).sum()) > 0  # exact zeros


def test_prox_step_zero_is_identity_and_unweighted_mode():
    gen = torch.Generator().manual_seed(1)
    layer = sparse_linear(7, 6, gen)
    model = nn.Sequential(layer)
    before = layer.values.detach().clone()
    S.prox_(model, 0.0)
    assert torch.equal(layer.values.detach(), before)
    w0 = layer.dense_weight().detach().clone()
    S.prox_(model, 0.3, groups=("rows",), weights="one")
    torch.testing.assert_close(layer.dense_weight().detach(),
                               dense_prox(w0, 0.3, [("rows", 1.0)], 1, "one"))


# -- prune_zeros_ ------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_prune_zeros_remaps_optimizer_state_and_twins_stay_identical(opt_name, kind):
    gen = torch.Generator().manual_seed(2)
    if kind == "linear":
        model = nn.Sequential(sparse_linear(24, 12, gen), nn.ReLU(), sparse_linear(12, 5, gen))
        x = torch.randn(16, 24, generator=gen, dtype=F64)
    else:
        model = nn.Sequential(sparse_conv(3, 4, 3, gen, padding=1), nn.ReLU(), nn.Flatten(),
                              sparse_linear(4 * 25, 5, gen))
        x = torch.randn(16, 3, 5, 5, generator=gen, dtype=F64)
    twin = tn.to_masked(model)
    y = torch.randint(0, 5, (16,), generator=gen)
    make = (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)) \
        if opt_name == "sgd" else (lambda p: torch.optim.Adam(p, lr=0.01))
    opts = [make(model.parameters()), make(twin.parameters())]
    for _ in range(3):
        for m, o in zip((model, twin), opts):
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    # gradients pending: they must follow their connections too
    for m in (model, twin):
        nn.functional.cross_entropy(m(x), y).backward()
    for m in (model, twin):
        S.prox_(m, 0.35)
    layers = [l for _, l in S.structured_layers(model)]
    old = []
    for l in layers:
        st = opts[0].state[l.values]
        keep = (l.values.detach().view(-1) != 0)
        old.append((keep, {k: v.clone() for k, v in st.items()},
                    l.values.grad.clone(), l.values.detach().clone(), l.layout.positions()))
    assert any(int((~k).sum()) for k, *_ in old)
    out_before = model(x)
    counts = S.prune_zeros_(model, opts[0])
    S.prune_zeros_(twin, opts[1])
    torch.testing.assert_close(model(x), out_before)
    for l, (keep, st, grad, values, positions), c in zip(layers, old, counts.values()):
        assert c["nnz_after"] == int(keep.sum()) == l.nnz
        assert torch.equal(l.layout.positions(), positions[keep])
        assert torch.equal(l.values.detach().view(-1), values.view(-1)[keep])
        assert torch.equal(l.values.grad.view(-1), grad.view(-1)[keep])
        new = opts[0].state[l.values]
        for k, v in st.items():
            if v.dim() == 0:
                assert torch.equal(new[k], v)  # Adam's step is kept
            else:
                assert new[k].shape == l.values.shape
                assert torch.equal(new[k].view(-1), v.view(-1)[keep])
    for s, m in zip(layers, (l for _, l in S.structured_layers(twin))):
        assert torch.equal(s.mask, m.mask)
    # the pruned twins keep training alike (momentum cannot revive a pruned weight)
    for _ in range(5):
        losses = []
        for m, o in zip((model, twin), opts):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1])
    for s, m in zip(layers, (l for _, l in S.structured_layers(twin))):
        w = m._weight().detach()
        assert bool((w[~m.mask] == 0).all())
        torch.testing.assert_close(s.dense_weight().detach().view(w.shape), w)


def test_prune_zeros_of_a_whole_layer_and_nothing_to_prune():
    gen = torch.Generator().manual_seed(0)
    layer = sparse_linear(5, 4, gen)
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.mse_loss(model(torch.randn(3, 5, dtype=F64)), torch.zeros(3, 4, dtype=F64)
                           ).backward()
    opt.step()
    values = layer.values
    assert S.prune_zeros_(model, opt)["0"]["nnz_after"] == layer.nnz  # nothing changes
    with torch.no_grad():
        layer.values.zero_()
    S.prune_zeros_(model, opt)
    assert layer.nnz == 0 and layer.values is values
    assert opt.state[layer.values]["momentum_buffer"].shape == (1, 0)
    torch.testing.assert_close(model(torch.ones(2, 5, dtype=F64)), layer.bias.detach().expand(2, 4))


# -- compact -----------------------------------------------------------------------------------
def _check_equivalent(model, x, expect_removed=True, atol=1e-12):
    model.eval()
    ref = model(x)
    small, report = S.compact(model)
    small.eval()
    torch.testing.assert_close(small(x), ref, rtol=1e-10, atol=atol)
    torch.testing.assert_close(model(x), ref)  # the input model is unchanged
    if expect_removed:
        assert report.neurons_removed > 0, str(report)
    return small, report


@pytest.mark.parametrize("seed", range(4))
def test_compact_random_mlps_with_empty_rows_and_columns(seed):
    gen = torch.Generator().manual_seed(seed)
    acts = [nn.ReLU(), nn.GELU(), nn.Tanh(), nn.Identity(), nn.Dropout(0.3), nn.LeakyReLU(0.1)]
    sizes = [13, 17, 15, 11, 6]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(sparse_linear(a, b, gen, density=0.35, empty_rows=3, empty_cols=3,
                                    bias=i != 1))
        if i < len(sizes) - 2:
            layers.append(acts[(seed + i) % len(acts)])
            if i == 1:
                bn = nn.BatchNorm1d(b, dtype=F64)
                with torch.no_grad():
                    bn.running_mean.copy_(torch.randn(b, generator=gen, dtype=F64))
                    bn.running_var.copy_(torch.rand(b, generator=gen, dtype=F64) + 0.5)
                    bn.weight.copy_(torch.randn(b, generator=gen, dtype=F64))
                    bn.bias.copy_(torch.randn(b, generator=gen, dtype=F64))
                layers.append(bn)
    model = nn.Sequential(*layers)
    x = torch.randn(7, 13, generator=gen, dtype=F64)
    small, report = _check_equivalent(model, x)
    assert report.folded > 0 and not report.left_alone, str(report)
    # every hidden layer lost neurons; interface kept
    lin = [m for m in small.modules() if isinstance(m, tn.SparseLinear)]
    assert lin[0].in_features == 13 and lin[-1].out_features == 6
    assert all(a.out_features == b.in_features for a, b in zip(lin, lin[1:]))
    assert all(l.out_features < s for l, s in zip(lin[:-1], sizes[1:-1]))
    # no empty rows or columns left in the hidden layers
    for a, b in zip(lin, lin[1:]):
        assert bool((a.crow_indices.diff() > 0).all())
        assert torch.bincount(b.col_indices.long(), minlength=b.in_features).min() > 0
    # the masked twin compacts to the same function and the same shapes
    twin = tn.to_masked(model)
    small_t, report_t = _check_equivalent(twin, x)
    assert [r["shape_after"] for r in report_t.layers] == [r["shape_after"] for r in report.layers]


def test_compact_nested_sequentials_dense_linear_and_chain_of_dead_neurons():
    gen = torch.Generator().manual_seed(7)
    a = sparse_linear(8, 10, gen, empty_rows=2, empty_cols=1)
    b = sparse_linear(10, 9, gen, empty_rows=2, empty_cols=2)
    dense = nn.Linear(9, 4, dtype=F64)
    with torch.no_grad():
        dense.weight[:, :3] = 0  # 3 inputs without outgoing connections
        a.bias[:] = -1.0  # ReLU(-1) = 0: constant 0
    model = nn.Sequential(nn.Sequential(a, nn.ReLU()), nn.Sequential(b, nn.ReLU()), dense)
    x = torch.randn(5, 8, generator=gen, dtype=F64)
    small, report = _check_equivalent(model, x)
    assert isinstance(small[2], nn.Linear) and small[2].in_features < 9
    # a neuron whose only consumers died is itself removed (the fixpoint)
    first = tn.SparseLinear.from_dense(nn.Linear(6, 4, dtype=F64))
    second_mask = torch.zeros(3, 4, dtype=torch.bool)
    second_mask[:, 0] = True  # only neuron 0 of the first hidden layer is read
    second = tn.SparseLinear(4, 3, mask=second_mask, dtype=F64)
    third = tn.SparseLinear(3, 2, mask=torch.ones(2, 3, dtype=torch.bool), dtype=F64)
    chain = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), third)
    small, report = _check_equivalent(chain, torch.randn(3, 6, dtype=F64))
    assert small[0].out_features == 1 and small[2].in_features == 1


@pytest.mark.parametrize("padding", [0, 1])
def test_compact_conv_chain(padding):
    gen = torch.Generator().manual_seed(11)
    c1 = sparse_conv(3, 8, 3, gen, padding=padding, empty_out=3, empty_in=1)
    c2 = sparse_conv(8, 7, 3, gen, padding=padding, empty_out=2, empty_in=2)
    c3 = sparse_conv(7, 5, 1, gen, empty_out=1, empty_in=2)
    with torch.no_grad():  # some constants 0 (ReLU of a negative bias), some not
        c1.bias[:4] = -1.0
        c1.bias[4:] = 0.5
    bn = nn.BatchNorm2d(7, dtype=F64).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(7, generator=gen, dtype=F64))
        bn.running_var.copy_(torch.rand(7, generator=gen, dtype=F64) + 0.5)
    model = nn.Sequential(c1, nn.ReLU(), c2, bn, nn.GELU(), c3)
    x = torch.randn(2, 3, 9, 9, generator=gen, dtype=F64)
    small, report = _check_equivalent(model, x)
    convs = [m for m in small.modules() if isinstance(m, tn.SparseConv2d)]
    assert [c.in_channels for c in convs][0] == 3 and convs[-1].out_channels == 5
    if padding:
        # nonzero constant channels before a zero-padded conv are kept, and reported
        assert any("zero padding" in why for _, why in report.left_alone), str(report)
    # masked twin alike
    _check_equivalent(tn.to_masked(model), x)


def test_compact_leaves_unsupported_structures_alone():
    gen = torch.Generator().manual_seed(4)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(sparse_linear(6, 9, gen), nn.ReLU(), sparse_linear(9, 6, gen))
            self.skip = sparse_linear(6, 6, gen)

        def forward(self, x):
            return self.body(x) + self.skip(x)

    shared = sparse_linear(6, 6, gen)
    model = nn.Sequential(Residual(), nn.ReLU(), shared, nn.ReLU(), shared)
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    small, report = _check_equivalent(model, x, expect_removed=False)
    names = dict(report.left_alone)
    assert "0.skip" in names  # a layer outside any Sequential
    assert any("more than once" in why for why in names.values())
    assert any("Residual" in why for why in names.values())
    # the Sequential inside the residual block is compacted with its interface kept
    assert small[0].body[0].in_features == 6 and small[0].body[2].out_features == 6
    assert small[0].body[0].out_features < 9
    # grouped convolutions keep their channels
    conv = nn.Sequential(sparse_conv(4, 6, 3, gen, groups=2), nn.ReLU(),
                         sparse_conv(6, 4, 1, gen, groups=2))
    y = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)
    small, report = _check_equivalent(conv, y, expect_removed=False)
    assert small[0].out_channels == 6
    assert any("grouped" in why for _, why in report.left_alone)
    # BatchNorm in training mode splits the chain
    bn_model = nn.Sequential(sparse_linear(5, 6, gen), nn.BatchNorm1d(6, dtype=F64),
                             sparse_linear(6, 3, gen))
    _, report = S.compact(bn_model)
    assert any("training mode" in why for _, why in report.left_alone)


# -- nnz-sized ---------------------------------------------------------------------------------
def test_everything_is_nnz_sized():
    out_f, in_f = 1500, 2000
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(tn.SparseLinear(in_f, out_f, density=0.01, generator=g), nn.ReLU(),
                          tn.SparseLinear(out_f, in_f, density=0.01, generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, in_f)
    probe = _MaxAlloc()
    with probe:
        pen = S.group_lasso(model)
        pen.backward()
        opt.step()
        S.prox_(model, 0.01)
        S.prune_zeros_(model, opt)
        S.compact(model)
    assert probe.largest < out_f * in_f // 4, probe.largest


# -- errors ------------------------------------------------------------------------------------
def test_bad_input_errors():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(sparse_linear(4, 3, gen))
    with pytest.raises(ValueError, match="step must be a finite number >= 0"):
        S.prox_(model, -0.1)
    with pytest.raises(ValueError, match="step must be a finite number"):
        S.prox_(model, float("nan"))
    with pytest.raises(TypeError, match="step must be a number"):
        S.prox_(model, "0.1")
    with pytest.raises(ValueError, match="unknown group kind 'neurons'"):
        S.group_lasso(model, groups=("neurons",))
    with pytest.raises(ValueError, match="at least one"):
        S.prox_(model, 0.1, groups=())
    with pytest.raises(ValueError, match="coefficient of 'rows'"):
        S.group_lasso(model, groups={"rows": -1})
    with pytest.raises(ValueError, match="weights must be one of"):
        S.group_lasso(model, weights="sqrt")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        S.compact("model")
    with pytest.raises(TypeError, match="optimizer must be"):
        S.prune_zeros_(model, optimizer="sgd")
    with pytest.raises(ValueError, match="lam must be"):
        S.fssl_finetune(model, [], nn.functional.mse_loss,
                        torch.optim.SGD(model.parameters(), lr=0.1), lam=-1)
    with pytest.raises(ValueError, match="target_nnz_fraction"):
        S.fssl_finetune(model, [], nn.functional.mse_loss,
                        torch.optim.SGD(model.parameters(), lr=0.1), lam=1,
                        target_nnz_fraction=2)


# -- the recipe --------------------------------------------------------------------------------
def test_fssl_finetune_removes_neurons_and_stops_at_the_target():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(tn.SparseLinear(20, 64, density=0.3, generator=gen), nn.ReLU(),
                          tn.SparseLinear(64, 4, density=0.3, generator=gen))
    x = torch.randn(256, 20, generator=gen)
    y = (x[:, :4]).argmax(dim=1)  # only 4 inputs matter
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = S.count_nnz(model)
    result = S.fssl_finetune(model, loader, nn.functional.cross_entropy, opt, lam=0.02,
                             warmup=10, target_nnz_fraction=0.2, epochs=50)
    assert result["reached_target"] and result["nnz"] <= 0.2 * start
    assert result["nnz"] == S.count_nnz(model) < start
    model.eval()
    small, report = S.compact(model)
    assert report.neurons_removed > 0
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    # max_steps bounds the loop
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    assert S.fssl_finetune(model, loader, nn.functional.cross_entropy, opt2, lam=0.0,
                           max_steps=3, epochs=5)["steps"] == 3


# -- the comparison experiment -----------------------------------------------------------------
TINY = """
title = "fssl-tiny"
[[experiment]]
kind = "fssl"
name = "mlp"
dataset = "synthetic-digits"
upsample = 8
hidden = [48, 24]
density = 0.3
pretrain_epochs = 1
lambdas = [0.0, 0.1]
finetune_steps = 40
threads = 1
warmup = 5
prune_every = 5
inference_calls = 3

[[experiment]]
kind = "fssl"
name = "gc"
network = "graphchallenge"
gc_neurons = 64
gc_layers = 2
threads = 1
pretrain_steps = 3
lr = 0.01
lambdas = [1e-2]
finetune_steps = 10
inference_calls = 3
"""


def test_tiny_fssl_config_runs(tmp_path):
    from torch_nerva.compare import config as config_mod, run_config
    import tomllib
    cfg = config_mod.parse(tomllib.loads(TINY), "tiny")
    docs = run_config(cfg, tmp_path, plots=False, log=lambda s: None)
    rows = docs[0]["rows"]
    assert [r["lambda"] for r in rows] == [0.0, 0.1]
    for r in rows:
        # the compacted network computes what the fine-tuned one does
        assert r["acc_fssl"] == r["acc_fssl_uncompacted"]
        assert r["nnz_magnitude"] == r["nnz_fssl"] <= r["nnz_finetuned"] <= r["nnz_start"]
        assert r["infer_batch_fssl_us"] > 0 and r["infer_b1_magnitude_us"] > 0
        assert sum(r["hidden_fssl"]) == sum(r["hidden_start"]) - r["neurons_removed"]
    assert rows[0]["finetune_steps"] == 40  # lambda 0: no target reached
    assert rows[0]["dataset"] == "synthetic-digits upsampled to 3x8x8"
    assert rows[1]["nnz_fssl"] < rows[0]["nnz_fssl"] and rows[1]["neurons_removed"] > 0
    gc = docs[1]["rows"][0]
    assert gc["network"] == "graphchallenge" and gc["hidden_start"] == [64, 64]
    assert (tmp_path / "mlp.csv").is_file() and (tmp_path / "gc.json").is_file()


@pytest.mark.parametrize("body, message", [
    ('network = "cnn"', "network must be one of"),
    ("lambdas = []", "lambdas must be a non-empty list"),
    ('groups = ["neurons"]', "unknown group kind"),
    ('network = "graphchallenge"\ngc_neurons = 1000', "gc_neurons must be"),
    ("target_nnz_fraction = 1.5", "target_nnz_fraction"),
    ('dataset = "synthetic-cifar10"\nupsample = 32', "upsample needs dataset digits"),
])
def test_bad_fssl_configs_are_refused(body, message):
    from torch_nerva.compare import config as config_mod
    import tomllib
    doc = tomllib.loads(f'[[experiment]]\nkind = "fssl"\n{body}\n')
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.parse(doc, "bad")


def test_magnitude_baseline_keeps_the_largest_weights_per_layer():
    from torch_nerva.compare.fssl import magnitude_prune_like
    gen = torch.Generator().manual_seed(0)
    start = nn.Sequential(sparse_linear(10, 8, gen), nn.ReLU(), sparse_linear(8, 4, gen))
    ref = nn.Sequential(sparse_linear(10, 3, gen, density=0.2), nn.ReLU(),
                        sparse_linear(3, 4, gen, density=0.5))
    pruned = magnitude_prune_like(start, ref)
    for p, s, r in zip(pruned[0::2], start[0::2], ref[0::2]):
        assert p.nnz == r.nnz
        w, ws = p.dense_weight().detach().abs(), s.dense_weight().detach().abs()
        kept = ws[w > 0]
        assert torch.equal(w[w > 0], kept)
        assert kept.min() >= ws[(w == 0) & (ws > 0)].max()


def test_compact_a_torchvision_mlp_trained_with_fssl():
    """torchvision.ops.MLP (Linear, BatchNorm1d, ReLU, Dropout), sparsified, trained a little
    with FSSL so that neurons die, compacts to the same function in eval mode."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    mlp = torchvision.ops.MLP(12, [40, 32, 5], norm_layer=nn.BatchNorm1d, dropout=0.1)
    model = tn.sparsify(mlp, 0.3, generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(64, 12, dtype=F64)
    y = x[:, :5].argmax(dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    S.fssl_finetune(model, [(x, y)] * 60, nn.functional.cross_entropy, opt, lam=0.05,
                    prune_every=5)
    small, report = _check_equivalent(model, x)
    assert isinstance(small, torchvision.ops.MLP) and not report.left_alone, str(report)
    bns = [m for m in small.modules() if isinstance(m, nn.BatchNorm1d)]
    lin = [m for m in small.modules() if isinstance(m, tn.SparseLinear)]
    assert [b.num_features for b in bns] == [l.out_features for l in lin[:-1]]
    assert sum(l.out_features for l in lin[:-1]) < 72
