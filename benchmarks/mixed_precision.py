"""One SparseLinear layer in float32, bfloat16 and float16 (native backend), one process.

    python benchmarks/mixed_precision.py --threads 2

Layer 3072 -> 1024 with bias, batch 100, at densities 0.001, 0.01 and 0.1 (uniform random
topology, the same for every dtype). Timed: a training pass of a hidden layer, i.e. forward and
backward with the input gradient (dX), the values gradient and the bias gradient; gradients are
reset untimed before each pass. The three dtypes of a density are timed interleaved
(harness.time_interleaved: rotated order, bursts whose first call is untimed), R repetitions;
the table gives median and 90th percentile per dtype and the ratio of medians to float32 (< 1:
faster than float32). Each dtype is first checked against float64 math on the same inputs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

import torch_nerva as tn
from torch_nerva.compare.harness import (environment, field, restored_threads,
                                         time_interleaved, write_results)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
FIELDS = ["density", "nnz", "dtype", "median_ms", "p90_ms", "ratio_to_f32", "max_rel_err",
          "isa", "threads"]


def p90(times: List[float]) -> float:
    return statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 \
        else times[0]


def make_pass(layer: tn.SparseLinear, x: torch.Tensor, g: torch.Tensor
              ) -> Dict[str, Callable[[], Any]]:
    """(setup, timed call) of one training pass of ``layer``."""
    x = x.detach().requires_grad_(True)

    def reset():
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    def step():
        layer(x).backward(g)
    return {"setup": reset, "call": step}


def check(layer: tn.SparseLinear, x: torch.Tensor) -> float:
    """Largest |y - y64| / max|y64| of the forward against float64 math on the same inputs."""
    with torch.no_grad():
        y = layer(x).double()
        w = layer.dense_weight().double()
        ref = x.double() @ w.t() + layer.bias.double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run_density(density: float, args: argparse.Namespace) -> List[Dict[str, Any]]:
    base = tn.SparseLinear(args.in_features, args.out_features, density=density,
                           backend="native", generator=torch.Generator().manual_seed(args.seed))
    gen = torch.Generator().manual_seed(args.seed + 1)
    x32 = torch.randn(args.batch, args.in_features, generator=gen)
    g32 = torch.randn(args.batch, args.out_features, generator=gen)
    calls, setups, errors = {}, {}, {}
    for name, dtype in DTYPES.items():
        layer = copy.deepcopy(base).to(dtype)  # (Module.to converts in place)
        x, g = x32.to(dtype), g32.to(dtype)
        errors[name] = check(layer, x)
        fns = make_pass(layer, x, g)
        calls[name], setups[name] = fns["call"], fns["setup"]
    times, failed = time_interleaved(calls, args.reps, setup=setups, burst=args.burst)
    if failed:
        raise next(iter(failed.values()))
    f32 = statistics.median(times["f32"])
    rows = []
    for name in DTYPES:
        med = statistics.median(times[name])
        rows.append(dict(density=density, nnz=base.nnz, dtype=name, median_ms=1e3 * med,
                         p90_ms=1e3 * p90(times[name]), ratio_to_f32=med / f32,
                         max_rel_err=errors[name], isa=tn.ops.kernel_isa(),
                         threads=torch.get_num_threads()))
    return rows


HEADER = (f"{'density':>8} {'nnz':>8} {'dtype':>5} {'median ms':>10} {'p90 ms':>9} "
          f"{'/ f32':>7} {'max rel err':>12}")


def format_row(row: Dict[str, Any]) -> str:
    return (f"{row['density']:>8g} {row['nnz']:>8} {row['dtype']:>5} "
            f"{field(row, 'median_ms', '.3f'):>10} {field(row, 'p90_ms', '.3f'):>9} "
            f"{field(row, 'ratio_to_f32', '.3f'):>7} {field(row, 'max_rel_err', '.2e'):>12}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    p.add_argument("--in-features", type=int, default=3072)
    p.add_argument("--out-features", type=int, default=1024)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--reps", type=int, default=60, help="timed passes per dtype and density")
    p.add_argument("--burst", type=int, default=3,
                   help="passes per dtype per turn, the first untimed (warm caches)")
    p.add_argument("--threads", type=int, help="default: torch's current")
    p.add_argument("--isa", choices=["avx512", "avx2", "base"],
                   help="kernel instruction set (default: the best this CPU supports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/mixed_precision"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the benchmark; prints the table and writes mixed_precision.csv and .json."""
    args = parse_args(argv)
    old_isa = tn.ops.kernel_isa()
    try:
        if args.isa:
            tn.ops.kernel_isa(args.isa)
        with restored_threads(args.threads):
            meta = environment(vars(args))
            print(f"# SparseLinear {args.in_features} -> {args.out_features}, batch {args.batch},"
                  f" forward + backward (dX, dvalues, dbias), native backend; "
                  f"{torch.get_num_threads()} threads, ISA {tn.ops.kernel_isa()}, "
                  f"{meta['cpu_model']}; {args.reps} interleaved reps (bursts of {args.burst}, "
                  f"first untimed)")
            print(HEADER)
            rows = []
            for density in args.densities:
                for row in run_density(density, args):
                    rows.append(row)
                    print(format_row(row))
    finally:
        tn.ops.kernel_isa(old_isa)
    paths = write_results(args.out, "mixed_precision", rows, meta, fields=FIELDS)
    print(f"# wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
