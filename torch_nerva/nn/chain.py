"""Fused inference for chains of sparse layers: :func:`fuse_for_inference`.

In an ``nn.Sequential``, a run of :class:`SparseLinear` layers, each optionally followed by an
``nn.ReLU``, computes ``y = relu(W x + b)`` layer after layer. In inference (``no_grad`` /
``inference_mode``) such a run does not need what training needs (the transposed input saved
for the backward, the autograd node, the transposes back to batch-major between layers), so a
:class:`FusedSequential` keeps the activations feature-major (features x batch) through the
whole run and computes it in one op call (``csr_chain_fm``: one kernel per layer, the ReLU
fused into its store): a batch-1 input is its own transpose, so the run costs the kernels and
one call. Only batches smaller than :data:`SMALL_BATCH` take it. Results are those of the
unfused model, NaN/Inf semantics included (the op applies dense math's rule to every layer
whose input holds a non-finite value, as the ordinary layers do). With autograd recording,
under autocast or torch.func, with hooks on a layer, or for a layer with an explicit
non-native backend, the ordinary path runs.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional import _functorch_active
from .linear import SparseLinear

_chain = torch.ops.torch_nerva.csr_chain_fm.default
#: Batches from this size on take the ordinary path: the feature-major chain was measured to
#: help small batches (batch-1 inference: no transposes at all) and not large ones, whose
#: transposes the ordinary kernels amortise.
SMALL_BATCH = 16

Segment = Union[nn.Module, List[Tuple[SparseLinear, bool]]]


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` (same children, same state dict) whose runs of SparseLinear
    (+ ReLU) layers are computed feature-major in inference; see the module docstring."""

    def _segments(self) -> List[Segment]:
        segments: List[Segment] = []
        mods = list(self)
        i = 0
        while i < len(mods):
            run: List[Tuple[SparseLinear, bool]] = []
            while i < len(mods) and isinstance(mods[i], SparseLinear):
                relu = (i + 1 < len(mods) and type(mods[i + 1]) is nn.ReLU
                        and not _has_hooks(mods[i + 1]))
                run.append((mods[i], relu))
                i += 2 if relu else 1
            if run:
                segments.append(run)
            else:
                segments.append(mods[i])
                i += 1
        return segments

    def forward(self, input: Tensor) -> Tensor:
        if torch.is_grad_enabled() or _has_hooks(self):
            return super().forward(input)
        mods = tuple(self._modules.values())
        cached = self.__dict__.get("_segments_cache")
        if cached is None or cached[0] != mods:  # children replaced: split again
            cached = (mods, self._segments())
            self.__dict__["_segments_cache"] = cached
        x = input
        for seg in cached[1]:
            x = seg(x) if isinstance(seg, nn.Module) else _run(seg, x)
        return x

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_segments_cache", None)  # copies hold other modules
        return state


def _fusable(run: List[Tuple[SparseLinear, bool]], x: Tensor) -> bool:
    if not x.is_cpu or x.dim() == 0 or x.shape[-1] != run[0][0].in_features \
            or _functorch_active() or torch.is_autocast_enabled("cpu"):
        return False
    dtype = x.dtype
    for layer, _ in run:
        p = layer._parameters
        values = p.get("values")
        if (values is None or "bias" not in p or values.dtype != dtype or not values.is_cpu
                or layer.backend not in ("auto", "native") or _has_hooks(layer)):
            return False
    return True


def _run(run: List[Tuple[SparseLinear, bool]], x: Tensor) -> Tensor:
    """One run, feature-major in one op call; the ordinary layers when it cannot be fused."""
    if not _fusable(run, x):
        return _plain(run, x)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    batch = x2.shape[0]
    if batch >= SMALL_BATCH or batch * max(4, x2.element_size()) >= 64 or batch == 0:
        return _plain(run, x)  # (and below one 64-byte vector: the kernel needs no padding)
    # a batch of one is its own transpose
    yt = x2.reshape(-1, 1).contiguous() if batch == 1 else x2.t().contiguous()
    yt = _chain(yt, [layer._parameters["values"] for layer, _ in run],
                [layer.crow_indices for layer, _ in run], [layer.col_indices for layer, _ in run],
                [layer._parameters["bias"] for layer, _ in run], [int(relu) for _, relu in run])
    y = yt.view(1, -1) if batch == 1 else yt.t().contiguous()
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _plain(run: List[Tuple[SparseLinear, bool]], x: Tensor) -> Tensor:
    for layer, relu in run:
        x = layer(x)
        if relu:
            x = torch.relu(x)
    return x


def fuse_for_inference(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every ``nn.Sequential`` in ``model`` that holds a SparseLinear becomes a
    :class:`FusedSequential` (same children, parameters and state dict keys; with
    ``inplace=False`` the model is deep-copied first). Training through it is unchanged (the
    ordinary path runs whenever autograd records); inference under ``torch.no_grad()`` or
    ``torch.inference_mode()`` runs each run of SparseLinear (+ ReLU) layers feature-major."""
    import copy
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) is nn.Sequential and any(isinstance(c, SparseLinear) for c in m):
            m.__class__ = FusedSequential
    return model
