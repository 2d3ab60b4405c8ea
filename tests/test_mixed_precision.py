"""bfloat16 and float16: the native kernels (16-bit storage, float32 accumulation), the layers in
16 bits, and torch.autocast (csrc/autocast.cpp; docs/mixed_precision.md).

Tolerances (docs/mixed_precision.md, "Accuracy"). The inputs are 16-bit numbers; the reference
is float64 math on exactly those numbers. Every product of two 16-bit numbers is exact in
float32 (8 + 8 or 11 + 11 significant bits <= 24), the float32 sum of n terms is within
gamma_n * sum|terms| of the exact sum (gamma_n = n u32 / (1 - n u32), u32 = 2^-24), and the
result is rounded once to the 16-bit type, within u * |value| (u = 2^-8 for bfloat16, 2^-11 for
float16: half an ulp), or half the subnormal spacing of float16 (2^-25) below 2^-14. So every
element must satisfy

    |got - ref| <= u |ref| + (1 + u) gamma_n sum|terms| + eta

with n the number of terms of that element (bound: the reduction length + 1 for the bias) and
eta = 2^-25 for float16, 2^-133 for bfloat16 (half its smallest subnormal). No tolerance
covers a second rounding: a kernel that rounded partial sums to 16 bits would fail.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_nerva as tn
from torch_nerva import ops

from reference import dense, random_layout

LOW = [torch.bfloat16, torch.float16]
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
ETA = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -25}


@pytest.fixture(params=LOW, ids=["bf16", "f16"])
def low(request):
    return request.param


def assert_rounded_once(got, ref, abs_terms, dtype, n_terms):
    """``got`` (16-bit) is the float32 sum behind ``ref`` (float64, same inputs) rounded once:
    the bound of the module docstring, elementwise. ``abs_terms`` is sum|terms| per element."""
    assert got.dtype == dtype, (got.dtype, dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    u32 = 2.0 ** -24
    gamma = n_terms * u32 / (1 - n_terms * u32)
    u = UNIT[dtype]
    bound = u * ref.abs() + (1 + u) * gamma * abs_terms + ETA[dtype]
    err = (got.double() - ref).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off by more than one "
                           f"rounding: worst excess {float((err - bound).max()):.3g}, at "
                           f"{bad.nonzero()[:3].tolist()}")


def _rand(shape, dtype, gen, scale=1.0):
    """Random numbers that are exactly representable in ``dtype``."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _bits(t):
    """The bit patterns of a 16-bit tensor with -0 made +0 (the sign of a zero result depends
    on whether the multiply-add is fused: +0 + (-tiny) rounds to -0 with an FMA and to +0
    without; both are IEEE results of one operation order)."""
    return (t.float() + 0.0).to(t.dtype).view(torch.int16)


# ---- the kernels against float64 math on the same 16-bit numbers ----------------------------

