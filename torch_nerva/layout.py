"""The CSR topology of a sparse (out x in) weight: construction, validation, transpose.

Nothing here allocates an ``out x in`` dense tensor unless the caller passes one (a mask or a
dense weight) or asks for one (:meth:`CSRLayout.to_mask`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops

_INT32_MAX = 2**31 - 1
# Below this many positions, sample a random topology with randperm (8 bytes per position);
# above it, draw candidates with replacement and deduplicate (memory ~ nnz, not out x in).
_RANDPERM_LIMIT = 1 << 22


def index_dtype_for(n_rows: int, n_cols: int, nnz: int) -> torch.dtype:
    """int32 when every index and the nnz count fit in int32 (half the bytes), else int64."""
    return torch.int32 if max(n_rows, n_cols, nnz) <= _INT32_MAX else torch.int64


def check_density(density) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise TypeError(f"density must be a number in [0, 1], got {density!r}") from None
    if not 0.0 <= d <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return d


def _check_index_dtype(index_dtype):
    if index_dtype not in (None, torch.int32, torch.int64):
        raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")


def _random_positions(n_total: int, nnz: int, generator: Optional[torch.Generator]) -> Tensor:
    """``nnz`` distinct positions in ``[0, n_total)``, uniform over all such subsets, sorted."""
    if nnz == 0:
        return torch.empty(0, dtype=torch.long)
    if n_total <= _RANDPERM_LIMIT or nnz > n_total // 2:
        return torch.randperm(n_total, generator=generator)[:nnz].sort().values
    # Draw i.i.d. candidates until there are enough distinct ones, then keep a uniformly random
    # subset of exactly nnz. By exchangeability the result is uniform over nnz-subsets.
    found = torch.empty(0, dtype=torch.long)
    while found.numel() < nnz:
        need = nnz - found.numel()
        draw = torch.randint(0, n_total, (need + need // 8 + 16,), generator=generator)
        found = torch.unique(torch.cat([found, draw]))
    keep = torch.randperm(found.numel(), generator=generator)[:nnz]
    return found[keep].sort().values


# Rows per step when building a row pointer: bounds the temporary int64 counts.
_CROW_STEP = 1 << 22


def _row_pointer(rows: Tensor, n_rows: int, index_dtype: torch.dtype) -> Tensor:
    """CSR row pointer (n_rows + 1, ``index_dtype``) of sorted int64 row indices, built in steps
    of rows so that no temporary of n_rows int64 entries exists (the result is the only
    n_rows-sized tensor: a layer of 10^9 rows needs 4 GB for it with int32, not 3x that)."""
    crow = torch.empty(n_rows + 1, dtype=index_dtype)
    crow[0] = 0
    if n_rows == 0:
        return crow
    edges = torch.arange(0, n_rows + _CROW_STEP, _CROW_STEP).clamp_max_(n_rows)
    bounds = torch.searchsorted(rows, edges).tolist()
    done = 0
    for i in range(len(edges) - 1):
        a, b = int(edges[i]), int(edges[i + 1])
        if a >= b:
            break
        counts = torch.bincount(rows[bounds[i]:bounds[i + 1]] - a, minlength=b - a)
        part = torch.cumsum(counts, 0)
        part += done
        crow[a + 1:b + 1] = part
        done = int(part[-1])
    return crow


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    """``torch.sparse_csr_tensor`` over validated indices, without torch's beta warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


