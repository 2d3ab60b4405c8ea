"""SparseConv2d / MaskedConv2d as drop-ins for nn.Conv2d: the same outputs and gradients as
nn.Conv2d with the same (sparse) weight over its arguments, identical twins step by step,
state dict and copies, and clear errors. The ops themselves: tests/test_conv_ops.py."""
import copy
import itertools
import pickle

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import torch_nerva as tn

F64 = torch.float64

CASES = [
    # kernel, stride, padding, dilation, groups, padding_mode
    (3, 1, 1, 1, 1, "zeros"),
    (1, 1, 0, 1, 1, "zeros"),
    (3, 2, 1, 1, 2, "zeros"),
    ((2, 3), 1, "same", 2, 1, "zeros"),
    (3, 1, "same", 1, 1, "reflect"),
    (3, 1, "valid", 1, 4, "zeros"),
    ((3, 1), (2, 1), (1, 0), (1, 2), 1, "circular"),
    (5, 3, 2, 1, 2, "replicate"),
]


def _dense_conv(case, bias, seed, in_ch=8, out_ch=12):
    k, s, p, d, g, mode = case
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, k, stride=s, padding=p, dilation=d, groups=g, bias=bias,
                     padding_mode=mode, dtype=F64)
    with torch.no_grad():  # a sparse weight with an empty output channel and input channel
        conv.weight.mul_(torch.rand(conv.weight.shape, dtype=F64) < 0.3)
        conv.weight[1] = 0
        conv.weight[:, 0] = 0
    return conv


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("backend", ["native", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_nn_conv2d_forward_and_gradients(case, backend, bias):
    conv = _dense_conv(case, bias, seed=len(str(case)))
    sparse = tn.SparseConv2d.from_dense(conv, backend=backend)
    masked = tn.MaskedConv2d.from_dense(conv)
    assert sparse.nnz == int((conv.weight != 0).sum()) == masked.nnz
    for batch, channels_last in ((3, False), (1, True)):
        x = torch.randn(batch, 8, 11, 9, dtype=F64)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        outs, grads = [], []
        for layer in (conv, sparse, masked):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            gy = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
            y.backward(gy)
            outs.append(y.detach())
            grads.append(xi.grad)
        for y, gx in zip(outs[1:], grads[1:]):
            torch.testing.assert_close(y, outs[0])
            torch.testing.assert_close(gx, grads[0])
        positions = sparse.layout.positions()
        torch.testing.assert_close(sparse.values.grad.view(-1),
                                   conv.weight.grad.flatten()[positions])
        torch.testing.assert_close(masked.weight.grad, conv.weight.grad * masked.mask)
        if bias:
            torch.testing.assert_close(sparse.bias.grad, conv.bias.grad)


def test_twins_from_one_seed_are_identical_step_by_step():
    kw = dict(kernel_size=3, padding=1, density=0.1)
    sparse = tn.SparseConv2d(16, 32, generator=torch.Generator().manual_seed(3),
                             backend="native", **kw)
    masked = tn.MaskedConv2d(16, 32, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(sparse.dense_weight4d(), masked.weight * masked.mask)
    assert torch.equal(sparse.mask, masked.mask)
    torch.testing.assert_close(sparse.bias, masked.bias)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
            for m in (sparse, masked)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 16, 8, 8, generator=g)
        target = torch.randn(4, 32, 8, 8, generator=g)
        for m, opt in zip((sparse, masked), opts):
            torch.nn.functional.mse_loss(m(x), target).backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(sparse.dense_weight4d(), masked.weight * masked.mask,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-5)


def test_initialisation_follows_pytorch_conv_fans():
    layer = tn.SparseConv2d(64, 128, 3, density=1.0, generator=torch.Generator().manual_seed(0))
    fan_in, fan_out = 64 * 9, 128 * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert layer.values.abs().max() <= bound and layer.values.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= 1 / fan_in ** 0.5
    assert (layer.fan_in, layer.fan_out) == (fan_in, fan_out)
    assert layer.matrix_shape == (128, 576)
    assert layer.flops_per_example(32, 32) == 2 * layer.nnz * 30 * 30  # no padding: 30 x 30
    assert tn.SparseConv2d(3, 8, 3, stride=2, density=0.5).output_size(32, 32) == (15, 15)


def test_state_dict_copies_and_pickles_keep_the_layer():
    a = tn.SparseConv2d(8, 16, 3, padding=1, density=0.2, backend="native",
                        generator=torch.Generator().manual_seed(0))
    b = tn.SparseConv2d(8, 16, 3, padding=1, density=0.4, backend="native",
                        generator=torch.Generator().manual_seed(1))
    sd = a.state_dict()
    assert set(sd) == {"values", "bias", "crow_indices", "col_indices"}
    b.load_state_dict(sd)  # another topology: adopted
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(b(x), a(x))
    for c in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        torch.testing.assert_close(c(x), a(x))
    wrong = tn.SparseConv2d(8, 16, 5, padding=2, density=0.2)
    with pytest.raises(RuntimeError, match="shape"):
        wrong.load_state_dict(sd)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by groups"):
        tn.SparseConv2d(6, 8, 3, groups=4, density=0.5)
    with pytest.raises(ValueError, match="strided"):
        tn.SparseConv2d(4, 8, 3, stride=2, padding="same", density=0.5)
    with pytest.raises(ValueError, match="padding_mode"):
        tn.SparseConv2d(4, 8, 3, padding_mode="mirror", density=0.5)
    with pytest.raises(ValueError, match="kernel_size"):
        tn.SparseConv2d(4, 8, 0, density=0.5)
    with pytest.raises(ValueError, match="density"):
        tn.SparseConv2d(4, 8, 3, density=1.5)
    with pytest.raises(ValueError, match="mask must have"):
        tn.SparseConv2d(4, 8, 3, mask=torch.ones(8, 4, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend"):
        tn.SparseConv2d(4, 8, 3, density=0.5, backend="torch")
    layer = tn.SparseConv2d(4, 8, 3, density=0.5)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(AttributeError):
        layer.weight  # no silent writes into a temporary dense weight


def test_gradcheck_through_the_module_float64():
    layer = tn.SparseConv2d(3, 4, 3, stride=2, padding=1, density=0.5, backend="native",
                            dtype=F64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 5, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: torch.func.functional_call(
        layer, {"values": v, "bias": b}, (x,)), (x, layer.values, layer.bias))


def test_compiles_fullgraph():
    model = nn.Sequential(tn.SparseConv2d(3, 8, 3, padding=1, density=0.3, backend="native"),
                          nn.ReLU(), tn.SparseConv2d(8, 4, 3, stride=2, density=0.3,
                                                     backend="native"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model[0].values.grad is not None and x.grad is not None


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_sparsify_converts_convolutions_with_erk_counting_kernels():
    import warnings
    model = _cnn()
    default = tn.sparsify(model, 0.2, generator=torch.Generator().manual_seed(0))
    assert [type(default[i]) for i in (0, 2, 6)] == [tn.SparseConv2d, tn.SparseConv2d,
                                                      tn.SparseLinear]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        linear_only = tn.sparsify(model, 0.2, conv=False, generator=torch.Generator().manual_seed(0))
    assert type(linear_only[0]) is nn.Conv2d and isinstance(linear_only[6], tn.SparseLinear)
    assert any(issubclass(w.category, tn.DenseWeightsWarning) and "0.weight" in str(w.message)
               for w in caught)  # the convolutions that stay dense are named
    keep_first = lambda name, m: not (isinstance(m, nn.Conv2d) and m.in_channels == 3)  # noqa
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = tn.sparsify(model, 0.2, distribution="erk", conv=True, filter_fn=keep_first,
                             generator=torch.Generator().manual_seed(0))
    assert type(sparse[0]) is nn.Conv2d and isinstance(sparse[2], tn.SparseConv2d)
    assert any("0.weight" in str(w.message) for w in caught)
    shapes = [(32, 8, 3, 3), (10, 32)]
    expected = tn.init.layer_nnz(shapes, 0.2, "erk")
    assert [sparse[2].nnz, sparse[6].nnz] == expected
    assert expected[0] / (32 * 8 * 9) != tn.init.layer_nnz([(32, 72), (10, 32)], 0.2, "er")[0] / (
        32 * 72)  # kernel dimensions counted
    pruned = tn.sparsify(model, 0.2, conv=True, init="magnitude")
    w = model[2].weight
    kept = pruned[2].dense_weight4d().detach() != 0
    assert kept.sum() == pruned[2].nnz
    assert w.abs()[kept].min() >= w.abs()[~kept].max()  # the largest magnitudes


def test_twin_conversions_round_trip_bit_identically():
    sparse = tn.sparsify(_cnn(), 0.3, conv=True, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 12, 12)
    masked = tn.to_masked(sparse)
    assert isinstance(masked[0], tn.MaskedConv2d) and isinstance(masked[6], tn.MaskedLinear)
    back = tn.to_sparse(masked)
    dense = tn.densify(sparse)
    assert type(dense[0]) is nn.Conv2d and type(dense[6]) is nn.Linear
    for other in (masked, back, dense):
        torch.testing.assert_close(other(x), sparse(x), rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse.modules(), back.modules()):
        if isinstance(a, tn.SparseConv2d):
            assert torch.equal(a.values, b.values) and torch.equal(a.col_indices, b.col_indices)


@pytest.mark.parametrize("grow", ["random", "gradient", "momentum"])
def test_dst_updates_conv_twins_alike(grow):
    from torch_nerva import dst
    sparse = tn.sparsify(_cnn(), 0.3, conv=True, generator=torch.Generator().manual_seed(0))
    masked = tn.to_masked(sparse)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 12, 12, generator=g), torch.randint(10, (4,), generator=g)
    kw = dict(drop_fraction=0.3, grow=grow)
    if grow == "gradient":
        kw.update(batch=(x, y), loss_fn=torch.nn.functional.cross_entropy)
    for m in (sparse, masked):
        if grow == "momentum":
            rec = dst.GradientMomentum(m, beta=0.9, window=2).start()
            for step in range(2):
                torch.nn.functional.cross_entropy(m(x + step), y).backward()
                rec.next_step()
            rec.stop()
            kw["momentum"] = rec
        counts = dst.prune_and_regrow(m, generator=torch.Generator().manual_seed(5), **kw)
        assert counts["2"]["dropped"] == counts["2"]["grown"] > 0
    for a, b in ((sparse[0], masked[0]), (sparse[2], masked[2])):
        assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_gradient_growth_scores_are_the_dense_weight_gradient(layer_index):
    """RigL's candidates for a convolution are the top |dL/dW| of the dense weight gradient
    (computed block by block, groups included), against autograd on the dense model."""
    from torch_nerva import dst
    model = tn.sparsify(_cnn().double(), 0.3, conv=True,
                        generator=torch.Generator().manual_seed(0))
    layer = model[layer_index]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 11, 11, dtype=F64, generator=g)
    y = torch.randint(10, (3,), generator=g)
    xs, dys = dst._capture(model, [layer], (x, y), torch.nn.functional.cross_entropy)[id(layer)]
    dense = tn.densify(model)
    torch.nn.functional.cross_entropy(dense(x), y).backward()
    score = dense[layer_index].weight.grad.abs().flatten()
    kept = layer.layout.positions()
    n = 25
    old_block = dst.SCORE_BLOCK
    try:
        dst.SCORE_BLOCK = 3 * layer.matrix_shape[1]  # several blocks, not aligned to groups
        got = dst._grow_gradient(kept, n, layer.matrix_shape, xs, dys, layer)
    finally:
        dst.SCORE_BLOCK = old_block
    score[kept] = -1
    expected = torch.topk(score, n).indices.sort().values
    assert torch.equal(got, expected)


def test_summary_counts_output_pixels_and_npz_round_trips(tmp_path):
    model = tn.sparsify(_cnn(), 0.3, conv=True, generator=torch.Generator().manual_seed(0))
    rows = {r["layer"]: r for r in tn.summary(model, input_size=(3, 12, 12))}
    assert rows["0"]["shape"] == "16x27" and rows["2"]["shape"] == "32x72"
    assert rows["0"]["pixels"] == 144 and rows["2"]["pixels"] == 36
    assert rows["0"]["infer_flops"] == 2 * model[0].nnz * 144
    assert rows["6"]["infer_flops"] == 2 * model[6].nnz  # linear: per example
    per_pixel = {r["layer"]: r for r in tn.summary(model)}
    assert per_pixel["2"]["infer_flops"] == 2 * model[2].nnz
    path = tmp_path / "m.npz"
    tn.interchange.save_npz(model, path)
    other = tn.sparsify(_cnn(), 0.3, conv=True, generator=torch.Generator().manual_seed(1))
    tn.interchange.load_npz(other, path)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(other(x), model(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("case", CASES[:4], ids=[str(c) for c in CASES[:4]])
def test_non_finite_inputs_follow_dense_math(bad, case):
    conv = _dense_conv(case, True, seed=3)
    sparse = tn.SparseConv2d.from_dense(conv, backend="native")
    x = torch.randn(2, 8, 11, 9, dtype=F64)
    x[0, 2, 4, 5] = bad
    x[1, 0, 0, 0] = bad  # input channel 0 has no weights at all
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), equal_nan=True)
    big = torch.full((1, 8, 6, 6), 1e308, dtype=F64)  # the sum overflows: nothing changes
    with torch.no_grad():
        torch.testing.assert_close(sparse(big), conv(big), equal_nan=True)


STRIDED = [(3, 2, 1, 1), (1, 2, 0, 2), ((3, 5), (2, 3), (1, 2), 2), (4, 2, 1, 1), (7, 3, 3, 1)]


@pytest.mark.parametrize("case", STRIDED, ids=[str(c) for c in STRIDED])
def test_strided_convolutions_through_phase_planes_match_nn_conv2d(case):
    """Stride > 1 as a stride-1 convolution of the phase planes (space-to-depth, the path
    taken where it measured faster): the same outputs and gradients as nn.Conv2d for any input
    size (cropping of the extra phase row / column), called directly in float64."""
    k, s, p, g = case
    conv = nn.Conv2d(6, 12, k, stride=s, padding=p, groups=g, dtype=F64)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, dtype=F64) < 0.4)
    sparse = tn.SparseConv2d.from_dense(conv, backend="native")
    for h, w in ((11, 9), (12, 16), (7, 8)):
        x = torch.randn(2, 6, h, w, dtype=F64, requires_grad=True)
        y, ref = sparse._strided(x, conv.padding, sparse.values.view(-1), sparse.bias), conv(x)
        torch.testing.assert_close(y, ref)
        gy = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0],
                                   torch.autograd.grad(ref, x, gy)[0])
        y = sparse._strided(x, conv.padding, sparse.values.view(-1), sparse.bias)
        gv = torch.autograd.grad(y, sparse.values, gy)[0].view(-1)
        gw = torch.autograd.grad(conv(x), conv.weight, gy)[0].flatten()
        torch.testing.assert_close(gv, gw[sparse.layout.positions()])
    with pytest.raises(ValueError, match="smaller than the kernel"):
        small = tn.SparseConv2d(6, 12, 7, stride=2, density=0.5, backend="native")
        small._strided(torch.randn(1, 6, 3, 3), (0, 0), small.values.view(-1), None)


