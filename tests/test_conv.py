"""SparseConv2d / MaskedConv2d as drop-ins for nn.Conv2d: the same outputs and gradients as
nn.Conv2d with the same (sparse) weight over its arguments, identical twins step by step,
state dict and copies, and clear errors. The ops themselves: tests/test_conv_ops.py."""
import copy
import itertools
import pickle

import pytest
import torch
from torch import nn

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
    assert torch.equal(sparse.mask().view(masked.mask.shape), masked.mask)
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
