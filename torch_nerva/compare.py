"""Mask-versus-CSR training comparison: ``python -m torch_nerva.compare``.

Trains a small MLP twice in one process, on exactly the same batches and from bit-identical
initial weights: once with :class:`~torch_nerva.SparseLinear` layers (CSR, work proportional to
the nonzeros) and once with their :class:`~torch_nerva.MaskedLinear` twins (the dense
``weight * mask`` baseline of sparse-training papers, which applies the mask in every forward).
For each density it prints training time per epoch, best test accuracy, the loss drift between
the twins over the first steps, and batch-1 inference time.

The default dataset is scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10 classes), so
the run works offline and takes seconds on two cores. Without scikit-learn (or with
``--dataset synthetic``) a synthetic dataset of the same shape is used instead, whose labels come
from a fixed random linear teacher; its accuracies are marked "synthetic".

Example::

    python -m torch_nerva.compare --densities 1.0 0.1 0.01 --epochs 5 --out results/
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .convert import sparsify, to_masked
from .modules import MaskedLinear, SparseLinear

DIGITS_SAMPLES, DIGITS_FEATURES, DIGITS_CLASSES = 1797, 64, 10
TRAIN_FRACTION = 0.8
INFERENCE_WARMUP_CALLS = 10
INFERENCE_TIMED_CALLS = 50

#: Columns of ``results.csv``, in order (the JSON rows also hold the per-epoch lists).
CSV_FIELDS = (
    "dataset", "density", "nnz_csr", "nnz_mask", "mask_s_per_epoch", "csr_s_per_epoch",
    "speedup", "best_acc_mask", "best_acc_csr", "drift", "drift_steps", "infer_mask_us",
    "infer_csr_us", "infer_speedup",
)


@dataclass
class Dataset:
    """A standardized train/test split held as float32 features and int64 labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def synthetic(self) -> bool:
        return self.name == "synthetic"

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]


# -- data --------------------------------------------------------------------------------------
def _digits() -> Optional[Tuple[Tensor, Tensor]]:
    """The scikit-learn digits as (features, labels), or None when scikit-learn is missing.

    The data file that scikit-learn ships is read directly, without importing scikit-learn:
    importing it loads its own copy of libgomp, and the process should hold exactly one OpenMP
    runtime (torch's) while it is timed.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return torch.from_numpy(table[:, :-1].copy()), torch.from_numpy(table[:, -1].astype(np.int64))


def _synthetic(generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Gaussian features shaped like the digits, labelled by a fixed random linear teacher."""
    x = torch.randn(DIGITS_SAMPLES, DIGITS_FEATURES, generator=generator)
    teacher = torch.randn(DIGITS_FEATURES, DIGITS_CLASSES, generator=generator)
    return x, (x @ teacher).argmax(dim=1)


def load_data(name: str = "digits", seed: int = 0) -> Dataset:
    """Load ``name`` ("digits" or "synthetic") and split it 80/20 with a permutation seeded by
    ``seed``; features are standardized with the training set's mean and standard deviation
    (constant features are only centred).

    If "digits" is asked for but scikit-learn is not importable, a one-line notice goes to stderr
    and the synthetic dataset is returned instead (its ``name`` says so).
    """
    if name not in ("digits", "synthetic"):
        raise ValueError(f"dataset must be 'digits' or 'synthetic', got {name!r}")
    generator = torch.Generator().manual_seed(seed)
    data = _digits() if name == "digits" else None
    if name == "digits" and data is None:
        print("torch_nerva.compare: scikit-learn is not installed, using the synthetic dataset "
              "instead of digits (pip install scikit-learn)", file=sys.stderr)
    if data is None:
        name, data = "synthetic", _synthetic(generator)
    x, y = data
    order = torch.randperm(x.shape[0], generator=generator)
    n_train = round(TRAIN_FRACTION * x.shape[0])
    train, test = order[:n_train], order[n_train:]
    mean = x[train].mean(dim=0)
    std = x[train].std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    return Dataset(name, x[train], y[train], x[test], y[test], int(y.max()) + 1)


# -- models ------------------------------------------------------------------------------------
def build_twins(in_features: int, hidden: Sequence[int], num_classes: int, density: float,
                seed: int) -> Tuple[nn.Module, nn.Module]:
    """The (masked, CSR) twins of an ``in -> hidden... -> num_classes`` ReLU MLP.

    The dense ``nn.Sequential`` is only a shape template (its weights are never initialised):
    :func:`~torch_nerva.sparsify` draws the topology and the values from a generator seeded with
    ``seed`` and :func:`~torch_nerva.to_masked` copies them bit for bit into the masked twin.
    """
    sizes = [in_features, *hidden, num_classes]
    layers: List[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.utils.skip_init(nn.Linear, n_in, n_out))
    csr = sparsify(nn.Sequential(*layers), density, distribution="er",
                   generator=torch.Generator().manual_seed(seed))
    return to_masked(csr), csr


