"""Slow, obviously correct dense references for the sparse kernels, and shared test helpers."""
import gc

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torch_nerva import CSRLayout


class OpLog(TorchDispatchMode):
    """Records every op that runs inside it: (name, args, output)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), args, out))
        return out


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


def assert_twins_train_alike(sparse, masked, make_opt, steps=20, device="cpu"):
    """Train a SparseLinear model and its masked twin on the same random batches (16 x 24
    inputs, 5 classes) and check their losses agree at every step."""
    g = torch.Generator().manual_seed(1)
    opts = [make_opt(sparse.parameters()), make_opt(masked.parameters())]
    for _ in range(steps):
        x = torch.randn(16, 24, generator=g).to(device)
        y = torch.randint(0, 5, (16,), generator=g).to(device)
        losses = []
        for model, opt in zip((sparse, masked), opts):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


def end_process_group():
    """Orderly end of a test's torch.distributed worker: collect the objects the caller
    released (DDP's reducer holds the process group), wait for every rank, then destroy."""
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