CASES = [  # (out, in, density, batch, empty_rows, empty_cols)
    (9, 14, 0.3, 1, 2, 3),
    (17, 33, 0.5, 5, 3, 4),
    (33, 20, 0.4, 16, 5, 2),
    (40, 70, 0.2, 37, 0, 9),
    (24, 31, 1.0, 3, 0, 0),
    (12, 18, 0.0, 20, 0, 0),
    (64, 9, 0.6, 70, 10, 1),
    (5, 3, 0.7, 130, 1, 0),
    (20, 300, 0.5, 1, 2, 10),  # batch 1 with long rows (the 4-way unrolled loop)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_sparse_linear_forward_and_gradients(low, isa, index_dtype, gen, case):
    out_f, in_f, density, batch, empty_rows, empty_cols = case
    layout, _ = random_layout(out_f, in_f, density, gen, index_dtype, empty_rows, empty_cols)
    crow_t, col_t, perm = layout.transpose()
    v = _rand((layout.nnz,), low, gen).requires_grad_()
    b = _rand((out_f,), low, gen).requires_grad_()
    x = _rand((batch, in_f), low, gen, scale=3.0).requires_grad_()
    y = ops.sparse_linear(x, v, b, layout.crow, layout.col, crow_t, col_t, perm)
    g = _rand((batch, out_f), low, gen)
    y.backward(g)
    w = dense(layout, v.detach().double())
    xd, gd = x.detach().double(), g.double()
    assert_rounded_once(y, xd @ w.t() + b.detach().double(), xd.abs() @ w.abs().t()
                        + b.detach().double().abs(), low, in_f + 1)
    assert_rounded_once(x.grad, gd @ w, gd.abs() @ w.abs(), low, out_f)
    pattern = dense(layout, torch.ones(layout.nnz, dtype=torch.float64)) != 0
    assert_rounded_once(v.grad, (gd.t() @ xd)[pattern], (gd.abs().t() @ xd.abs())[pattern],
                        low, batch)
    assert v.grad.dtype == b.grad.dtype == x.grad.dtype == low


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "x".join(map(str, c)))
def test_raw_spmm_and_sddmm(low, isa, index_dtype, gen, case):
    out_f, in_f, density, batch, empty_rows, empty_cols = case
    layout, mask = random_layout(out_f, in_f, density, gen, index_dtype, empty_rows, empty_cols)
    v = _rand((layout.nnz,), low, gen)
    b = _rand((out_f,), low, gen)
    x = _rand((batch, in_f), low, gen)
    w = dense(layout, v.double())
    xd = x.double()
    assert_rounded_once(ops.csr_spmm(x, v, layout.crow, layout.col, bias=b),
                        xd @ w.t() + b.double(), xd.abs() @ w.abs().t() + b.double().abs(),
                        low, in_f + 1)
    crow_t, col_t, perm = layout.transpose()  # values read through perm
    dy = _rand((batch, out_f), low, gen)
    assert_rounded_once(ops.csr_spmm(dy, v, crow_t, col_t, perm), dy.double() @ w,
                        dy.double().abs() @ w.abs(), low, out_f)
    got = ops.csr_sddmm(dy, x, layout.crow, layout.col)
    assert_rounded_once(got, (dy.double().t() @ xd)[mask],
                        (dy.double().abs().t() @ xd.abs())[mask], low, batch)


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_malformed_layouts_raise_in_16_bits(low, isa, gen, batch):
    # every index is checked as it is read on the 16-bit paths too (batch 1: the vector loop of
    # four nonzeros at a time; 3: narrow rows; 40: row blocks)
    layout, _ = random_layout(6, 40, 0.6, gen, torch.int64)
    crow, col = layout.crow, layout.col
    x = _rand((batch, 40), low, gen)
    v = _rand((col.numel(),), low, gen)
    for position in (1, 6, col.numel() - 1):
        bad_col = col.clone()
        bad_col[position] = 10**9
        with pytest.raises(RuntimeError, match="column index out of range"):
            ops.csr_spmm(x, v, crow, bad_col)
        with pytest.raises(RuntimeError, match="column index out of range"):
            ops.csr_sddmm(_rand((batch, 6), low, gen), x, crow, bad_col)
    bad_crow = crow.clone()
    bad_crow[2] = -5
    with pytest.raises(RuntimeError, match="row pointer"):
        ops.csr_spmm(x, v, bad_crow, col)
    perm = torch.arange(col.numel())
    perm[0] = col.numel() + 3
    with pytest.raises(RuntimeError, match="perm index out of range"):
        ops.csr_spmm(x, v, crow, col, perm)


