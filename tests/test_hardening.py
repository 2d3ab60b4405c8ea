"""Bad input at every entry point: a clear exception or the right answer, never a crash, a
silent wrong result or a half-changed model. One test (or more) per failure mode found by an
adversarial pass over the public functions, module methods, registered ops and file readers."""
import gzip
import io
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_nerva as tn
from torch_nerva import dst, graphchallenge as gc, interchange, ops
from torch_nerva.layout import CSRLayout

from reference import dense, random_layout

OPS = torch.ops.torch_nerva


def _layer(gen, n_in=12, n_out=9, density=0.3, dtype=torch.float64, **kw):
    return tn.SparseLinear(n_in, n_out, density=density, dtype=dtype, generator=gen, **kw)


def _buffers(layer):
    b = layer.__dict__
    return (b["crow_indices"], b["col_indices"], b["crow_indices_t"], b["col_indices_t"],
            b["perm_t"])


def _snapshot(module):
    """Everything a load could change, including the non-persistent caches."""
    out = {k: v.detach().clone() for k, v in module.named_parameters()}
    out.update({k: v.clone() for k, v in module.named_buffers()})
    for name, m in module.named_modules():  # the topology and its caches are not buffers
        for n in getattr(m, "_TOPOLOGY", ()):
            if n in m.__dict__:
                out[f"{name}.{n}"] = m.__dict__[n].clone()
    return out


def _assert_unchanged(module, snap):
    now = _snapshot(module)
    assert now.keys() == snap.keys()
    for k in snap:
        assert now[k].dtype == snap[k].dtype and torch.equal(now[k], snap[k]), k


def _assert_dense_math(layer, batches=(1, 3, 8, 40)):
    """Forward, input gradient and values gradient equal F.linear on the dense weight."""
    for batch in batches:
        x = torch.randn(batch, layer.in_features, dtype=layer.values.dtype, requires_grad=True)
        layer.zero_grad()
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        w = layer.dense_weight().detach().requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        ref = F.linear(x2, w, None if layer.bias is None else layer.bias.detach())
        ref.backward(g)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(layer.values.grad.view(-1), w.grad.flatten()[layer.layout.positions()])


# ---- critical: the backward op reads the saved input through its data pointer ---------------

