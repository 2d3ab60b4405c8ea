"""sparsify / to_masked / to_sparse / densify and the per-layer density distributions."""
import math

import pytest
import torch
from torch import nn

import torch_nerva as tn
from torch_nerva.init import layer_nnz


def mlp(*sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


PAPER = [(1024, 3072), (512, 1024), (10, 512)]


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
def test_layer_nnz_total_is_exact(distribution, density):
    counts = layer_nnz(PAPER, density, distribution)
    total = sum(o * i for o, i in PAPER)
    assert sum(counts) == math.floor(density * total + 0.5)
    assert all(0 <= k <= o * i for k, (o, i) in zip(counts, PAPER))


def test_er_densities_follow_mocanu_and_cap_small_layers():
    counts = layer_nnz(PAPER, 0.01, "er")
    d = [k / (o * i) for k, (o, i) in zip(counts, PAPER)]
    # density_i proportional to (in + out) / (in * out) while no layer is capped
    ratios = [di / ((o + i) / (o * i)) for di, (o, i) in zip(d, PAPER)]
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-3) == pytest.approx(ratios[2], rel=5e-2)
    # At 0.2 the tiny output layer would exceed density 1: it becomes dense, the rest rescaled.
    counts = layer_nnz(PAPER, 0.2, "er")
    assert counts[2] == 10 * 512
    assert counts[0] / (1024 + 3072) == pytest.approx(counts[1] / (512 + 1024), rel=1e-3)
    assert layer_nnz(PAPER, 0.2, "erk") == counts  # no kernel dims: ERK == ER for linear


def test_uniform_density_per_layer():
    counts = layer_nnz(PAPER, 0.1, "uniform")
    for k, (o, i) in zip(counts, PAPER):
        assert abs(k - 0.1 * o * i) <= 1


def test_layer_nnz_errors():
    with pytest.raises(ValueError, match="distribution must be one of"):
        layer_nnz(PAPER, 0.1, "gaussian")
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        layer_nnz(PAPER, 1.01)


def test_sparsify_replaces_linears_exactly_and_keeps_original():
    model = mlp(3072, 1024, 512, 10)
    sparse = tn.sparsify(model, 0.01, generator=torch.Generator().manual_seed(0))
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))  # untouched
    layers = [m for m in sparse if isinstance(m, tn.SparseLinear)]
    assert len(layers) == 3
    assert [l.nnz for l in layers] == layer_nnz(PAPER, 0.01, "er")
    assert sum(l.nnz for l in layers) == round(0.01 * sum(o * i for o, i in PAPER))
    assert not any(isinstance(m, nn.Linear) for m in sparse.modules())
    # No dense weight anywhere in the sparse model's state.
    assert max(t.numel() for t in sparse.state_dict().values() if torch.is_tensor(t)) < 40000


def test_sparsify_is_deterministic_and_inplace_consistent():
    model = mlp(20, 30, 5)
    a = tn.sparsify(model, 0.3, generator=torch.Generator().manual_seed(7))
    b = tn.sparsify(model, 0.3, generator=torch.Generator().manual_seed(7), inplace=True)
    assert b is model
    for la, lb in zip(a, b):
        if isinstance(la, tn.SparseLinear):
            assert torch.equal(la.col_indices, lb.col_indices)
            assert torch.equal(la.values, lb.values)


def test_sparsify_filter_fn_nested_and_shared_modules():
    shared = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = shared
            self.b = shared
            self.head = nn.Sequential(nn.Linear(8, 4))
            self.attn = nn.MultiheadAttention(8, 2)

    with pytest.warns(tn.DenseWeightsWarning, match=r"head\.0\.weight"):
        net = tn.sparsify(Net(), 0.5, filter_fn=lambda name, m: not name.startswith("head"))
    assert isinstance(net.a, tn.SparseLinear) and net.a is net.b
    assert type(net.head[0]) is nn.Linear
    assert isinstance(net.attn, tn.SparseMultiheadAttention)  # converted as a whole
    assert isinstance(net.attn.out_proj, tn.SparseLinear)
    assert net.a.nnz == 32


def test_sparsify_magnitude_init_keeps_largest_weights():
    model = mlp(20, 30, 5)
    sparse = tn.sparsify(model, 0.2, init="magnitude", distribution="uniform")
    for dense_l, sparse_l in zip(model, sparse):
        if isinstance(sparse_l, tn.SparseLinear):
            w = dense_l.weight.detach()
            assert sparse_l.nnz == round(0.2 * w.numel())
            assert torch.equal(sparse_l.dense_weight(), w * sparse_l.mask)
            assert w.abs()[sparse_l.mask].min() >= w.abs()[~sparse_l.mask].max()


def test_sparsify_top_level_linear_and_dtype():
    lin = nn.Linear(10, 6, dtype=torch.float64)
    s = tn.sparsify(lin, 0.5)
    assert isinstance(s, tn.SparseLinear) and s.values.dtype == torch.float64 and s.nnz == 30


def test_to_masked_to_sparse_densify_round_trip():
    sparse = tn.sparsify(mlp(16, 32, 4), 0.25, generator=torch.Generator().manual_seed(1))
    masked = tn.to_masked(sparse)
    back = tn.to_sparse(masked)
    dense = tn.densify(sparse)
    x = torch.randn(5, 16)
    for i, (s, m, b, d) in enumerate(zip(sparse, masked, back, dense)):
        if isinstance(s, tn.SparseLinear):
            assert isinstance(m, tn.MaskedLinear) and isinstance(b, tn.SparseLinear)
            assert type(d) is nn.Linear
            assert torch.equal(m.dense_weight(), s.dense_weight())  # bit-identical
            assert torch.equal(b.values, s.values) and torch.equal(b.col_indices, s.col_indices)
            assert torch.equal(d.weight, s.dense_weight())
    for model in (masked, back, dense):
        torch.testing.assert_close(model(x), sparse(x))
    assert isinstance(sparse[0], tn.SparseLinear)  # not converted in place


def test_sparsify_a_meta_template_never_allocates_dense_weights():
    with torch.device("meta"):
        template = torch.nn.Sequential(torch.nn.Linear(20000, 30000), torch.nn.ReLU(),
                                       torch.nn.Linear(30000, 10))
    model = tn.sparsify(template, 1e-4, device="cpu",
                                 generator=torch.Generator().manual_seed(0))
    layers = [m for m in model if isinstance(m, tn.SparseLinear)]
    assert all(m.values.device.type == "cpu" and m.bias.device.type == "cpu" for m in layers)
    assert sum(m.nnz for m in layers) == round(1e-4 * (20000 * 30000 + 30000 * 10))
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model(torch.randn(2, 20000)).shape == (2, 10)
    with pytest.raises(ValueError, match="device= places freshly initialised layers"):
        tn.sparsify(template, 0.1, device="cpu", init="magnitude")
