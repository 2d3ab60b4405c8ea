"""A ResNet-18 (CIFAR variant) training step: dense, masked twin and CSR (SparseConv2d).

    python benchmarks/resnet_step.py --densities 0.05 0.01 --batch 64 --reps 5 --threads 2

The model is torchvision's ``resnet18(num_classes=10)`` with the CIFAR stem (3x3 first conv,
stride 1, no max-pool). It is sparsified with ``sparsify(..., conv=True, distribution=...)``
(``--distribution``, default ``erk``),
keeping the first conv (3 input channels) and the classifier ``fc`` dense, as the sparse
training literature does; its masked twin comes from ``to_masked``. One step = forward,
cross-entropy, backward, SGD (momentum 0.9) step, zero_grad, on a synthetic CIFAR-shaped batch;
the three models are timed interleaved in one process (harness.time_interleaved), medians over
``--reps`` rounds. Printed: ms per step and the speedups of CSR over masked and over dense. A
measurement, not a test.
"""
from __future__ import annotations

import argparse
import statistics
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import torch_nerva as tn
from torch_nerva.compare.harness import cpu_model, restored_threads, time_interleaved


def cifar_resnet18() -> nn.Module:
    import torchvision
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def keep_stem_and_head(name: str, module: nn.Module) -> bool:
    """sparsify's filter: the first conv (3 input channels) and ``fc`` stay dense."""
    return not (isinstance(module, nn.Conv2d) and module.in_channels == 3) and name != "fc"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.01])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distribution", default="erk", choices=["erk", "er", "uniform"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with restored_threads(args.threads):
        print(f"# ResNet-18 (CIFAR stem), {args.distribution} densities, batch {args.batch}, "
              f"{args.threads} threads, ISA "
              f"{tn.ops.kernel_isa()}, {cpu_model()}; SGD step; medians of {args.reps} "
              "interleaved steps")
        print(f"{'density':>8} {'nnz':>10} {'dense ms':>9} {'masked ms':>10} {'CSR ms':>8} "
              f"{'x masked':>9} {'x dense':>8}")
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch, 3, 32, 32, generator=gen)
        y = torch.randint(10, (args.batch,), generator=gen)
        for density in args.densities:
            torch.manual_seed(args.seed)
            dense = cifar_resnet18()
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tn.DenseWeightsWarning)
                sparse = tn.sparsify(dense, density, conv=True, distribution=args.distribution,
                                     filter_fn=keep_stem_and_head,
                                     generator=torch.Generator().manual_seed(args.seed))
            masked = tn.to_masked(sparse)
            nnz = sum(m.nnz for m in sparse.modules() if isinstance(m, tn.SparseConv2d))
            calls = {}
            for name, model in (("dense", dense), ("masked", masked), ("csr", sparse)):
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

                def step(model=model, opt=opt):
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
                calls[name] = step
            times, errors = time_interleaved(calls, args.reps, warmup=1)
            if errors:
                print(f"{density:>8g} errors: {errors}")
                continue
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{density:>8g} {nnz:>10,} {med['dense']:>9.1f} {med['masked']:>10.1f} "
                  f"{med['csr']:>8.1f} {med['masked'] / med['csr']:>9.2f} "
                  f"{med['dense'] / med['csr']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