def test_backward_with_expanded_saved_input_raises_in_a_fresh_process():
    code = textwrap.dedent("""
        import torch, torch_nerva as tn
        layer = tn.SparseLinear(64, 32, density=0.1)
        b = layer.__dict__
        grad = torch.randn(100000, 32)
        xt = torch.zeros(1, 1).expand(100000, 64)  # stride 0, the shape of a row-major input
        try:
            torch.ops.torch_nerva.sparse_linear_backward(
                grad, xt, layer.flat_values(), b["crow_indices"], b["col_indices"],
                b["crow_indices_t"], b["col_indices_t"], b["perm_t"], True, True)
        except RuntimeError as e:
            print("raised:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "raised:" in out.stdout and "saved input must be (in_features x ld)" in out.stdout


@pytest.mark.parametrize("batch", [1, 5, 100])
def test_backward_reads_any_strides_of_the_saved_input_correctly(gen, batch):
    layer = _layer(gen, 40, 24, 0.2)
    x = torch.randn(batch, 40, dtype=torch.float64)
    grad = torch.randn(batch, 24, dtype=torch.float64)
    y, xt = OPS.sparse_linear(x, layer.flat_values(), layer.bias, *_buffers(layer))
    ref = OPS.sparse_linear_backward(grad, xt, layer.flat_values(), *_buffers(layer), True, True)
    variants = [xt.t().contiguous().t(),                      # transposed strides
                torch.cat([xt, xt], 1)[:, :xt.shape[1]]]        # a slice of a wider tensor
    if xt.shape[1]:
        variants.append(xt[:, :1].expand(xt.shape) if batch == 1 else xt)
    for v in variants:
        out = OPS.sparse_linear_backward(grad, v, layer.flat_values(), *_buffers(layer), True, True)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    expected = (grad.t() @ x).flatten()[layer.layout.positions()]
    torch.testing.assert_close(ref[1], expected)


def test_backward_refuses_a_saved_input_of_the_wrong_shape_or_dtype(gen):
    layer = _layer(gen, 40, 24, 0.2)
    grad = torch.randn(20, 24, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="saved input must be"):
        OPS.sparse_linear_backward(grad, torch.zeros(40, 20, dtype=torch.float64), layer.flat_values(),
                                   *_buffers(layer), False, True)  # ld must be 24 for 20 rows
    with pytest.raises(RuntimeError, match="saved input has dtype"):
        OPS.sparse_linear_backward(grad, torch.zeros(40, 24), layer.flat_values(), *_buffers(layer),
                                   False, True)


# ---- high: partial state dicts ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "native", "dense", "torch"])
@pytest.mark.parametrize("keys", [("crow_indices",), ("col_indices",), ("values",),
                                  ("crow_indices", "col_indices"),
                                  ("crow_indices", "col_indices", "values")])
def test_partial_load_is_validated_and_rebuilds_every_cache(gen, backend, keys):
    # density 0.6 on a small layer: backend="auto" computes it densely above batch 4 and with
    # the native kernel at batch <= 4, so both caches are exercised
    layer = _layer(gen, 12, 9, 0.6, backend=backend)
    other = _layer(gen, 12, 9, 0.6)
    sd = {k: v for k, v in other.state_dict().items() if k in keys}
    before = _snapshot(layer)
    combined_ok = True
    try:
        CSRLayout.from_tensors(sd.get("crow_indices", layer.crow_indices),
                               sd.get("col_indices", layer.col_indices), (9, 12))
    except RuntimeError:
        combined_ok = False
    if combined_ok and sd.get("values", layer.values).numel() == (
            sd["col_indices"].numel() if "col_indices" in sd else layer.nnz):
        layer.load_state_dict(sd, strict=False)
        if "col_indices" in keys:
            assert torch.equal(layer.col_indices, other.col_indices)
        if "values" in keys:
            assert torch.equal(layer.values, other.values)
        crow_t, col_t, perm = layer.layout.transpose()
        assert torch.equal(layer.crow_indices_t, crow_t) and torch.equal(layer.perm_t, perm)
        _assert_dense_math(layer)
    else:
        with pytest.raises(RuntimeError, match="nothing of it was loaded"):
            layer.load_state_dict(sd, strict=False)
        _assert_unchanged(layer, before)


def test_partial_load_with_duplicate_columns_is_refused(gen):
    layer = _layer(gen, 12, 9, 0.6)
    before = _snapshot(layer)
    col = layer.col_indices.clone()
    row0 = int(layer.crow_indices[1])
    assert row0 >= 2
    col[1] = col[0]
    with pytest.raises(RuntimeError, match="duplicate column index"):
        layer.load_state_dict({"col_indices": col}, strict=False)
    _assert_unchanged(layer, before)


# ---- high: a strict load that fails leaves the layer untouched ---------------------------------

@pytest.mark.parametrize("corrupt", ["bias_shape", "values_len", "extra_state", "not_tensor",
                                     "float_index", "float_values", "bias_on_biasless"])
def test_failed_load_changes_nothing(gen, corrupt):
    layer = _layer(gen, 12, 9, 0.3, bias=corrupt != "bias_on_biasless")
    sd = _layer(gen, 12, 9, 0.5).state_dict()  # another topology: adoption would happen
    if corrupt == "bias_shape":
        sd["bias"] = torch.zeros(10, dtype=torch.float64)
    elif corrupt == "values_len":
        sd["values"] = sd["values"][:-1]
    elif corrupt == "extra_state":
        sd["_extra_state"] = {"in_features": 12, "out_features": 8}
    elif corrupt == "not_tensor":
        sd["col_indices"] = sd["col_indices"].tolist()
    elif corrupt == "float_index":
        sd["col_indices"] = sd["col_indices"].double()
    elif corrupt == "float_values":
        sd["values"] = sd["values"].long()
    before = _snapshot(layer)
    x = torch.randn(5, 12, dtype=torch.float64)
    y_before = layer(x)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="nothing of it was loaded"):
            layer.load_state_dict(sd, strict=strict)
        _assert_unchanged(layer, before)
        torch.testing.assert_close(layer(x), y_before, rtol=0, atol=0)


@pytest.mark.parametrize("corrupt", ["missing", "unexpected"])
def test_strict_key_errors(gen, corrupt):
    """Missing / unexpected keys are judged by nn.Module after the load: the layer is then
    loaded consistently from the keys present; torch_nerva.load_state_dict undoes it."""
    layer = _layer(gen, 12, 9, 0.3)
    other = _layer(gen, 12, 9, 0.5)
    sd = other.state_dict()
    if corrupt == "missing":
        del sd["bias"]
    else:
        sd["weight"] = torch.zeros(9, 12)
    before = _snapshot(layer)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        tn.load_state_dict(layer, sd)
    _assert_unchanged(layer, before)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        layer.load_state_dict(sd)
    assert torch.equal(layer.col_indices, other.col_indices)
    _assert_dense_math(layer)


def test_extra_state_none_gives_a_clear_error(gen):
    layer = _layer(gen)
    sd = layer.state_dict()
    sd["_extra_state"] = None
    with pytest.raises(RuntimeError, match="_extra_state must be a dict"):
        layer.load_state_dict(sd)


def test_masked_load_is_checked_before_copying(gen):
    layer = tn.MaskedLinear(12, 9, density=0.3, generator=gen)
    before = _snapshot(layer)
    sd = tn.MaskedLinear(12, 9, density=0.5, generator=gen).state_dict()
    sd["mask"] = sd["mask"].float() * 0.5
    with pytest.raises(RuntimeError, match="mask must be boolean"):
        layer.load_state_dict(sd)
    _assert_unchanged(layer, before)
    sd["mask"] = torch.ones(9, 12, dtype=torch.bool)
    sd["bias"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="bias has shape"):
        layer.load_state_dict(sd)
    _assert_unchanged(layer, before)


def test_whole_model_load_is_all_or_nothing_with_load_state_dict(gen):
    def model():
        return torch.nn.Sequential(_layer(gen, 12, 9, 0.3), torch.nn.ReLU(),
                                   torch.nn.Linear(9, 7).double(), _layer(gen, 7, 5, 0.4))
    m, src = model(), model()
    sd = src.state_dict()
    sd["3.col_indices"] = sd["3.col_indices"].flip(0)  # unsorted: the last layer is bad
    x = torch.randn(4, 12, dtype=torch.float64)
    m(x).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    before = _snapshot(m)
    with pytest.raises(RuntimeError, match="not sorted|duplicate"):
        tn.load_state_dict(m, sd)
    _assert_unchanged(m, before)
    assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads))
    # nn.Module's own loader: the bad layer is untouched, the layers before it are loaded
    with pytest.raises(RuntimeError):
        m.load_state_dict(sd)
    assert torch.equal(m[0].col_indices, src[0].col_indices)
    assert torch.equal(m[3].col_indices, before["3.col_indices"])
    # a good state loads through the wrapper like load_state_dict
    tn.load_state_dict(m, src.state_dict())
    torch.testing.assert_close(m(x), src(x))


# ---- medium: a topology change between forward and backward ----------------------------------

@pytest.mark.parametrize("backend", ["native", "dense", "torch", "mkl"])
@pytest.mark.parametrize("how", ["dst", "load"])
def test_backward_through_a_replaced_topology_raises(gen, backend, how):
    if backend not in tn.backends.available():
        pytest.skip(f"{backend} not built")
    layer = _layer(gen, 12, 9, 0.3, backend=backend)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    if how == "dst":
        dst.prune_and_regrow(layer, drop_fraction=0.5, generator=torch.Generator().manual_seed(0))
    else:
        layer.load_state_dict(_layer(gen, 12, 9, 0.5).state_dict())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # a new forward works, against dense math
    _assert_dense_math(layer, batches=(6,))


def test_masked_twin_raises_the_same_way(gen):
    layer = tn.MaskedLinear(12, 9, density=0.3, generator=gen, dtype=torch.float64)
    y = layer(torch.randn(6, 12, dtype=torch.float64, requires_grad=True))
    dst.prune_and_regrow(layer, drop_fraction=0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- medium: tensors on the meta device beside CPU tensors -----------------------------------

def _raw_calls(layer, meta_name):
    """Every registered op taking the argument ``meta_name``, with it on the meta device."""
    crow, col, crow_t, col_t, perm = _buffers(layer)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    g = torch.randn(5, layer.out_features, dtype=torch.float64)
    _, xt = OPS.sparse_linear(x, layer.flat_values(), layer.bias, crow, col, crow_t, col_t, perm)
    a = dict(x=x, values=layer.flat_values().detach(), crow=crow, col=col, g=g, xt=xt)
    a[meta_name] = a[meta_name].to("meta")
    calls = {
        ("x", "values", "crow", "col"): lambda: OPS.csr_spmm(a["x"], a["values"], a["crow"],
                                                             a["col"]),
        ("g", "x", "crow", "col"): lambda: OPS.csr_sddmm(a["g"], a["x"], a["crow"], a["col"]),
        ("crow", "col"): lambda: OPS.csr_transpose(a["crow"], a["col"], layer.in_features),
        ("crow", "col", ""): lambda: OPS.csr_check(a["crow"], a["col"], layer.out_features,
                                                   layer.in_features),
        ("x", "values", "crow", "col", ""): lambda: OPS.sparse_linear(
            a["x"], a["values"], None, a["crow"], a["col"], crow_t, col_t, perm),
        ("g", "xt", "values", "crow", "col"): lambda: OPS.sparse_linear_backward(
            a["g"], a["xt"], a["values"], a["crow"], a["col"], crow_t, col_t, perm, True, True),
        ("x", "values", "crow", "col", "", ""): lambda: tn.sparse_linear(
            a["x"], a["values"], None, a["crow"], a["col"], crow_t, col_t, perm),
    }
    return [call for names, call in calls.items() if meta_name in names]


@pytest.mark.parametrize("meta_name", ["x", "values", "crow", "col", "g", "xt"])
def test_meta_tensors_beside_cpu_tensors_raise(gen, meta_name):
    layer = _layer(gen)
    calls = _raw_calls(layer, meta_name)
    assert calls
    for call in calls:
        with pytest.raises((RuntimeError, ValueError), match="device|is on"):
            call()


def test_meta_chain_and_feature_major_ops_raise(gen):
    layer = _layer(gen, 16, 16, 0.3)
    y0 = torch.rand(4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="device"):
        OPS.sparse_chain(y0, [layer.flat_values().detach()], [layer.crow_indices.to("meta")],
                         [layer.col_indices], -0.3, 0.0, 32.0, 8, True)
    with pytest.raises(RuntimeError, match="device"):
        OPS.csr_spmm_fm(y0.t().contiguous().to("meta"), layer.flat_values().detach(),
                        layer.crow_indices, layer.col_indices)


def test_all_meta_still_infers_shapes(gen):
    layer = _layer(gen).to("meta")
    y = layer(torch.empty(7, 12, dtype=torch.float64, device="meta"))
    assert y.shape == (7, 9) and y.device.type == "meta"


# ---- medium: Graph Challenge chunk ------------------------------------------------------------

def test_infer_with_huge_or_bad_chunk(gen):
    layers = [gc.generate_layer(1024, i) for i in range(3)]
    y0 = gc.make_inputs(1024, 40)
    expected = gc.reference_categories(layers, y0.numpy(), gc.BIAS[1024])
    for chunk in (sys.maxsize, 2**62, 40, 1):
        assert gc.infer(layers, y0, gc.BIAS[1024], chunk=chunk).tolist() == expected.tolist()
    assert OPS.sparse_chain(y0, [m.flat_values().detach() for m in layers],
                            [m.crow_indices for m in layers], [m.col_indices for m in layers],
                            -0.3, 0.0, 32.0, sys.maxsize, True).nonzero().flatten().tolist() \
        == expected.tolist()
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="chunk must be an int >= 1"):
            gc.infer(layers, y0, gc.BIAS[1024], chunk=bad)


# ---- medium: text files keep their line structure; readers bound memory ---------------------

@pytest.mark.parametrize("text", ["1 1 0.5 2\n", "1 1\n0.5 2 2 0.25\n", "1 1 0.5\n2 2\n",
                                  "1 1 0.5\n2 2 0.5 1\n"])
def test_read_tsv_respects_lines(tmp_path, text):
    path = tmp_path / "m.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match="expected 3 numbers per line"):
        interchange.read_tsv(path, (4, 4))


def test_read_tsv_accepts_blank_lines_comments_and_gzip(tmp_path):
    path = tmp_path / "m.tsv.gz"
    with gzip.open(path, "wt") as f:
        f.write("# a comment\n1\t2\t0.5\n\n3 1 -2\n")
    rows, cols, values = interchange.read_tsv(path, (3, 2))
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0] and values.tolist() == [0.5, -2]


def test_graphchallenge_inputs_and_categories_respect_lines(tmp_path):
    path = tmp_path / "images.tsv"
    path.write_text("1\t3\t1\n2\t4\t1\n")
    y = gc.load_inputs(path, 16)
    assert y.shape == (2, 16) and y[0, 2] == 1 and y[1, 3] == 1 and y.sum() == 2
    path.write_text("1\t3\t1\t9\n")
    with pytest.raises(ValueError, match="expected 3 numbers per line"):
        gc.load_inputs(path, 16)
    path.write_text("1\t17\t1\n")
    with pytest.raises(ValueError, match="out of range"):
        gc.load_inputs(path, 16)
    cats = tmp_path / "cats.tsv"
    cats.write_text("3\n1\n")
    assert gc.load_categories(cats).tolist() == [2, 0]
    cats.write_text("3 4\n")
    with pytest.raises(ValueError, match="expected 1 numbers per line"):
        gc.load_categories(cats)


def _peak_rss_increase(code: str) -> tuple:
    """Run ``code`` (which sets ``result``) in a fresh process; its peak resident memory
    increase over the state just before (MB, sampled every half millisecond) and its output."""
    wrapper = textwrap.dedent("""
        import threading, time
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
        import torch, torch_nerva, numpy
        peak, stop = [0], [False]
        def sample():
            while not stop[0]:
                peak[0] = max(peak[0], rss())
                time.sleep(0.0005)
        base = rss()
        t = threading.Thread(target=sample)
        t.start()
        try:
    """) + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
        finally:
            stop[0] = True
            t.join()
        print("PEAK_MB", (peak[0] - base) / 1e6)
    """)
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = float(out.stdout.split("PEAK_MB")[1])
    return peak, out.stdout


