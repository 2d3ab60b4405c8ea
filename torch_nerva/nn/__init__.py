"""Sparse layers. ``_sparse.py``: :class:`SparseWeightModule`, the core every truly sparse layer
type shares (values, CSR topology and its caches, state dict, topology replacement);
``linear.py``: :class:`SparseLinear` on it and its masked twin :class:`MaskedLinear`;
``conv.py``: :class:`SparseConv2d` and :class:`MaskedConv2d`; ``attention.py``: attention built
on them; ``chain.py``: fused inference. A new layer type is a new file with a subclass of
SparseWeightModule."""
from ._sparse import SparseWeightModule
from .linear import MaskedLinear, SparseLinear
from .conv import MaskedConv2d, SparseConv2d
from .attention import SparseMultiheadAttention
from .chain import FusedSequential, fuse_for_inference

__all__ = ["SparseWeightModule", "SparseLinear", "MaskedLinear", "SparseConv2d", "MaskedConv2d",
           "SparseMultiheadAttention", "FusedSequential", "fuse_for_inference"]
