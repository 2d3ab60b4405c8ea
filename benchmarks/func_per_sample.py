"""Per-sample gradients (the DP-SGD / Opacus recipe, ``vmap(grad(loss), in_dims=(None, 0, 0))``)
of a sparse MLP, against a loop of eager backward calls one sample at a time and against the
same recipe on the dense model; and, for one layer, the two ways the per-sample value gradient
can be computed (row gathers, what the vmap rule uses for one-row samples, vs the SDDMM kernel
on the block-diagonal layout). Results are checked before they are timed.

    python benchmarks/func_per_sample.py --threads 1 --batch 64 --densities 0.01 0.1
"""
import argparse
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import torch_nerva
from torch_nerva import ops


def median_ms(f, reps):
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[784, 1024, 10])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, sizes = args.batch, args.sizes
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (B,), generator=gen)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {B}, MLP {sizes}")
    for density in args.densities:
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + [nn.ReLU()] * (i < len(sizes) - 2)
        model = torch_nerva.sparsify(nn.Sequential(*layers), density, backend="native",
                                     generator=torch.Generator().manual_seed(1))
        dense = torch_nerva.densify(model)

        def recipe(m):
            def loss(p, xs, ts):  # one sample, as a batch of one
                out = functional_call(m, p, (xs.unsqueeze(0),))
                return nn.functional.cross_entropy(out, ts.unsqueeze(0))
            params = {n: p.detach() for n, p in m.named_parameters()}
            return lambda: vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

        def loop():
            grads = {n: [] for n, _ in model.named_parameters()}
            for i in range(B):
                model.zero_grad()
                nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
                for n, p in model.named_parameters():
                    grads[n].append(p.grad.clone())
            return {n: torch.stack(g) for n, g in grads.items()}

        sparse_fn = recipe(model)
        got, want = sparse_fn(), loop()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
        nnz = sum(m.nnz for m in model.modules() if isinstance(m, torch_nerva.SparseLinear))
        print(f"density {density} (nnz {nnz}): sparse vmap(grad) "
              f"{median_ms(sparse_fn, args.reps):.1f} ms | eager loop "
              f"{median_ms(loop, args.reps):.1f} ms | dense vmap(grad) "
              f"{median_ms(recipe(dense), args.reps):.1f} ms")

        layer = model[0]
        g_out = torch.randn(B, 1, layer.out_features, generator=gen)
        x_in = torch.randn(B, 1, layer.in_features, generator=gen)
        crow, col = layer.crow_indices, layer.col_indices

        def gathers():
            return vmap(lambda g, a: ops.csr_sddmm(g, a, crow, col))(g_out, x_in)

        def block_kernel():
            crow_b, col_b, _ = ops.block_diagonal_layout(B, crow, col, layer.in_features)
            return ops.csr_sddmm(ops.side_by_side(g_out, 0, B), ops.side_by_side(x_in, 0, B),
                                 crow_b, col_b).view(B, -1)

        torch.testing.assert_close(gathers(), block_kernel(), rtol=1e-5, atol=1e-6)
        print(f"  per-sample dvalues, {layer.out_features}x{layer.in_features} layer, nnz "
              f"{layer.nnz}: row gathers {median_ms(gathers, 3 * args.reps):.2f} ms | SDDMM "
              f"on the block-diagonal layout {median_ms(block_kernel, 3 * args.reps):.2f} ms")


if __name__ == "__main__":
    main()
