"""Cost of one dynamic-sparse-training topology update, CSR against its masked twin.

    python benchmarks/dst_update.py --reps 7

The paper MLP 3072-1024-512-10 (ER) at each density and its masked twin. For each method
(SET: SET drop + random growth; RigL: magnitude drop + gradient growth, including its extra
forward/backward on one batch; momentum: magnitude drop + growth by the gradient momentum of
``--window`` recorded training steps) one ``torch_nerva.dst.prune_and_regrow`` of the whole
model is timed, CSR and masked interleaved, median over R updates (each update changes the
topology, nnz stays fixed). A CSR training step (SGD Nesterov) is timed alongside, so that
``overhead_per_100`` = update / (100 steps) is the cost of updating every 100 steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

import torch_nerva as tn
from torch_nerva.compare.harness import (environment, failure_status, field, quartiles,
                                         restored_threads, time_interleaved, write_results)
from mlp_step import CLASSES, IN_FEATURES, mlp, step_fn
from torch_nerva import dst

METHODS = {"set": ("set", "random"), "rigl": ("magnitude", "gradient"),
           "momentum": ("magnitude", "momentum")}
FIELDS = ["density", "method", "nnz", "csr_update_ms", "masked_update_ms", "csr_step_ms",
          "update_over_step", "overhead_per_100", "status", "note"]


def update_fn(model, opt, method: str, batch, fraction: float, window: int, seed: int):
    """One topology update of ``model`` as a function of no arguments."""
    drop, grow = METHODS[method]
    gen = torch.Generator().manual_seed(seed)
    kw: Dict[str, Any] = {}
    if grow == "gradient":
        kw = dict(batch=batch, loss_fn=F.cross_entropy)
    if grow == "momentum":
        rec = dst.GradientMomentum(model, beta=0.9, window=window).start()
        for _ in range(window):  # record the training steps the momentum is made of
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            rec.next_step()
        rec.stop()
        kw = dict(momentum=rec)

    def update():
        dst.prune_and_regrow(model, opt, drop_fraction=fraction, drop=drop, grow=grow,
                             generator=gen, **kw)
    return update


def run(density: float, methods: List[str], args: argparse.Namespace) -> List[Dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, IN_FEATURES, generator=gen)
    y = torch.randint(CLASSES, (args.batch,), generator=gen)
    for method in methods:
        row: Dict[str, Any] = dict(density=density, method=method, status="ok", note="")
        try:
            sparse = tn.sparsify(mlp(args.hidden), density, distribution="er",
                                 generator=torch.Generator().manual_seed(args.seed))
            masked = tn.to_masked(sparse)
            row["nnz"] = sum(m.nnz for m in sparse.modules() if isinstance(m, tn.SparseLinear))
            opts = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
                    for m in (sparse, masked)]
            for m, o in zip((sparse, masked), opts):  # optimizer state exists and is remapped
                F.cross_entropy(m(x), y).backward()
                o.step()
                o.zero_grad()
            calls = {"csr": update_fn(sparse, opts[0], method, (x, y), args.fraction,
                                      args.window, args.seed),
                     "masked": update_fn(masked, opts[1], method, (x, y), args.fraction,
                                         args.window, args.seed),
                     "step": step_fn(tn.sparsify(mlp(args.hidden), density, distribution="er",
                                                 generator=torch.Generator().manual_seed(0)),
                                     x, y, args.lr)}
            times, errors = time_interleaved(calls, args.reps, warmup=1)
            if errors:
                raise next(iter(errors.values()))
            med = {k: quartiles(t)[1] * 1e3 for k, t in times.items()}
        except Exception as e:  # recorded, not fatal
            row.update(status=failure_status(e), note=repr(e)[:200].replace("\n", " "))
            rows.append(row)
            continue
        row.update(csr_update_ms=med["csr"], masked_update_ms=med["masked"],
                   csr_step_ms=med["step"], update_over_step=med["csr"] / med["step"],
                   overhead_per_100=med["csr"] / (100 * med["step"]))
        rows.append(row)
    return rows


def format_row(row: Dict[str, Any]) -> str:
    return (f"{row['density']:>8g} {row['method']:>9} {row.get('nnz', ''):>9} "
            f"{field(row, 'csr_update_ms', '.2f'):>10} "
            f"{field(row, 'masked_update_ms', '.2f'):>10} {field(row, 'csr_step_ms', '.2f'):>9} "
            f"{field(row, 'update_over_step', '.1f'):>8} "
            f"{field(row, 'overhead_per_100', '.1%'):>8}  {row['status']}")


HEADER = (f"{'density':>8} {'method':>9} {'nnz':>9} {'csr upd ms':>10} {'mask upd ms':>10} "
          f"{'step ms':>9} {'upd/step':>8} {'per 100':>8}  status")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--fraction", type=float, default=0.3, help="drop fraction per update")
    p.add_argument("--window", type=int, default=10, help="recorded steps for momentum growth")
    p.add_argument("--reps", type=int, default=7, help="timed updates per twin")
    p.add_argument("--threads", type=int, help="default: torch's current")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/dst_update"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with restored_threads(args.threads):
        print(f"# MLP {'-'.join(map(str, [IN_FEATURES, *args.hidden, CLASSES]))}, ER, batch "
              f"{args.batch}, drop fraction {args.fraction}, {torch.get_num_threads()} threads; "
              f"median of {args.reps} interleaved updates")
        print(HEADER)
        rows = []
        for density in args.densities:
            for row in run(density, args.methods, args):
                rows.append(row)
                print(format_row(row))
        meta = environment(vars(args))
    paths = write_results(args.out, "dst_update", rows, meta, fields=FIELDS)
    print(f"# wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