@pytest.mark.parametrize("batch", [1, 5, 16, 23, 64, 100])
def test_one_product_per_output_is_rounded_exactly_once(low, isa, gen, batch):
    # One nonzero per row: y = v * x exactly in float32, then one rounding to nearest even,
    # bit for bit what torch's own conversion of the float32 product gives, ties included
    # (many products of 16-bit numbers are exact ties). Magnitudes reach float16's overflow and
    # subnormal range.
    n = 300
    perm = torch.randperm(n, generator=gen)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[torch.arange(n), perm] = True
    layout = tn.CSRLayout.from_mask(mask)
    scale = torch.logspace(-4, 2.5, n, dtype=torch.float64) if low == torch.float16 else \
        torch.logspace(-20, 20, n, dtype=torch.float64)
    v = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(low)
    x = (torch.randn(batch, n, generator=gen, dtype=torch.float64) * scale.flip(0)
         * (1 + 500 * (torch.rand(batch, n, generator=gen) < 0.05))).to(low)
    expected = (x.float()[:, layout.col.long()] * v.float()).to(low)
    got = ops.csr_spmm(x, v, layout.crow, layout.col)
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("w", [1.0, 0.125, 3.0, 2.0 ** -20])
def test_every_16_bit_number_widens_and_rounds_back_exactly(low, isa, w):
    # all 65536 bit patterns times one weight: the kernels' own conversions both ways (vector
    # loops, and the scalar batch-1 path) against torch's conversions, bit for bit (NaNs: any
    # NaN); subnormal results, underflow to zero and overflow to Inf included
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(low)
    v = torch.tensor([w], dtype=low)
    crow, col = torch.tensor([0, 1]), torch.tensor([0])
    expected = (x.float() * v.float()).to(low)
    got = ops.csr_spmm(x[:, None], v, crow, col)[:, 0]  # batch 65536, one feature
    assert torch.equal(got.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(_bits(got[keep]), _bits(expected[keep]))
    finite = x[torch.isfinite(x)]  # batch 1 through W = w I (NaN/Inf would trigger the rule)
    n = finite.numel()
    got1 = ops.csr_spmm(finite[None], v.expand(n).contiguous(), torch.arange(n + 1),
                        torch.arange(n))[0]
    assert torch.equal(_bits(got1), _bits((finite.float() * w).to(low)))


def test_results_do_not_depend_on_the_thread_count(low, isa, gen):
    layer = tn.SparseLinear(600, 300, density=0.2, backend="native", generator=gen).to(low)
    x = _rand((100, 600), low, gen).requires_grad_()
    g = _rand((100, 300), low, gen)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x.grad = None
            layer.zero_grad()
            y = layer(x)
            y.backward(g)
            runs.append((y, x.grad, layer.values.grad))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_isas_agree_up_to_float32_rounding_order(low, gen):
    # every ISA rounds the same float32 sums once; only the summation order differs
    layer = tn.SparseLinear(200, 70, density=0.3, backend="native", generator=gen).to(low)
    x = _rand((45, 200), low, gen)
    old = ops.kernel_isa()
    try:
        results = {}
        for isa in ops.supported_isas():
            ops.kernel_isa(isa)
            results[isa] = layer(x).detach()
    finally:
        ops.kernel_isa(old)
    w = layer.dense_weight().detach().double()
    ref = x.double() @ w.t() + layer.bias.detach().double()
    for got in results.values():
        assert_rounded_once(got, ref, x.double().abs() @ w.abs().t()
                            + layer.bias.detach().double().abs(), low, 201)


def test_saved_input_stays_16_bit_and_padded_like_float32(low, gen):
    layout, _ = random_layout(7, 11, 0.4, gen)
    crow_t, col_t, perm = layout.transpose()
    v = _rand((layout.nnz,), low, gen)
    for batch in (1, 15, 16, 17, 100):
        x = _rand((batch, 11), low, gen)
        y, xt = torch.ops.torch_nerva.sparse_linear(x, v, None, layout.crow, layout.col,
                                                    crow_t, col_t, perm)
        assert xt.dtype == low and y.dtype == low
        assert xt.shape == (11, ops.padded_ld(batch, low)) == (11, ops.padded_ld(batch,
                                                                                 torch.float32))
        assert torch.equal(xt[:, :batch], x.t()) and not xt[:, batch:].any()


def test_feature_major_spmm_with_clamp(low, isa, gen):
    layout, _ = random_layout(30, 20, 0.3, gen)
    v = _rand((layout.nnz,), low, gen)
    b = _rand((30,), low, gen)
    for ld in (5, 16, 48):
        xt = _rand((20, ld), low, gen, scale=2.0)
        got = torch.ops.torch_nerva.csr_spmm_fm(xt, v, layout.crow, layout.col, b, 0.0, 1.5)
        w = dense(layout, v.double())
        ref = (w @ xt.double() + b.double()[:, None])
        exact = ref.clamp(0.0, 1.5)
        # clamped in float32 before the rounding: the bound holds against the clamped sum
        terms = w.abs() @ xt.double().abs() + b.double().abs()[:, None]
        assert_rounded_once(got, exact, terms, low, 21)


# ---- NaN/Inf: dense math's semantics in 16 bits ----------------------------------------------

def _same_nonfinite(got, ref):
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    assert torch.equal(got.isinf() & (got > 0), ref.isinf() & (ref > 0))


def test_every_16_bit_pattern_is_classified_like_dense_math(low, isa):
    # all 65536 bit patterns as inputs (row b holds the patterns with high byte b): row 0 of W
    # has no weight (y = bias: nan exactly when the input row holds a NaN or Inf), row 1 one
    # weight at column 5
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(256, 256)
    x = bits.view(low)
    mask = torch.zeros(2, 256, dtype=torch.bool)
    mask[1, 5] = True
    layer = tn.SparseLinear(256, 2, mask=mask, backend="native").to(low)
    with torch.no_grad():
        layer.values.fill_(0.5)
        layer.bias.fill_(0.25)
    ref = F.linear(x.double(), layer.dense_weight().detach().double(),
                   layer.bias.detach().double())
    for rows in (x, x[:1], x[127:128], x[124:125], x[255:]):  # batch 256 and batch 1 paths
        got = layer(rows).detach()
        _same_nonfinite(got, F.linear(rows.double(), layer.dense_weight().detach().double(),
                                      layer.bias.detach().double()))
    assert ref[:, 0].isnan().sum() == (2 if low == torch.bfloat16 else 8)  # rows with Inf/NaN


def test_nonfinite_counts_stay_exact_beyond_16_bit_integers(low, isa):
    # 300 Inf inputs in a row; W's row 0 is connected to 299 of them: dense math multiplies the
    # 300th by an absent (zero) weight, so y is nan. Counted in bfloat16, 299 would round to
    # 300 and the rule would miss it. Row 1 is connected to all 300: y = +inf.
    n = 600
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, :299] = True
    mask[1, :300] = True
    layer = tn.SparseLinear(n, 2, mask=mask, backend="native").to(low)
    with torch.no_grad():
        layer.values.fill_(1.0)
    x = torch.ones(3, n, dtype=low)
    x[:2, :300] = float("inf")
    ref = F.linear(x.double(), layer.dense_weight().detach().double(),
                   layer.bias.detach().double())
    got = layer(x).detach()
    _same_nonfinite(got, ref)
    assert got[0, 0].isnan() and got[0, 1] == float("inf") and torch.isfinite(got[2]).all()