def test_small_strided_float32_layer_takes_phase_planes_and_non_finite_inputs_do_not():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.1)
    sparse = tn.SparseConv2d.from_dense(conv, backend="native")
    x = torch.randn(4, 16, 8, 8)
    expected = tn.ops.kernel_isa() == "avx512"
    assert sparse._phase_planes_pay(x, (1, 1)) == expected
    assert not sparse._phase_planes_pay(torch.randn(4, 16, 32, 32), (1, 1))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
        x[0, 3, 0, 0] = float("nan")  # a corner only the phase kernel's padding taps reach
        x[2, 5, 4, 3] = float("inf")
        torch.testing.assert_close(sparse(x), conv(x), equal_nan=True, rtol=1e-5, atol=1e-5)


def _ddp_conv_worker(rank, world, port, result):
    import os
    from reference import end_process_group
    from torch_nerva import dst
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tn.sparsify(_cnn(), 0.3, conv=True, generator=torch.Generator().manual_seed(0))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    # different seeds per rank on purpose: rank 0's decisions must win everywhere
    sched = dst.DynamicSparsity(model, opt, drop_fraction=0.3, grow="random", update_every=2,
                                anneal="constant", seed=rank)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x, y = torch.randn(4, 3, 10, 10, generator=g), torch.randint(10, (4,), generator=g)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    mine = [t for m in model.modules() if isinstance(m, tn.SparseConv2d)
            for t in (torch.cat([m.crow_indices.long(), m.col_indices.long()]),
                      m.values.detach().reshape(-1))]
    gathered = [[torch.empty_like(t) for _ in range(world)] for t in mine]
    for t, out in zip(mine, gathered):
        torch.distributed.all_gather(out, t)
    if rank == 0:
        result.put(len(mine) > 0 and all(torch.equal(o[0], o[1]) for o in gathered))
    del ddp
    end_process_group()