def total_nnz(model: nn.Module) -> int:
    """Nonzero weights summed over the model's sparse and masked layers."""
    return sum(m.nnz for m in model.modules() if isinstance(m, (SparseLinear, MaskedLinear)))


# -- training and timing -----------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor,
               y: Tensor) -> Tuple[float, float]:
    """One SGD step; returns (seconds for forward + backward + step + zero_grad, loss)."""
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start, loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (evaluated in eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / y.numel()


@torch.no_grad()
def batch1_inference_us(models: Sequence[nn.Module], x: Tensor) -> List[float]:
    """Median microseconds of a batch-1 forward for each model (eval mode), after warm-up.

    The models are timed call by call in turn, rotating which goes first, so that slow drifts
    of the machine affect them alike.
    """
    for model in models:
        model.eval()
        for _ in range(INFERENCE_WARMUP_CALLS):
            model(x)
    times: List[List[float]] = [[] for _ in models]
    for call in range(INFERENCE_TIMED_CALLS):
        for k in range(len(models)):
            i = (call + k) % len(models)
            start = time.perf_counter()
            models[i](x)
            times[i].append(time.perf_counter() - start)
    return [1e6 * statistics.median(t) for t in times]


def _median(values: Sequence[float]) -> Optional[float]:
    """The median of ``values``, or None when there are none."""
    return statistics.median(values) if values else None


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def compare_density(data: Dataset, density: float, args: argparse.Namespace) -> Dict[str, Any]:
    """Train the masked and CSR twins at ``density`` side by side; returns one result row.

    Both twins see the same batches (one shuffled order per epoch from a generator seeded with
    ``args.seed``). Every step is timed separately for each twin, alternating which goes first.
    An epoch's time is the sum of its step times; the very first step of the run is left out
    as warm-up (an epoch left without timed steps, possible only when it has a single step, is
    left out of the median, which is None if no epoch is left).

    ``drift`` is the largest absolute difference between the twins' losses over the first
    ``args.check_steps`` steps (None when that is 0); ``drift_steps`` is how many steps that was
    (fewer when the run is shorter).
    """
    masked, csr = build_twins(data.in_features, args.hidden, data.num_classes, density,
                              args.seed)
    twins = (masked, csr)
    optimizers = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
                  for m in twins]
    order_generator = torch.Generator().manual_seed(args.seed)
    epoch_times: Tuple[List[float], List[float]] = ([], [])
    best_acc = [0.0, 0.0]
    drift: Optional[float] = None
    step = 0
    for _ in range(args.epochs):
        epoch_time = [0.0, 0.0]
        timed = False
        order = torch.randperm(data.x_train.shape[0], generator=order_generator)
        for batch in order.split(args.batch_size):
            x, y = data.x_train[batch], data.y_train[batch]
            losses = [0.0, 0.0]
            for i in ((0, 1) if step % 2 == 0 else (1, 0)):
                seconds, losses[i] = train_step(twins[i], optimizers[i], x, y)
                if step > 0:
                    epoch_time[i] += seconds
                    timed = True
            if step < args.check_steps:
                drift = max(drift or 0.0, abs(losses[0] - losses[1]))
            step += 1
        for i, m in enumerate(twins):
            if timed:
                epoch_times[i].append(epoch_time[i])
            best_acc[i] = max(best_acc[i], accuracy(m, data.x_test, data.y_test))
    infer_mask, infer_csr = batch1_inference_us(twins, data.x_test[:1])
    mask_s, csr_s = (_median(t) for t in epoch_times)
    return {
        "dataset": data.name,
        "density": density,
        "nnz_csr": total_nnz(csr),
        "nnz_mask": total_nnz(masked),
        "mask_s_per_epoch": mask_s,
        "csr_s_per_epoch": csr_s,
        "speedup": _ratio(mask_s, csr_s),
        "best_acc_mask": best_acc[0],
        "best_acc_csr": best_acc[1],
        "drift": drift,
        "drift_steps": min(step, args.check_steps),
        "infer_mask_us": infer_mask,
        "infer_csr_us": infer_csr,
        "infer_speedup": _ratio(infer_mask, infer_csr),
        "mask_epoch_s": epoch_times[0],
        "csr_epoch_s": epoch_times[1],
    }


def run(args: argparse.Namespace, data: Optional[Dataset] = None) -> List[Dict[str, Any]]:
    """One result row per density in ``args.densities`` (data loaded from ``args`` unless
    given)."""
    if data is None:
        data = load_data(args.dataset, args.seed)
    return [compare_density(data, density, args) for density in args.densities]