@pytest.mark.parametrize("batch", [1, 3, 40])
def test_nonfinite_inputs_and_gradients_follow_dense_math(low, isa, gen, batch):
    layer = tn.SparseLinear(40, 24, density=0.1, backend="native", generator=gen).to(low)
    x = _rand((batch, 40), low, gen)
    x[0, 3] = float("inf")
    x[-1, 10] = float("nan")
    x[batch // 2, 7] = -float("inf")
    g = _rand((batch, 24), low, gen)
    g[0, 1] = float("inf")
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    y.backward(g)
    w = layer.dense_weight().detach().double().requires_grad_(True)
    x2 = x.double().requires_grad_(True)
    ref = F.linear(x2, w, layer.bias.detach().double())
    ref.backward(g.double())
    _same_nonfinite(y, ref)
    _same_nonfinite(x1.grad, x2.grad)
    _same_nonfinite(layer.values.grad.reshape(-1),
                    w.grad.flatten()[layer.layout.positions()])


# ---- opcheck: schemas, fakes (dtypes), autograd registration, dynamic shapes ----------------

def test_opcheck_16_bit(low, gen):
    layout, _ = random_layout(9, 14, 0.3, gen, torch.int32, empty_rows=2)
    crow_t, col_t, perm = layout.transpose()
    x = _rand((20, 14), low, gen)
    v = _rand((layout.nnz,), low, gen)
    b = _rand((9,), low, gen)
    dy = _rand((20, 9), low, gen)
    xt = torch.ops.torch_nerva.sparse_linear(x, v, None, layout.crow, layout.col, crow_t, col_t,
                                             perm)[1]
    cases = [
        (torch.ops.torch_nerva.csr_spmm.default, (x, v, layout.crow, layout.col, None, b)),
        (torch.ops.torch_nerva.csr_spmm.default, (dy, v, crow_t, col_t, perm, None)),
        (torch.ops.torch_nerva.csr_sddmm.default, (dy, x, layout.crow, layout.col)),
        (torch.ops.torch_nerva.sparse_linear.default,
         (x.clone().requires_grad_(), v.clone().requires_grad_(), b.clone().requires_grad_(),
          layout.crow, layout.col, crow_t, col_t, perm)),
        (torch.ops.torch_nerva.sparse_linear_backward.default,
         (dy, xt, v, layout.crow, layout.col, crow_t, col_t, perm, True, True)),
        (torch.ops.torch_nerva.csr_spmm_fm.default,
         (x.t().contiguous()[:, :16].contiguous(), v, layout.crow, layout.col, b, None, None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- layers stored in 16 bits ----------------------------------------------------------------

@pytest.mark.parametrize("convert", ["half", "bfloat16"])
def test_layer_in_16_bits_trains(gen, convert):
    dtype = torch.float16 if convert == "half" else torch.bfloat16
    layer = tn.SparseLinear(50, 30, density=0.2, backend="native", generator=gen)
    layer = layer.half() if convert == "half" else layer.to(torch.bfloat16)
    assert layer.values.dtype == layer.bias.dtype == dtype
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = _rand((8, 50), dtype, gen)
    before = layer.values.detach().clone()
    y = layer(x)
    assert y.dtype == dtype
    loss = y.float().square().sum()
    loss.backward()
    assert layer.values.grad.dtype == dtype and layer.bias.grad.dtype == dtype
    # the gradient against float64 math on the same numbers (dL/dy = 2 y, y as computed)
    gy = 2 * y.detach().double()
    positions = layer.layout.positions()
    ref = (gy.t() @ x.double()).flatten()[positions]
    assert_rounded_once(layer.values.grad.reshape(-1), ref,
                        (gy.abs().t() @ x.double().abs()).flatten()[positions], dtype, 8)
    opt.step()
    assert layer.values.dtype == dtype
    # SGD's 16-bit update, within an ulp or two of the values' scale of the exact step
    expected = before.double() - 0.1 * layer.values.grad.double()
    torch.testing.assert_close(layer.values.detach().double(), expected, rtol=0,
                               atol=4 * UNIT[dtype] * float(expected.abs().max()))
    assert not torch.equal(layer.values.detach(), before)


@pytest.mark.parametrize("backend", ["torch", "mkl"])
def test_sparse_library_backends_refuse_16_bit_naming_native(low, gen, backend):
    if backend not in tn.backends.available():
        pytest.skip(f"{backend} not built")
    layer = tn.SparseLinear(10, 6, density=0.5, backend=backend, generator=gen).to(low)
    with pytest.raises(RuntimeError, match="backend='native'"):
        layer(_rand((3, 10), low, gen))
    layer32 = tn.SparseLinear(10, 6, density=0.5, backend=backend, generator=gen)
    with torch.autocast("cpu", dtype=low):
        with pytest.raises(RuntimeError, match="autocast.*backend='native'"):
            layer32(torch.randn(3, 10))


# ---- torch.autocast --------------------------------------------------------------------------

def _mlp(gen, backend, layer=tn.SparseLinear):
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(),
                         layer(40, 32, density=0.3, backend=backend, generator=gen), nn.ReLU(),
                         layer(32, 10, density=0.5, backend=backend, generator=gen))


def _run(model, x, dtype):
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    y.float().square().sum().backward()
    return y


def _sparse_grads(model):
    return [m.values.grad.reshape(-1) for m in model if isinstance(m, tn.SparseLinear)]


@pytest.mark.parametrize("backend", ["native", "dense", "auto"])
def test_autocast_model_matches_nn_linear(low, backend):
    gen = torch.Generator().manual_seed(5)
    model = _mlp(gen, backend)
    reference = tn.densify(model)  # nn.Linear layers with the same (densified) weights
    assert not any(isinstance(m, tn.SparseLinear) for m in reference)
    x = torch.randn(16, 24, generator=gen)
    y = _run(model, x, low)
    y_ref = _run(reference, x, low)
    assert y.dtype == y_ref.dtype == low
    # both round every layer's output to 16 bits; the roundings may differ by an ulp, which the
    # next layers carry: a few ulps of the output's scale
    scale = float(y_ref.detach().float().abs().max())
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=4 * UNIT[low],
                               atol=4 * UNIT[low] * scale)
    sparse = [m for m in model if isinstance(m, tn.SparseLinear)]
    dense_layers = [m for m in reference if isinstance(m, nn.Linear)][1:]
    for s, d, g in zip(sparse, dense_layers, _sparse_grads(model)):
        assert s.values.dtype == g.dtype == torch.float32  # the gradient reaches the float32
        assert s.bias.grad.dtype == torch.float32           # parameters in float32
        g_ref = d.weight.grad.flatten()[s.layout.positions()]
        gscale = float(g_ref.abs().max())
        torch.testing.assert_close(g, g_ref, rtol=8 * UNIT[low], atol=8 * UNIT[low] * gscale)
        torch.testing.assert_close(s.bias.grad, d.bias.grad, rtol=8 * UNIT[low],
                                   atol=8 * UNIT[low] * float(d.bias.grad.abs().max()))
    assert model[0].weight.grad.dtype == torch.float32


def test_autocast_dense_backend_is_nn_linear_exactly(low):
    gen = torch.Generator().manual_seed(6)
    model = _mlp(gen, "dense")
    reference = tn.densify(model)
    x = torch.randn(16, 24, generator=gen)
    assert torch.equal(_run(model, x, low), _run(reference, x, low))


def test_autocast_masked_twin_matches_sparse(low):
    gen = torch.Generator().manual_seed(7)
    sparse = _mlp(gen, "native")
    masked = tn.to_masked(sparse)
    assert any(isinstance(m, tn.MaskedLinear) for m in masked)
    x = torch.randn(16, 24, generator=gen)
    y, y_m = _run(sparse, x, low), _run(masked, x, low)
    assert y.dtype == y_m.dtype == low
    scale = float(y_m.detach().float().abs().max())
    torch.testing.assert_close(y.float(), y_m.float(), rtol=4 * UNIT[low],
                               atol=4 * UNIT[low] * scale)
    for s, m in zip((m for m in sparse if isinstance(m, tn.SparseLinear)),
                    (m for m in masked if isinstance(m, tn.MaskedLinear))):
        assert m.weight.grad.dtype == s.values.grad.dtype == torch.float32
        g_ref = m.weight.grad.flatten()[s.layout.positions()]
        torch.testing.assert_close(s.values.grad.reshape(-1), g_ref, rtol=8 * UNIT[low],
                                   atol=8 * UNIT[low] * float(g_ref.abs().max()))


def test_autocast_op_casts_inputs_and_keeps_float32_gradients(low, gen):
    layout, _ = random_layout(9, 14, 0.4, gen)
    crow_t, col_t, perm = layout.transpose()
    v = torch.randn(layout.nnz, generator=gen, requires_grad=True)
    b = torch.randn(9, generator=gen, requires_grad=True)
    x = torch.randn(6, 14, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=low):
        y = ops.sparse_linear(x, v, b, layout.crow, layout.col, crow_t, col_t, perm)
        z = ops.csr_spmm(x, v, layout.crow, layout.col, bias=b)
    assert y.dtype == z.dtype == low
    # what the op computed: float64 math on the 16-bit casts, rounded once
    w = dense(layout, v.detach().to(low).double())
    xl, bl = x.detach().to(low).double(), b.detach().to(low).double()
    for out in (y, z):
        assert_rounded_once(out, xl @ w.t() + bl, xl.abs() @ w.abs().t() + bl.abs(), low, 15)
    (y.float().sum() + z.float().sum()).backward()
    assert v.grad.dtype == b.grad.dtype == x.grad.dtype == torch.float32
    ones = torch.ones(6, 9, dtype=torch.float64)
    pattern = dense(layout, torch.ones(layout.nnz, dtype=torch.float64)) != 0
    # each op's 16-bit gradient, widened exactly: 2x one rounded value (ties aside, equal)
    torch.testing.assert_close(v.grad.double(), 2 * (ones.t() @ xl)[pattern].to(low).double(),
                               rtol=2 * UNIT[low], atol=0)
    torch.testing.assert_close(b.grad, torch.full((9,), 12.0))


def test_autocast_leaves_float64_alone_and_mismatches_outside_it_raise(gen):
    layer64 = tn.SparseLinear(10, 6, density=0.5, backend="native", generator=gen,
                              dtype=torch.float64)
    x64 = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer64(x64)
        assert F.linear(x64, layer64.dense_weight()).dtype == torch.float64  # as nn.Linear
        with pytest.raises(TypeError, match="dtype"):  # float64 is never cast: a real mismatch
            layer64(x64.float())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x64, layer64.dense_weight(), layer64.bias))
    layer = tn.SparseLinear(10, 6, density=0.5, backend="native", generator=gen)
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        layer(torch.randn(3, 10).to(torch.bfloat16))  # no autocast: the usual error
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 activation, float32 layer
        assert layer(torch.randn(3, 10).to(torch.bfloat16)).dtype == torch.bfloat16


