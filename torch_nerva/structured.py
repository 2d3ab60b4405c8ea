r"""Fine-tuned structured sparsity (FSSL): shrink a trained sparse network to fewer neurons.

The recipe of "Performance of Training Sparse Deep Neural Networks on GPUs": fine-tune a trained
sparse network with the task loss plus a group-lasso penalty over whole neurons, so that most of
the remaining nonzeros become exact zeros and many neurons die; then remove the zeros from the
CSR and the dead neurons from the layers (smaller, denser layers evaluate faster than the same
nnz spread over the original shape).

Groups of a layer's weight matrix W (``matrix_shape``; for a convolution (out, in/groups x kh x
kw)):

- ``"rows"``: output neuron (output channel) j: the stored weights of row j.
- ``"cols"``: input feature (input channel) c: for a linear layer column c; for a convolution
  the kh x kw taps of input channel c in every output channel that reads it (with ``groups >
  1``, only the output channels of c's group).

Penalty: :math:`\Omega(W) = \sum_{\text{kind}} \text{coef}_\text{kind} \sum_g \sqrt{|g|}\,
\|w_g\|_2`, with ``|g|`` the group's size in the dense matrix (``weights=None``; the number of
stored connections with ``weights="nnz"``; 1 with ``weights="one"``). :func:`group_lasso`
computes it from ``values`` with segment sums over the CSR (row of each nonzero from
``crow_indices``, input channel from ``col_indices``): nnz-sized work, no dense weight. The
masked twins (:class:`MaskedLinear`, :class:`MaskedConv2d`) give the same value from their
dense ``weight * mask`` (and ``weights="nnz"`` counts their mask), so twins stay comparable.

:func:`prox_` is the proximal step of ``step x`` that penalty (group soft-thresholding, exact
zeros). Row and column groups overlap, so the prox of their sum has no closed form; ``prox_``
applies the prox of each kind in turn, in the order given by ``groups`` (default: rows, then
columns, each on the result of the previous): exact for one kind, the usual composite
approximation for both.

:func:`prune_zeros_` removes the exact zeros from the CSR (optimizer state remapped, as a DST
update does); :func:`compact` removes dead neurons and shrinks the layers;
:func:`fssl_finetune` is the whole loop (docs/fssl.md).
"""
from __future__ import annotations

import copy
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .dst import _remap_state
from .layout import CSRLayout
from .nn._sparse import SparseWeightModule
from .nn.conv import MaskedConv2d, SparseConv2d, conv_args
from .nn.linear import MaskedLinear, SparseLinear

GROUP_KINDS = ("rows", "cols")
WEIGHTS = (None, "dense", "nnz", "one")
_LAYERS = (SparseLinear, MaskedLinear, SparseConv2d, MaskedConv2d)

__all__ = ["group_lasso", "prox_", "prune_zeros_", "compact", "CompactReport", "fssl_finetune",
           "group_norms", "structured_layers", "count_nnz", "GROUP_KINDS"]


# -- layers and their groups -------------------------------------------------------------------
def structured_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The (name, layer) pairs FSSL works on: SparseLinear, SparseConv2d and their masked
    twins (each once, however often it is shared)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]


def count_nnz(model: nn.Module) -> int:
    """Stored connections of every sparse / masked layer of ``model``."""
    return sum(m.nnz for _, m in structured_layers(model))


def _geometry(layer: nn.Module) -> Tuple[int, int, int, int]:
    """(out, in per group, kernel taps, groups): W is (out, in_per_group x taps)."""
    if isinstance(layer, (SparseConv2d, MaskedConv2d)):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels // layer.groups, kh * kw, layer.groups
    return layer.out_features, layer.in_features, 1, 1


def _check_groups(groups) -> List[Tuple[str, float]]:
    """``groups``: names (``"rows"``, ``"cols"``) or a mapping name -> coefficient."""
    if isinstance(groups, str):
        groups = (groups,)
    if isinstance(groups, Mapping):
        items = list(groups.items())
    else:
        try:
            items = [(g, 1.0) for g in groups]
        except TypeError:
            raise TypeError(f"groups must be names from {GROUP_KINDS} or a mapping from them to "
                            f"coefficients, got {groups!r}") from None
    if not items:
        raise ValueError("groups must name at least one of 'rows', 'cols'")
    seen = set()
    out = []
    for name, coef in items:
        if name not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {name!r}: expected one of {GROUP_KINDS}")
        if name in seen:
            raise ValueError(f"group kind {name!r} given twice")
        seen.add(name)
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or \
                not math.isfinite(coef) or coef < 0:
            raise ValueError(f"the coefficient of {name!r} must be a finite number >= 0, got "
                             f"{coef!r}")
        out.append((name, float(coef)))
    return out