def test_gzip_bomb_tsv_raises_within_bounded_memory(tmp_path):
    path = tmp_path / "bomb.tsv.gz"
    line = b"1\t1\t0.5\n"
    with gzip.open(path, "wb", compresslevel=9) as f:
        block = line * (1 << 20)
        for _ in range(24):  # 24 Mi lines, 190 MB of text, ~0.2 MB compressed
            f.write(block)
    assert path.stat().st_size < 2 << 20
    peak, out = _peak_rss_increase(f"""
        try:
            torch_nerva.interchange.read_tsv({str(path)!r}, (10, 10))
        except ValueError as e:
            print("raised:", e)
    """)
    assert "raised:" in out and "more than 100 entries" in out
    assert peak < 120, f"peak memory {peak:.0f} MB for a file that holds at most 100 entries"


def _npz_with_member(tmp_path, name, array_header_shape, payload=b"", dtype="<f4"):
    """An .npz with the arrays of a valid 4 x 3 layer plus one member whose header says
    ``array_header_shape``; its data is ``payload`` zeros (compressed)."""
    layer = tn.SparseLinear(3, 4, density=0.5, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    interchange.save_npz(layer, buf)
    buf.seek(0)
    out = tmp_path / "m.npz"
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst_:
        for item in src.namelist():
            if item != name + ".npy":
                dst_.writestr(item, src.read(item))
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False,
                                                      "shape": array_header_shape})
        with dst_.open(name + ".npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            chunk = b"\0" * (1 << 20)
            for _ in range(payload // len(chunk)):
                f.write(chunk)
    return layer, out


def test_npz_bomb_is_refused_from_its_header(tmp_path):
    layer, path = _npz_with_member(tmp_path, "layer.values", (400_000_000,),
                                   payload=400 << 20)  # 1.6 GB claimed, 400 MB of zeros
    assert path.stat().st_size < 2 << 20
    target = tn.SparseLinear(3, 4, density=0.5)
    peak, out = _peak_rss_increase(f"""
        target = torch_nerva.SparseLinear(3, 4, density=0.5)
        try:
            torch_nerva.interchange.load_npz(target, {str(path)!r})
        except ValueError as e:
            print("raised:", e)
    """)
    assert "raised:" in out and "expected (6,)" in out
    assert peak < 60, f"peak memory {peak:.0f} MB before the length check"
    before = _snapshot(target)
    with pytest.raises(ValueError, match="values has shape"):
        interchange.load_npz(target, path)
    _assert_unchanged(target, before)


def test_from_tsv_of_a_huge_sparse_layer_peaks_near_its_final_size(tmp_path):
    n = 20_000_000
    path = tmp_path / "big.tsv"
    path.write_text("".join(f"{i * 97 % n + 1}\t{i * 31 % n + 1}\t0.5\n" for i in range(1, 500)))
    peak, out = _peak_rss_increase(f"""
        layer = torch_nerva.interchange.from_tsv({str(path)!r}, ({n}, {n}))
        final = sum(t.numel() * t.element_size() for t in list(layer.parameters())
                    + list(layer.buffers()) + layer.topology_tensors())
        print("FINAL_MB", final / 1e6)
    """)
    final = float(out.split("FINAL_MB")[1].split()[0])
    assert final > 150  # row pointers of the layer and of its transpose, int32
    assert peak < 1.5 * final + 30, (peak, final)


# ---- low: NaN/Inf follow dense math on every path ---------------------------------------------

def _same_ieee(a, b):
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.isinf(), b.isinf())
    assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0))
    torch.testing.assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0))


