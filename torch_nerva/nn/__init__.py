"""Sparse layers: :class:`SparseLinear` (truly sparse, CSR) and its masked twin
:class:`MaskedLinear` (``linear.py``); attention built on them (``attention.py``)."""
from .linear import MaskedLinear, SparseLinear
from .attention import SparseMultiheadAttention
from .chain import FusedSequential, fuse_for_inference

__all__ = ["SparseLinear", "MaskedLinear", "SparseMultiheadAttention", "FusedSequential",
           "fuse_for_inference"]
