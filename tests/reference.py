"""Slow, obviously correct dense references for the sparse kernels."""
import torch

from torch_nerva import CSRLayout


def random_layout(n_rows, n_cols, density, gen, index_dtype=torch.int64, empty_rows=0,
                  empty_cols=0):
    """A random CSR pattern with some rows and columns forced empty."""
    mask = torch.rand(n_rows, n_cols, generator=gen) < density
    if empty_rows and n_rows:
        mask[torch.randperm(n_rows, generator=gen)[:empty_rows]] = False
    if empty_cols and n_cols:
        mask[:, torch.randperm(n_cols, generator=gen)[:empty_cols]] = False
    return CSRLayout.from_mask(mask, index_dtype), mask


def dense(layout, values):
    w = torch.zeros(layout.shape[0] * layout.shape[1], dtype=values.dtype)
    w[layout.positions()] = values
    return w.view(layout.shape)
