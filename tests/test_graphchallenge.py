"""The Graph Challenge engine: official format, generator, inputs, exact categories."""
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_nerva as tn
from torch_nerva import graphchallenge as gc

DATA = Path(__file__).resolve().parent / "data" / "graphchallenge"


def _dense(path):
    import gzip
    w = np.zeros((1024, 1024))
    with gzip.open(path, "rt") as f:
        for line in f:
            r, c, v = line.split()
            w[int(r) - 1, int(c) - 1] = float(v)
    return w


@pytest.mark.parametrize("index", range(6))
def test_generator_reproduces_the_official_layers(index):
    official = gc.load_layer(DATA / f"n1024-l{index + 1}.tsv.gz", 1024)
    generated = gc.generate_layer(1024, index)
    assert torch.equal(official.crow_indices, generated.crow_indices)
    assert torch.equal(official.col_indices, generated.col_indices)
    assert torch.equal(official.values, generated.values)


def test_loaded_layer_computes_y_times_w():
    path = DATA / "n1024-l3.tsv.gz"
    layer = gc.load_layer(path, 1024)
    y = torch.rand(5, 1024, dtype=torch.float64)
    layer = layer.to(torch.float64)
    torch.testing.assert_close(layer(y), y @ torch.from_numpy(_dense(path)))
    assert layer.bias is None and layer.nnz == 32 * 1024


@pytest.mark.parametrize("text,message", [
    ("1\t2\n", "expected 3 numbers per line"),
    ("1\t1\t0.0625\t7\n", "expected 3 numbers per line"),  # 4 columns
    ("1\t1\n0.0625\t2\t2\t0.0625\n", "expected 3 numbers per line"),  # 2 + 4 = 6 numbers
    ("1\t1\t0.0625\n" + "7" * 5000 + "\n", "longer than"),
    ("1\t1025\t0.0625\n", "outside 1..1024"),
    ("0\t1\t0.0625\n", "outside 1..1024"),
    ("1\t1\t0.0625\n1\t1\t0.0625\n", "duplicate"),
    ("1.5\t1\t0.0625\n", "integers"),
    ("nan\t1\t0.0625\n", "must be integers"),
    ("1\tx\t0.0625\n", "expected 3 numbers per line"),
])
def test_bad_weight_files_are_refused(tmp_path, text, message):
    path = tmp_path / "w.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        gc.load_layer(path, 1024)