@dataclass(frozen=True)
class CSRLayout:
    """Sorted, duplicate-free CSR topology of an (n_rows x n_cols) matrix: ``crow``, ``col``."""

    crow: Tensor
    col: Tensor
    shape: Tuple[int, int]

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_positions(cls, positions: Tensor, shape, index_dtype=None) -> "CSRLayout":
        """From flat row-major positions ``row * n_cols + col`` (an integer tensor), strictly
        increasing (sorted, no duplicates) and in ``[0, n_rows * n_cols)``: checked, O(nnz)."""
        n_rows, n_cols = int(shape[0]), int(shape[1])
        if n_rows < 0 or n_cols < 0:
            raise ValueError(f"shape must be non-negative, got {(n_rows, n_cols)}")
        _check_index_dtype(index_dtype)
        if not isinstance(positions, Tensor) or positions.dim() != 1 or \
                positions.is_floating_point() or positions.is_complex() or \
                positions.dtype == torch.bool:
            raise TypeError("positions must be a 1-D integer tensor, got "
                            + (f"{positions.dtype} of shape {tuple(positions.shape)}"
                               if isinstance(positions, Tensor) else type(positions).__name__))
        positions = positions.to(torch.long)
        nnz = positions.numel()
        if nnz:
            if int(positions[0]) < 0 or int(positions[-1]) >= n_rows * n_cols:
                bad = positions[(positions < 0) | (positions >= n_rows * n_cols)]
                raise ValueError(f"position {int(bad[0]) if bad.numel() else int(positions[0])} "
                                 f"is outside a {n_rows} x {n_cols} layout")
            steps = positions[1:] <= positions[:-1]
            if bool(steps.any()):
                i = int(steps.nonzero()[0]) + 1
                what = "duplicate" if positions[i] == positions[i - 1] else "unsorted"
                raise ValueError(f"positions must be strictly increasing: {what} position "
                                 f"{int(positions[i])} at index {i} after "
                                 f"{int(positions[i - 1])}")
        index_dtype = index_dtype or index_dtype_for(n_rows, n_cols, nnz)
        if index_dtype == torch.int32 and max(n_rows, n_cols, nnz) > _INT32_MAX:
            raise ValueError(f"a {n_rows} x {n_cols} layout with {nnz} nonzeros does not fit "
                             "int32 indices; use index_dtype=torch.int64")
        if n_cols == 0:
            rows = cols = positions
        else:
            rows = torch.div(positions, n_cols, rounding_mode="floor")
            cols = positions - rows * n_cols
        return cls(_row_pointer(rows, n_rows, index_dtype), cols.to(index_dtype), (n_rows, n_cols))

    @classmethod
    def random(cls, n_rows: int, n_cols: int, nnz: int, *,
               generator: Optional[torch.Generator] = None, index_dtype=None) -> "CSRLayout":
        """Exactly ``nnz`` nonzeros at uniformly random distinct positions (Erdos-Renyi)."""
        n_total = n_rows * n_cols
        if not 0 <= nnz <= n_total:
            raise ValueError(f"nnz must be in [0, {n_total}] for a {n_rows} x {n_cols} layout, "
                             f"got {nnz}")
        return cls.from_positions(_random_positions(n_total, nnz, generator), (n_rows, n_cols),
                                  index_dtype)

    @classmethod
    def from_mask(cls, mask: Tensor, index_dtype=None) -> "CSRLayout":
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D (out_features x in_features), got shape "
                             f"{tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("a floating-point mask must contain only 0 and 1")
        positions = torch.flatten(mask.detach().cpu() != 0).nonzero().flatten()
        return cls.from_positions(positions, tuple(mask.shape), index_dtype)

    @classmethod
    def from_tensors(cls, crow: Tensor, col: Tensor, shape) -> "CSRLayout":
        """From user data: validated (sorted, no duplicates, indices in range)."""
        layout = cls(crow, col, (int(shape[0]), int(shape[1])))
        layout.validate()
        return layout

    # -- queries --------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.col.numel()

    def validate(self) -> "CSRLayout":
        """Raise a clear error if this is not a sorted, duplicate-free CSR of ``shape``."""
        for name, t in (("crow", self.crow), ("col", self.col)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if self.crow.dtype != self.col.dtype:
            raise TypeError(f"crow and col must have one index dtype, got {self.crow.dtype} and "
                            f"{self.col.dtype}")
        ops.csr_check(self.crow.cpu(), self.col.cpu(), self.shape[0], self.shape[1])
        return self

    def row_indices(self) -> Tensor:
        counts = (self.crow[1:] - self.crow[:-1]).to(torch.long)
        # output_size: no device synchronisation to size the result (and meta tensors work)
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), counts,
                                       output_size=self.col.numel())

    def positions(self) -> Tensor:
        """Flat row-major positions ``row * n_cols + col`` (int64), sorted."""
        return self.row_indices() * self.shape[1] + self.col.to(torch.long)

    def transpose(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(crow_t, col_t, perm)``: the CSR of W^T with ``values_t = values[perm]``."""
        return ops.csr_transpose(self.crow, self.col, self.shape[1])

    def to_mask(self) -> Tensor:
        mask = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.col.device)
        mask[self.positions()] = True
        return mask.view(self.shape)
