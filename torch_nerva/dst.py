"""Dynamic sparse training without a dense matrix: SET, RigL and Sparse Momentum on
SparseLinear and SparseConv2d layers (and their masked twins).

:func:`prune_and_regrow` drops a fraction of each layer's connections and grows as many new
ones, so every layer keeps its nnz. The CSR layout and its cached transpose are rebuilt, the
``values`` Parameter object stays the same (an existing optimizer keeps working) and the
optimizer's per-weight state (SGD momentum, Adam moments, any state tensor shaped like the
values) is remapped in place: surviving connections keep their state, new connections start
from zero state and, by default, zero weight (RigL's semantics).

Drop criteria: ``"magnitude"`` (smallest |w|), ``"set"`` (SET: the smallest positive and the
largest negative weights, the same fraction of each sign), ``"threshold"`` (every |w| below
``threshold``; nnz is still kept constant by growing as many). Grow criteria: ``"random"``
(SET; uniform over non-connections, rejection-sampled from the flat index space) and
``"gradient"`` (RigL: the largest |dL/dW| over non-connections, computed from the layer's input
X and output gradient dY of a batch as dY^T X one block of rows at a time, never the whole
out x in matrix) and ``"momentum"`` (Sparse Momentum: the largest |M| where M is the momentum of
the dense gradient over the last training steps, sum_t beta^(T-t) dY_t^T X_t; the X_t and dY_t
are recorded by :class:`GradientMomentum` during the ordinary training steps before an update and
scored in the same blocks). Dropped connections may be grown again in the same update.

The same algorithm runs on :class:`MaskedLinear` twins through the same code and the same
random stream, so a masked and a CSR model updated alike keep identical topologies.

Under ``torch.distributed``, the new topology of every layer is broadcast from rank 0, so all
ranks keep identical layouts even when their gradients (and so RigL's scores) differ.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layout import CSRLayout
from .nn._sparse import SparseWeightModule
from .nn.conv import MaskedConv2d, SparseConv2d
from .nn.linear import MaskedLinear, SparseLinear

Layer = Union[SparseLinear, MaskedLinear, SparseConv2d, MaskedConv2d]
_CONV = (SparseConv2d, MaskedConv2d)
DROPS = ("magnitude", "set", "threshold")
GROWS = ("random", "gradient", "momentum")
#: Elements of dY^T X computed at once by the gradient criterion (per block of rows).
SCORE_BLOCK = 1 << 20


def _layers(model: nn.Module) -> List[Tuple[str, Layer]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (SparseLinear, MaskedLinear, SparseConv2d, MaskedConv2d))]


def _positions_values(layer: Layer) -> Tuple[Tensor, Tensor]:
    """Sorted flat positions (int64, CPU) and the values there (detached)."""
    if isinstance(layer, SparseWeightModule):
        return layer.layout.positions().cpu(), layer.values.detach().view(-1)
    flat = layer.mask.flatten().nonzero().flatten().cpu()
    w = layer._weight()
    return flat, w.detach().flatten()[flat.to(w.device)]


def _select(keys: Tensor, k: int, largest: bool) -> Tensor:
    """Sorted indices of the ``k`` smallest (or largest) keys, ties going to the lower index
    (what a stable sort would pick), in O(n): topk finds the k-th value, comparisons the rest."""
    n = keys.numel()
    k = min(k, n)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if k == n:
        return torch.arange(n)
    kth = torch.topk(keys, k, largest=largest, sorted=False).values
    kth = kth.min() if largest else kth.max()
    beyond = (keys > kth) if largest else (keys < kth)
    strict = beyond.nonzero().flatten()
    ties = (keys == kth).nonzero().flatten()[:k - strict.numel()]
    chosen = torch.cat([strict, ties])
    if chosen.numel() != k:  # NaN keys: fall back to a stable sort (NaN sorts last)
        order = torch.sort(-keys if largest else keys, stable=True).indices
        chosen = order[:k]
    return chosen.sort().values


def _drop(values: Tensor, n_drop: int, how: str, threshold: Optional[float]) -> Tensor:
    """Indices (into values) of the connections to drop, sorted."""
    v = values.detach().cpu().double()
    if how == "magnitude":
        return _select(v.abs(), n_drop, largest=False)
    if how == "threshold":
        return (v.abs() < threshold).nonzero().flatten()
    # SET: the same fraction of each sign, the ones closest to zero
    pos, neg = (v > 0).nonzero().flatten(), (v <= 0).nonzero().flatten()
    frac = n_drop / max(v.numel(), 1)
    k_pos = min(round(frac * pos.numel()), pos.numel())
    k_neg = min(n_drop - k_pos, neg.numel())
    k_pos = n_drop - k_neg
    drop_pos = pos[_select(v[pos], k_pos, largest=False)]
    drop_neg = neg[_select(v[neg], k_neg, largest=True)]
    return torch.cat([drop_pos, drop_neg]).sort().values


def _grow_random(kept: Tensor, n_grow: int, size: int, generator: torch.Generator) -> Tensor:
    """``n_grow`` distinct flat positions not in ``kept`` (sorted), uniformly at random: drawn
    from the flat index space and rejected when taken (expected draws < 2 x n_grow while at
    most half the positions are taken); above that density the free positions are enumerated
    (an allocation of the layer's dense size, only for such dense-ish layers)."""
    free = size - kept.numel()
    if n_grow > free:
        raise ValueError(f"cannot grow {n_grow} connections: only {free} positions are free")
    if n_grow == 0:
        return torch.empty(0, dtype=torch.long)
    if 2 * free < size:
        taken = torch.zeros(size, dtype=torch.bool)
        taken[kept] = True
        candidates = (~taken).nonzero().flatten()
        return candidates[torch.randperm(free, generator=generator)[:n_grow]]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n_grow:
        need = n_grow - chosen.numel()
        draw = torch.randint(0, size, (max(2 * need, 64),), generator=generator)
        draw = draw[~_in(draw, kept)]
        merged = torch.cat([chosen, draw])
        # first occurrences in draw order: the result depends only on the random stream
        uniq, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((uniq.numel(),), merged.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(merged.numel()), reduce="amin")
        chosen = merged[first.sort().values][:n_grow]
    return chosen


def _grow_gradient(kept: Tensor, n_grow: int, shape: Tuple[int, int], x: Tensor,
                   dy: Tensor, layer: Optional[Layer] = None) -> Tensor:
    """The ``n_grow`` non-connections with the largest |dL/dW| (ties: lower position first),
    sorted. Computed one block of rows at a time, never as the whole weight matrix: a block
    only contributes the entries above the running n_grow-th best score. For a linear layer
    a block is ``dY[:, rows]^T X``; for a convolution (``layer`` given) it is the weight
    gradient of those output channels (``torch.nn.grad.conv2d_weight``), blocks cut at group
    boundaries."""
    n_out, n_in = shape
    rows = max(1, SCORE_BLOCK // max(n_in, 1))
    if isinstance(layer, _CONV):
        xp, pads = layer._padded(x)
        dy = dy.to(xp.dtype)
        cin_g, cout_g = layer.in_channels // layer.groups, layer.out_channels // layer.groups

        def block(r0: int, r1: int) -> Tensor:
            g = r0 // cout_g
            w = torch.nn.grad.conv2d_weight(xp[:, g * cin_g:(g + 1) * cin_g],
                                            (r1 - r0, cin_g, *layer.kernel_size),
                                            dy[:, r0:r1].contiguous(), layer.stride, pads,
                                            layer.dilation)
            return w.reshape(r1 - r0, n_in)
        bounds = sorted({*range(0, n_out, rows), *range(0, n_out, cout_g), n_out})
    else:
        x = x.reshape(-1, n_in)
        dy = dy.reshape(-1, n_out).to(x.dtype)

        def block(r0: int, r1: int) -> Tensor:
            return dy[:, r0:r1].t() @ x  # (block x in), never out x in
        bounds = [*range(0, n_out, rows), n_out]
    best_scores = x.new_empty(0)
    best_pos = torch.empty(0, dtype=torch.long)
    kept_rows = torch.div(kept, n_in, rounding_mode="floor")
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        score = block(r0, r1).abs().cpu()
        lo, hi = torch.searchsorted(kept_rows, torch.tensor([r0, r1]))
        flat = score.reshape(-1)
        flat[kept[lo:hi] - r0 * n_in] = -1.0  # existing connections are not candidates
        if best_scores.numel() >= n_grow > 0:
            # only entries above the current n_grow-th best can enter (ties lose: the
            # earlier, lower positions win them)
            idx = (flat > best_scores.min()).nonzero().flatten()
        else:
            idx = _select(flat, n_grow, largest=True)
        # candidates stay in position order, so _select's lower-index tie rule is by position
        scores = torch.cat([best_scores, flat[idx]])
        pos = torch.cat([best_pos, idx + r0 * n_in])
        keep = _select(scores, n_grow, largest=True)
        best_scores, best_pos = scores[keep], pos[keep]
    if best_pos.numel() < n_grow or (best_scores < 0).any():
        raise ValueError(f"cannot grow {n_grow} connections: not enough free positions")
    return best_pos


def _remap_state(optimizer: Optional[torch.optim.Optimizer], param: Tensor, old_n: int,
                 old_index: Tensor, new_index: Tensor, new_n: int,
                 positions: Optional[Tensor] = None) -> None:
    """Per-weight optimizer state of ``param``: entries ``old_index`` move to ``new_index``,
    everything else becomes zero (new connections). For a masked weight (``positions`` given),
    the state is dense: dropped and grown positions are zeroed in place."""
    if optimizer is None or param not in optimizer.state:
        return
    state = optimizer.state[param]
    for key, t in list(state.items()):
        if not isinstance(t, Tensor) or t.dim() == 0:
            continue
        if positions is not None:
            if t.shape == param.shape:
                t.view(-1)[positions.to(t.device)] = 0
            continue
        if t.numel() != old_n or t.shape != param.shape[:-1] + (old_n,):
            continue
        new = t.new_zeros(new_n)
        new[new_index.to(t.device)] = t.view(-1)[old_index.to(t.device)]
        state[key] = new.view(param.shape)


def _broadcast(positions: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s positions (an int64 CPU tensor of the same length on every rank) on every
    rank (identity outside torch.distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return positions
    buf = positions.clone()
    if dist.get_backend() == "nccl":
        buf = buf.cuda()
    dist.broadcast(buf, src=src)
    return buf.cpu()


def broadcast_topology(model: nn.Module, src: int = 0) -> int:
    """Make every rank hold rank ``src``'s topology (call it once after building the model
    and before ``DistributedDataParallel(model)``, which broadcasts parameters and buffers
    but not the topology: it is not a buffer, so that averaging and buffer-sync utilities
    never touch indices). Layers whose topology differs adopt ``src``'s (their values are
    then overwritten by DDP's parameter broadcast). Identity outside torch.distributed;
    returns the number of layers that changed on this rank."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    changed = 0
    for _, layer in _layers(model):
        positions, values = _positions_values(layer)
        n = int(_broadcast(torch.tensor([positions.numel()]), src)[0])  # nnz may differ
        theirs = _broadcast(positions if positions.numel() == n else positions.new_empty(n), src)
        if torch.equal(theirs, positions):
            continue
        changed += 1
        shape = layer.matrix_shape
        if isinstance(layer, SparseWeightModule):
            layout = CSRLayout.from_positions(theirs, shape, layer.col_indices.dtype)
            layer._adopt(layout, values.new_zeros(theirs.numel()))
        else:
            with torch.no_grad():
                mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
                mask[theirs] = True
                layer.mask.copy_(mask.view(layer.mask.shape))
                layer._weight().mul_(layer.mask)
    return changed


def update_layer(layer: Layer, optimizer: Optional[torch.optim.Optimizer], *,
                 drop_fraction: float, drop: str = "magnitude", grow: str = "random",
                 generator: Optional[torch.Generator] = None, threshold: Optional[float] = None,
                 inputs: Optional[Tensor] = None, grad_outputs: Optional[Tensor] = None,
                 grow_init: Optional[Callable[[int], Tensor]] = None,
                 n_drop: Optional[int] = None, averaged: Sequence[Layer] = ()) -> Dict[str, int]:
    """Drop and regrow connections of one layer in place; returns the counts. ``n_drop``
    overrides the number dropped (``drop_fraction`` is then ignored). ``averaged``: this
    layer's counterparts in averaged copies of the model (EMA, SWA), carried through the
    update (see :func:`prune_and_regrow`)."""
    if drop not in DROPS:
        raise ValueError(f"drop must be one of {DROPS}, got {drop!r}")
    if grow not in GROWS:
        raise ValueError(f"grow must be one of {GROWS}, got {grow!r}")
    if not 0 <= drop_fraction <= 1:
        raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
    if drop == "threshold" and threshold is None:
        raise ValueError("drop='threshold' needs threshold=")
    if grow != "random" and (inputs is None or grad_outputs is None):
        raise ValueError(f"grow={grow!r} needs the layer's inputs and output gradients "
                         "(prune_and_regrow captures them from batch= and loss_fn=, or takes "
                         "them from a GradientMomentum recorder)")
    shape = layer.matrix_shape
    size = shape[0] * shape[1]
    positions, values = _positions_values(layer)
    nnz = positions.numel()
    for copy in averaged:  # checked before anything changes
        _check_averaged(copy, layer, positions)
    if n_drop is None:
        n_drop = (math.floor(drop_fraction * nnz + 0.5) if drop != "threshold"
                  else int((values.abs() < threshold).sum()))
    n_drop = min(n_drop, nnz)
    dropped = _drop(values, n_drop, drop, threshold) if n_drop else torch.empty(0, dtype=torch.long)
    n_drop = dropped.numel()
    keep_mask = torch.ones(nnz, dtype=torch.bool)
    keep_mask[dropped] = False
    kept_idx = keep_mask.nonzero().flatten()
    kept = positions[kept_idx]
    if grow == "random":
        gen = generator or torch.Generator().manual_seed(0)
        grown = _grow_random(kept, n_drop, size, gen)
    else:
        grown = _grow_gradient(kept, n_drop, shape, inputs, grad_outputs, layer)
    merged = torch.cat([kept, grown])  # disjoint: grown never picks a kept position
    order = torch.sort(merged).indices
    new_positions = merged[order]
    shared = _broadcast(new_positions)
    if shared.numel() != nnz:
        raise RuntimeError("internal error: nnz changed during an update")
    if shared is new_positions or torch.equal(shared, new_positions):
        # where each surviving connection lands: the inverse of the sorting permutation
        where = torch.empty_like(order)
        where[order] = torch.arange(nnz)
        new_of_kept = where[:kept.numel()]
    else:  # another rank decided: survivors are the kept positions rank 0 also kept
        new_positions = shared
        new_of_kept = torch.searchsorted(new_positions, kept)
        valid = (new_of_kept < nnz) & (new_positions[new_of_kept.clamp_max(nnz - 1)] == kept)
        kept_idx, new_of_kept = kept_idx[valid], new_of_kept[valid]
    is_new = torch.ones(nnz, dtype=torch.bool)
    is_new[new_of_kept] = False
    new_values = values.new_zeros(nnz)
    new_values[new_of_kept.to(values.device)] = values[kept_idx.to(values.device)]
    fresh = is_new.nonzero().flatten()
    if grow_init is not None and fresh.numel():
        new_values[fresh.to(values.device)] = grow_init(fresh.numel()).to(new_values)
    for copy in averaged:
        _carry_averaged(copy, positions, new_positions, kept_idx, new_of_kept)
    if isinstance(layer, SparseWeightModule):
        old_n = layer.values.numel()
        layout = CSRLayout.from_positions(new_positions, shape, layer.col_indices.dtype)
        # a gradient computed before the update (backward, update, then step) moves with its
        # connections as the optimizer state does; new connections get zero
        old_grad = layer.values.grad
        grad = None
        if old_grad is not None:
            grad = old_grad.new_zeros(nnz)
            grad[new_of_kept.to(grad.device)] = old_grad.view(-1)[kept_idx.to(grad.device)]
        layer._adopt(layout, new_values, grad=grad)
        _remap_state(optimizer, layer.values, old_n, kept_idx, new_of_kept, nnz)
    else:
        changed = torch.cat([positions[~_in(positions, new_positions)],
                             new_positions[is_new]])
        with torch.no_grad():
            weight = layer._weight()
            flat_w, flat_m = weight.view(-1), layer.mask.view(-1)
            dev = flat_w.device
            flat_m[positions.to(dev)] = False
            flat_m[new_positions.to(dev)] = True
            flat_w[positions.to(dev)] = 0
            flat_w[new_positions.to(dev)] = new_values
            if weight.grad is not None:  # as the sparse twin's: zero where it changed
                weight.grad.view(-1)[changed.to(weight.grad.device)] = 0
        _remap_state(optimizer, weight, 0, kept_idx, new_of_kept, 0, positions=changed)
    return {"nnz": nnz, "dropped": n_drop, "grown": int(fresh.numel())}


def _check_averaged(copy: Layer, layer: Layer, positions: Tensor) -> None:
    if type(copy) is not type(layer) or copy.matrix_shape != layer.matrix_shape:
        rc, cc = copy.matrix_shape
        rl, cl = layer.matrix_shape
        raise ValueError(f"averaged copy: a {type(copy).__name__} "
                         f"({rc}x{cc}) stands where the model has a "
                         f"{type(layer).__name__} ({rl}x{cl}); "
                         "pass copies of this model (e.g. AveragedModel(model))")
    if copy is layer:
        raise ValueError("averaged copy: got the model's own layer, pass a separate copy")
    mine, _ = _positions_values(copy)
    if not torch.equal(mine, positions):
        raise ValueError("averaged copy: a layer's topology differs from the model's before the "
                         "update (was the copy made before an earlier update it did not "
                         "follow?): pass every averaged copy to every update")


def _carry_averaged(copy: Layer, positions: Tensor, new_positions: Tensor, kept_idx: Tensor,
                    new_of_kept: Tensor) -> None:
    """The averaged copy's values follow their connections: surviving connections keep their
    average, new ones start at 0 (what an average of the masked dense weight holds for a
    connection that was never there); the copy adopts the new topology."""
    with torch.no_grad():
        if isinstance(copy, SparseWeightModule):
            old = copy.flat_values().detach()
            new = old.new_zeros(new_positions.numel())
            new[new_of_kept.to(old.device)] = old[kept_idx.to(old.device)]
            layout = CSRLayout.from_positions(new_positions, copy.matrix_shape,
                                              copy.col_indices.dtype)
            copy._adopt(layout, new)
        else:  # a dense average holds every position already: only the mask changes
            flat_m = copy.mask.view(-1)
            flat_m[positions.to(flat_m.device)] = False
            flat_m[new_positions.to(flat_m.device)] = True


def _averaged_layers(model_layers: Sequence[Tuple[str, Layer]],
                     averaged: Sequence[nn.Module]) -> List[List[Layer]]:
    """Per layer of the model, its counterparts in each averaged copy (matched in order)."""
    if isinstance(averaged, nn.Module):
        averaged = [averaged]
    per_layer: List[List[Layer]] = [[] for _ in model_layers]
    for copy in averaged:
        if not isinstance(copy, nn.Module):
            raise TypeError(f"averaged copies must be nn.Modules, got {type(copy).__name__}")
        theirs = _layers(copy)
        if len(theirs) != len(model_layers):
            raise ValueError(f"averaged copy has {len(theirs)} sparse layers, the model "
                             f"{len(model_layers)}: pass copies of this model")
        for i, (_, c) in enumerate(theirs):
            per_layer[i].append(c)
    return per_layer


def _in(a: Tensor, sorted_b: Tensor) -> Tensor:
    """Whether each element of ``a`` is in ``sorted_b``."""
    if sorted_b.numel() == 0 or a.numel() == 0:
        return torch.zeros(a.shape, dtype=torch.bool)
    a_sorted, order = torch.sort(a)  # searching in order is cache-friendly: ~3x faster
    i = torch.searchsorted(sorted_b, a_sorted).clamp_max(sorted_b.numel() - 1)
    found = torch.empty(a.shape, dtype=torch.bool)
    found[order] = sorted_b[i] == a_sorted
    return found


def _capture(model: nn.Module, layers: Sequence[Layer], batch, loss_fn) -> Dict[int, Tuple]:
    """Inputs and output gradients of every layer for one batch, without touching .grad."""
    saved: Dict[int, List] = {}
    handles = []

    def hook(module, args, output):
        saved[id(module)] = [args[0].detach(), output]

    for layer in layers:
        handles.append(layer.register_forward_hook(hook))
    try:
        x, y = batch
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            outputs = [saved[id(m)][1] for m in layers]
            grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {id(m): (saved[id(m)][0], g if g is not None else torch.zeros_like(o))
            for m, g, o in zip(layers, grads, outputs)}


class GradientMomentum:
    """Records what Sparse Momentum growth needs, without a dense matrix: each layer's input X_t
    and output gradient dY_t of the ordinary training steps (a forward hook and a hook on the
    output tensor; no extra forward or backward). At an update, the momentum of the dense weight
    gradient over the recorded steps, ``M = sum_t beta^(T-t) dY_t^T X_t`` (``T`` the newest
    step), is scored block by block as one product of the stacked X_t with the weighted dY_t.

    This is the optimizer-style momentum ``m_t = beta m_(t-1) + g_t`` truncated to the last
    ``window`` steps (the dropped tail weighs ``beta^window`` of the newest gradient; 0.9^20 is
    12%). Memory: ``window x batch x (in + out)`` numbers per layer, not ``out x in``.
    :class:`DynamicSparsity` with ``grow="momentum"`` records only during the ``window`` steps
    before each update. Several forwards in one step (gradient accumulation) are all counted;
    forwards without a backward (evaluation) are not. Hooks are module hooks: eager mode.
    """

    def __init__(self, model: nn.Module, beta: float = 0.9, window: int = 10) -> None:
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.model, self.beta, self.window = model, beta, window
        self.step_index = 0
        self._records: Dict[int, List[Tuple[int, Tensor, Tensor]]] = {}
        self._handles: List = []

    @property
    def recording(self) -> bool:
        return bool(self._handles)

    def start(self) -> "GradientMomentum":
        """Attach the hooks (idempotent)."""
        if not self._handles:
            self._handles = [m.register_forward_hook(self._forward)
                             for _, m in _layers(self.model)]
        return self

    def stop(self) -> None:
        """Detach the hooks; what was recorded stays until :meth:`clear`."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self._records = {}

    def next_step(self) -> None:
        """Mark the end of a training step (later records weigh beta^-1 more); records older
        than ``window`` steps are forgotten."""
        self.step_index += 1
        oldest = self.step_index - self.window
        for key, recs in self._records.items():
            self._records[key] = [r for r in recs if r[0] >= oldest]

    def steps_recorded(self) -> int:
        return len({r[0] for recs in self._records.values() for r in recs})

    def _forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        # a copy: the live input may be modified in place after the forward (our op keeps its
        # own transposed copy, so autograd would not notice)
        x, step = args[0].detach().clone(), self.step_index

        def on_grad(grad):
            self._records.setdefault(id(module), []).append((step, x, grad.detach()))
        output.register_hook(on_grad)

    def state_dict(self) -> Dict:
        """What was recorded, by layer name (tensors; for checkpoints taken mid-window)."""
        names = {id(m): n for n, m in _layers(self.model)}
        return {"step_index": self.step_index,
                "records": {names[k]: [(step, x, dy) for step, x, dy in recs]
                            for k, recs in self._records.items() if k in names}}

    def load_state_dict(self, state: Dict) -> None:
        by_name = {n: m for n, m in _layers(self.model)}
        unknown = sorted(set(state["records"]) - set(by_name))
        if unknown:
            raise KeyError(f"GradientMomentum state has layers this model lacks: {unknown}")
        self.step_index = int(state["step_index"])
        self._records = {id(by_name[n]): [(int(step), x, dy) for step, x, dy in recs]
                         for n, recs in state["records"].items()}

    def inputs_for(self, layer: Layer) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """``(X, dY)`` stacked over the recorded steps, dY weighted by beta^(T-t), so that
        ``dY^T X`` is the truncated momentum; ``(None, None)`` if nothing was recorded."""
        recs = self._records.get(id(layer))
        if not recs:
            return None, None
        newest = max(r[0] for r in recs)
        if isinstance(layer, _CONV):  # images stack along the batch: dW is linear in it
            xs = [r[1] for r in recs]
            dys = [r[2] * self.beta ** (newest - r[0]) for r in recs]
            if len({tuple(t.shape[1:]) for t in xs}) > 1:
                raise ValueError("grow='momentum' on a convolution needs inputs of one size in "
                                 "the recorded steps, got " + ", ".join(
                                     str(tuple(t.shape)) for t in xs))
            return torch.cat(xs), torch.cat(dys)
        xs = [r[1].reshape(-1, layer.in_features) for r in recs]
        dys = [r[2].reshape(-1, layer.out_features) * self.beta ** (newest - r[0])
               for r in recs]
        return torch.cat(xs), torch.cat(dys)


def prune_and_regrow(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                     drop_fraction: float, drop: str = "magnitude", grow: str = "random",
                     generator: Optional[torch.Generator] = None,
                     threshold: Optional[float] = None, batch=None, loss_fn=None,
                     grow_init: Optional[Callable[[int], Tensor]] = None,
                     allocation: str = "layer",
                     momentum: Optional[GradientMomentum] = None,
                     averaged: Sequence[nn.Module] = ()) -> Dict[str, Dict]:
    """Update every sparse layer of ``model`` in place (SparseLinear, MaskedLinear,
    SparseConv2d, MaskedConv2d), nnz per layer kept;
    returns ``{layer name: {"nnz", "dropped", "grown"}}``.

    ``grow="gradient"`` (RigL) scores non-connections by |dL/dW| on ``batch = (x, y)`` with
    ``loss_fn(model(x), y)``: one extra forward and backward that reads only the layers' inputs
    and output gradients (parameter ``.grad`` is left alone). ``grow="momentum"`` scores by the
    momentum of the dense gradient over the steps a :class:`GradientMomentum` recorded
    (``momentum=``; an error if a layer has no recorded step). ``generator`` drives the random
    choices (one stream for all layers, in model order), so equally seeded updates of a masked
    and a CSR twin pick the same connections.

    ``allocation="layer"`` (default) drops ``drop_fraction`` of every layer; ``"global"`` (with
    ``drop="magnitude"``) drops the ``drop_fraction`` of all connections with the smallest
    magnitudes across layers, and each layer regrows as many as it lost, so per-layer nnz stays
    constant while the drop budget goes where the weights are smallest.

    ``averaged``: averaged copies of the model (``torch.optim.swa_utils.AveragedModel``, timm's
    ``ModelEmaV2/V3``, or any module holding a copy of it; one or a list). Their sparse layers
    (matched to the model's in order) follow the update: each surviving connection keeps its
    average, a new connection starts at 0 (what an average of the masked dense weight holds for
    a connection that was never there) and the copy adopts the new topology, so that the next
    ``update_parameters`` averages every value with its own connection. A copy that did not
    follow an earlier update is refused. Without this, an average keeps averaging array slots,
    which after an update belong to other connections.
    """
    if allocation not in ("layer", "global"):
        raise ValueError(f"allocation must be 'layer' or 'global', got {allocation!r}")
    if allocation == "global" and drop != "magnitude":
        raise ValueError("allocation='global' ranks magnitudes across layers: use drop='magnitude'")
    layers = _layers(model)
    copies = _averaged_layers(layers, averaged)
    budgets: Dict[int, int] = {}
    if allocation == "global" and layers:
        mags = [(_positions_values(m)[1].detach().abs().cpu().double(), i)
                for i, (_, m) in enumerate(layers)]
        everything = torch.cat([v for v, _ in mags])
        owner = torch.cat([torch.full((v.numel(),), i) for v, i in mags])
        k = math.floor(drop_fraction * everything.numel() + 0.5)
        chosen = owner[_select(everything, k, largest=False)]
        budgets = {i: int((chosen == i).sum()) for _, i in mags}
    captured = {}
    if grow == "gradient":
        if batch is None or loss_fn is None:
            raise ValueError("grow='gradient' needs batch=(x, y) and loss_fn=")
        captured = _capture(model, [m for _, m in layers], batch, loss_fn)
    elif grow == "momentum":
        if not isinstance(momentum, GradientMomentum):
            raise ValueError("grow='momentum' needs momentum=GradientMomentum(model) that "
                             "recorded the training steps before the update")
        for name, layer in layers:
            x, dy = momentum.inputs_for(layer)
            if x is None:
                raise ValueError(f"grow='momentum': no training step was recorded for layer "
                                 f"{name!r} (start the GradientMomentum before the steps)")
            captured[id(layer)] = (x, dy)
    counts = {}
    for i, (name, layer) in enumerate(layers):
        x, dy = captured.get(id(layer), (None, None))
        counts[name] = update_layer(layer, optimizer, drop_fraction=drop_fraction, drop=drop,
                                    grow=grow, generator=generator, threshold=threshold,
                                    inputs=x, grad_outputs=dy, grow_init=grow_init,
                                    n_drop=budgets.get(i), averaged=copies[i])
    return counts


class DynamicSparsity:
    """Drives :func:`prune_and_regrow` from a training loop: call :meth:`step` after every
    ``optimizer.step()``.

    Updates happen every ``update_every`` steps from ``begin`` to ``end`` (exclusive; None =
    forever) with drop fraction ``drop_fraction`` annealed by ``anneal``: ``"constant"``,
    ``"cosine"`` (to 0 at ``end``, RigL's default) or ``"exponential"`` (halved every
    ``half_life`` updates). Deterministic for ``seed``. Per-epoch updates:
    ``update_every=steps_per_epoch``.

    ``grow="gradient"`` (RigL) needs ``loss_fn`` and the step's batch in :meth:`step`;
    ``grow="momentum"`` (Sparse Momentum) records the ``momentum_window`` training steps before
    each update with a :class:`GradientMomentum` (``momentum`` is its beta) and needs neither.

    ``averaged``: averaged copies of the model (EMA / SWA) carried through every update (see
    :func:`prune_and_regrow`); the list ``self.averaged`` may also be appended to later.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 drop_fraction: float = 0.3, drop: str = "magnitude", grow: str = "random",
                 update_every: int = 100, begin: int = 0, end: Optional[int] = None,
                 anneal: str = "cosine", half_life: int = 10, seed: int = 0,
                 loss_fn=None, allocation: str = "layer", momentum: float = 0.9,
                 momentum_window: int = 10, averaged: Sequence[nn.Module] = ()) -> None:
        if anneal not in ("constant", "cosine", "exponential"):
            raise ValueError(f"anneal must be constant, cosine or exponential, got {anneal!r}")
        if anneal == "cosine" and end is None:
            raise ValueError("anneal='cosine' needs end=")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        if grow not in GROWS:
            raise ValueError(f"grow must be one of {GROWS}, got {grow!r}")
        if grow == "gradient" and loss_fn is None:
            raise ValueError("grow='gradient' needs loss_fn= (and the batch in step())")
        self.model, self.optimizer = model, optimizer
        self.drop_fraction, self.drop, self.grow = drop_fraction, drop, grow
        self.update_every, self.begin, self.end = update_every, begin, end
        self.anneal, self.half_life, self.loss_fn = anneal, half_life, loss_fn
        self.allocation = allocation
        self.averaged = [averaged] if isinstance(averaged, nn.Module) else list(averaged)
        self.generator = torch.Generator().manual_seed(seed)
        self.recorder = (GradientMomentum(model, momentum, momentum_window)
                         if grow == "momentum" else None)
        self.steps = 0
        self.updates = 0
        self.history: List[Dict] = []
        self._arm_recorder()

    def state_dict(self) -> Dict:
        """Step and update counts, the random stream, the history and, for momentum growth,
        the recorded steps: with the model's and the optimizer's state dicts, a resumed run
        continues exactly as an uninterrupted one (tested). Settings are not saved: build the
        object with the same arguments, then load."""
        return {"steps": self.steps, "updates": self.updates,
                "generator": self.generator.get_state(), "history": list(self.history),
                "recorder": None if self.recorder is None else self.recorder.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        if (state.get("recorder") is None) != (self.recorder is None):
            raise ValueError("DynamicSparsity state is from a run with another grow criterion")
        self.steps, self.updates = int(state["steps"]), int(state["updates"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        if self.recorder is not None:
            self.recorder.load_state_dict(state["recorder"])
        self._arm_recorder()

    def next_update(self) -> Optional[int]:
        """The step number of the next update after the steps counted so far (None: none)."""
        first = max(self.steps + 1, self.begin, 1)
        u = -(-first // self.update_every) * self.update_every
        return None if self.end is not None and u >= self.end else u

    def _arm_recorder(self) -> None:
        """Record exactly the training steps inside the window before the next update."""
        if self.recorder is None:
            return
        u = self.next_update()
        if u is not None and u - self.recorder.window < self.steps + 1:
            self.recorder.start()
        else:
            self.recorder.stop()

    def fraction(self, step: int) -> float:
        if self.anneal == "constant":
            return self.drop_fraction
        if self.anneal == "exponential":
            return self.drop_fraction * 0.5 ** (self.updates / self.half_life)
        span = max(self.end - self.begin, 1)
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * (step - self.begin) / span))

    def step(self, batch=None) -> Optional[Dict[str, Dict]]:
        """Count a training step; on update steps, update the topology and return the counts.
        ``batch = (x, y)`` is needed for ``grow="gradient"``."""
        self.steps += 1
        s = self.steps
        counts = None
        if not (s < self.begin or (self.end is not None and s >= self.end)
                or s % self.update_every):
            fraction = self.fraction(s)
            counts = prune_and_regrow(self.model, self.optimizer,
                                      drop_fraction=fraction, drop=self.drop,
                                      grow=self.grow, generator=self.generator, batch=batch,
                                      loss_fn=self.loss_fn, allocation=self.allocation,
                                      momentum=self.recorder, averaged=self.averaged)
            self.updates += 1
            self.history.append({"step": s, "fraction": fraction, "counts": counts})
            if self.recorder is not None:
                self.recorder.clear()
        if self.recorder is not None:
            self.recorder.next_step()
        self._arm_recorder()
        return counts
