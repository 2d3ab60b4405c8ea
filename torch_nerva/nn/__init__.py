"""Sparse layers: :class:`SparseLinear` (truly sparse, CSR) and its masked twin
:class:`MaskedLinear` (``linear.py``); attention built on them (``attention.py``)."""
from .linear import MaskedLinear, SparseLinear

__all__ = ["SparseLinear", "MaskedLinear"]