def test_autocast_with_torch_compile_aot_eager(low):
    gen = torch.Generator().manual_seed(8)
    model = _mlp(gen, "native")
    twin = copy.deepcopy(model)
    x = torch.randn(16, 24, generator=gen)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    y = _run(model, x, low)
    y_c = _run(compiled, x, low)
    assert y_c.dtype == low
    assert torch.equal(y, y_c)
    for g, g_c in zip(_sparse_grads(model), _sparse_grads(twin)):
        assert g_c.dtype == torch.float32
        torch.testing.assert_close(g, g_c, rtol=0, atol=0)
    assert math.isfinite(float(y_c.detach().float().sum()))


# ---- the comparison command's autocast option ------------------------------------------------

AUTOCAST_CONFIG = """
[[experiment]]
kind = "density"
name = "amp"
dataset = "synthetic-digits"
train_samples = 200
test_samples = 50
hidden = [32]
densities = [1.0, 0.2]
epochs = 1
batch_size = 50
check_steps = 2
inference_calls = 2
autocast = "{autocast}"
dtype = "{dtype}"

[[experiment]]
kind = "depth"
dataset = "synthetic-digits"
depths = [1]
width = 32
density = 0.2
steps = 1
train_samples = 100
test_samples = 10
samples_per_epoch = 100
"""


