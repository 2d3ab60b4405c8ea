"""sparse_conv2d / sparse_conv2d_backward against F.conv2d with the dense weight built from the
CSR: forward, gradients, gradcheck, opcheck, malformed inputs, thread-count independence."""
import pytest
import torch
import torch.nn.functional as F

from torch_nerva import ops

from conftest import tol
from reference import OpLog, random_layout

pytestmark = [pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
              pytest.mark.filterwarnings("ignore:Sparse invariant checks")]

OPS = torch.ops.torch_nerva

# (batch, in, h, w, out, kernel, stride, padding, dilation, groups)
CONFIGS = [
    (1, 3, 8, 8, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),      # batch 1, "same" 3x3
    (2, 4, 7, 9, 6, (1, 1), (1, 1), (0, 0), (1, 1), 1),      # 1x1
    (3, 4, 10, 11, 8, (2, 5), (2, 1), (2, 1), (1, 2), 2),    # 2x5, mixed stride/padding/dilation
    (2, 8, 9, 9, 8, (3, 3), (2, 2), (1, 1), (2, 2), 4),      # stride 2, dilation 2, groups 4
    (2, 6, 6, 5, 4, (3, 3), (1, 1), (2, 2), (1, 1), 2),      # padding 2, groups 2
    (1, 4, 33, 35, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),    # rows longer than a vector + tails
    (2, 2, 20, 40, 3, (3, 3), (2, 2), (1, 1), (1, 1), 1),    # stride 2 along long rows
    (1, 2, 3, 3, 2, (1, 1), (1, 1), (2, 2), (1, 1), 1),      # output pixels reading only padding
    (2, 3, 4, 4, 3, (3, 3), (1, 1), (2, 2), (2, 2), 1),      # dilated kernel mostly in padding
    (2, 3, 9, 8, 4, (3, 3), (2, 1), (1, 1), (1, 1), 1),      # wo == w but vertical stride 2
    (2, 4, 5, 6, 4, (1, 3), (1, 1), (0, 2), (1, 2), 2),      # wo == w through dilation 2
    (3, 6, 6, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3),      # 42-pixel planes (3 vectors)
    (2, 4, 9, 7, 4, (3, 1), (1, 1), (0, 0), (1, 1), 2),      # ho < h, wo == w: 49 of 63 pixels
    (2, 4, 9, 9, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),      # 81 pixels: beyond 4 vectors
]
DENSITIES = [0.0, 0.1, 1.0]


def make_case(cfg, density, gen, index_dtype=torch.int64, dtype=torch.float64, empty=True):
    n, c_in, h, w, c_out, kernel, stride, padding, dilation, groups = cfg
    n_cols = c_in // groups * kernel[0] * kernel[1]
    layout, _ = random_layout(c_out, n_cols, density, gen, index_dtype,
                              empty_rows=c_out // 4 if empty else 0,
                              empty_cols=n_cols // 4 if empty else 0)
    crow_t, col_t, perm = layout.transpose()
    values = torch.randn(layout.nnz, dtype=dtype, generator=gen)
    x = torch.randn(n, c_in, h, w, dtype=dtype, generator=gen)
    bias = torch.randn(c_out, dtype=dtype, generator=gen)
    params = dict(kernel=list(kernel), stride=list(stride), padding=list(padding),
                  dilation=list(dilation), groups=groups)
    return x, values, bias, (layout.crow, layout.col, crow_t, col_t, perm), params


def dense_weight(values, crow, col, c_in, params):
    kh, kw = params["kernel"]
    c_out = crow.numel() - 1
    n_cols = c_in // params["groups"] * kh * kw
    w = torch.sparse_csr_tensor(crow, col, values, (c_out, n_cols)).to_dense()
    return w.view(c_out, c_in // params["groups"], kh, kw)


def dense_conv(x, w, bias, params):
    return F.conv2d(x, w, bias, params["stride"], params["padding"], params["dilation"],
                    params["groups"])


def sparse_conv(x, values, bias, layout, params):
    return ops.sparse_conv2d(x, values, bias, *layout, params["kernel"], params["stride"],
                             params["padding"], params["dilation"], params["groups"])


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("density", DENSITIES)
def test_forward_and_gradients_match_dense(cfg, density, dtype, index_dtype, gen, isa):
    x, values, bias, layout, params = make_case(cfg, density, gen, index_dtype, dtype)
    w = dense_weight(values, layout[0], layout[1], x.shape[1], params)
    x1, v1, b1 = (t.clone().requires_grad_() for t in (x, values, bias))
    y = sparse_conv(x1, v1, b1, layout, params)
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, bias))
    y2 = dense_conv(x2, w2, b2, params)
    assert y.shape == y2.shape
    torch.testing.assert_close(y, y2, **tol(dtype))
    g = torch.randn(y.shape, dtype=dtype, generator=gen)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **tol(dtype))
    mask = dense_weight(torch.ones_like(values), layout[0], layout[1], x.shape[1], params) != 0
    torch.testing.assert_close(v1.grad, w2.grad[mask], **tol(dtype))
    torch.testing.assert_close(b1.grad, b2.grad, **tol(dtype))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[5], CONFIGS[8], CONFIGS[10]])