def _check_weights(weights) -> Optional[str]:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of None (sqrt of the dense group size), 'dense', "
                         f"'nnz' (sqrt of the stored connections) or 'one', got {weights!r}")
    return "dense" if weights is None else weights


#: layer -> {kind: (crow, col, group index, groups)}: outside the layer, so that pickles, copies
#: and state dicts never carry it; an entry is used only while the layer holds those very
#: index tensors (a topology change or a device move replaces them).
_GROUP_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _group_index(layer: SparseWeightModule, kind: str) -> Tuple[Tensor, int]:
    """Group of every stored nonzero (int64, nnz) and the number of groups; cached per
    topology (the cache holds the index tensors it was computed from)."""
    crow, col = layer.crow_indices, layer.col_indices
    cache = _GROUP_CACHE.setdefault(layer, {})
    hit = cache.get(kind)
    if hit is not None and hit[0] is crow and hit[1] is col:
        return hit[2], hit[3]
    out, ipg, taps, groups = _geometry(layer)
    rows = torch.repeat_interleave(torch.arange(out, device=crow.device),
                                   (crow[1:] - crow[:-1]).long())
    if kind == "rows":
        index, n = rows, out
    else:
        c = col.long() // taps if taps > 1 else col.long()
        if groups > 1:
            c = (rows // (out // groups)) * ipg + c
        index, n = c, ipg * groups
    if n <= 2**31 - 1:  # kept as long as the topology: int32 halves it
        index = index.to(torch.int32)
    cache[kind] = (crow, col, index, n)
    return index, n


def _group_sizes(layer: nn.Module, kind: str, weights: str, index: Optional[Tensor],
                 n: int, like: Tensor) -> Tensor:
    """The sqrt(|g|) factor of every group (``weights``: dense size, stored count, or 1)."""
    out, ipg, taps, groups = _geometry(layer)
    if weights == "one":
        return like.new_ones(n)
    if weights == "dense":
        size = ipg * taps if kind == "rows" else (out // groups) * taps
        return like.new_full((n,), math.sqrt(size))
    if index is not None:  # sparse: stored connections per group
        counts = torch.bincount(index.long(), minlength=n)
    else:
        counts = _masked_group_sums(layer, kind, layer.mask.to(like.dtype))
    return counts.to(like.dtype).sqrt()


def _masked_group_sums(layer: nn.Module, kind: str, dense: Tensor) -> Tensor:
    """Sums of ``dense`` (the weight's shape) over each group of a masked layer."""
    out, ipg, taps, groups = _geometry(layer)
    m = dense.reshape(out, ipg, taps).sum(dim=2)  # (out, ipg)
    if kind == "rows":
        return m.sum(dim=1)
    return m.reshape(groups, out // groups, ipg).sum(dim=1).reshape(groups * ipg)


def _safe_sqrt(sq: Tensor) -> Tensor:
    """sqrt with gradient 0 (a subgradient) at 0 instead of NaN."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _group_sq(layer: nn.Module, kind: str) -> Tuple[Tensor, Optional[Tensor], int]:
    """(squared group norms (differentiable), group index of the nonzeros or None, groups)."""
    if isinstance(layer, SparseWeightModule):
        v = layer.values.view(-1)
        index, n = _group_index(layer, kind)
        return v.new_zeros(n).index_add(0, index, v * v), index, n
    w = layer._weight() * layer.mask
    sq = _masked_group_sums(layer, kind, w * w)
    return sq, None, sq.numel()


def group_norms(layer: nn.Module, kind: str) -> Tensor:
    """The L2 norm of every ``kind`` group (``"rows"`` or ``"cols"``) of one layer (detached)."""
    if not isinstance(layer, _LAYERS):
        raise TypeError(f"layer must be one of {[c.__name__ for c in _LAYERS]}, got "
                        f"{type(layer).__name__}")
    _check_groups((kind,))
    with torch.no_grad():
        return _group_sq(layer, kind)[0].sqrt()


Groups = Union[Sequence[str], Mapping[str, float]]


def group_lasso(model: nn.Module, *, groups: Groups = GROUP_KINDS,
                weights: Optional[str] = None) -> Tensor:
    r"""The group-lasso penalty :math:`\sum_\text{kind} \text{coef} \sum_g \sqrt{|g|}\,
    \|w_g\|_2` over every sparse / masked layer of ``model`` (a 0-dim tensor, differentiable
    w.r.t. ``values`` / ``weight``; the gradient of an all-zero group is 0). ``groups``: names
    or ``{"rows": coef, "cols": coef}``; ``weights``: see the module docstring."""
    kinds = _check_groups(groups)
    wmode = _check_weights(weights)
    layers = structured_layers(model)
    total = None
    for _, layer in layers:
        for kind, coef in kinds:
            if coef == 0:
                continue
            sq, index, n = _group_sq(layer, kind)
            if n == 0:
                continue
            sizes = _group_sizes(layer, kind, wmode, index, n, sq.detach())
            term = coef * (sizes * _safe_sqrt(sq)).sum()
            total = term if total is None else total + term.to(total.device)
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=p.dtype if p is not None else torch.get_default_dtype(),
                           device=p.device if p is not None else None)
    return total


def _check_step(step) -> float:
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(f"step must be a number, got a tensor of shape {tuple(step.shape)}")
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"step must be a number, got {type(step).__name__}")
    if not math.isfinite(step) or step < 0:
        raise ValueError(f"step must be a finite number >= 0 (learning rate x lambda), got {step}")
    return float(step)


@torch.no_grad()
def prox_(model: nn.Module, step: float, *,
          groups: Union[Sequence[str], Mapping[str, float]] = GROUP_KINDS,
          weights: Optional[str] = None) -> Dict[str, int]:
    r"""Group soft-thresholding in place: for every group g of each kind in ``groups`` (in that
    order), :math:`w_g \leftarrow w_g \max(0, 1 - \text{step}\,\text{coef}\sqrt{|g|} /
    \|w_g\|_2)`: the proximal operator of ``step x group_lasso``, exact for one kind; rows then
    columns compose the two proxes (see the module docstring). Call it after
    ``optimizer.step()`` with ``step = lr x lambda``. Produces exact zeros. Returns the number
    of groups of each kind that are zero after the step."""
    step = _check_step(step)
    kinds = _check_groups(groups)
    wmode = _check_weights(weights)
    zero = {k: 0 for k, _ in kinds}
    for _, layer in structured_layers(model):
        for kind, coef in kinds:
            sq, index, n = _group_sq(layer, kind)
            if n == 0:
                continue
            sizes = _group_sizes(layer, kind, wmode, index, n, sq)
            norm = sq.sqrt()
            thr = sizes * (step * coef)
            factor = torch.where(norm > thr, 1 - thr / torch.where(norm > 0, norm, 1),
                                 torch.zeros_like(norm))
            if index is not None:
                layer.values.view(-1).mul_(factor[index])
            else:
                out, ipg, taps, g = _geometry(layer)
                w = layer._weight()
                if kind == "rows":
                    scale = factor.view(out, 1, 1)
                else:  # input channel of (o, c): (o // (out / g)) * ipg + c
                    scale = factor.view(g, 1, ipg, 1).expand(g, out // g, ipg, 1) \
                        .reshape(out, ipg, 1)
                w.view(out, ipg, taps).mul_(scale)
            zero[kind] += int((factor == 0).sum())
    return zero


# -- removing exact zeros ----------------------------------------------------------------------
@torch.no_grad()
def prune_zeros_(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                 ) -> Dict[str, Dict[str, int]]:
    """Remove the exactly-zero weights of every sparse layer from its CSR (nnz shrinks; the
    ``values`` Parameter object stays, so ``optimizer`` keeps working). ``optimizer``'s
    per-weight state (momentum, Adam moments: every state tensor shaped like ``values``) and
    ``values.grad`` follow their connections, as in a DST update; scalar state (``step``) is
    kept. On a masked twin the mask is cleared where the weight is exactly zero, and the
    optimizer state and gradient there are zeroed (so a momentum cannot revive them). Returns
    ``{layer name: {"nnz_before", "nnz_after"}}``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")
    counts: Dict[str, Dict[str, int]] = {}
    for name, layer in structured_layers(model):
        before = layer.nnz
        if isinstance(layer, SparseWeightModule):
            v = layer.values.view(-1)
            keep = v != 0
            kept_idx = keep.nonzero().flatten()
            if kept_idx.numel() != before:
                shape = layer.matrix_shape
                rows, _ = _group_index(layer, "rows")
                crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=v.device)
                crow[1:] = torch.cumsum(torch.bincount(rows[kept_idx].long(),
                                                       minlength=shape[0]), 0)
                idx = layer.col_indices.dtype
                layout = CSRLayout(crow.to(idx).cpu(), layer.col_indices[kept_idx].cpu(), shape)
                grad = layer.values.grad
                if grad is not None:
                    grad = grad.view(-1)[kept_idx]
                new_n = kept_idx.numel()
                layer._adopt(layout, v[kept_idx], grad=grad)
                _remap_state(optimizer, layer.values, before, kept_idx,
                             torch.arange(new_n, device=kept_idx.device), new_n)
        else:
            w = layer._weight()
            dead = layer.mask & (w == 0)
            if bool(dead.any()):
                layer.mask.masked_fill_(dead, False)
                positions = dead.flatten().nonzero().flatten()
                if w.grad is not None:
                    w.grad.masked_fill_(dead, 0)
                _remap_state(optimizer, w, 0, positions, positions, 0, positions=positions)
        counts[name] = {"nnz_before": before, "nnz_after": layer.nnz}
    return counts


# -- compaction --------------------------------------------------------------------------------
_ELEMENTWISE = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid,
                nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Dropout,
                nn.AlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_LINEAR = (SparseLinear, MaskedLinear, nn.Linear)
_CONV = (SparseConv2d, MaskedConv2d, nn.Conv2d)


@dataclass
class CompactReport:
    """What :func:`compact` did. ``layers``: per resized layer ``{"name", "type", "shape_before",
    "shape_after", "nnz_before", "nnz_after"}``; ``neurons_removed``: hidden neurons (channels)
    deleted; ``folded``: of those, constants folded into the next layer's bias;
    ``left_alone``: ``(name, reason)`` of what was not compacted."""

    layers: List[Dict[str, Any]] = field(default_factory=list)
    neurons_removed: int = 0
    folded: int = 0
    left_alone: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def nnz_before(self) -> int:
        return sum(r["nnz_before"] for r in self.layers)

    @property
    def nnz_after(self) -> int:
        return sum(r["nnz_after"] for r in self.layers)

    def __str__(self) -> str:
        lines = [f"compact: {self.neurons_removed} neurons removed ({self.folded} constants "
                 f"folded into the next bias), nnz {self.nnz_before} -> {self.nnz_after}"]
        for r in self.layers:
            lines.append(f"  {r['name']} ({r['type']}): {r['shape_before']} -> "
                         f"{r['shape_after']}, nnz {r['nnz_before']} -> {r['nnz_after']}")
        for name, reason in self.left_alone:
            lines.append(f"  left alone: {name}: {reason}")
        return "\n".join(lines)


class _Node:
    """A weight layer of a chain as coordinate lists (row, matrix column, value), exact zeros
    dropped; ``alive_out`` / ``alive_in`` mark the neurons (channels) kept."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.conv = isinstance(module, _CONV)
        if self.conv:
            kh, kw = module.kernel_size
            self.taps, self.groups = kh * kw, module.groups
            self.n_out, self.n_in = module.out_channels, module.in_channels
        else:
            self.taps, self.groups = 1, 1
            self.n_out, self.n_in = module.out_features, module.in_features
        with torch.no_grad():
            if isinstance(module, SparseWeightModule):
                v = module.values.detach().view(-1)
                rows = module.layout.row_indices().to(v.device)
                cols = module.col_indices.long().to(v.device)
            else:
                masked = isinstance(module, (MaskedLinear, MaskedConv2d))
                w = module._weight() * module.mask if masked else module.weight
                w = w.detach().reshape(self.n_out, -1)
                rows, cols = w.nonzero(as_tuple=True)
                v = w[rows, cols]
            keep = v != 0
            self.rows, self.cols, self.vals = rows[keep], cols[keep], v[keep].clone()
        self.nnz_before = int(module.nnz) if hasattr(module, "nnz") and not isinstance(
            module, (nn.Linear, nn.Conv2d)) else int(keep.sum())
        b = module.bias
        self.bias = None if b is None else b.detach().clone()
        self.alive_out = torch.ones(self.n_out, dtype=torch.bool, device=self.vals.device)
        self.alive_in = torch.ones(self.n_in, dtype=torch.bool, device=self.vals.device)

    def channel(self) -> Tensor:
        """Input channel of every entry (groups == 1 when it matters)."""
        return self.cols // self.taps if self.taps > 1 else self.cols

    def keep(self, sel: Tensor) -> None:
        self.rows, self.cols, self.vals = self.rows[sel], self.cols[sel], self.vals[sel]

    def zero_padding(self) -> bool:
        """Whether a conv's output at the borders reads zero padding (a constant input channel
        is then not a constant contribution)."""
        if not self.conv or self.module.padding_mode != "zeros":
            return False
        p = self.module.padding
        if p == "valid":
            return False
        if p == "same":
            return any(k > 1 for k in self.module.kernel_size)
        return any(x > 0 for x in p)


def _flatten_chain(seq: nn.Sequential, prefix: str) -> Optional[List[Tuple[str, nn.Module,
                                                                          nn.Module, str]]]:
    """Leaves of a Sequential of Sequentials in execution order: (full name, module, parent,
    attribute); None if a nested Sequential has its own forward."""
    out = []
    for attr, m in seq._modules.items():  # every entry (named_children skips repeats)
        if m is None:
            continue
        name = f"{prefix}.{attr}" if prefix else attr
        if isinstance(m, nn.Sequential):
            if type(m).forward is not nn.Sequential.forward:
                return None
            inner = _flatten_chain(m, name)
            if inner is None:
                return None
            out.extend(inner)
        else:
            out.append((name, m, seq, attr))
    return out


def _nested_sequentials(seq: nn.Sequential) -> set:
    found = {id(seq)}
    for m in seq._modules.values():
        if isinstance(m, nn.Sequential):
            found |= _nested_sequentials(m)
    return found


def _is_between_op(m: nn.Module) -> bool:
    if isinstance(m, _ELEMENTWISE):
        return True
    if isinstance(m, nn.PReLU):
        return m.num_parameters == 1
    return isinstance(m, _BATCHNORM) and not m.training and m.running_mean is not None


def _segments(leaves, shared: set, report: CompactReport):
    """Split a chain into runs ``[node, ops, node, ops, ..., node]`` of weight layers joined
    by elementwise / eval-mode BatchNorm modules; other modules end a run (reported)."""
    runs, cur, ops = [], [], []

    def close():
        nonlocal cur, ops
        if len(cur) >= 2:
            runs.append(cur)
        cur, ops = [], []

    for name, m, parent, attr in leaves:
        if id(m) in shared:
            report.left_alone.append((name, "module used more than once in the model"))
            close()
        elif isinstance(m, _LINEAR + _CONV):
            if cur and (isinstance(m, _CONV) != cur[-1][1].conv):
                close()
            if cur:
                cur.append(ops)
            node = _Node(name, m)
            cur.append((( name, m, parent, attr), node))
            ops = []
        elif _is_between_op(m) and cur:
            ops.append((name, m, parent, attr))
        elif _is_between_op(m):
            continue
        else:
            if isinstance(m, _BATCHNORM):
                why = ("BatchNorm in training mode (compact is exact in eval mode: call "
                       "model.eval())")
            elif isinstance(m, nn.Module) and not list(m.parameters()) and not isinstance(
                    m, nn.Flatten):
                why = "not an elementwise module known to compact"
            else:
                why = "unsupported module type in a chain"
            report.left_alone.append((name, f"{type(m).__name__}: {why}; the chain is split "
                                            f"here"))
            close()
    close()
    return runs


def _constants(ops, bias: Optional[Tensor], n: int, conv: bool, like: Tensor) -> Tensor:
    """The value every neuron with an empty incoming row has after the ops between two layers
    (its bias, or 0, through the activations / eval-mode BatchNorm)."""
    x = bias.clone() if bias is not None else like.new_zeros(n)
    x = x.view(1, n, 1, 1) if conv else x.view(1, n)
    modes = [m.training for _, m, _, _ in ops]
    try:
        for _, m, _, _ in ops:
            m.eval()
        with torch.no_grad():
            for _, m, _, _ in ops:
                x = m(x)
    finally:
        for (_, m, _, _), mode in zip(ops, modes):
            m.train(mode)
    return x.reshape(n)


def _resizable(a: _Node, b: _Node) -> bool:
    return a.groups == 1 and b.groups == 1


def _fixpoint(nodes: List[_Node], opss: List[list], report: CompactReport) -> None:
    changed = True
    notes = set()
    while changed:
        changed = False
        for k in range(len(nodes) - 1):
            a, b = nodes[k], nodes[k + 1]
            if not _resizable(a, b):
                notes.add((a.name, "grouped convolution: its channels are kept"))
                continue
            alive = a.alive_out
            out_count = torch.bincount(a.rows, minlength=a.n_out)
            in_count = torch.bincount(b.channel(), minlength=b.n_in)
            dead = alive & (in_count == 0)
            if bool(dead.any()):  # no outgoing connection: delete with its incoming row
                alive &= ~dead
                a.keep(alive[a.rows])
                changed = True
            const = alive & (out_count == 0) & (in_count > 0)
            if bool(const.any()):
                c = _constants(opss[k], a.bias, a.n_out, a.conv, a.vals)
                c = torch.where(const, c, torch.zeros_like(c))
                foldable = const & ((c == 0) | (not b.zero_padding()))
                if bool((const & ~foldable).any()):
                    notes.add((b.name, f"{int((const & ~foldable).sum())} constant input "
                                       "channels kept: folding them into the bias is not exact "
                                       "with zero padding"))
                if bool(foldable.any()):
                    ch = b.channel()
                    hit = foldable[ch]
                    contrib = b.vals[hit] * c[ch[hit]].to(b.vals.dtype)
                    if bool((contrib != 0).any()):
                        if b.bias is None:
                            b.bias = b.vals.new_zeros(b.n_out)
                        b.bias.index_add_(0, b.rows[hit], contrib)
                    b.keep(~hit)
                    alive &= ~foldable
                    a.keep(alive[a.rows])
                    report.folded += int(foldable.sum())
                    changed = True
            b.alive_in = alive
    report.left_alone.extend(sorted(notes))


def _renumber(alive: Tensor) -> Tensor:
    return torch.cumsum(alive.long(), 0) - 1


def _rebuild(node: _Node) -> nn.Module:
    """A new layer of the node's class, shrunk to its alive neurons (values, bias, backend and
    index dtype kept)."""
    m = node.module
    out_map, in_map = _renumber(node.alive_out), _renumber(node.alive_in)
    n_out, n_in = int(node.alive_out.sum()), int(node.alive_in.sum())
    rows = out_map[node.rows]
    if node.taps > 1:
        cols = in_map[node.cols // node.taps] * node.taps + node.cols % node.taps
    else:
        cols = in_map[node.cols]
    n_cols = n_in * node.taps
    positions = rows * n_cols + cols  # sorted: renumbering keeps the (row, col) order
    bias = node.bias[node.alive_out] if node.bias is not None else None
    dtype, device = node.vals.dtype, node.vals.device
    if isinstance(m, SparseWeightModule):
        layout = CSRLayout.from_positions(positions.cpu(), (n_out, n_cols), m.col_indices.dtype)
        if isinstance(m, SparseLinear):
            new = SparseLinear.from_layout(layout, node.vals, bias, has_bias=bias is not None,
                                           backend=m.backend, device=device)
        else:
            args = conv_args(m)
            args.update(in_channels=n_in, out_channels=n_out, bias=bias is not None)
            new = SparseConv2d(**args, nnz=0, backend=m.backend, device=device, dtype=dtype,
                               index_dtype=m.col_indices.dtype)
            new._adopt(layout, node.vals)
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias)
        return new.train(m.training)
    flat = node.vals.new_zeros(n_out * n_cols)
    flat[positions] = node.vals
    if isinstance(m, (MaskedLinear, nn.Linear)):
        kw = dict(bias=bias is not None, device=device, dtype=dtype)
        with warnings.catch_warnings():  # nn.Linear(0, n) warns that its init is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            new = MaskedLinear(n_in, n_out, nnz=0, backend=m.backend, **kw) \
                if isinstance(m, MaskedLinear) else nn.Linear(n_in, n_out, **kw)
    else:
        args = conv_args(m)
        args.update(in_channels=n_in, out_channels=n_out, bias=bias is not None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            new = MaskedConv2d(**args, nnz=0, backend=m.backend, device=device, dtype=dtype) \
                if isinstance(m, MaskedConv2d) else nn.Conv2d(**args, device=device,
                                                              dtype=dtype)
    with torch.no_grad():
        w = new._weight() if isinstance(new, (MaskedLinear, MaskedConv2d)) else new.weight
        w.copy_(flat.view(w.shape))
        if isinstance(new, (MaskedLinear, MaskedConv2d)):
            mask = torch.zeros(n_out * n_cols, dtype=torch.bool, device=device)
            mask[positions] = True
            new.mask.copy_(mask.view(new.mask.shape))
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(m.training)


def _slice_batchnorm(bn: nn.Module, alive: Tensor) -> nn.Module:
    new = copy.deepcopy(bn)
    new.num_features = int(alive.sum())
    with torch.no_grad():
        for pname in ("weight", "bias"):
            p = getattr(bn, pname)
            if p is not None:
                setattr(new, pname, nn.Parameter(p.detach()[alive].clone(),
                                                 requires_grad=p.requires_grad))
        for bname in ("running_mean", "running_var"):
            t = getattr(bn, bname)
            if t is not None:
                setattr(new, bname, t[alive].clone())
    return new


def compact(model: nn.Module, *, inplace: bool = False) -> Tuple[nn.Module, CompactReport]:
    """Remove dead neurons (channels) of the ``nn.Sequential`` chains in ``model``; returns
    ``(compacted model, report)``. The input model is left unchanged unless ``inplace``.

    In a chain of weight layers (SparseLinear / MaskedLinear / nn.Linear, or the convolutions)
    joined by elementwise modules (ReLU, GELU, Tanh, Identity, Dropout, ...) and eval-mode
    BatchNorm, a hidden neuron j between layers A and B

    - with no outgoing connection (column j of B empty; for a convolution, input channel j) is
      deleted with its incoming row;
    - with an empty incoming row outputs the constant c_j = ops(b_j) (its bias through the
      modules in between); ``W_B[:, j] c_j`` is folded into B's bias and j deleted. For a
      convolution B with zero padding the constant's border outputs differ, so it is folded
      only when c_j == 0 (else reported and kept).

    Exact zeros count as absent (a stored zero contributes nothing). Repeated to a fixpoint
    (a deletion can empty a neighbour's row or column). The chain's inputs and outputs are
    kept. Grouped convolutions keep their channels; nested Sequentials are flattened into one
    chain; modules used more than once, Sequential subclasses with their own forward, and
    modules of any other type (Flatten, pooling, attention...) split chains and are named in
    the report. The compacted model computes the same function in eval mode (Dropout and
    BatchNorm as in inference); it is a new module tree: build a new optimizer for it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = CompactReport()
    uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    shared = {i for i, n in uses.items() if n > 1}
    done: set = set()
    in_chain: set = set()  # the leaves of every chain looked at
    seqs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)]
    for name, seq in seqs:
        if id(seq) in done:
            continue
        if type(seq).forward is not nn.Sequential.forward:
            report.left_alone.append((name or type(seq).__name__,
                                      "Sequential subclass with its own forward"))
            continue
        leaves = _flatten_chain(seq, name)
        if leaves is not None:
            in_chain.update(id(leaf[1]) for leaf in leaves)
        if leaves is None:
            report.left_alone.append((name or "model", "holds a Sequential subclass with its "
                                                       "own forward"))
            continue
        done.update(_nested_sequentials(seq))  # flattened into this chain
        if id(seq) in shared:
            report.left_alone.append((name, "Sequential used more than once in the model"))
            continue
        for run in _segments(leaves, shared, report):
            nodes = [item[1] for item in run[0::2]]
            places = [item[0] for item in run[0::2]]
            opss = run[1::2]
            _fixpoint(nodes, opss, report)
            for k, (node, (lname, m, parent, attr)) in enumerate(zip(nodes, places)):
                if k + 1 < len(nodes):
                    node.alive_out = nodes[k + 1].alive_in
                resized = not (bool(node.alive_out.all()) and bool(node.alive_in.all()))
                if not resized and node.rows.numel() == node.nnz_before and (
                        node.bias is None) == (m.bias is None) and (
                        m.bias is None or torch.equal(node.bias, m.bias.detach())):
                    continue
                new = _rebuild(node)
                setattr(parent, attr, new)
                in_chain.add(id(new))
                report.layers.append({
                    "name": lname, "type": type(m).__name__,
                    "shape_before": (node.n_out, node.n_in),
                    "shape_after": (int(node.alive_out.sum()), int(node.alive_in.sum())),
                    "nnz_before": node.nnz_before, "nnz_after": int(node.rows.numel())})
                if k + 1 < len(nodes):
                    report.neurons_removed += int((~node.alive_out).sum())
                    for oname, op, oparent, oattr in opss[k]:
                        if isinstance(op, _BATCHNORM) and not bool(node.alive_out.all()):
                            setattr(oparent, oattr, _slice_batchnorm(op, node.alive_out))
    # weight layers outside any chain
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS) and id(m) not in in_chain:
            report.left_alone.append((name or type(m).__name__,
                                      "not inside an nn.Sequential chain"))
    return model, report


