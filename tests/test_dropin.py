"""SparseLinear inside other people's training code: layer.weight, fused fast paths, attention,
tied weights, weight-decay rules, EMA / AveragedModel, state dicts of tensors only."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import torch_nerva as tn
from torch_nerva import dst

F64 = torch.float64


def _layer(in_f=12, out_f=7, density=0.4, seed=0, dtype=F64, bias=True):
    return tn.SparseLinear(in_f, out_f, bias, density=density, dtype=dtype,
                           generator=torch.Generator().manual_seed(seed))


# ---- layer.weight ---------------------------------------------------------------------------

def test_weight_holds_no_data_and_reports_the_layer():
    layer = _layer()
    w = layer.weight
    assert isinstance(w, torch.Tensor) and isinstance(w, tn.nn.weight.SparseWeight)
    assert w.shape == (7, 12) and w.dtype == F64 and w.dim() == 2 and w.requires_grad
    assert w.T.shape == (12, 7) and w.t().T.shape == (7, 12) and w.mT.shape == (12, 7)
    assert w.transpose(0, 1).shape == (12, 7)
    assert "nnz=" in repr(w)


@pytest.mark.parametrize("how", ["F.linear", "F.linear_kw", "x@W.T", "matmul", "mm", "addmm",
                                 "linear_other_bias", "linear_no_bias", "3d_matmul"])
def test_linear_products_run_the_layer_and_reach_values(how):
    layer = _layer()
    calls = []
    layer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    w_dense = layer.dense_weight().detach().requires_grad_()
    other = torch.randn(7, dtype=F64)
    xs = x if how != "3d_matmul" else x.view(5, 1, 12)
    ops = {
        "F.linear": lambda w, b: F.linear(xs, w, b),
        "F.linear_kw": lambda w, b: F.linear(xs, weight=w, bias=b),
        "x@W.T": lambda w, b: xs @ w.T + b,
        "matmul": lambda w, b: torch.matmul(xs, w.t()),
        "mm": lambda w, b: torch.mm(xs, w.t()),
        "addmm": lambda w, b: torch.addmm(b, xs, w.t()),
        "linear_other_bias": lambda w, b: F.linear(xs, w, other),
        "linear_no_bias": lambda w, b: F.linear(xs, w),
        "3d_matmul": lambda w, b: xs @ w.T,
    }[how]
    got = ops(layer.weight, layer.bias)
    ref = ops(w_dense, layer.bias.detach())
    torch.testing.assert_close(got, ref)
    assert calls, "the product did not go through the layer (its forward hook never fired)"
    got.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(layer.values.grad.view(-1),
                               w_dense.grad.flatten()[layer.layout.positions()])


def test_weight_times_input_and_other_ops_see_the_dense_weight():
    layer = _layer()
    dense = layer.dense_weight()
    y = torch.randn(12, 3, dtype=F64)
    torch.testing.assert_close(layer.weight @ y, dense @ y)
    torch.testing.assert_close(layer.weight * 2, dense * 2)
    torch.testing.assert_close(layer.weight.sum(), dense.sum())
    torch.testing.assert_close(layer.weight.to_dense(), dense)
    torch.testing.assert_close(layer.weight.norm(), dense.norm())
    layer.weight.abs().sum().backward()  # the dense fallback is differentiable too
    torch.testing.assert_close(layer.values.grad.view(-1), layer.flat_values().detach().sign())
    csr = layer.weight.to_sparse_csr()
    assert csr.layout == torch.sparse_csr and torch.equal(csr.to_dense(), dense.detach())


def test_in_place_writes_land_at_the_nonzeros_only():
    layer = _layer()
    positions = layer.layout.positions()
    nn.init.constant_(layer.weight, 0.25)
    assert torch.all(layer.values == 0.25) and layer.nnz == positions.numel()
    g = torch.Generator().manual_seed(3)
    target = torch.randn(7, 12, dtype=F64, generator=g)
    with torch.no_grad():
        layer.weight.copy_(target)
    torch.testing.assert_close(layer.flat_values().detach(), target.flatten()[positions])
    layer.weight.data.mul_(2)
    torch.testing.assert_close(layer.flat_values().detach(), 2 * target.flatten()[positions])
    torch.testing.assert_close(layer.dense_weight().detach(),
                               (2 * target) * layer.mask)  # absent positions stay absent


def test_weight_reaching_cpp_below_python_raises_clearly():
    layer = _layer()
    with pytest.raises(RuntimeError, match="holds no"):
        with torch._C.DisableTorchFunctionSubclass():
            torch.add(layer.weight, 1)


def test_swin_style_functional_use_runs_the_kernel_and_rigl_works():
    """torchvision's Swin calls F.linear(x, self.qkv.weight, self.qkv.bias): the products
    must run our kernel (hooks fire), so RigL's capture sees every layer."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
            a = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
            return F.linear(a, self.proj.weight, self.proj.bias)

    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(16 * 4, 3))
    sparse = tn.sparsify(model, 0.3, generator=torch.Generator().manual_seed(0),
                         backend="native")
    dense = tn.densify(sparse)
    x, y = torch.randn(6, 4, 16), torch.randint(0, 3, (6,))
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    before = [m.layout.positions() for m in sparse.modules() if isinstance(m, tn.SparseLinear)]
    counts = dst.prune_and_regrow(sparse, drop_fraction=0.3, grow="gradient", batch=(x, y),
                                  loss_fn=F.cross_entropy)
    assert set(counts) == {"0.qkv", "0.proj", "2"}
    after = [m.layout.positions() for m in sparse.modules() if isinstance(m, tn.SparseLinear)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


# ---- fused inference fast paths decline ----------------------------------------------------

@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("nested", [False, True])
def test_transformer_encoder_evaluates_like_the_dense_one(mode, nested):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True,
                                                           dropout=0.0),
                                2, enable_nested_tensor=nested)
    sparse = tn.sparsify(enc, 0.3, init="magnitude").eval()
    dense = tn.densify(sparse).eval()
    x = torch.randn(3, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True], [False] * 4 + [True]])
    if mode == "frozen":
        for m in (sparse, dense):
            m.requires_grad_(False)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "frozen": torch.enable_grad}[mode]
    with ctx():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
        a, b = sparse(x, src_key_padding_mask=pad), dense(x, src_key_padding_mask=pad)
    # torch's nested-tensor path writes 0 at padded positions; the real tokens must agree
    torch.testing.assert_close(a[~pad], b[~pad], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_multihead_attention_alone_evaluates_like_torch(mode):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    sparse = tn.sparsify(nn.Sequential(mha), 0.4, init="magnitude")[0].eval()
    ref = sparse.to_dense().eval()
    x = torch.randn(2, 6, 16)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        got, w1 = sparse(x, x, x)
        want, w2 = ref(x, x, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-5)


# ---- sparsify: attention, tied weights, what stays dense --------------------------------------

class _ViTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, 4)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(self.mlp(t).mean(1))