@pytest.mark.parametrize("backend_name", ["auto", "native", "dense", "torch", "mkl"])
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
def test_nonfinite_inputs_follow_dense_math(gen, isa, backend_name, batch, dtype):
    if backend_name not in ("auto",) + tuple(tn.backends.available()):
        pytest.skip(f"{backend_name} not built")
    layer = tn.SparseLinear(40, 24, density=0.1, backend=backend_name, dtype=dtype,
                            generator=gen)
    masked = tn.to_masked(layer)
    x = torch.randn(batch, 40, dtype=dtype, generator=gen)
    x[0, 3] = float("inf")
    x[-1, 10] = float("nan")
    x[batch // 2, 7] = -float("inf")
    g = torch.randn(batch, 24, dtype=dtype, generator=gen)
    g[0, 1] = float("inf")
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    y.backward(g)
    w = layer.dense_weight().detach().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ref = F.linear(x2, w, layer.bias.detach())
    ref.backward(g)
    _same_ieee(y, ref)
    _same_ieee(x1.grad, x2.grad)
    _same_ieee(layer.values.grad.view(-1), w.grad.flatten()[layer.layout.positions()])
    x3 = x.clone().requires_grad_(True)
    ym = masked(x3)
    ym.backward(g)
    _same_ieee(ym, y)
    _same_ieee(x3.grad, x1.grad)


def test_nonfinite_input_at_a_column_without_weights(gen):
    # column 0 has no nonzero at all: sparse kernels never read it, dense math multiplies it
    mask = torch.rand(5, 6, generator=gen) < 0.5
    mask[:, 0] = False
    mask[0, 1] = True
    layer = tn.SparseLinear(6, 5, mask=mask, backend="native", dtype=torch.float64)
    x = torch.ones(2, 6, dtype=torch.float64)
    x[0, 0] = float("inf")
    y = layer(x)
    assert y[0].isnan().all() and torch.isfinite(y[1]).all()
    _same_ieee(y, F.linear(x, layer.dense_weight(), layer.bias))


# ---- low: values.grad moves with its connections ---------------------------------------------

def test_update_between_backward_and_step_keeps_twins_equal(gen):
    sparse = tn.SparseLinear(24, 16, density=0.3, generator=torch.Generator().manual_seed(3))
    masked = tn.MaskedLinear(24, 16, density=0.3, generator=torch.Generator().manual_seed(3))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (sparse, masked)]
    data = torch.Generator().manual_seed(5)
    for step in range(6):
        x = torch.randn(8, 24, generator=data)
        for m, opt in zip((sparse, masked), opts):
            opt.zero_grad()
            m(x).square().sum().backward()
        if step % 2 == 1:  # the update lands between backward and step
            for m, opt in zip((sparse, masked), opts):
                dst.prune_and_regrow(m, opt, drop_fraction=0.3,
                                     generator=torch.Generator().manual_seed(step))
            kept = sparse.values.grad
            assert kept is not None and kept.shape == sparse.values.shape
            torch.testing.assert_close(kept.view(-1), masked.weight.grad.flatten()[
                sparse.layout.positions()])
        for opt in opts:
            opt.step()
        torch.testing.assert_close(sparse.dense_weight(), masked.dense_weight())