# -- the fine-tuning recipe --------------------------------------------------------------------
def fssl_finetune(model: nn.Module, loader: Iterable, loss_fn: Callable[[Tensor, Tensor], Tensor],
                  optimizer: torch.optim.Optimizer, *, lam: float, warmup: int = 0,
                  target_nnz_fraction: Optional[float] = None, max_steps: Optional[int] = None,
                  epochs: int = 1, groups: Union[Sequence[str], Mapping[str, float]] = GROUP_KINDS,
                  weights: Optional[str] = None, prune_every: int = 1,
                  callback: Optional[Callable[[int, Dict[str, float]], Any]] = None
                  ) -> Dict[str, Any]:
    """Fine-tune with the task loss and proximal group lasso (FSSL); stop at a target.

    Each step: ``loss_fn(model(x), y).backward(); optimizer.step()``, then
    :func:`prox_` with ``step = lr x lambda_t`` (``lr`` of the first parameter group,
    ``lambda_t = lam x min(1, t / warmup)``: a linear warm-up over ``warmup`` steps), and every
    ``prune_every`` steps :func:`prune_zeros_` (exact zeros leave the CSR; their optimizer
    state too, so momentum cannot revive them). Stops when the stored connections fall to
    ``target_nnz_fraction`` of the start, after ``max_steps`` steps, or after ``epochs`` passes
    over ``loader`` (an iterable of ``(x, y)``). Then call :func:`compact` for inference.

    Returns ``{"steps", "nnz_start", "nnz", "reached_target", "history"}``; ``history`` holds
    ``(step, loss, nnz)`` every 10 steps. ``callback(step, info)`` is called after every step;
    returning True stops."""
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) \
            or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    for key, v, low in (("warmup", warmup, 0), ("epochs", epochs, 1),
                        ("prune_every", prune_every, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{key} must be an int >= {low}, got {v!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be an int >= 0 or None, got {max_steps!r}")
    if target_nnz_fraction is not None and not 0 <= target_nnz_fraction <= 1:
        raise ValueError(f"target_nnz_fraction must be in [0, 1], got {target_nnz_fraction!r}")
    _check_groups(groups)
    _check_weights(weights)
    nnz_start = count_nnz(model)
    if nnz_start == 0 and not structured_layers(model):
        raise ValueError("the model has no SparseLinear / SparseConv2d / masked layers")
    target = None if target_nnz_fraction is None else target_nnz_fraction * nnz_start
    step, history, reached = 0, [], False
    nnz = nnz_start
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            if max_steps is not None and step >= max_steps:
                break
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            lam_t = lam * (min(1.0, step / warmup) if warmup else 1.0)
            prox_(model, optimizer.param_groups[0]["lr"] * lam_t, groups=groups,
                  weights=weights)
            if step % prune_every == 0:
                prune_zeros_(model, optimizer)
                nnz = count_nnz(model)
            loss_value = loss.item()
            if step % 10 == 0:
                history.append((step, loss_value, nnz))
            if callback is not None and callback(step, {"loss": loss_value, "nnz": nnz,
                                                        "lam": lam_t}):
                break
            if target is not None and nnz <= target:
                reached = True
                break
        else:
            continue
        break
    prune_zeros_(model, optimizer)
    nnz = count_nnz(model)
    reached = reached or (target is not None and nnz <= target)
    return {"steps": step, "nnz_start": nnz_start, "nnz": nnz, "reached_target": reached,
            "history": history}