def test_two_rank_ddp_trains_conv_layers_with_set_updates_identically():
    import socket
    import torch.multiprocessing as mp
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_conv_worker, args=(2, port, result), nprocs=2,
                       start_method="spawn")
    assert result.get() is True


def test_torchvision_resnet18_trains_like_its_masked_twin():
    """A model nobody here wrote: torchvision's ResNet-18 (CIFAR stem), its convolutions
    sparsified (first conv and fc dense), trained with SGD Nesterov + weight decay and a
    cosine schedule: the CSR model and its masked twin stay equal step by step in float64,
    and every SparseConv2d ran the native kernels (backend native, some of them strided)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10)
    dense.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    dense.maxpool = nn.Identity()
    keep = lambda n, m: not (isinstance(m, nn.Conv2d) and m.in_channels == 3) and n != "fc"  # noqa
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tn.DenseWeightsWarning)
        sparse = tn.sparsify(dense.double(), 0.1, conv=True, filter_fn=keep, backend="native",
                             generator=torch.Generator().manual_seed(1))
    masked = tn.to_masked(sparse)
    convs = [m for m in sparse.modules() if isinstance(m, tn.SparseConv2d)]
    assert len(convs) == 19 and any(m.stride == (2, 2) for m in convs)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=F64, generator=g)
    y = torch.randint(10, (2,), generator=g)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                            weight_decay=5e-4) for m in (sparse, masked)]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3) for o in opts]
    for _ in range(3):
        for m, opt, sched in zip((sparse, masked), opts, scheds):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        torch.testing.assert_close(sparse(x), masked(x))
    for a, b in zip(convs, [m for m in masked.modules() if isinstance(m, tn.MaskedConv2d)]):
        torch.testing.assert_close(a.dense_weight4d(), b.weight * b.mask)
        assert bool((b.weight[~b.mask] == 0).all())  # weight decay kept the mask


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_autocast_and_16_bit_layers_behave_as_nn_conv2d(low, stride):
    """Under torch.autocast a native SparseConv2d does what nn.Conv2d does (operands rounded to
    the region's dtype, output in it, float32 values get float32 gradients); a layer converted
    to 16 bits computes with its operands widened and returns its dtype (gradients in it)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.1)
    sparse = tn.SparseConv2d.from_dense(conv, backend="native")
    x = torch.randn(4, 16, 8, 8)
    with torch.autocast("cpu", dtype=low):
        y, ref = sparse(x), conv(x)
    assert y.dtype == ref.dtype == low
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert sparse.values.grad.dtype == torch.float32
    # the same math in float64 on the rounded operands: only the output's rounding differs
    xr = x.to(low).double()
    wr = sparse.dense_weight4d().detach().to(low).double()
    exact = F.conv2d(xr, wr, sparse.bias.detach().to(low).double(), stride, 1)
    torch.testing.assert_close(y.double(), exact, rtol=1e-2, atol=1e-2)
    # a 16-bit layer
    half = tn.SparseConv2d.from_dense(conv, backend="native").to(low)
    xh = x.to(low).requires_grad_()
    yh = half(xh)
    assert yh.dtype == low
    torch.testing.assert_close(yh.double(), F.conv2d(xh.detach().double(), half.dense_weight4d()
                                                     .detach().double(), half.bias.detach()
                                                     .double(), stride, 1), rtol=1e-2, atol=1e-2)
    yh.float().sum().backward()
    assert xh.grad.dtype == low and half.values.grad.dtype == low


