"""Memory of a model and of its training step: measured, and estimated before allocating.

- :func:`state_bytes`: bytes of the distinct storages behind the given tensors (parameters,
  buffers, gradients, optimizer state).
- :class:`TensorMemoryTracker`: the peak of live tensor memory while code runs, measured at every
  op boundary through a ``TorchDispatchMode``. It sees every tensor an op returns (including the
  autograd graph's saved tensors and the gradients) but not the scratch an op allocates and frees
  inside itself, nor allocator overhead: a lower bound of the process's extra memory, comparable
  between the twins.
- :func:`estimate_training_bytes`: what a training step of an MLP needs, from its shapes alone,
  so that a twin too big for the machine is skipped instead of crashing the run.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.multiprocessing.reductions import StorageWeakRef  # stable since torch 1.x

# Per weight of a masked layer in an SGD-momentum step: the weight, its mask (bool), the
# momentum buffer, the gradient, the product weight * mask kept for backward and its gradient.
MASKED_BYTES_PER_WEIGHT = 4 + 1 + 4 + 4 + 4 + 4
# Per nonzero of a CSR layer (float32 values, int32 indices): values, gradient, momentum, column
# index, and the cached transpose's column index and permutation.
CSR_BYTES_PER_NONZERO = 4 + 4 + 4 + 4 + 4 + 4


def _storage_key(t: Tensor) -> Tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def state_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries are skipped)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            ptr, nbytes = _storage_key(t)
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers of ``model``, and the topology tensors of its sparse layers
    (indices and their cached transpose, which are not buffers)."""
    topology = [t for m in model.modules() if hasattr(m, "topology_tensors")
                for t in m.topology_tensors()]
    return state_bytes(list(model.parameters()) + list(model.buffers()) + topology)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's state tensors (e.g. momentum buffers)."""
    return state_bytes(tree_leaves([dict(s) for s in optimizer.state.values()]))


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the ``with`` block and alive at once.

    Storages that existed before the block (parameters, optimizer state) are not counted: add
    :func:`state_bytes` of those for the total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {_storage_key(t)[0] for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue  # a view or in-place result, or already counted
            self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def layer_shapes(sizes: Sequence[int]) -> list:
    """``(out, in)`` of the linear layers of an MLP with layer widths ``sizes``."""
    return [(o, i) for i, o in zip(sizes[:-1], sizes[1:])]


def estimate_training_bytes(sizes: Sequence[int], nnz: Optional[Sequence[int]], batch: int,
                            masked: bool) -> int:
    """Bytes an SGD-momentum training step of the MLP with widths ``sizes`` needs: the weights
    and their per-weight state (:data:`MASKED_BYTES_PER_WEIGHT` for the masked twin, or
    :data:`CSR_BYTES_PER_NONZERO` per nonzero given in ``nnz``), biases with gradient and
    momentum, row pointers, and float32 activations with their gradients and ReLU masks
    (about 4 copies of every layer's activations, batch-major and transposed)."""
    shapes = layer_shapes(sizes)
    if masked:
        weights = sum(o * i for o, i in shapes) * MASKED_BYTES_PER_WEIGHT
    else:
        if nnz is None or len(nnz) != len(shapes):
            raise ValueError("estimate_training_bytes: nnz per layer is needed for the CSR twin")
        weights = sum(k * CSR_BYTES_PER_NONZERO + 4 * (o + i + 2) for k, (o, i) in
                      zip(nnz, shapes))
    biases = sum(o for o, _ in shapes) * 12
    activations = 4 * 4 * batch * sum(sizes)
    return weights + biases + activations


def available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