# -- environment and output --------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_revision() -> Optional[str]:
    """The commit of the checkout holding this file (``-dirty`` appended when tracked files
    differ from it), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=here,
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def environment(args: argparse.Namespace, data: Dataset) -> Dict[str, Any]:
    """Metadata describing the run: versions, machine, dataset and arguments."""
    return {
        "torch_version": torch.__version__,
        "torch_nerva_version": __version__,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "git_revision": git_revision(),
        "dataset": data.name,
        "synthetic": data.synthetic,
        "train_samples": data.x_train.shape[0],
        "test_samples": data.x_test.shape[0],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``, or "n/a" for None."""
    return "n/a" if value is None else format(value, spec) + suffix


def format_table(rows: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The side-by-side table: a header line, one line per density, then footnotes."""
    args = meta["args"]
    acc = "syn-acc" if meta["synthetic"] else "acc"
    columns = [
        ("density", 8), ("nnz", 9), ("mask s/ep", 10), ("CSR s/ep", 9), ("speedup", 8),
        (f"{acc} mask", 12), (f"{acc} CSR", 11), ("drift", 8), ("b1 mask us", 11),
        ("b1 CSR us", 10), ("b1 speedup", 10),
    ]
    lines = [
        f"threads: {meta['threads']} | CPU: {meta['cpu_model']} | dataset: {meta['dataset']} "
        f"({meta['train_samples']} train / {meta['test_samples']} test) | hidden "
        f"{' '.join(map(str, args['hidden']))}, epochs {args['epochs']}, batch "
        f"{args['batch_size']}, lr {args['lr']}",
        "  ".join(name.rjust(width) for name, width in columns),
    ]
    lines.append("-" * len(lines[-1]))
    for r in rows:
        cells = [
            f"{r['density']:g}", str(r["nnz_csr"]), _fmt(r["mask_s_per_epoch"], ".4f"),
            _fmt(r["csr_s_per_epoch"], ".4f"), _fmt(r["speedup"], ".2f", "x"),
            f"{r['best_acc_mask']:.4f}", f"{r['best_acc_csr']:.4f}", _fmt(r["drift"], ".1e"),
            f"{r['infer_mask_us']:.1f}", f"{r['infer_csr_us']:.1f}",
            _fmt(r["infer_speedup"], ".2f", "x"),
        ]
        lines.append("  ".join(c.rjust(width) for c, (_, width) in zip(cells, columns)))
    lines += [
        "mask = MaskedLinear, dense weight * mask applied in every forward (the usual masked "
        "baseline); CSR = SparseLinear (torch_nerva).",
        "s/ep: median over epochs of summed step times (forward + backward + SGD step + "
        "zero_grad), first step of the run excluded; speedup = mask / CSR.",
        f"acc: best test accuracy over epochs; drift: max |loss mask - loss CSR| over the first "
        f"{max((r['drift_steps'] for r in rows), default=0)} steps; b1: batch-1 inference, "
        f"median of {INFERENCE_TIMED_CALLS} calls.",
    ]
    if meta["synthetic"]:
        lines.append("syn-acc: accuracy on SYNTHETIC data (Gaussian features, random linear "
                     "teacher labels), not a real task.")
    return "\n".join(lines)


def write_results(out: Path, rows: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> None:
    """Write ``results.csv`` (the :data:`CSV_FIELDS`) and ``results.json`` (metadata and full
    rows) into ``out``, creating it if needed."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=2)
        f.write("\n")


# -- command line ------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _density(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_nerva.compare",
        description="Train an MLP with masked dense layers and with CSR SparseLinear layers "
                    "side by side and compare time per epoch, accuracy and inference time.")
    parser.add_argument("--densities", type=_density, nargs="+", default=[1.0, 0.1, 0.01],
                        help="global weight densities to compare (default: 1.0 0.1 0.01)")
    parser.add_argument("--epochs", type=_positive_int, default=5, help="default: 5")
    parser.add_argument("--batch-size", type=_positive_int, default=100, help="default: 100")
    parser.add_argument("--lr", type=_positive_float, default=0.05,
                        help="SGD learning rate (Nesterov momentum 0.9; default: 0.05)")
    parser.add_argument("--hidden", type=_positive_int, nargs="+", default=[1024, 512],
                        help="hidden layer sizes (default: 1024 512)")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits",
                        help="digits needs scikit-learn, else synthetic is used (default: digits)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the weights and the batch order (default: 0)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch.set_num_threads value (default: leave torch's setting)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory to write results.csv and results.json into")
    parser.add_argument("--check-steps", type=_non_negative_int, default=5,
                        help="steps over which the twins' loss drift is measured (default: 5)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the comparison, print the table and optionally write the results; returns 0."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(args.dataset, args.seed)
    rows = run(args, data)
    meta = environment(args, data)
    print(format_table(rows, meta))
    if args.out is not None:
        write_results(args.out, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