def test_sparsify_converts_attention_and_reports_what_stays_dense():
    torch.manual_seed(0)
    model = _ViTish()
    assert isinstance(tn.sparsify(model, 0.1).embed, tn.SparseConv2d)  # converted by default
    # the patch embedding kept dense on purpose (the common recipe for the first layer)
    with pytest.warns(tn.DenseWeightsWarning, match=r"embed\.weight \(Conv2d 32x3x4x4\)") as rec:
        sparse = tn.sparsify(model, 0.1, generator=torch.Generator().manual_seed(0),
                             filter_fn=lambda n, m: n != "embed")
    assert isinstance(sparse.attn, tn.SparseMultiheadAttention)
    assert all(isinstance(getattr(sparse.attn, p), tn.SparseLinear)
               for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    msg = str(rec[0].message)
    assert "1 weight matrices stay dense" in msg and "realised over all weight matrices" in msg
    # every linear weight of the attention is counted in the density budget
    layers = [m for m in sparse.modules() if isinstance(m, tn.SparseLinear)]
    total = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.nnz for m in layers) == round(0.1 * total)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(sparse(x), tn.densify(sparse)(x), rtol=1e-5, atol=1e-5)
    # excluded by filter_fn: kept as nn.MultiheadAttention, and named in the warning
    with pytest.warns(tn.DenseWeightsWarning, match=r"attn\.in_proj_weight"):
        kept = tn.sparsify(model, 0.1, filter_fn=lambda n, m: n != "attn")
    assert type(kept.attn) is nn.MultiheadAttention


