"""Whole-model conversions: sparsify, to_masked, to_sparse, densify.

Every function returns the converted model; with ``inplace=False`` (the default) the input model
is deep-copied first and left untouched. A module shared by several parents stays shared.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .init import layer_nnz
from .layout import CSRLayout, check_density
from .nn.attention import SparseMultiheadAttention
from .nn.conv import MaskedConv2d, SparseConv2d, conv_args
from .nn.linear import MaskedLinear, SparseLinear, keep_largest

_SPARSE_LAYERS = (SparseLinear, MaskedLinear, SparseConv2d, MaskedConv2d)


class DenseWeightsWarning(UserWarning):
    """:func:`sparsify` left some weight matrices of the model dense (the warning names them
    and gives the density realised over all weight matrices). Filter it with
    ``warnings.filterwarnings("ignore", category=torch_nerva.DenseWeightsWarning)``."""


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
    # MultiheadAttention reads its out_proj's weight directly: it is converted with its
    # attention module (as a whole), never alone.
    return (isinstance(module, nn.Linear)
            and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear))


def _is_attention(name, module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def _is_conv(name, module) -> bool:
    return type(module) is nn.Conv2d  # subclasses (quantized, weight-standardised) may differ


def _shared_parameters(model: nn.Module) -> Dict[int, List[str]]:
    """Every parameter held by more than one module (tied weights): id -> names."""
    names: Dict[int, List[str]] = {}
    owners: Dict[int, set] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
            owners.setdefault(id(p), set()).add(id(m))
    # a module shared as a whole (one object under two names) is converted once and stays
    # shared; a tie is one parameter held by different modules
    return {k: v for k, v in names.items() if len(owners[k]) > 1}


def _dense_shapes(module) -> List[Tuple[int, ...]]:
    if _is_attention("", module):
        return SparseMultiheadAttention.dense_shapes(module)
    if _is_conv("", module):
        return [tuple(module.weight.shape)]  # (out, in / groups, kh, kw): ERK counts kh, kw
    return [(module.out_features, module.in_features)]


def _weight_matrices(model: nn.Module):
    """(name, module type, parameter) of the weight matrices torch_nerva did not convert:
    parameters of two or more dimensions named ``weight`` or ``*_weight``."""
    for mname, m in model.named_modules():
        if isinstance(m, _SPARSE_LAYERS):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and (pname == "weight" or pname.endswith("_weight")):
                yield (f"{mname}.{pname}" if mname else pname), type(m).__name__, p


def _report_dense(model: nn.Module, requested: float) -> None:
    """Warn (DenseWeightsWarning) about the weight matrices left dense, with the density
    realised over all weight matrices."""
    seen, dense = set(), []
    for name, kind, p in _weight_matrices(model):
        if id(p) not in seen:
            seen.add(id(p))
            dense.append((name, kind, p))
    if not dense:
        return
    sparse_nnz = sparse_size = 0
    seen_layers = set()
    for m in model.modules():
        if isinstance(m, _SPARSE_LAYERS) and id(m) not in seen_layers:
            seen_layers.add(id(m))
            sparse_nnz += m.nnz
            sparse_size += m.matrix_shape[0] * m.matrix_shape[1]
    n_dense = sum(p.numel() for _, _, p in dense)
    total = sparse_size + n_dense
    listed = ", ".join(f"{n} ({k} {'x'.join(map(str, p.shape))})" for n, k, p in dense[:12])
    more = f" and {len(dense) - 12} more" if len(dense) > 12 else ""
    warnings.warn(
        f"sparsify: {len(dense)} weight matrices stay dense ({n_dense:,} weights): {listed}"
        f"{more}. Density realised over all weight matrices: "
        f"{(sparse_nnz + n_dense) / total if total else 0.0:.4g} (requested {requested:g} for "
        f"the converted layers). Convert them with filter_fn, or leave them dense on purpose.",
        DenseWeightsWarning, stacklevel=3)


def sparsify(model: nn.Module, density: float, *, distribution: str = "er",
             filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, inplace: bool = False,
             backend: str = "auto", generator: Optional[torch.Generator] = None,
             init: str = "xavier", index_dtype=None,
             device: Optional[torch.device] = None, conv: bool = True) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by :class:`SparseLinear` and its
    ``nn.Conv2d`` layers by :class:`SparseConv2d` (``conv=False``: the linear layers only).

    Per-layer densities follow ``distribution`` ("uniform", "er" or "erk"; see
    :mod:`torch_nerva.init`) so that the converted layers hold exactly
    ``floor(density x total + 1/2)`` nonzeros in total. ``filter_fn(name, module)`` chooses which
    linear layers to convert (default: all).

    ``nn.MultiheadAttention`` modules become :class:`torch_nerva.nn.SparseMultiheadAttention`
    (same forward semantics) whose four projections (q, k, v from the packed ``in_proj_weight``,
    and ``out_proj``) are sparse layers in the density distribution; ``filter_fn(name, mha)``
    includes or excludes each as a whole. A linear layer whose weight is tied to another module
    (e.g. a GPT head sharing the embedding's weight) is left dense with a warning, so that the
    tie holds. Every weight matrix left dense (excluded, tied, convolutions, embeddings) is
    reported in one :class:`DenseWeightsWarning` naming them, with the density realised over
    all weight matrices.

    ``init="xavier"`` (default) places each layer's nonzeros uniformly at random and draws them
    Glorot-uniform scaled for the realised density, biases as ``nn.Linear`` (sparse training
    from scratch). ``init="magnitude"`` keeps each layer's largest-magnitude existing weights
    and its bias instead (pruning a trained model).

    Every ``nn.Conv2d`` (exactly that class: ``Conv1d``/``Conv3d``/transposed convolutions stay
    dense and are named in the warning) that ``filter_fn`` accepts is converted too, in the same
    density distribution (ERK counts its kernel dimensions). The first convolution (3 input
    channels, a tiny share of the weights) and the classifier are commonly kept dense in the
    literature: ``filter_fn=lambda name, m: not (isinstance(m, nn.Conv2d) and m.in_channels ==
    3) and name != "fc"`` (torchvision ResNets). ``conv=False`` leaves every convolution dense
    (the behaviour of earlier versions).

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

    shared = _shared_parameters(model)
    tied: Dict[int, str] = {}

    def predicate(name, module):
        if not (_is_linear(name, module) or _is_attention(name, module)
                or (conv and _is_conv(name, module))):
            return False
        if filter_fn is not None and not filter_fn(name, module):
            return False
        ties = [n for p in module.parameters(recurse=False) if id(p) in shared
                for n in shared[id(p)]]
        if ties:
            tied[id(module)] = f"{name} (its parameters are also {', '.join(ties)})"
            return False
        return True

    targets = _targets(model, predicate)
    if tied:
        warnings.warn("sparsify: left dense because their weights are tied to other modules "
                      "(converting would silently untie them): " + "; ".join(tied.values()),
                      stacklevel=2)
    shapes = [_dense_shapes(m) for _, m in targets]
    flat_counts = layer_nnz([s for group in shapes for s in group], density, distribution)
    counts, at = [], 0
    for group in shapes:
        counts.append(flat_counts[at:at + len(group)])
        at += len(group)
    # Layers are built in model order from the original modules, so the RNG stream is the
    # same whether or not the conversion is in place.
    built: Dict[int, nn.Module] = {}
    for (_, m), ks in zip(targets, counts):
        if _is_attention("", m):
            built[id(m)] = SparseMultiheadAttention.from_dense(
                m, nnz=ks, init=init, backend=backend, generator=generator,
                index_dtype=index_dtype, device=device)
            continue
        k = ks[0]
        if _is_conv("", m):
            if init == "magnitude":
                layer = SparseConv2d.from_dense(m, mask=keep_largest(m.weight, k),
                                                backend=backend, index_dtype=index_dtype)
            else:
                layer = SparseConv2d(**conv_args(m), nnz=k, backend=backend,
                                     device=m.weight.device if device is None else device,
                                     dtype=m.weight.dtype, generator=generator,
                                     index_dtype=index_dtype)
            built[id(m)] = layer
            continue
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
        out = _replace(model, lambda n, m: id(m) in built, lambda name, m: built[id(m)],
                       inplace=True)
    else:
        # Deep copy maps modules to new objects: match them by their position in the traversal.
        copied = copy.deepcopy(model)
        chosen = {id(m) for _, m in targets}
        originals = [m for _, m in model.named_modules() if id(m) in chosen]
        copies = [m for m in _traverse_like(model, copied, chosen)]
        by_copy = {id(c): built[id(o)] for o, c in zip(originals, copies)}
        out = _replace(copied, lambda n, m: id(m) in by_copy, lambda name, m: by_copy[id(m)],
                       inplace=True)
    _report_dense(out, density)
    return out


def _traverse_like(original: nn.Module, copied: nn.Module, chosen) -> List[nn.Module]:
    """The modules of ``copied`` at the places where ``original`` holds a module in
    ``chosen`` (same traversal order: a deep copy keeps the structure)."""
    a, b = list(original.named_modules()), list(copied.named_modules())
    if [n for n, _ in a] != [n for n, _ in b]:  # pragma: no cover - deepcopy keeps structure
        raise RuntimeError("internal error: the deep copy has another structure")
    return [mb for (_, ma), (_, mb) in zip(a, b) if id(ma) in chosen]


def to_masked(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every :class:`SparseLinear` becomes a :class:`MaskedLinear` (every
    :class:`SparseConv2d` a :class:`MaskedConv2d`) with bit-identical weights, mask and bias
    (the masked twin of the mask-versus-CSR comparison)."""

    def make(name, m):
        if isinstance(m, SparseConv2d):
            out = MaskedConv2d(**conv_args(m), nnz=0, backend=m.backend,
                               device=m.values.device, dtype=m.values.dtype)
            with torch.no_grad():
                out.weight.copy_(m.dense_weight4d())
                out.mask.copy_(m.mask)
                if m.bias is not None:
                    out.bias.copy_(m.bias)
            out.train(m.training)
            return out
        out = MaskedLinear(m.in_features, m.out_features, m.bias is not None, nnz=0,
                           backend=m.backend, device=m.values.device, dtype=m.values.dtype)
        with torch.no_grad():
            out._weight().copy_(m.dense_weight())
            out.mask.copy_(m.mask)
            if m.bias is not None:
                out.bias.copy_(m.bias)
        out.train(m.training)
        return out

    return _replace(model, lambda n, m: isinstance(m, (SparseLinear, SparseConv2d)), make,
                    inplace)