# ---- low: npz files -----------------------------------------------------------------------------

def _two_layer_model(gen):
    return torch.nn.Sequential(tn.SparseLinear(6, 5, density=0.5, generator=gen),
                               tn.SparseLinear(5, 4, density=0.5, generator=gen))


@pytest.mark.parametrize("corrupt", ["bias_1", "float_col", "float_crow", "values_len",
                                     "unsorted", "extra_member", "missing_col", "shape"])
def test_bad_npz_is_refused_and_changes_nothing(gen, tmp_path, corrupt):
    src, target = _two_layer_model(gen), _two_layer_model(gen)
    path = tmp_path / "m.npz"
    interchange.save_npz(src, path)
    with np.load(path) as data:
        arrays = dict(data)
    if corrupt == "bias_1":
        arrays["1.bias"] = np.zeros(1, np.float32)
    elif corrupt == "float_col":
        arrays["1.col"] = arrays["1.col"].astype(np.float64) + 0.4
    elif corrupt == "float_crow":
        arrays["1.crow"] = arrays["1.crow"].astype(np.float32)
    elif corrupt == "values_len":
        arrays["1.values"] = arrays["1.values"][:-1]
    elif corrupt == "unsorted":
        arrays["1.col"] = arrays["1.col"][::-1].copy()
    elif corrupt == "extra_member":
        arrays["1.weight"] = np.zeros((4, 5), np.float32)
    elif corrupt == "missing_col":
        del arrays["1.col"]
    elif corrupt == "shape":
        arrays["1.shape"] = np.array([4, 5, 1])
    np.savez(path, **arrays)
    before = _snapshot(target)
    with pytest.raises((ValueError, RuntimeError)):
        interchange.load_npz(target, path)
    _assert_unchanged(target, before)