def test_mlp_only_models_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tn.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)


class _TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.wte.weight = self.lm_head.weight  # nanoGPT's weight tying

    def forward(self, idx):
        return self.lm_head(torch.relu(self.fc(self.wte(idx))))


@pytest.mark.parametrize("inplace", [False, True])
def test_tied_head_is_kept_dense_and_tied(inplace):
    model = _TinyGPT()
    with pytest.warns(UserWarning, match=r"lm_head.*tied|tied.*lm_head"):
        sparse = tn.sparsify(model, 0.2, inplace=inplace)
    assert isinstance(sparse.fc, tn.SparseLinear)
    assert type(sparse.lm_head) is nn.Linear and sparse.lm_head.weight is sparse.wte.weight


# ---- weight decay rules ---------------------------------------------------------------------

def _mlp():
    return tn.sparsify(nn.Sequential(nn.Linear(20, 30), nn.LayerNorm(30), nn.Linear(30, 4)),
                       0.3, generator=torch.Generator().manual_seed(0))


def test_nanogpt_decay_rule_decays_sparse_weights():
    model = _mlp()
    decay = [n for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [n for n, p in model.named_parameters() if p.dim() < 2]
    assert decay == ["0.values", "2.values"]
    assert "0.bias" in no_decay and "1.weight" in no_decay


def test_timm_decay_groups_decay_sparse_weights():
    pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_weight_decay
    model = _mlp()
    groups = param_groups_weight_decay(model, weight_decay=0.05)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    values = {id(m.values) for m in model.modules() if isinstance(m, tn.SparseLinear)}
    assert values <= by_decay[0.05] and not values & by_decay[0.0]
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert values <= decayed
    before = model[0].values.detach().clone()
    opt.zero_grad()
    model(torch.randn(4, 20)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].values.detach())


def test_old_checkpoints_with_1d_values_and_extra_state_load():
    layer = _layer(dtype=torch.float32)
    sd = layer.state_dict()
    old = {k: v for k, v in sd.items()}
    old["values"] = old["values"].reshape(-1)
    old["_extra_state"] = {"in_features": 12, "out_features": 7}
    other = _layer(seed=5, dtype=torch.float32)
    other.load_state_dict(old)
    assert torch.equal(other.values, layer.values) and other.values.shape == (1, layer.nnz)
    bad = dict(old, _extra_state={"in_features": 13, "out_features": 7})
    with pytest.raises(RuntimeError, match="shape"):
        other.load_state_dict(bad)


def test_state_dict_shape_metadata_refuses_another_layer_shape():
    src = tn.SparseLinear(12, 7, density=0.3)
    dst_layer = tn.SparseLinear(20, 7, density=0.3)  # cols of src fit, the shape does not
    with pytest.raises(RuntimeError, match=r"shape \(out, in\) = \(7, 12\)"):
        dst_layer.load_state_dict(src.state_dict())


# ---- state dicts of tensors only: safetensors, numel idiom, timm EMA ------------------------