def to_sparse(model: nn.Module, *, inplace: bool = False, backend: Optional[str] = None,
              index_dtype=None) -> nn.Module:
    """Every :class:`MaskedLinear` becomes a :class:`SparseLinear` (every :class:`MaskedConv2d`
    a :class:`SparseConv2d`) with the mask as topology and ``weight[mask]`` as values
    (bit-identical); ``backend`` defaults to the layer's."""

    def make(name, m):
        rows, cols = m.matrix_shape
        layout = CSRLayout.from_mask(m.mask.reshape(rows, cols), index_dtype)
        w = m._weight() if isinstance(m, MaskedLinear) else m.weight
        values = w.detach().flatten()[layout.positions().to(w.device)]
        if isinstance(m, MaskedConv2d):
            layer = SparseConv2d(**conv_args(m), nnz=0, backend=backend or m.backend,
                                 device=w.device, dtype=w.dtype, index_dtype=index_dtype)
            layer._adopt(layout, values)
            if m.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(m.bias)
        else:
            layer = SparseLinear.from_layout(layout, values, m.bias,
                                             backend=backend or m.backend)
        layer.train(m.training)
        return layer

    return _replace(model, lambda n, m: isinstance(m, (MaskedLinear, MaskedConv2d)), make,
                    inplace)


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every sparse or masked layer becomes the plain ``nn.Linear`` / ``nn.Conv2d`` with the
    (masked) dense weight."""

    def make(name, m) -> nn.Module:
        if isinstance(m, (SparseConv2d, MaskedConv2d)):
            w = m.dense_weight4d().detach()
            out = nn.Conv2d(**conv_args(m), device=w.device, dtype=w.dtype)
        else:
            w = m.dense_weight().detach()
            out = nn.Linear(m.in_features, m.out_features, m.bias is not None, device=w.device,
                            dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if m.bias is not None:
                out.bias.copy_(m.bias)
        out.train(m.training)
        return out

    return _replace(model, lambda n, m: isinstance(m, _SPARSE_LAYERS), make, inplace)
