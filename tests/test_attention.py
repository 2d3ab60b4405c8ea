"""SparseMultiheadAttention against nn.MultiheadAttention holding the same weights."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import torch_nerva as tn
from torch_nerva.nn import SparseMultiheadAttention
from torch_nerva.nn.linear import keep_largest

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
E, H = 8, 2


def make_mha(embed_dim=E, num_heads=H, seed=0, **kw):
    """An nn.MultiheadAttention with random weights and nonzero biases (MHA zeroes them)."""
    torch.manual_seed(seed)
    kw.setdefault("dtype", F64)
    mha = nn.MultiheadAttention(embed_dim, num_heads, **kw)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha.eval()


def inputs(batch_first=False, batched=True, N=3, L=5, S=4, kdim=E, vdim=E, self_attn=False,
           seed=1):
    g = torch.Generator().manual_seed(seed)

    def rand(seq, feat):
        shape = ((N, seq, feat) if batch_first else (seq, N, feat)) if batched else (seq, feat)
        return torch.randn(*shape, dtype=F64, generator=g)

    if self_attn:
        q = rand(L, E)
        return q, q, q
    return rand(L, E), rand(S, kdim), rand(S, vdim)


def masks(kind, N=3, L=5, S=4, batched=True, num_heads=H, seed=2):
    """(key_padding_mask, attn_mask) of the given kind."""
    g = torch.Generator().manual_seed(seed)
    kpm_shape = (N, S) if batched else (S,)
    am3_shape = ((N if batched else 1) * num_heads, L, S)

    def bool_mask(shape):
        m = torch.rand(*shape, generator=g) < 0.3
        m[..., 0] = False  # every row keeps a key: no all -inf rows (NaN in both)
        return m

    def float_mask(shape):
        return torch.randn(*shape, dtype=F64, generator=g)

    return {
        "none": (None, None),
        "kpm_bool": (bool_mask(kpm_shape), None),
        "kpm_float": (float_mask(kpm_shape), None),
        "am2_bool": (None, bool_mask((L, S))),
        "am2_float": (None, float_mask((L, S))),
        "am3_bool": (None, bool_mask(am3_shape)),
        "am3_float": (None, float_mask(am3_shape)),
        "both_bool": (bool_mask(kpm_shape), bool_mask((L, S))),
        "both_float_3d": (float_mask(kpm_shape), float_mask(am3_shape)),
    }[kind]


def assert_same(ref, out, need_weights):
    torch.testing.assert_close(out[0], ref[0], **TOL)
    assert out[0].shape == ref[0].shape and out[0].dtype == ref[0].dtype
    if need_weights:
        torch.testing.assert_close(out[1], ref[1], **TOL)
        assert out[1].shape == ref[1].shape and out[1].dtype == ref[1].dtype
    else:
        assert ref[1] is None and out[1] is None


class BothWays:
    """from_dense(mha) (all weights kept) must compute what mha does; a 0.3-dense one what its
    own to_dense() does. The modules are built once and called for many argument sets."""

    def __init__(self, mha, backend="auto"):
        self.mha = mha
        self.full = SparseMultiheadAttention.from_dense(mha, backend=backend)
        self.sparse = SparseMultiheadAttention.from_dense(mha, density=0.3, backend=backend)
        self.sparse_dense = self.sparse.to_dense()
        assert isinstance(self.sparse_dense, nn.MultiheadAttention)

    def check(self, args, kwargs):
        need_weights = kwargs.get("need_weights", True)
        assert_same(self.mha(*args, **kwargs), self.full(*args, **kwargs), need_weights)
        assert_same(self.sparse_dense(*args, **kwargs), self.sparse(*args, **kwargs),
                    need_weights)


def check_both_ways(mha, args, kwargs, backend="auto"):
    BothWays(mha, backend).check(args, kwargs)


WEIGHTS = [(True, True), (True, False), (False, True)]  # (need_weights, average_attn_weights)
MASKS = ["none", "kpm_bool", "kpm_float", "am2_bool", "am2_float", "am3_bool", "am3_float",
         "both_bool", "both_float_3d"]


def check_masks_and_weights(both, mask_kinds, batched, batch_first=False, num_heads=H):
    """Every mask kind x (need_weights, average_attn_weights), reported by case."""
    args = inputs(batch_first, batched, kdim=both.mha.kdim, vdim=both.mha.vdim)
    for mask_kind in mask_kinds:
        kpm, am = masks(mask_kind, batched=batched, num_heads=num_heads)
        for need_weights, average in WEIGHTS:
            try:
                both.check(args, dict(key_padding_mask=kpm, attn_mask=am,
                                      need_weights=need_weights, average_attn_weights=average))
            except AssertionError as e:
                raise AssertionError(f"mask={mask_kind}, need_weights={need_weights}, "
                                     f"average_attn_weights={average}: {e}") from None


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_matches_mha_masks_and_layouts(batch_first, batched):
    both = BothWays(make_mha(batch_first=batch_first))
    check_masks_and_weights(both, MASKS, batched, batch_first)


OPTIONS = {
    "add_bias_kv": dict(add_bias_kv=True),
    "add_zero_attn": dict(add_zero_attn=True),
    "bias_kv_and_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim_vdim": dict(kdim=6, vdim=3),
    "kdim_only": dict(kdim=5),
    "no_bias": dict(bias=False),
    "no_bias_kdim_zero_attn": dict(bias=False, kdim=6, vdim=6, add_zero_attn=True),
    "dropout_in_eval": dict(dropout=0.5),
    "four_heads": dict(num_heads=4),
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_mha_options(option, batched):
    kw = dict(OPTIONS[option])
    num_heads = kw.pop("num_heads", H)
    mha = make_mha(num_heads=num_heads, batch_first=not batched, **kw)
    check_masks_and_weights(BothWays(mha), ["none", "kpm_float", "am3_bool", "both_bool",
                                            "both_float_3d"], batched, not batched, num_heads)


@pytest.mark.parametrize("backend", ["native", "dense", "torch"])
def test_matches_mha_with_each_backend(backend):
    mha = make_mha(batch_first=True, add_bias_kv=True, kdim=6, vdim=5)
    kpm, am = masks("both_bool")
    args = inputs(True, kdim=6, vdim=5)
    for need_weights in (True, False):
        check_both_ways(mha, args, dict(key_padding_mask=kpm, attn_mask=am,
                                        need_weights=need_weights), backend=backend)


def test_self_attention_same_tensor():
    mha = make_mha(batch_first=True)
    q, k, v = inputs(True, self_attn=True)
    assert q is k is v
    check_both_ways(mha, (q, k, v), dict(need_weights=False))
    check_both_ways(mha, (q, k, v), dict(need_weights=True))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("mask_type", ["bool", "float"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_is_causal_with_causal_mask(batch_first, mask_type, with_kpm, need_weights):
    L = 5
    mha = make_mha(batch_first=batch_first)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    am = causal if mask_type == "float" else torch.isinf(causal)
    kpm = masks("kpm_bool", S=L)[0] if with_kpm else None
    if kpm is not None and mask_type == "float":
        kpm = torch.zeros(kpm.shape, dtype=F64).masked_fill(kpm, float("-inf"))
    args = inputs(batch_first, self_attn=True, L=L)
    check_both_ways(mha, args, dict(attn_mask=am, key_padding_mask=kpm, is_causal=True,
                                    need_weights=need_weights))
    # the hint changes nothing when the mask is causal
    sparse = SparseMultiheadAttention.from_dense(mha)
    torch.testing.assert_close(sparse(*args, attn_mask=am, key_padding_mask=kpm,
                                      need_weights=need_weights)[0],
                               sparse(*args, attn_mask=am, key_padding_mask=kpm, is_causal=True,
                                      need_weights=need_weights)[0], **TOL)


def test_is_causal_hint_wins_as_in_torch():
    """With need_weights=False and no padding mask, torch drops attn_mask and trusts the hint;
    with need_weights=True it uses the mask. Both are matched (a non-causal mask shows which)."""
    mha = make_mha(batch_first=True)
    sparse = SparseMultiheadAttention.from_dense(mha)
    args = inputs(True, self_attn=True)
    am = masks("am2_float", S=5)[1]
    for need_weights in (False, True):
        kw = dict(attn_mask=am, is_causal=True, need_weights=need_weights)
        assert_same(mha(*args, **kw), sparse(*args, **kw), need_weights)
    no_hint = sparse(*args, attn_mask=am, need_weights=False)[0]
    hinted = sparse(*args, attn_mask=am, is_causal=True, need_weights=False)[0]
    assert not torch.allclose(no_hint, hinted)  # the test above is not vacuous


def test_is_causal_without_mask_raises_like_torch():
    mha = make_mha()
    sparse = SparseMultiheadAttention.from_dense(mha)
    args = inputs()
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        mha(*args, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        sparse(*args, is_causal=True, need_weights=False)


def test_mismatched_mask_types_warn_like_torch():
    mha = make_mha()
    sparse = SparseMultiheadAttention.from_dense(mha)
    kpm = masks("kpm_bool")[0]
    am = masks("am2_float")[1]
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        out = sparse(*inputs(), key_padding_mask=kpm, attn_mask=am)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = mha(*inputs(), key_padding_mask=kpm, attn_mask=am)
    assert_same(ref, out, True)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_draws_as_torch(need_weights):
    """In training the attention weights are dropped with the same random draws as
    nn.MultiheadAttention (same ops in the same order), so equal seeds give equal outputs."""
    mha = make_mha(batch_first=True, dropout=0.5).train()
    sparse = SparseMultiheadAttention.from_dense(mha)
    assert sparse.training
    args = inputs(True)
    torch.manual_seed(7)
    ref = mha(*args, need_weights=need_weights)
    torch.manual_seed(7)
    out = sparse(*args, need_weights=need_weights)
    assert_same(ref, out, need_weights)
    torch.manual_seed(8)
    other = sparse(*args, need_weights=need_weights)[0]
    assert not torch.allclose(out[0], other)  # dropout is really applied
    assert not torch.allclose(out[0], sparse.eval()(*args, need_weights=need_weights)[0])


# -- gradients ----------------------------------------------------------------------------
def dense_projection_grads(mha):
    if mha.in_proj_weight is not None:
        gq, gk, gv = mha.in_proj_weight.grad.chunk(3)
    else:
        gq, gk, gv = mha.q_proj_weight.grad, mha.k_proj_weight.grad, mha.v_proj_weight.grad
    return [gq, gk, gv, mha.out_proj.weight.grad]


def dense_bias_grads(mha):
    if mha.in_proj_bias is None:
        return [None] * 4
    return [*mha.in_proj_bias.grad.chunk(3), mha.out_proj.bias.grad]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", ["auto", "native"])
@pytest.mark.parametrize("option", ["plain", "add_bias_kv", "kdim_vdim", "no_bias"])
def test_gradients_are_dense_gradients_at_the_nonzeros(option, backend, need_weights):
    kw = {"plain": {}, "add_bias_kv": dict(add_bias_kv=True, add_zero_attn=True),
          "kdim_vdim": dict(kdim=6, vdim=5), "no_bias": dict(bias=False)}[option]
    sparse = SparseMultiheadAttention.from_dense(make_mha(batch_first=True, **kw), density=0.3,
                                                 backend=backend)
    dense = sparse.to_dense()
    kpm, am = masks("both_bool")
    args = inputs(True, kdim=dense.kdim, vdim=dense.vdim)
    args_d = [a.clone().requires_grad_() for a in args]
    args_s = [a.clone().requires_grad_() for a in args]
    g = torch.Generator().manual_seed(5)
    out_d, w_d = dense(*args_d, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    out_s, w_s = sparse(*args_s, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    go = torch.randn(out_d.shape, dtype=F64, generator=g)
    loss_d, loss_s = (out_d * go).sum(), (out_s * go).sum()
    if need_weights:
        gw = torch.randn(w_d.shape, dtype=F64, generator=g)
        loss_d, loss_s = loss_d + (w_d * gw).sum(), loss_s + (w_s * gw).sum()
    loss_d.backward()
    loss_s.backward()

    for a_d, a_s in zip(args_d, args_s):
        torch.testing.assert_close(a_s.grad, a_d.grad, **TOL)
    for name, gd, gb in zip(("q_proj", "k_proj", "v_proj", "out_proj"),
                            dense_projection_grads(dense), dense_bias_grads(dense)):
        layer = getattr(sparse, name)
        # The dense gradient gathered at the nonzeros, in the layout of the layer's values
        # (dense_weight() scatters them, its adjoint gathers), and by flat position.
        expected, = torch.autograd.grad(layer.dense_weight(), layer.values, grad_outputs=gd)
        torch.testing.assert_close(layer.values.grad, expected, **TOL)
        positions = layer.layout.positions()
        torch.testing.assert_close(expected.reshape(-1), gd.flatten()[positions], **TOL)
        assert gd.flatten()[positions].abs().sum() > 0
        if gb is None:
            assert layer.bias is None
        else:
            torch.testing.assert_close(layer.bias.grad, gb, **TOL)
    if sparse.bias_k is not None:
        torch.testing.assert_close(sparse.bias_k.grad, dense.bias_k.grad, **TOL)
        torch.testing.assert_close(sparse.bias_v.grad, dense.bias_v.grad, **TOL)


def test_gradcheck_small():
    sparse = SparseMultiheadAttention.from_dense(make_mha(add_bias_kv=True), density=0.5,
                                                 backend="native")
    q, k, v = (a.requires_grad_() for a in inputs(N=2, L=3, S=2))
    kpm = torch.tensor([[False, True], [False, False]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: sparse(q, k, v, key_padding_mask=kpm)[0], (q, k, v))


# -- torch transformer layers -------------------------------------------------------------
def encoder_pair(enable_nested_tensor, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=enable_nested_tensor)
    for p in ref.parameters():  # nonzero attention biases
        if p.dim() == 1:
            nn.init.normal_(p)
    enc = copy.deepcopy(ref)
    for lyr in enc.layers:
        lyr.self_attn = SparseMultiheadAttention.from_dense(lyr.self_attn)
    return ref, enc


KPM = torch.tensor([[False, False, False, True, True],
                    [False, False, False, False, False],
                    [False, False, True, True, True]])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("with_kpm", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad", "eval_inference_mode"])
@pytest.mark.parametrize("nested", [False, True], ids=["nested_off", "nested_on"])
def test_transformer_encoder_declines_fast_paths(nested, mode, with_kpm):
    ref, enc = encoder_pair(nested)
    if mode != "train":
        ref.eval()
        enc.eval()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))
    kpm = KPM if with_kpm else None
    ctx = {"train": torch.enable_grad, "eval": torch.enable_grad,
           "eval_no_grad": torch.no_grad, "eval_inference_mode": torch.inference_mode}[mode]
    with ctx():
        expected = ref(x, src_key_padding_mask=kpm)
        out = enc(x, src_key_padding_mask=kpm)
    assert not out.is_nested and out.shape == expected.shape
    tol = dict(rtol=1e-5, atol=1e-5)
    if with_kpm:
        keep = ~KPM
        torch.testing.assert_close(out[keep], expected[keep], **tol)
        if nested and mode in ("eval_no_grad", "eval_inference_mode"):
            # The original took torch's nested-tensor path, which writes 0 at padded
            # positions; this one declined it and computes them (as the original does in
            # training or with autograd on): only the real tokens are comparable.
            assert expected[KPM].abs().max() == 0 and out[KPM].abs().max() > 0
        else:
            torch.testing.assert_close(out, expected, **tol)
    else:
        torch.testing.assert_close(out, expected, **tol)
    if mode == "train":
        out.sum().backward()
        assert enc.layers[0].self_attn.q_proj.values.grad is not None


@pytest.mark.parametrize("no_grad", [False, True])
def test_transformer_encoder_built_around_sparse_attention(no_grad):
    """An encoder constructed from a layer that already holds the sparse attention decides at
    construction time not to use nested tensors (with torch's warning)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    ref = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False).eval()
    layer.self_attn = SparseMultiheadAttention.from_dense(layer.self_attn)
    with pytest.warns(UserWarning, match="_qkv_same_embed_dim was not True"):
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert not enc.use_nested_tensor
    x = torch.randn(3, 5, 8)
    with torch.no_grad() if no_grad else torch.enable_grad():
        torch.testing.assert_close(enc(x, src_key_padding_mask=KPM),
                                   ref(x, src_key_padding_mask=KPM), rtol=1e-5, atol=1e-5)
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        torch.testing.assert_close(enc(x, mask=causal, is_causal=True),
                                   ref(x, mask=causal, is_causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_transformer_decoder_layer(train):
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    dec = copy.deepcopy(ref)
    dec.self_attn = SparseMultiheadAttention.from_dense(dec.self_attn)
    dec.multihead_attn = SparseMultiheadAttention.from_dense(dec.multihead_attn)
    ref.train(train)
    dec.train(train)
    tgt, mem = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    kw = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=KPM)
    with torch.no_grad():
        torch.testing.assert_close(dec(tgt, mem, **kw), ref(tgt, mem, **kw),
                                   rtol=1e-5, atol=1e-5)


def test_fused_fast_path_markers():
    sparse = SparseMultiheadAttention.from_dense(make_mha(batch_first=True))
    assert sparse._qkv_same_embed_dim is False
    assert sparse.in_proj_bias is None
    assert torch.overrides.has_torch_function((sparse.in_proj_weight,))
    with pytest.raises(RuntimeError, match="no packed in_proj_weight"):
        sparse.in_proj_weight.chunk(3)
    assert "in_proj_weight" not in sparse.state_dict()


# -- conversions, state dict ----------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn
        self.head = nn.Linear(E, 3, dtype=F64)

    def forward(self, x, kpm):
        out, w = self.attn(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
        return self.head(out), w


def test_to_masked_and_densify_keep_outputs():
    attn = SparseMultiheadAttention.from_dense(make_mha(batch_first=True, add_bias_kv=True),
                                               density=0.3)
    holder = Holder(attn)
    model = tn.sparsify(holder, 0.5)  # the head becomes sparse too
    x, _, _ = inputs(True, self_attn=True)
    kpm = masks("kpm_bool", S=5)[0]
    expected = model(x, kpm)
    masked = tn.to_masked(model)
    assert all(isinstance(getattr(masked.attn, n), tn.MaskedLinear)
               for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    dense = tn.densify(model)
    assert all(type(getattr(dense.attn, n)) is nn.Linear
               for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    back = tn.to_sparse(masked)
    assert all(isinstance(getattr(back.attn, n), tn.SparseLinear)
               for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    for other in (masked, dense, back):
        for got, want in zip(other(x, kpm), expected):
            torch.testing.assert_close(got, want, **TOL)
        # to_dense() works whatever the projections are
        ref = other.attn.to_dense()
        torch.testing.assert_close(ref(x, x, x, key_padding_mask=kpm)[0],
                                   attn(x, x, x, key_padding_mask=kpm)[0], **TOL)
    assert holder.attn is attn and type(holder.head) is nn.Linear  # conversions copied


def test_state_dict_round_trip():
    mha = make_mha(batch_first=True, add_bias_kv=True, kdim=6, vdim=5)
    a = SparseMultiheadAttention.from_dense(mha, density=0.3)
    b = SparseMultiheadAttention(E, H, add_bias_kv=True, kdim=6, vdim=5, batch_first=True,
                                 density=0.6, dtype=F64)
    args = inputs(True, kdim=6, vdim=5)
    assert not torch.allclose(a(*args)[0], b(*args)[0])
    b.load_state_dict(a.state_dict())
    assert_same(a(*args), b(*args), True)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert getattr(b, name).nnz == getattr(a, name).nnz
    # pickling the whole module and deepcopy
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    assert_same(a(*args), c(*args), True)
    assert_same(a(*args), copy.deepcopy(a)(*args), True)
    assert set(a.state_dict()) >= {"bias_k", "bias_v", "q_proj.values", "out_proj.bias"}


def test_to_float32_and_back():
    sparse = SparseMultiheadAttention.from_dense(make_mha(batch_first=True), density=0.5)
    x = inputs(True, self_attn=True)[0]
    ref = sparse(x, x, x)[0]
    s32 = copy.deepcopy(sparse).float()
    out = s32(*(x.float(),) * 3)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    torch.testing.assert_close(out[0], ref.float(), rtol=1e-4, atol=1e-5)


# -- construction ----------------------------------------------------------------------------
def test_dense_shapes():
    assert SparseMultiheadAttention.dense_shapes(make_mha()) == [(8, 8)] * 4
    mha = make_mha(kdim=6, vdim=5)
    shapes = SparseMultiheadAttention.dense_shapes(mha)
    assert shapes == [(8, 8), (8, 6), (8, 5), (8, 8)]
    weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight]
    assert shapes == [tuple(w.shape) for w in weights]
    with torch.device("meta"):
        meta = nn.MultiheadAttention(16, 4)
    assert SparseMultiheadAttention.dense_shapes(meta) == [(16, 16)] * 4
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SparseMultiheadAttention.dense_shapes(nn.Linear(3, 3))


@pytest.mark.parametrize("kw", [{}, dict(kdim=6, vdim=5)])
def test_from_dense_magnitude_keeps_largest(kw):
    mha = make_mha(**kw)
    nnz = [10, 20, 30, 40]
    sparse = SparseMultiheadAttention.from_dense(mha, nnz=nnz)
    assert [getattr(sparse, n).nnz for n in ("q_proj", "k_proj", "v_proj", "out_proj")] == nnz
    if mha.in_proj_weight is not None:
        weights = list(mha.in_proj_weight.detach().chunk(3))
    else:
        weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    weights = [w.detach() for w in weights] + [mha.out_proj.weight.detach()]
    dense = sparse.to_dense()
    got = (list(dense.in_proj_weight.detach().chunk(3)) if dense.in_proj_weight is not None
           else [dense.q_proj_weight, dense.k_proj_weight, dense.v_proj_weight])
    got = [g.detach() for g in got] + [dense.out_proj.weight.detach()]
    for w, g, k in zip(weights, got, nnz):
        torch.testing.assert_close(g, w * keep_largest(w, k), rtol=0, atol=0)
    torch.testing.assert_close(dense.in_proj_bias, mha.in_proj_bias, rtol=0, atol=0)
    torch.testing.assert_close(dense.out_proj.bias, mha.out_proj.bias, rtol=0, atol=0)
    # density applies to each projection
    sparse = SparseMultiheadAttention.from_dense(mha, density=0.25)
    for name, (o, i) in zip(("q_proj", "k_proj", "v_proj", "out_proj"),
                            SparseMultiheadAttention.dense_shapes(mha)):
        assert getattr(sparse, name).nnz == int(0.25 * o * i + 0.5)
    # the original is untouched and independent
    with torch.no_grad():
        sparse.out_proj.bias.add_(1)
    assert not torch.equal(sparse.out_proj.bias, mha.out_proj.bias)


def test_from_dense_keeps_nonzeros_without_sparsity():
    mha = make_mha()
    with torch.no_grad():
        mha.in_proj_weight[:3].zero_()
    sparse = SparseMultiheadAttention.from_dense(mha)
    assert sparse.q_proj.nnz == 64 - 3 * 8 and sparse.out_proj.nnz == 64


def test_from_dense_xavier():
    mha = make_mha(batch_first=True, add_bias_kv=True, dropout=0.25).train()
    make = lambda: SparseMultiheadAttention.from_dense(  # noqa: E731
        mha, init="xavier", nnz=[5, 6, 7, 8], generator=torch.Generator().manual_seed(4),
        index_dtype=torch.int64)
    sparse = make()
    assert [getattr(sparse, n).nnz for n in ("q_proj", "k_proj", "v_proj", "out_proj")] == \
        [5, 6, 7, 8]
    assert sparse.q_proj.layout.crow.dtype == torch.int64
    assert sparse.q_proj.dense_weight().dtype == F64
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert torch.count_nonzero(getattr(sparse, name).bias) == 0
    torch.testing.assert_close(sparse.bias_k, mha.bias_k, rtol=0, atol=0)
    assert sparse.training and sparse.dropout == 0.25 and sparse.batch_first
    again = make()
    args = inputs(True)
    sparse.eval()
    again.eval()
    assert_same(sparse(*args), again(*args), True)
    # not the kept magnitudes: fresh values
    kept = SparseMultiheadAttention.from_dense(mha, nnz=[5, 6, 7, 8])
    assert not torch.equal(kept.q_proj.dense_weight(), sparse.q_proj.dense_weight())
    # neither nnz nor density: the nonzero counts of mha
    full = SparseMultiheadAttention.from_dense(mha, init="xavier")
    assert full.q_proj.nnz == 64


def test_from_dense_meta_template():
    with torch.device("meta"):
        meta = nn.MultiheadAttention(16, 4, add_bias_kv=True, kdim=12, batch_first=True)
    sparse = SparseMultiheadAttention.from_dense(meta, init="xavier", density=0.1, device="cpu",
                                                 generator=torch.Generator().manual_seed(0))
    assert sparse.q_proj.nnz == 26 and sparse.k_proj.nnz == 19
    assert not sparse.bias_k.is_meta and torch.isfinite(sparse.bias_k).all()
    x, m, v = torch.randn(2, 3, 16), torch.randn(2, 4, 12), torch.randn(2, 4, 16)
    out, w = sparse(x, m, v)
    assert out.shape == (2, 3, 16) and w.shape == (2, 3, 5) and torch.isfinite(out).all()
    torch.testing.assert_close(sparse.to_dense()(x, m, v)[0], out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="meta device"):
        SparseMultiheadAttention.from_dense(meta, density=0.1)  # magnitude needs values
    with pytest.raises(ValueError, match="meta device"):
        SparseMultiheadAttention.from_dense(meta, init="xavier", device="cpu")
    with pytest.raises(ValueError, match="meta device"):
        SparseMultiheadAttention.from_dense(meta, init="xavier", density=0.1)


def test_constructor():
    def build(seed):
        return SparseMultiheadAttention(E, H, add_bias_kv=True, kdim=6, batch_first=True,
                                        density=0.25, dtype=F64,
                                        generator=torch.Generator().manual_seed(seed))

    a = build(0)
    assert (a.embed_dim, a.num_heads, a.head_dim, a.kdim, a.vdim) == (8, 2, 4, 6, 8)
    assert a.k_proj.in_features == 6 and a.v_proj.in_features == 8
    assert [a.q_proj.nnz, a.k_proj.nnz, a.out_proj.nnz] == [16, 12, 16]
    assert all(torch.count_nonzero(getattr(a, n).bias) == 0
               for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert a.bias_k.shape == (1, 1, 8) and a.bias_k.dtype == F64
    args = inputs(True, kdim=6)
    assert_same(a(*args), build(0)(*args), True)
    assert not torch.allclose(a(*args)[0], build(1)(*args)[0])
    assert_same(a.to_dense()(*args), a(*args), True)
    b = SparseMultiheadAttention(E, H, bias=False, nnz=[1, 2, 3, 4], backend="native")
    assert b.q_proj.bias is None and b.out_proj.nnz == 4 and b.bias_k is None
    assert b.to_dense().in_proj_bias is None
    r = repr(a)
    assert "embed_dim=8, num_heads=2, batch_first=True" in r and "kdim=6" in r
    assert "add_bias_kv=True" in r


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(embed_dim=10, num_heads=3), ValueError, "divisible by num_heads"),
    (dict(embed_dim=0, num_heads=1), ValueError, "embed_dim must be a positive int"),
    (dict(embed_dim=8, num_heads=0), ValueError, "num_heads must be a positive int"),
    (dict(embed_dim=8, num_heads=2.0), ValueError, "num_heads must be a positive int"),
    (dict(embed_dim=8, num_heads=2, kdim=-1), ValueError, "kdim must be a positive int"),
    (dict(embed_dim=8, num_heads=2, dropout=1.5, density=0.5), ValueError, "dropout must be"),
    (dict(embed_dim=8, num_heads=2, density=0.5, nnz=[1, 1, 1, 1]), TypeError, "exactly one"),
    (dict(embed_dim=8, num_heads=2), TypeError, "exactly one"),
    (dict(embed_dim=8, num_heads=2, nnz=[1, 1, 1]), ValueError, "sequence of 4"),
    (dict(embed_dim=8, num_heads=2, nnz=[1, 1, 1, 65]), ValueError, "out_proj"),
    (dict(embed_dim=8, num_heads=2, density=2.0), ValueError, "density"),
    (dict(embed_dim=8, num_heads=2, density=0.5, backend="nope"), ValueError, "backend"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseMultiheadAttention(**kwargs)


def test_from_dense_rejects_bad_arguments():
    mha = make_mha()
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SparseMultiheadAttention.from_dense(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="init must be"):
        SparseMultiheadAttention.from_dense(mha, init="kaiming")
    with pytest.raises(TypeError, match="not both"):
        SparseMultiheadAttention.from_dense(mha, nnz=[1, 1, 1, 1], density=0.5)
    with pytest.raises(ValueError, match="k_proj"):
        SparseMultiheadAttention.from_dense(mha, nnz=[1, 100, 1, 1])


def test_forward_rejects_bad_inputs():
    sparse = SparseMultiheadAttention.from_dense(make_mha(kdim=6, vdim=6))
    q, k, v = inputs(kdim=6, vdim=6)  # (L, N, E), batch_first=False
    cases = [
        ((q, q, q), {}, ValueError, "key must have 6 features"),
        ((q[0, 0], k, v), {}, ValueError, "2-D .unbatched. or 3-D"),
        ((q, k[:, 0], v[:, 0]), {}, ValueError, "key and value must be 3-D"),
        ((q, k, v[:2]), {}, ValueError, "same sequence and batch"),
        ((q[:, :2], k, v), {}, ValueError, "same batch size"),
        ((q, k, v), dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.bool)), ValueError,
         "key_padding_mask must have shape"),
        ((q, k, v), dict(attn_mask=torch.zeros(4, 5, dtype=torch.bool)), ValueError,
         "attn_mask must have shape"),
        ((q, k, v), dict(attn_mask=torch.zeros(5, 4, dtype=torch.int64)), TypeError,
         "bool or floating-point"),
        ((q, k, v), dict(key_padding_mask=[[0] * 4] * 3), TypeError, "torch.Tensor"),
        ((q, "k", v), {}, TypeError, "key must be a torch.Tensor"),
    ]
    for args, kw, error, match in cases:
        with pytest.raises(error, match=match):
            sparse(*args, **kw)
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
    with pytest.raises(NotImplementedError, match="nested"):
        SparseMultiheadAttention.from_dense(make_mha(batch_first=True))(nested, nested, nested)


def test_to_dense_rejects_inconsistent_biases():
    sparse = SparseMultiheadAttention.from_dense(make_mha())
    sparse.out_proj = tn.SparseLinear(8, 8, bias=False, density=0.5, dtype=F64)
    with pytest.raises(ValueError, match="biases on all four projections or on none"):
        sparse.to_dense()