def test_good_npz_still_loads(gen, tmp_path):
    src, target = _two_layer_model(gen), _two_layer_model(gen)
    interchange.save_npz(src, tmp_path / "m.npz")
    interchange.load_npz(target, tmp_path / "m.npz")
    x = torch.randn(3, 6)
    torch.testing.assert_close(target(x), src(x))


# ---- low: the raw products are differentiable ------------------------------------------------

def test_raw_ops_have_gradients(gen):
    layer = _layer(gen, 9, 7, 0.4)
    crow, col = layer.crow_indices, layer.col_indices
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    v = torch.randn(layer.nnz, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    perm = torch.randint(0, layer.nnz, (layer.nnz,), generator=gen).to(crow.dtype)
    assert torch.autograd.gradcheck(lambda x, v, b: ops.csr_spmm(x, v, crow, col, None, b),
                                    (x, v, b))
    assert torch.autograd.gradcheck(lambda x, v: ops.csr_spmm(x, v, crow, col, perm), (x, v))
    assert torch.autograd.gradcheck(lambda g, x: ops.csr_sddmm(g, x, crow, col), (g, x))
    assert torch.autograd.gradgradcheck(lambda x, v: ops.csr_spmm(x, v, crow, col), (x, v))
    y = ops.csr_spmm(x, v, crow, col)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones(5, 7, dtype=torch.float64) @ dense(layer.layout, v))
    for op, args in ((OPS.csr_spmm.default, (x, v, crow, col, None, b)),
                     (OPS.csr_sddmm.default, (g, x, crow, col))):
        torch.library.opcheck(op, args)