@pytest.mark.parametrize("neurons", [256, 1024])
def test_generated_layers_are_radix_nets(neurons):
    m = int(np.log2(neurons // 16))
    for index in (0, m - 1, m, 2 * m + 1):  # first and later (permuted) groups
        layer = gc.generate_layer(neurons, index, seed=3)
        w = layer.dense_weight()
        assert (w.ne(0).sum(0) == 32).all() and (w.ne(0).sum(1) == 32).all()
        assert torch.all(layer.values == 1 / 16)
    assert not torch.equal(gc.generate_layer(neurons, m, seed=3).col_indices,
                           gc.generate_layer(neurons, m, seed=4).col_indices)
    assert torch.equal(gc.generate_layer(neurons, 1, seed=3).col_indices,
                       gc.generate_layer(neurons, 1, seed=4).col_indices)  # group 0: fixed


def test_bad_neuron_counts():
    for bad in (1000, 16, 48):
        with pytest.raises(ValueError, match="neurons must be"):
            gc.generate_layer(bad, 0)


def test_inputs_are_binary_and_seeded():
    y = gc.make_inputs(1024, 300, seed=1)
    assert y.shape == (300, 1024) and set(y.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y, gc.make_inputs(1024, 300, seed=1))
    assert not torch.equal(y, gc.make_inputs(1024, 300, seed=2))
    pytest.importorskip("sklearn")
    assert 0.08 < y.mean().item() < 0.16  # close to MNIST's ink at 32 x 32


@pytest.fixture(scope="module")
def small_net():
    neurons, n_layers = 256, 20  # 5 groups of 4: the permuted groups are covered
    layers = [gc.generate_layer(neurons, i, seed=0) for i in range(n_layers)]
    y0 = gc.make_inputs(neurons, 400, seed=0)
    return layers, y0, gc.BIAS[1024]


def test_categories_match_scipy(small_net):
    layers, y0, bias = small_net
    ref = gc.reference_categories(layers, y0.numpy(), bias)
    assert 0 < len(ref) < 400  # some die, some survive: the check means something
    for prune in (True, False):
        for chunk in (1, 7, 64, 1000):
            cats = gc.infer(layers, y0, bias, prune=prune, chunk=chunk)
            assert np.array_equal(cats.numpy(), ref), (prune, chunk)


def test_layerwise_path_and_threads_agree(small_net):
    layers, y0, bias = small_net
    expected = gc.infer(layers, y0, bias)
    assert torch.equal(gc._infer_layerwise(layers, y0, bias, gc.YMAX, True), expected)
    assert torch.equal(gc._infer_layerwise(layers, y0, bias, gc.YMAX, False), expected)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(gc.infer(layers, y0, bias), expected)
    finally:
        torch.set_num_threads(old)


def test_infer_refuses_inconsistent_input(small_net):
    layers, y0, bias = small_net
    with pytest.raises(ValueError, match="in_features"):
        gc.infer([layers[0], tn.SparseLinear(100, 256, density=0.1, bias=False)], y0, bias)
    with pytest.raises(ValueError, match="columns"):
        gc.infer(layers, y0[:, :100], bias)
    with pytest.raises(ValueError, match="bias <= 0"):
        gc.infer(layers, y0, 0.5)
    with pytest.raises(ValueError, match="no bias of their own"):
        gc.infer([tn.SparseLinear(256, 256, density=0.1)], y0, bias)
    with pytest.raises(RuntimeError, match="exact only with lo = 0"):
        torch.ops.torch_nerva.sparse_chain(y0, [], [], [], 0.5, 0.0, 32.0, 16, True)


def test_spmm_feature_major_with_clamp(gen, dtype):
    layer = tn.SparseLinear(40, 30, density=0.3, dtype=dtype, generator=gen)
    w = layer.dense_weight().detach()
    for ld in (1, 5, 16, 48):
        xt = torch.randn(40, ld, dtype=dtype, generator=gen)
        bias = torch.randn(30, dtype=dtype, generator=gen)
        got = torch.ops.torch_nerva.csr_spmm_fm(xt, layer.flat_values().detach(), layer.crow_indices,
                                                layer.col_indices, bias, -0.5, 0.7)
        torch.testing.assert_close(got, (w @ xt + bias[:, None]).clamp(-0.5, 0.7))
        plain = torch.ops.torch_nerva.csr_spmm_fm(xt, layer.flat_values().detach(),
                                                  layer.crow_indices, layer.col_indices)
        torch.testing.assert_close(plain, w @ xt)
    with pytest.raises(RuntimeError, match="multiple of"):
        torch.ops.torch_nerva.csr_spmm_fm(torch.randn(40, 20, dtype=dtype),
                                          layer.flat_values().detach(), layer.crow_indices,
                                          layer.col_indices)
    torch.library.opcheck(torch.ops.torch_nerva.csr_spmm_fm.default,
                          (torch.randn(40, 16, dtype=dtype), layer.flat_values().detach(),
                           layer.crow_indices, layer.col_indices, None, 0.0, 1.0))


def test_official_inputs_and_categories_formats(tmp_path):
    (tmp_path / "img.tsv").write_text("1\t3\t1\n2\t1\t1\n3\t4\t1\n")
    y = gc.load_inputs(tmp_path / "img.tsv", 4)
    assert y.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    (tmp_path / "cats.tsv").write_text("1\n3\n")
    assert gc.load_categories(tmp_path / "cats.tsv").tolist() == [0, 2]


def test_the_library_does_not_import_the_experiments():
    """Importing torch_nerva (and its Graph Challenge inputs) loads nothing of the comparison
    command (torch_nerva.compare): the library never depends on the experiments."""
    import subprocess
    import sys
    code = ("import sys, torch_nerva, torch_nerva.graphchallenge as g; g.make_inputs(1024, 2); "
            "print(sorted(m for m in sys.modules if m.startswith('torch_nerva.compare')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
