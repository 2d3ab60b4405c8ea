"""Sparse 2-D convolution (torch_nerva.ops.sparse_conv2d) against dense F.conv2d (oneDNN).

    python benchmarks/conv.py --densities 0.05 0.01 --batch 64 --reps 10 --threads 2

The 3x3 (padding 1) layers of a ResNet-18 for CIFAR: 64->64 at 32x32, 128->128 at 16x16,
256->256 at 8x8, 512->512 at 4x4. Per layer and density (random uniform pattern), the forward
and the forward + backward (dX, dW / dvalues; no bias) of both are timed interleaved in one
process (harness.time_interleaved), medians over --reps rounds; ratio = sparse / dense time
(< 1: sparse is faster). Also timed in the same rounds: the masked twin (``weight * mask`` in
every call, as MaskedConv2d; its ratio is sparse / masked) and, when PyPI ``sparseprop`` is
installed, SparseProp's sparse conv (the faster of its two vectorisation orders; its ratio is
SparseProp / dense). A measurement, not a test.
"""
from __future__ import annotations

import argparse
import platform
from typing import List, Optional

import torch
import torch.nn.functional as F

from torch_nerva import ops
from torch_nerva.compare.harness import (cpu_model, quartiles, restored_threads,
                                         time_interleaved)

LAYERS = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, height = width)


def layer_calls(channels: int, size: int, density: float, batch: int, gen: torch.Generator):
    n_cols = channels * 9
    mask = torch.rand(channels, n_cols, generator=gen) < density
    w = torch.randn(channels, n_cols, generator=gen) * mask
    crow = torch.zeros(channels + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1].to(torch.int32)
    values = w[mask].clone().requires_grad_()
    crow_t, col_t, perm = ops.csr_transpose(crow, col, n_cols)
    weight = w.view(channels, channels, 3, 3).clone().requires_grad_()
    x = torch.randn(batch, channels, size, size, generator=gen, requires_grad=True)
    g = torch.randn(batch, channels, size, size, generator=gen)

    def dense_fwd():
        with torch.no_grad():
            F.conv2d(x, weight, None, 1, 1)

    def sparse_fwd():
        with torch.no_grad():
            ops.sparse_conv2d(x, values, None, crow, col, crow_t, col_t, perm, 3, 1, 1)

    def dense_fb():
        x.grad = weight.grad = None
        F.conv2d(x, weight, None, 1, 1).backward(g)

    mask4 = mask.view(weight.shape)
    masked_weight = weight.detach().clone().requires_grad_()

    def masked_fwd():  # the masked twin: weight * mask in every call (MaskedConv2d)
        with torch.no_grad():
            F.conv2d(x, masked_weight * mask4, None, 1, 1)

    def masked_fb():
        x.grad = masked_weight.grad = None
        F.conv2d(x, masked_weight * mask4, None, 1, 1).backward(g)

    def sparse_fb():
        x.grad = values.grad = None
        ops.sparse_conv2d(x, values, None, crow, col, crow_t, col_t, perm, 3, 1, 1).backward(g)

    # the two agree (float32): a benchmark of a wrong result is no benchmark
    y_ref = F.conv2d(x.detach(), weight.detach(), None, 1, 1)
    with torch.no_grad():
        y = ops.sparse_conv2d(x, values, None, crow, col, crow_t, col_t, perm, 3, 1, 1)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    calls = dict(dense_fwd=dense_fwd, sparse_fwd=sparse_fwd, dense_fb=dense_fb,
                 sparse_fb=sparse_fb, masked_fwd=masked_fwd, masked_fb=masked_fb)
    calls.update(sparseprop_calls(weight.detach(), x, g, y_ref))
    return int(mask.sum()), calls


def sparseprop_calls(weight, x, g, y_ref):
    """SparseProp's sparse conv (PyPI ``sparseprop``; float32, square kernels), both of its
    vectorisation orders (its own ``sparsify_conv2d_auto`` times them and keeps the faster one;
    here both are timed and the faster is reported). Empty when it is not installed."""
    try:
        from sparseprop.modules.conv2d import SparseConv2d as SPConv
    except ImportError:
        return {}
    calls = {}
    for over_on in (False, True):
        conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(weight)
        sp = SPConv.from_dense(conv, vectorizing_over_on=over_on)
        tag = "on" if over_on else "off"
        with torch.no_grad():
            y_sp = sp(x.detach())
        if not torch.allclose(y_sp, y_ref, rtol=1e-4, atol=1e-4):
            # (seen at batch 2: a wrong result is not timed)
            print(f"# SparseProp (vectorising over {tag}) gives a wrong result at this shape: "
                  f"max error {(y_sp - y_ref).abs().max().item():.3g}; not timed")
            continue

        def fwd(sp=sp):
            with torch.no_grad():
                sp(x)

        def fb(sp=sp):
            x.grad = sp.W_val.grad = None
            sp(x).backward(g)

        calls[f"sparseprop_{tag}_fwd"] = fwd
        calls[f"sparseprop_{tag}_fb"] = fb
    return calls


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.01])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, nargs="*", default=None,
                   help="channel counts of the layers to run (default: all four)")
    args = p.parse_args(argv)
    with restored_threads(args.threads):
        print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, "
              f"ISA {ops.kernel_isa()}, CPU {cpu_model() or platform.processor()}, "
              f"batch {args.batch}, reps {args.reps} (medians, ms)")
        header = (f"{'layer':>16} {'density':>7} {'nnz':>8} | {'dense fwd':>9} {'sparse fwd':>10} "
                  f"{'ratio':>6} | {'dense f+b':>9} {'sparse f+b':>10} {'ratio':>6} | "
                  f"{'masked f+b':>10} {'ratio':>6} | {'SparseProp f+b':>14} {'ratio':>6}")
        print(header)
        gen = torch.Generator().manual_seed(0)
        for channels, size in LAYERS:
            if args.layers and channels not in args.layers:
                continue
            for density in args.densities:
                nnz, calls = layer_calls(channels, size, density, args.batch, gen)
                times, errors = time_interleaved(calls, args.reps)
                med = {k: quartiles(v)[1] * 1e3 for k, v in times.items()}
                for k, e in errors.items():
                    print(f"# {k} failed: {e!r}")
                name = f"{channels}->{channels} {size}x{size}"
                sp = [med[k] for k in ("sparseprop_off_fb", "sparseprop_on_fb") if k in med]
                sp_text = (f"{min(sp):>14.2f} {min(sp) / med['dense_fb']:>6.2f}" if sp
                           else f"{'not installed':>14} {'':>6}")
                print(f"{name:>16} {density:>7.3f} {nnz:>8} | {med['dense_fwd']:>9.2f} "
                      f"{med['sparse_fwd']:>10.2f} {med['sparse_fwd'] / med['dense_fwd']:>6.2f} | "
                      f"{med['dense_fb']:>9.2f} {med['sparse_fb']:>10.2f} "
                      f"{med['sparse_fb'] / med['dense_fb']:>6.2f} | {med['masked_fb']:>10.2f} "
                      f"{med['sparse_fb'] / med['masked_fb']:>6.2f} | {sp_text}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
