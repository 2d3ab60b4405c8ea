"""Whole-model conversions: sparsify, to_masked, to_sparse, densify.

Every function returns the converted model; with ``inplace=False`` (the default) the input model
is deep-copied first and left untouched. A module shared by several parents stays shared.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .init import layer_nnz
from .layout import CSRLayout, check_density
from .nn.linear import MaskedLinear, SparseLinear, keep_largest


def _targets(model: nn.Module, predicate) -> List[Tuple[str, nn.Module]]:
    seen, found = set(), []
    for name, module in model.named_modules():
        if id(module) not in seen and predicate(name, module):
            seen.add(id(module))
            found.append((name, module))
    return found


def _replace(model: nn.Module, predicate, make, inplace: bool) -> nn.Module:
    if not inplace:
        model = copy.deepcopy(model)
    made: Dict[int, nn.Module] = {}

    def convert(name, module):
        if id(module) not in made:
            made[id(module)] = make(name, module)
        return made[id(module)]

    if predicate("", model):
        return convert("", model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):  # keeps shared children
            if child is None:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if predicate(full, child):
                setattr(parent, child_name, convert(full, child))
    return model


def _is_linear(name, module) -> bool:
    # MultiheadAttention reads its out_proj's weight directly: leave that one dense.
    return (isinstance(module, nn.Linear)
            and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear))


def sparsify(model: nn.Module, density: float, *, distribution: str = "er",
             filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, inplace: bool = False,
             backend: str = "auto", generator: Optional[torch.Generator] = None,
             init: str = "xavier", index_dtype=None,
             device: Optional[torch.device] = None) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`.

    Per-layer densities follow ``distribution`` ("uniform", "er" or "erk"; see
    :mod:`torch_nerva.init`) so that the converted layers hold exactly
    ``floor(density x total + 1/2)`` nonzeros in total. ``filter_fn(name, module)`` chooses which
    linear layers to convert (default: all).

    ``init="xavier"`` (default) places each layer's nonzeros uniformly at random and draws them
    Glorot-uniform scaled for the realised density, biases as ``nn.Linear`` (sparse training
    from scratch). ``init="magnitude"`` keeps each layer's largest-magnitude existing weights
    and its bias instead (pruning a trained model).

    ``device`` places the new layers (default: each replaced layer's device). With it, a model
    built on the ``meta`` device is a shape template whose dense weights are never allocated:
    ``with torch.device("meta"): template = make_model()``, then
    ``sparsify(template, 0.001, device="cpu")`` for layers far too big to hold densely (the
    rest of the model must hold no other meta tensors).
    """
    density = check_density(density)
    if device is not None and init == "magnitude":
        raise ValueError("device= places freshly initialised layers; init='magnitude' keeps the "
                         "existing weights, on their device")
    if init not in ("xavier", "magnitude"):
        raise ValueError(f"init must be 'xavier' or 'magnitude', got {init!r}")

    def predicate(name, module):
        return _is_linear(name, module) and (filter_fn is None or filter_fn(name, module))

    targets = _targets(model, predicate)
    counts = layer_nnz([(m.out_features, m.in_features) for _, m in targets], density, distribution)
    # Layers are built in model order from the original modules, so the RNG stream is the
    # same whether or not the conversion is in place.
    built: Dict[int, SparseLinear] = {}
    for (_, m), k in zip(targets, counts):
        if init == "magnitude":
            layer = SparseLinear.from_dense(m, mask=keep_largest(m.weight, k), backend=backend,
                                            index_dtype=index_dtype)
        else:
            layer = SparseLinear(m.in_features, m.out_features, m.bias is not None, nnz=k,
                                 backend=backend,
                                 device=m.weight.device if device is None else device,
                                 dtype=m.weight.dtype,
                                 generator=generator, index_dtype=index_dtype)
        built[id(m)] = layer

    if inplace:
        return _replace(model, predicate, lambda name, m: built[id(m)], inplace=True)
    # Deep copy maps modules to new objects: match them by their position in the traversal.
    copied = copy.deepcopy(model)
    copied_targets = _targets(copied, predicate)
    by_copy = {id(c): built[id(o)] for (_, o), (_, c) in zip(targets, copied_targets)}
    return _replace(copied, predicate, lambda name, m: by_copy[id(m)], inplace=True)


def to_masked(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every :class:`SparseLinear` becomes a :class:`MaskedLinear` with bit-identical weights,
    mask and bias (the masked twin of the mask-versus-CSR comparison)."""

    def make(name, m: SparseLinear) -> MaskedLinear:
        out = MaskedLinear(m.in_features, m.out_features, m.bias is not None, nnz=0,
                           backend=m.backend, device=m.values.device, dtype=m.values.dtype)
        with torch.no_grad():
            out.weight.copy_(m.dense_weight())
            out.mask.copy_(m.mask())
            if m.bias is not None:
                out.bias.copy_(m.bias)
        out.train(m.training)
        return out

    return _replace(model, lambda n, m: isinstance(m, SparseLinear), make, inplace)


def to_sparse(model: nn.Module, *, inplace: bool = False, backend: Optional[str] = None,
              index_dtype=None) -> nn.Module:
    """Every :class:`MaskedLinear` becomes a :class:`SparseLinear` with the mask as topology
    and ``weight[mask]`` as values (bit-identical); ``backend`` defaults to the layer's."""

    def make(name, m: MaskedLinear) -> SparseLinear:
        layout = CSRLayout.from_mask(m.mask, index_dtype)
        values = m.weight.detach().flatten()[layout.positions().to(m.weight.device)]
        layer = SparseLinear.from_layout(layout, values, m.bias, backend=backend or m.backend)
        layer.train(m.training)
        return layer

    return _replace(model, lambda n, m: isinstance(m, MaskedLinear), make, inplace)


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every :class:`SparseLinear` and :class:`MaskedLinear` becomes a plain ``nn.Linear`` with
    the (masked) dense weight."""

    def make(name, m) -> nn.Linear:
        w = m.dense_weight().detach()
        out = nn.Linear(m.in_features, m.out_features, m.bias is not None, device=w.device,
                        dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if m.bias is not None:
                out.bias.copy_(m.bias)
        out.train(m.training)
        return out

    return _replace(model, lambda n, m: isinstance(m, (SparseLinear, MaskedLinear)), make,
                    inplace)
