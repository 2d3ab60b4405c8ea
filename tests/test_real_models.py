"""Models and recipes nobody on this project wrote: torchvision ViT, Swin, ConvNeXt, MobileNetV3,
VGG and a timm ViT, sparsified at density 0.05, then forward, backward and three AdamW + cosine
steps with gradient clipping, in float64, against the masked twin (the same weights as a dense
matrix times a mask) and, before training, against ``densify``. Every converted layer must run
a torch_nerva kernel: the ``torch_nerva::sparse_linear`` and ``sparse_conv2d`` calls are
counted per layer (``sparsify`` converts the convolutions too: ConvNeXt's depthwise 7x7, MobileNet's
depthwise and pointwise, VGG's 3x3, the patch embeddings)."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_nerva as tn

torchvision = pytest.importorskip("torchvision")


class _KernelCalls(TorchDispatchMode):
    """The ``values`` storages of every torch_nerva::sparse_linear / sparse_conv2d call."""

    def __init__(self):
        super().__init__()
        self.values = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.torch_nerva.sparse_linear.default,
                    torch.ops.torch_nerva.sparse_conv2d.default):
            self.values.append(args[1].untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def _vit_b_16():
    return torchvision.models.vit_b_16(image_size=32)


def _swin_t():
    return torchvision.models.swin_t()


def _convnext_tiny():
    return torchvision.models.convnext_tiny()


def _mobilenet_v3_small():
    return torchvision.models.mobilenet_v3_small(num_classes=10)


def _vgg11():
    return torchvision.models.vgg11(num_classes=10)


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             num_classes=10)


MODELS = {"vit_b_16": _vit_b_16, "swin_t": _swin_t, "convnext_tiny": _convnext_tiny,
          "mobilenet_v3_small": _mobilenet_v3_small, "vgg11": _vgg11, "timm_vit": _timm_vit}


def _train(model, x, y, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for step in range(steps):
        torch.manual_seed(100 + step)  # dropout draws the same masks in both twins
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_real_model_trains_like_its_masked_twin(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tn.DenseWeightsWarning)  # e.g. embeddings stay dense
        sparse = tn.sparsify(model, 0.05, generator=torch.Generator().manual_seed(0),
                             backend="native")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    del model
    layers = {id(m): n for n, m in sparse.named_modules()
              if isinstance(m, (tn.SparseLinear, tn.SparseConv2d))}
    assert layers, "nothing was converted"
    assert sum(isinstance(m, tn.SparseConv2d) for m in sparse.modules()) == convs
    assert not any(type(m) is nn.Conv2d for m in sparse.modules())
    if name in ("vit_b_16",):
        assert any(isinstance(m, tn.SparseMultiheadAttention) for m in sparse.modules())
    masked = tn.to_masked(sparse)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])

    sparse.eval()
    with torch.no_grad():
        dense = tn.densify(sparse).eval()
        counter = _KernelCalls()
        with counter:
            out = sparse(x)
        torch.testing.assert_close(out, dense(x), rtol=1e-9, atol=1e-9)
        del dense
    ran = set(counter.values)
    missing = [n for n in layers.values()
               if sparse.get_submodule(n).values.untyped_storage().data_ptr() not in ran]
    assert not missing, f"converted layers that never ran a torch_nerva kernel: {missing}"

    sparse.train()
    masked.train()
    loss_s = _train(sparse, x, y)
    loss_m = _train(masked, x, y)
    torch.testing.assert_close(loss_s, loss_m, rtol=1e-8, atol=1e-10)
    sparse.eval()
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked(x), rtol=1e-8, atol=1e-10)
    # the sparse weights were decayed and trained (AdamW moved them)
    assert all(m.values.grad is not None for m in sparse.modules()
               if isinstance(m, (tn.SparseLinear, tn.SparseConv2d)))