# ---- low: torch.nn.utils.parametrize on values ------------------------------------------------

def test_parametrize_values(gen):
    import torch.nn.utils.parametrize as P

    class Doubled(torch.nn.Module):
        def forward(self, v):
            return 2 * v

    layer = _layer(gen)
    values = layer.values.detach().clone()
    x = torch.randn(4, 12, dtype=torch.float64)
    P.register_parametrization(layer, "values", Doubled())
    assert P.is_parametrized(layer, "values")
    torch.testing.assert_close(layer(x), F.linear(x, 2 * dense(layer.layout, values), layer.bias))
    layer(x).sum().backward()
    assert layer.parametrizations["values"].original.grad is not None
    P.remove_parametrizations(layer, "values", leave_parametrized=True)
    torch.testing.assert_close(layer.values.detach(), 2 * values)
    _assert_dense_math(layer, batches=(3,))


# ---- low: layouts built from positions or given to from_layout are checked -------------------

@pytest.mark.parametrize("positions,message", [
    ([3, 1, 5], "unsorted"), ([1, 1, 5], "duplicate"), ([-1, 2], "outside"),
    ([2, 12], "outside"), ([0.0, 2.0], "integer tensor"),
])
def test_from_positions_checks(positions, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CSRLayout.from_positions(torch.tensor(positions), (3, 4))


def test_from_layout_refuses_an_unvalidated_bad_layout():
    bad = CSRLayout(torch.tensor([0, 2, 2]), torch.tensor([1, 1]), (2, 3))  # duplicate column
    with pytest.raises(RuntimeError, match="duplicate column"):
        tn.SparseLinear.from_layout(bad, torch.ones(2))
    with pytest.raises(TypeError, match="floating-point"):
        tn.SparseLinear.from_layout(CSRLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 2]),
                                              (2, 3)), torch.ones(2, dtype=torch.long))


# ---- cosmetic: messages -----------------------------------------------------------------------

def test_non_monotone_row_pointer_is_reported_as_such():
    # row 0 spans [0, 3) and its columns are unsorted: the row pointer is the real problem
    with pytest.raises(RuntimeError, match="malformed row pointer"):
        CSRLayout.from_tensors(torch.tensor([0, 3, 1, 3]), torch.tensor([0, 2, 1]), (3, 4))


# ---- properties: random partial or corrupted states load right or change nothing -------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

_CORRUPTIONS = ["drop", "truncate", "extend", "to_float", "to_int", "shuffle", "out_of_range",
                "duplicate", "scalar", "not_tensor", "other_layer"]