def test_state_dict_holds_only_tensors_and_round_trips_through_safetensors(tmp_path):
    model = _mlp()
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sum(v.numel() for v in sd.values()) > 0
    st = pytest.importorskip("safetensors.torch")
    st.save_file(sd, str(tmp_path / "m.safetensors"))
    fresh = tn.sparsify(nn.Sequential(nn.Linear(20, 30), nn.LayerNorm(30), nn.Linear(30, 4)),
                        0.3, generator=torch.Generator().manual_seed(9))
    fresh.load_state_dict(st.load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(5, 20)
    torch.testing.assert_close(fresh(x), model(x))


def test_state_dict_topology_is_a_copy():
    layer = _layer()
    sd = layer.state_dict()
    sd["col_indices"].zero_()
    sd["crow_indices"].add_(1)
    layer.layout.validate()
    assert layer.col_indices.max() > 0


def _train_steps(model, steps, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randn(8, 20, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        yield


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("kind", ["ema_multi", "ema_avg_fn", "swa"])
def test_averaged_model_never_changes_a_topology(use_buffers, kind):
    model = _mlp()
    if kind == "ema_multi":
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                            use_buffers=use_buffers)
    elif kind == "ema_avg_fn":
        avg = AveragedModel(model, avg_fn=lambda e, m, n: 0.9 * e + 0.1 * m,
                            use_buffers=use_buffers)
    else:
        avg = AveragedModel(model, use_buffers=use_buffers)
    layers = [m for m in model.modules() if isinstance(m, tn.SparseLinear)]
    topo = [(m.crow_indices.clone(), m.col_indices.clone()) for m in layers]
    history = []
    for _ in _train_steps(model, 6):
        avg.update_parameters(model)
        history.append([m.dense_weight().detach().clone() for m in layers])
    avg_layers = [m for m in avg.modules() if isinstance(m, tn.SparseLinear)]
    for m, (crow, col) in zip(avg_layers, topo):
        assert torch.equal(m.crow_indices, crow) and torch.equal(m.col_indices, col)
        m.layout.validate()
    # the averaged weights are the average of the dense weights, at the nonzeros
    for i, m in enumerate(avg_layers):
        ws = [h[i] for h in history]
        if kind == "swa":
            want = torch.stack(ws).mean(0)
        else:
            want = ws[0]
            for w in ws[1:]:
                want = 0.9 * want + 0.1 * w
        torch.testing.assert_close(m.dense_weight().detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version", ["V2", "V3"])
def test_timm_model_ema_keeps_the_topology(version):
    timm_utils = pytest.importorskip("timm.utils")
    model = _mlp()
    ema = getattr(timm_utils, f"ModelEma{version}")(model, decay=0.9)
    layers = [m for m in model.modules() if isinstance(m, tn.SparseLinear)]
    topo = [(m.crow_indices.clone(), m.col_indices.clone()) for m in layers]
    for _ in _train_steps(model, 5):
        ema.update(model)
    ema_layers = [m for m in ema.module.modules() if isinstance(m, tn.SparseLinear)]
    for m, (crow, col) in zip(ema_layers, topo):
        assert torch.equal(m.crow_indices, crow) and torch.equal(m.col_indices, col)
    x = torch.randn(3, 20)
    assert torch.isfinite(ema.module(x)).all()


# ---- EMA across DST updates -----------------------------------------------------------------

@pytest.mark.parametrize("holder", ["averaged_model", "plain_copy"])
def test_ema_follows_connections_across_dst_updates(holder):
    """An EMA of the sparse model carried through DST updates equals an EMA of the masked
    dense weight kept densely, at every connection the layer holds (new connections start at
    0, which is the dense EMA's value for a connection that was never there)."""
    torch.manual_seed(0)
    model = tn.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)), 0.2,
                        generator=torch.Generator().manual_seed(0))
    decay = 0.8
    if holder == "averaged_model":
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    else:
        avg = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, tn.SparseLinear)]
    dense_ema = [m.dense_weight().detach().clone() for m in layers]
    # connections dropped by some update: the dense EMA keeps a decaying residual there, the
    # sparse one forgets them, so they are compared only if never regrown
    dropped = [torch.zeros_like(m.mask) for m in layers]
    sched = dst.DynamicSparsity(model, drop_fraction=0.3, update_every=3, anneal="constant",
                                averaged=avg)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg_layers = [m for m in avg.modules() if isinstance(m, tn.SparseLinear)]
    for step in range(10):
        x = torch.randn(8, 20, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        held = [m.mask for m in layers]
        w_before = [m.dense_weight().detach() for m in layers]
        counts = sched.step()
        if counts is not None:  # dropped, or dropped and regrown in the same update (reset to 0)
            for i, m in enumerate(layers):
                w_after = m.dense_weight().detach()
                dropped[i] |= held[i] & (~m.mask | ((w_after == 0) & (w_before[i] != 0)))
        if holder == "averaged_model":
            avg.update_parameters(model)
        else:
            with torch.no_grad():
                for a, m in zip(avg_layers, layers):
                    a.values.mul_(decay).add_(m.values, alpha=1 - decay)
        if holder == "averaged_model" and step == 0:  # its first update copies the model
            dense_ema = [m.dense_weight().detach().clone() for m in layers]
        else:
            dense_ema = [decay * e + (1 - decay) * m.dense_weight().detach()
                         for e, m in zip(dense_ema, layers)]
    assert sched.updates == 3
    compared = 0
    for a, m, e, d in zip(avg_layers, layers, dense_ema, dropped):
        positions = m.layout.positions()
        assert torch.equal(a.layout.positions(), positions)
        fair = ~d.flatten()[positions]
        compared += int(fair.sum())
        torch.testing.assert_close(a.flat_values().detach()[fair], e.flatten()[positions][fair],
                                   rtol=1e-5, atol=1e-6)
    assert compared > 0.9 * sum(m.nnz for m in layers)


def test_ema_copy_that_missed_an_update_is_refused():
    model = _mlp()
    stale = copy.deepcopy(model)
    dst.prune_and_regrow(model, drop_fraction=0.3, generator=torch.Generator().manual_seed(0))
    before = [m.layout.positions() for m in model.modules() if isinstance(m, tn.SparseLinear)]
    with pytest.raises(ValueError, match="topology differs"):
        dst.prune_and_regrow(model, drop_fraction=0.3, averaged=[stale],
                             generator=torch.Generator().manual_seed(1))
    after = [m.layout.positions() for m in model.modules() if isinstance(m, tn.SparseLinear)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing changed


def test_model_moves_devices_and_dtypes_with_its_topology():
    layer = _layer(dtype=torch.float32)
    twin = layer.double()
    assert twin.values.dtype == F64 and twin.crow_indices.dtype == layer.crow_indices.dtype
    meta = copy.deepcopy(layer).to("meta")
    assert meta.crow_indices.device.type == "meta" and meta.values.device.type == "meta"
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back.col_indices, layer.col_indices)


def test_masked_twin_read_through_weight_keeps_its_mask():
    """Code reading MaskedLinear.weight directly skips the mask of its forward: the gradient
    mask registered on first read keeps the weight zero outside the mask under AdamW."""
    layer = tn.MaskedLinear(12, 7, density=0.3, generator=torch.Generator().manual_seed(0))
    called_as_module = tn.MaskedLinear(12, 7, density=0.3)
    called_as_module(torch.randn(2, 12)).sum().backward()
    assert "_grad_masked" not in called_as_module.__dict__  # no hook, no cost
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.linear(torch.randn(4, 12), layer.weight, layer.bias).square().sum().backward()
        opt.step()
    assert torch.all(layer.weight.detach()[~layer.mask] == 0)
    copied = copy.deepcopy(layer)  # the copy registers its own hook on first read
    copied.weight.grad = None
    F.linear(torch.randn(4, 12), copied.weight).sum().backward()
    assert torch.all(copied.weight.grad[~copied.mask] == 0)


def test_a_pickle_of_the_buffer_layout_still_loads():
    """Layers pickled when the topology lived in buffers and values were 1-D."""
    layer = _layer(dtype=torch.float32)
    old = copy.deepcopy(layer)
    values = old._parameters["values"]
    values.data = values.data.reshape(-1)
    for name in old._TOPOLOGY:
        old._buffers[name] = old.__dict__.pop(name)
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.values.shape == (1, layer.nnz) and not back._buffers
    x = torch.randn(3, 12)
    torch.testing.assert_close(back(x), layer(x))


def test_masked_copy_does_not_disturb_the_original_hook_marker():
    layer = tn.MaskedLinear(6, 4, density=0.5)
    w = layer.weight  # registers the gradient mask
    copy.deepcopy(layer)
    assert layer.__dict__["_grad_masked"] is w


def test_compiled_code_reading_layer_weight_matches_eager():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            return F.linear(x, self.qkv.weight, self.qkv.bias).relu()

    torch._dynamo.reset()
    model = tn.sparsify(Block(), 0.3, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 16)
    out = torch.compile(model, backend="aot_eager")(x)
    ref = twin(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(model.qkv.values.grad, twin.qkv.values.grad)