def test_compare_autocast_option_is_recorded(tmp_path):
    from torch_nerva import compare
    from torch_nerva.compare import experiments

    path = tmp_path / "amp.toml"
    path.write_text(AUTOCAST_CONFIG.format(autocast="fp16", dtype="float32"))
    out = tmp_path / "out"
    # the command line overrides the config's key for every experiment
    assert compare.main(["--config", str(path), "--out", str(out), "--no-plots",
                         "--autocast", "bf16"]) == 0
    for name in ("amp", "depth"):
        doc = json.loads((out / f"{name}.json").read_text())
        assert doc["experiment"]["autocast"] == doc["meta"]["autocast"] == "bf16"
        assert all(r["autocast"] == "bf16" for r in doc["rows"])
    rows = json.loads((out / "amp.json").read_text())["rows"]
    assert [r["density"] for r in rows] == [1.0, 0.2]
    for r in rows:
        assert r["csr_s_per_epoch"] > 0 and r["mask_s_per_epoch"] > 0
        assert 0 <= r["best_acc_csr"] <= 1 and math.isfinite(r["loss_drift"])
    # the wrapper runs the forward in the autocast dtype: logits are bfloat16 numbers
    gen = torch.Generator().manual_seed(0)
    masked, csr = experiments.build_twins([24, 16, 5], 0.3, 0)
    for model in (masked, csr):
        wrapped = experiments.with_autocast(model, {"autocast": "bf16"})
        out_ = wrapped(torch.randn(4, 24, generator=gen))
        assert out_.dtype == torch.float32
        assert torch.equal(out_, out_.to(torch.bfloat16).float())
        assert next(model.parameters()).dtype == torch.float32
    assert experiments.with_autocast(csr, {"autocast": "none"}) is csr