def test_off_the_cpu_auto_computes_densely_and_native_refuses():
    """The sparse conv kernels are CPU-only: on another device (here ``meta``, standing in for
    CUDA) ``auto`` resolves to dense and gives nn.Conv2d's output shape; ``native`` raises."""
    layer = tn.SparseConv2d(8, 16, 3, stride=2, padding=1, density=0.02).to("meta")
    assert layer.resolved_backend == "dense"
    assert layer(torch.randn(2, 8, 9, 9, device="meta")).shape == (2, 16, 5, 5)
    native = tn.SparseConv2d(8, 16, 3, density=0.02, backend="native").to("meta")
    with pytest.raises(RuntimeError, match="runs on the CPU only"):
        native(torch.randn(2, 8, 9, 9, device="meta"))


def test_torch_func_per_sample_gradients_of_a_native_layer():
    """torch.func on a native SparseConv2d (computed in its dense form under the transforms):
    vmap(grad) per-sample gradients equal one backward per sample, and jvp works."""
    torch.manual_seed(0)
    layer = tn.SparseConv2d(6, 8, 3, padding=1, groups=2, density=0.05, backend="native",
                            dtype=F64)
    x = torch.randn(3, 6, 5, 5, dtype=F64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi.unsqueeze(0),)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        g = torch.autograd.grad(layer(x[i:i + 1]).square().sum(), layer.values)[0]
        torch.testing.assert_close(per_sample["values"][i], g)
    t = torch.randn_like(x)
    _, jv = torch.func.jvp(lambda xx: layer(xx), (x,), (t,))
    torch.testing.assert_close(jv, layer(t) - layer(torch.zeros_like(t)))