def _corrupt(draw, arrays, keys, to_tensor):
    """Apply one random corruption to one random key of ``arrays`` (a dict of tensors or numpy
    arrays) and return what was done."""
    key = draw(st.sampled_from(keys))
    how = draw(st.sampled_from(_CORRUPTIONS))
    if key not in arrays:
        return f"{how} {key} (absent)"
    v = arrays[key]
    if how == "drop":
        del arrays[key]
        return f"drop {key}"
    if isinstance(v, dict):  # the extra state
        arrays[key] = None if how == "not_tensor" else {**v, "in_features": 99}
        return f"{how} {key}"
    if not isinstance(v, (torch.Tensor, np.ndarray)):  # already made a non-tensor
        return f"{how} {key} (skipped)"
    t = torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v
    if t.dim() == 2 and t.shape[0] == 1:  # values (1, nnz): corrupted as the 1-D vector
        t = t.reshape(-1)
    if t.dim() == 0 or t.numel() == 0:
        return f"{how} {key} (skipped)"
    if how == "truncate":
        t = t[:-1]
    elif how == "extend":
        t = torch.cat([t, t[-1:]])
    elif how == "to_float":
        t = t.double() + 0.25
    elif how == "to_int":
        t = t.long()
    elif how == "shuffle":
        t = t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(
            draw(st.integers(0, 99))))]
    elif how == "out_of_range":
        t = t.clone()
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([-1, 10**6, 7]))
    elif how == "duplicate":
        t = t.clone()
        if t.numel() > 1:
            t[1] = t[0]
    elif how == "scalar":
        t = t[:1].reshape(())
    elif how == "not_tensor":
        arrays[key] = t.tolist()
        return f"{how} {key}"
    elif how == "other_layer":
        others = [k for k in arrays if k != key and k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
        if not others:
            return f"{how} {key} (skipped)"
        t = torch.as_tensor(arrays[others[0]])
    arrays[key] = to_tensor(t)
    return f"{how} {key}"


def _model(seed, d1, d2):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Sequential(tn.SparseLinear(7, 5, density=d1, generator=g),
                               torch.nn.ReLU(),
                               tn.SparseLinear(5, 3, density=d2, generator=g))


def _consistent(model):
    """Every sparse layer holds a valid layout with matching caches and computes dense math."""
    for m in model.modules():
        if isinstance(m, tn.SparseLinear):
            m.layout.validate()
            crow_t, col_t, perm = m.layout.transpose()
            assert torch.equal(m.crow_indices_t, crow_t) and torch.equal(m.col_indices_t, col_t)
            assert torch.equal(m.perm_t, perm) and m.values.shape == (1, m.nnz)
            for batch in (1, 6):
                x = torch.randn(batch, m.in_features)
                torch.testing.assert_close(m(x), F.linear(x, m.dense_weight(), m.bias))


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_random_state_dicts_load_right_or_change_nothing(data):
    draw = data.draw
    model = _model(draw(st.integers(0, 50)), draw(st.sampled_from([0.2, 0.5, 1.0])), 0.4)
    src = _model(draw(st.integers(51, 99)), draw(st.sampled_from([0.0, 0.3, 0.6])),
                 draw(st.sampled_from([0.2, 0.8])))
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else dict(v))
          for k, v in src.state_dict().items()}
    if draw(st.booleans()):  # a partial state
        sd = {k: v for k, v in sd.items() if draw(st.booleans())}
    done = [_corrupt(draw, sd, sorted(src.state_dict()), lambda t: t)
            for _ in range(draw(st.integers(0, 3)))]
    strict = draw(st.booleans())
    before = _snapshot(model)
    try:
        tn.load_state_dict(model, sd, strict=strict)
    except (RuntimeError, ValueError, TypeError) as e:
        _assert_unchanged(model, before)
        assert str(e), done
        return
    _consistent(model)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_random_single_layer_loads_are_all_or_nothing(data):
    draw = data.draw
    layer = _model(draw(st.integers(0, 50)), 0.4, 0.4)[0]
    src = _model(draw(st.integers(51, 99)), draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])), 0.4)[0]
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else dict(v))
          for k, v in src.state_dict().items()}
    done = [_corrupt(draw, sd, sorted(sd), lambda t: t) for _ in range(draw(st.integers(0, 2)))]
    before = _snapshot(layer)
    try:  # nn.Module's own loader, not strict: partial states are allowed
        layer.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError, TypeError):
        _assert_unchanged(layer, before)
        return
    _consistent(torch.nn.Sequential(layer))
    assert done is not None


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_random_npz_files_load_right_or_change_nothing(data):
    draw = data.draw
    model = _model(draw(st.integers(0, 50)), 0.4, 0.4)
    src = _model(draw(st.integers(51, 99)), draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])), 0.5)
    buf = io.BytesIO()
    interchange.save_npz(src, buf)
    buf.seek(0)
    with np.load(buf) as f:
        arrays = dict(f)
    done = [_corrupt(draw, arrays, sorted(arrays), lambda t: t.numpy())
            for _ in range(draw(st.integers(0, 3)))]
    out = io.BytesIO()
    try:
        np.savez(out, **{k: np.asarray(v) for k, v in arrays.items()})
    except (ValueError, TypeError):
        return  # numpy itself cannot write it
    out.seek(0)
    before = _snapshot(model)
    try:
        interchange.load_npz(model, out)
    except (RuntimeError, ValueError, TypeError, KeyError):
        _assert_unchanged(model, before)
        return
    _consistent(model)
    assert done is not None
