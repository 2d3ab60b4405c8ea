"""Whole-model training step: the paper MLP, SparseLinear against its masked twin, one process.

    python benchmarks/mlp_step.py --reps 30

MLP 3072-1024-512-10 with ReLU, sparsified with Erdos-Renyi at each density, and its masked
twin (to_masked: bit-identical weights). On a synthetic, seeded CIFAR-shaped batch (100 x 3072,
10 classes) one training step (forward, cross-entropy, backward, SGD momentum 0.9 Nesterov
step, zero_grad) is timed for each twin, interleaved, median over R repetitions after warm-up;
then a batch-1 forward (eval, no grad). speedup = masked time / CSR time (higher is better).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import torch_nerva as tn
from torch_nerva.compare.harness import (environment, failure_status, field, quartiles,
                                         restored_threads, time_interleaved, write_results)

IN_FEATURES, CLASSES = 3072, 10
FIELDS = ["density", "nnz", "masked_ms", "csr_ms", "speedup", "masked_b1_us", "csr_b1_us",
          "b1_speedup", "backends", "status", "note"]


def mlp(hidden: List[int]) -> nn.Sequential:
    """IN_FEATURES -> hidden... -> CLASSES with ReLU between the linear layers."""
    sizes = [IN_FEATURES] + list(hidden) + [CLASSES]
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def layer_backends(model: nn.Module) -> str:
    """Each SparseLinear's ``backend`` (and what it resolves to), in model order."""
    return " ".join(f"{m.backend}->{m.resolved_backend}" if hasattr(m, "resolved_backend")
                    else m.backend for m in model.modules() if isinstance(m, tn.SparseLinear))


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float):
    """One training step of ``model`` on (x, y) as a function of no arguments."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return step


def infer_fn(model: nn.Module, x: torch.Tensor):
    """A no-grad forward of ``model`` on x as a function of no arguments."""
    def infer():
        with torch.no_grad():
            model(x)
    return infer


def medians(calls: Dict[str, Any], reps: int, scale: float, burst: int) -> Dict[str, float]:
    """Median time of each call (times ``scale``); raises the first error."""
    times, errors = time_interleaved(calls, reps, burst=burst)
    if errors:
        raise next(iter(errors.values()))
    return {name: quartiles(t)[1] * scale for name, t in times.items()}


def run_density(density: float, args: argparse.Namespace) -> Dict[str, Any]:
    """The row of one density."""
    row: Dict[str, Any] = dict(density=density, status="ok", note="")
    try:
        sparse = tn.sparsify(mlp(args.hidden), density, distribution="er",
                             generator=torch.Generator().manual_seed(args.seed))
        masked = tn.to_masked(sparse)
        row.update(nnz=sum(m.nnz for m in sparse.modules() if isinstance(m, tn.SparseLinear)),
                   backends=layer_backends(sparse))
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.batch, IN_FEATURES, generator=gen)
        y = torch.randint(CLASSES, (args.batch,), generator=gen)
        with torch.no_grad():
            try:
                torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-4)
            except AssertionError as e:
                row.update(status="mismatch", note=str(e)[:200].replace("\n", " "))
                return row
        train = medians({"masked": step_fn(masked, x, y, args.lr),
                         "csr": step_fn(sparse, x, y, args.lr)}, args.reps, 1e3, args.burst)
        masked.eval()
        sparse.eval()
        infer = medians({"masked": infer_fn(masked, x[:1]), "csr": infer_fn(sparse, x[:1])},
                        args.infer_reps, 1e6, args.burst)
    except Exception as e:  # recorded, not fatal
        row.update(status=failure_status(e), note=repr(e)[:200].replace("\n", " "))
        return row
    row.update(masked_ms=train["masked"], csr_ms=train["csr"],
               speedup=train["masked"] / train["csr"], masked_b1_us=infer["masked"],
               csr_b1_us=infer["csr"], b1_speedup=infer["masked"] / infer["csr"])
    return row


def format_row(row: Dict[str, Any]) -> str:
    """One printed table line (see :data:`HEADER`)."""
    return (f"{row['density']:>8g} {row.get('nnz', ''):>9} {field(row, 'masked_ms', '.3f'):>10} "
            f"{field(row, 'csr_ms', '.3f'):>10} {field(row, 'speedup', '.2f'):>8} "
            f"{field(row, 'masked_b1_us', '.1f'):>10} {field(row, 'csr_b1_us', '.1f'):>10} "
            f"{field(row, 'b1_speedup', '.2f'):>8}  {row['status']:<6} {row.get('backends', '')}")


HEADER = (f"{'density':>8} {'nnz':>9} {'masked ms':>10} {'csr ms':>10} {'speedup':>8} "
          f"{'b1 mask us':>10} {'b1 csr us':>10} {'b1 spdup':>8}  {'status':<6} backends")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--densities", type=float, nargs="+",
                   default=[1, 0.5, 0.2, 0.1, 0.05, 0.01, 0.005, 0.001])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--reps", type=int, default=30, help="timed training steps per twin")
    p.add_argument("--infer-reps", type=int, default=200, help="timed batch-1 forwards per twin")
    p.add_argument("--threads", type=int, help="default: torch's current")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burst", type=int, default=4,
                   help="steps per twin per turn; the first of each is untimed (warm caches, "
                        "as in a loop training one model); 1 times steps right after the other "
                        "twin's")
    p.add_argument("--out", type=Path, default=Path("results/mlp_step"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the benchmark; prints the table and writes mlp_step.csv and mlp_step.json."""
    args = parse_args(argv)
    with restored_threads(args.threads):
        print(f"# MLP {'-'.join(map(str, [IN_FEATURES, *args.hidden, CLASSES]))}, ER, batch "
              f"{args.batch}, {torch.get_num_threads()} threads; median of {args.reps} "
              f"interleaved steps (bursts of {args.burst}, first untimed), {args.infer_reps} "
              f"batch-1 forwards; speedup = masked / CSR")
        print(HEADER)
        rows = []
        for density in args.densities:
            rows.append(run_density(density, args))
            print(format_row(rows[-1]))
        meta = environment(vars(args))
    paths = write_results(args.out, "mlp_step", rows, meta, fields=FIELDS)
    print(f"# wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
