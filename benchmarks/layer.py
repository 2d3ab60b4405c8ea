"""Time one layer, forward+backward, SparseLinear against its MaskedLinear twin in one process.

    python benchmarks/layer.py --in 3072 --out 1024 --batch 100 --densities 0.1 0.01 0.001

Prints, per density, the median time per forward+backward of each method and the ratio to the
masked layer (lower is better), interleaving the methods in every repetition so that machine
noise hits all of them alike. Each method is first checked against the masked twin.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import torch_nerva as tn


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def step(layer, x, grad):
    y = layer(x)
    y.backward(grad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--in", dest="in_f", type=int, default=3072)
    p.add_argument("--out", dest="out_f", type=int, default=1024)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--input-grad", action="store_true", help="also compute dX (hidden layers)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}")
    print(f"# layer {args.in_f}->{args.out_f}, batch {args.batch}, forward+backward "
          f"(dX {'on' if args.input_grad else 'off'}), median of {args.reps}")
    print(f"{'density':>8} {'nnz':>9} {'masked ms':>10} {'native ms':>10} {'torch ms':>10} "
          f"{'native/masked':>14} {'torch/masked':>13}")
    for density in args.densities:
        g = torch.Generator().manual_seed(0)
        sparse = tn.SparseLinear(args.in_f, args.out_f, density=density, generator=g)
        masked = tn.to_masked(sparse)
        torch_sparse = tn.to_sparse(masked, backend="torch")
        x = torch.randn(args.batch, args.in_f, requires_grad=args.input_grad)
        grad = torch.randn(args.batch, args.out_f)
        methods = {"masked": masked, "native": sparse, "torch": torch_sparse}
        ref = masked(x)
        for name, layer in methods.items():
            torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4, msg=name)
        times = {name: [] for name in methods}
        for _ in range(3):
            for layer in methods.values():
                step(layer, x, grad)
        for _ in range(args.reps):
            for name, layer in methods.items():
                layer.zero_grad(set_to_none=True)
                x.grad = None
                t0 = time.perf_counter()
                step(layer, x, grad)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{density:>8g} {sparse.nnz:>9} {med['masked']:>10.3f} {med['native']:>10.3f} "
              f"{med['torch']:>10.3f} {med['native'] / med['masked']:>14.3f} "
              f"{med['torch'] / med['masked']:>13.3f}")


if __name__ == "__main__":
    main()