def test_compare_autocast_config_errors(tmp_path, capsys):
    from torch_nerva import compare
    from torch_nerva.compare import config

    path = tmp_path / "amp.toml"
    path.write_text(AUTOCAST_CONFIG.format(autocast="fp32", dtype="float32"))
    with pytest.raises(config.ConfigError, match="autocast must be one of"):
        config.load(path)
    path.write_text(AUTOCAST_CONFIG.format(autocast="bf16", dtype="float64"))
    with pytest.raises(config.ConfigError, match="needs dtype"):
        config.load(path)
    path.write_text(AUTOCAST_CONFIG.format(autocast="none", dtype="float64"))
    assert [e["autocast"] for e in config.load(path)["experiments"]] == ["none", "none"]
    assert compare.main(["--config", str(path), "--autocast", "fp16", "--no-plots",
                         "--out", str(tmp_path / "o")]) == 2
    assert "needs dtype" in capsys.readouterr().err


def test_benchmark_script_runs_and_checks_each_dtype(tmp_path):
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mixed_precision as bench

    assert bench.main(["--in-features", "64", "--out-features", "32", "--batch", "20",
                       "--densities", "0.1", "0.5", "--reps", "3", "--burst", "1",
                       "--out", str(tmp_path)]) == 0
    with open(tmp_path / "mixed_precision.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["density"], r["dtype"]) for r in rows] == [
        (d, t) for d in ("0.1", "0.5") for t in ("f32", "bf16", "f16")]
    limit = {"f32": 1e-6, "bf16": 2 * UNIT[torch.bfloat16], "f16": 2 * UNIT[torch.float16]}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p90_ms"]) >= float(r["median_ms"])
        assert float(r["max_rel_err"]) < limit[r["dtype"]]
        assert r["isa"] == ops.kernel_isa()
    assert all(float(r["ratio_to_f32"]) == 1.0 for r in rows if r["dtype"] == "f32")