@pytest.mark.parametrize("flat", ["0", "5"])
def test_row_path_where_the_flat_path_applies(cfg, flat, dtype, gen, isa, monkeypatch):
    # stride 1 and wo == w take the flat path by default; TORCH_NERVA_CONV_FLAT=0 forces one
    # loop per output row (5: the input gradient only), which must agree as well.
    monkeypatch.setenv("TORCH_NERVA_CONV_FLAT", flat)
    test_forward_and_gradients_match_dense(cfg, 0.3, dtype, torch.int32, gen, isa)


# Planes of more than 64 pixels on the flat path (stride 1, wo == w) take the tile kernels
# (AVX-512 float32: tiles of 8 vectors = 128 pixels, the last one shorter): plane sizes around
# tile multiples, tails of 1 to 7 vectors, input planes larger or smaller than the output plane,
# padding that clips rows and columns, dilation, groups; make_case leaves empty rows and columns.
TILE_CONFIGS = [
    (2, 4, 5, 13, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2),     # 65 pixels: 5 vectors, one tile
    (1, 3, 8, 16, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 128: exactly one tile
    (2, 3, 1, 127, 3, (1, 3), (1, 1), (0, 1), (1, 1), 1),    # 127: one pixel short of a tile
    (2, 3, 9, 15, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 135: a tile and 7 pixels
    (2, 4, 17, 17, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2),    # 289: two tiles and 33 pixels
    (1, 2, 12, 20, 3, (5, 5), (1, 1), (2, 2), (1, 1), 1),    # 5x5, padding 2 clips two rows
    (1, 3, 10, 14, 4, (3, 3), (1, 1), (2, 2), (2, 2), 1),    # dilation 2, 140 pixels
    (2, 3, 16, 10, 4, (3, 1), (1, 1), (0, 0), (1, 1), 1),    # ho < h: 140 out, 160 in pixels
    (1, 2, 10, 12, 2, (1, 3), (1, 1), (3, 1), (1, 1), 1),    # rows of padding: 192 out, 120 in
    (2, 8, 32, 32, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4),    # 32x32 (8 tiles), groups 4
]


@pytest.mark.parametrize("cfg", TILE_CONFIGS)
@pytest.mark.parametrize("density", DENSITIES)
def test_tiles_of_large_planes_match_dense(cfg, density, dtype, gen, isa):
    test_forward_and_gradients_match_dense(cfg, density, dtype, torch.int32, gen, isa)


def test_without_bias_and_channels_last_input(gen):
    cfg = (2, 4, 9, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    x, values, _, layout, params = make_case(cfg, 0.3, gen)
    w = dense_weight(values, *layout[:2], x.shape[1], params)
    xc = x.to(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    torch.testing.assert_close(sparse_conv(xc, values, None, layout, params),
                               dense_conv(x, w, None, params))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[8], CONFIGS[10]])
def test_nonfinite_input_follows_dense_math(cfg, gen, isa):
    # The flat path reads across row ends and masks those columns out: an Inf or NaN there must
    # reach exactly the outputs F.conv2d with the dense weight makes non-finite (an absent
    # weight is a zero, and 0 * Inf = NaN there too: the op applies dense math's rule).
    x, values, bias, layout, params = make_case(cfg, 0.5, gen, empty=False)
    bad = torch.zeros_like(x, dtype=torch.bool)
    bad[0, 0, 1, 0] = bad[-1, -1, -2, -1] = bad[0, -1, 2, -1] = True
    x_bad = x.masked_fill(bad, float("inf"))
    x_bad[-1, -1, -2, -1] = float("nan")
    w = dense_weight(values, *layout[:2], x.shape[1], params)
    y = sparse_conv(x_bad, values, bias, layout, params)
    ref = dense_conv(x_bad, w, bias, params)
    assert not ref.isfinite().all()
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert torch.equal(y.isnan(), ref.isnan())


@pytest.mark.parametrize("size", [6, 12])  # small-plane and tile kernels (float32, AVX-512)
def test_empty_batch(size, dtype, gen):
    cfg = (0, 4, size, size, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    x, values, bias, layout, params = make_case(cfg, 0.5, gen, dtype=dtype)
    x.requires_grad_()
    values.requires_grad_()
    y = sparse_conv(x, values, bias, layout, params)
    assert y.shape == (0, 3, size, size)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(values.grad, torch.zeros_like(values))


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[3], CONFIGS[7]])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck(cfg, with_bias, index_dtype, gen):
    x, values, bias, layout, params = make_case(cfg, 0.4, gen, index_dtype)
    x = x[:, :, :7, :8].contiguous()  # small: gradcheck is O(size^2)
    inputs = (x.requires_grad_(), values.requires_grad_(),
              bias.requires_grad_() if with_bias else None)
    assert torch.autograd.gradcheck(
        lambda x, v, b: sparse_conv(x, v, b, layout, params), inputs)


@pytest.mark.parametrize("x_grad,v_grad", [(False, True), (True, False), (True, True)])
def test_backward_computes_only_requested_gradients(x_grad, v_grad, gen):
    x, values, bias, layout, params = make_case(CONFIGS[3], 0.3, gen)
    x.requires_grad_(x_grad)
    values.requires_grad_(v_grad)
    y = sparse_conv(x, values, bias, layout, params)
    with OpLog() as log:
        y.sum().backward()
    (call,) = [c for c in log.calls if "sparse_conv2d_backward" in c[0]]
    _, args, (grad_x, grad_values) = call
    assert tuple(args[-2:]) == (x_grad, v_grad)
    assert grad_x.numel() == (x.numel() if x_grad else 0)
    assert grad_values.numel() == (values.numel() if v_grad else 0)
    assert (x.grad is not None) == x_grad and (values.grad is not None) == v_grad


def test_opcheck_both_ops(gen):
    for cfg in (CONFIGS[0], CONFIGS[3]):
        x, values, bias, layout, params = make_case(cfg, 0.4, gen, torch.int32)
        p = (params["kernel"], params["stride"], params["padding"], params["dilation"],
             params["groups"])
        torch.library.opcheck(OPS.sparse_conv2d.default,
                              (x.clone().requires_grad_(), values.clone().requires_grad_(),
                               bias.clone().requires_grad_(), *layout, *p))
        torch.library.opcheck(OPS.sparse_conv2d.default, (x, values, None, *layout, *p))
        y = OPS.sparse_conv2d(x, values, bias, *layout, *p)
        for flags in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(OPS.sparse_conv2d_backward.default,
                                  (torch.randn_like(y), x, values, *layout, *p, *flags))


@pytest.mark.parametrize("cfg", [(4, 16, 16, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),
                                 (3, 8, 15, 17, 12, (3, 3), (2, 2), (1, 1), (1, 1), 4),
                                 (8, 32, 4, 4, 32, (3, 3), (1, 1), (1, 1), (1, 1), 2),
                                 (3, 8, 17, 19, 8, (3, 3), (1, 1), (1, 1), (1, 1), 2)])
def test_bit_identical_across_thread_counts(cfg, gen):
    x, values, bias, layout, params = make_case(cfg, 0.3, gen, dtype=torch.float32)
    g = None
    results = []
    old = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            x1, v1 = x.clone().requires_grad_(), values.clone().requires_grad_()
            y = sparse_conv(x1, v1, bias, layout, params)
            if g is None:
                g = torch.randn(y.shape, generator=gen)
            y.backward(g)
            results.append((y.detach(), x1.grad, v1.grad))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- malformed inputs: clear errors --------------------------------------------------------

def _call(x, values, bias, layout, params, **override):
    p = {**params, **override}
    return OPS.sparse_conv2d(x, values, bias, *layout, p["kernel"], p["stride"], p["padding"],
                             p["dilation"], p["groups"])


def _replace(layout, i, t):
    return tuple(t if j == i else u for j, u in enumerate(layout))


def test_argument_errors_name_the_problem(gen):
    cfg = (2, 4, 6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    x, values, bias, layout, params = make_case(cfg, 0.5, gen, empty=False)
    crow, col, crow_t, col_t, perm = layout
    cases = [
        (dict(x=x[0]), {}, "x must be 4-D"),
        (dict(x=x.float()), {}, "dtype"),
        (dict(x=x.half(), values=values.half()), {}, "only float32 and float64"),
        (dict(values=values[:-1]), {}, "values has"),
        (dict(bias=bias[:-1]), {}, "bias must have shape"),
        (dict(bias=bias.float()), {}, "bias has dtype"),
        ({}, dict(kernel=[0, 3]), "kernel size must be >= 1"),
        ({}, dict(stride=[1, 0]), "stride must be >= 1"),
        ({}, dict(dilation=[0, 1]), "dilation must be >= 1"),
        ({}, dict(padding=[-1, 1]), "padding must be >= 0"),
        ({}, dict(groups=3), "does not divide in_channels"),
        ({}, dict(groups=4), "does not divide out_channels"),
        ({}, dict(groups=1), "in_channels / groups \\* kh \\* kw"),
        ({}, dict(kernel=[2, 2]), "in_channels / groups \\* kh \\* kw"),
        (dict(x=x[:, :, :2, :2]), dict(padding=[0, 0]), "smaller than the dilated kernel"),
        (dict(x=x.to("meta")), {}, "device|is on"),
    ]
    for tensors, override, message in cases:
        args = dict(x=x, values=values, bias=bias, layout=layout, params=params)
        args.update(tensors)
        with pytest.raises(RuntimeError, match=message):
            _call(args["x"], args["values"], args["bias"], args["layout"], params, **override)


def test_malformed_layouts_raise(gen):
    cfg = (2, 4, 6, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    x, values, bias, layout, params = make_case(cfg, 0.5, gen, empty=False)
    crow, col, crow_t, col_t, perm = layout
    n_cols = 2 * 9

    def bad(t, pos, value):
        t = t.clone()
        t[pos] = value
        return t

    forward_cases = [
        (_replace(layout, 1, bad(col, 3, n_cols)), "column index out of range at position 3"),
        (_replace(layout, 1, bad(col, 0, -1)), "column index out of range at position 0"),
        (_replace(layout, 0, bad(crow, 2, 10 ** 6)), "row pointer"),
        (_replace(layout, 0, bad(crow, 0, 1)), "crow\\[0\\] must be 0"),
        (_replace(layout, 0, crow.int()), "one index dtype|same index dtype"),
        (_replace(layout, 0, crow[:-1]), "does not divide out_channels|crow\\[-1\\]"),
    ]
    for lay, message in forward_cases:
        with pytest.raises(RuntimeError, match=message):
            _call(x, values, bias, lay, params)
    y = _call(x, values, bias, layout, params)
    p = (params["kernel"], params["stride"], params["padding"], params["dilation"],
         params["groups"])
    g = torch.randn_like(y)
    backward_cases = [
        (_replace(layout, 4, bad(perm, 1, col.numel())), "perm index out of range"),
        (_replace(layout, 4, perm.flip(0)), "not the transpose"),
        (_replace(layout, 3, bad(col_t, 2, 6)), "column index out of range"),
        (_replace(layout, 2, bad(crow_t, 4, -3)), "row pointer"),
    ]
    row = int(torch.argmax(crow_t[1:] - crow_t[:-1]))  # a W^T row with >= 2 entries
    assert crow_t[row + 1] - crow_t[row] >= 2
    lo = int(crow_t[row])
    swapped = col_t.clone()
    swapped[lo], swapped[lo + 1] = col_t[lo + 1], col_t[lo]
    swapped_perm = perm.clone()
    swapped_perm[lo], swapped_perm[lo + 1] = perm[lo + 1], perm[lo]
    backward_cases.append((_replace(_replace(layout, 3, swapped), 4, swapped_perm),
                           "not sorted"))
    for lay, message in backward_cases:
        with pytest.raises(RuntimeError, match=message):
            OPS.sparse_conv2d_backward(g, x, values, *lay, *p, True, True)
    with pytest.raises(RuntimeError, match="grad must have the output's shape"):
        OPS.sparse_conv2d_backward(g[:, :, 1:], x, values, *layout, *p, True, True)


def test_benchmark_script_runs(capsys):
    # benchmarks/conv.py on one small case: it checks its two convolutions agree, then prints
    # one table row with positive times and ratios
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import conv
    assert conv.main(["--reps", "1", "--batch", "2", "--layers", "64", "--densities", "0.1",
                      "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "64->64" in line]
    assert len(rows) == 1
    # name, density, nnz | dense fwd, sparse fwd, ratio | dense f+b, sparse f+b, ratio |
    # masked f+b, ratio | SparseProp f+b, ratio (or a note when it is absent or wrong here)
    cells = rows[0].split("|")
    numbers = [float(f) for cell in cells[:4] for f in cell.split()[2 if cell is cells[0] else 0:]]
    assert len(numbers) == 10 and all(n > 0 for n in numbers)
