"""Kernel benchmark: one sparse layer, torch_nerva against its twins and baselines, one process.

    python benchmarks/kernels.py --config configs/kernels.toml
    python benchmarks/kernels.py --shapes 3072x1024 --densities 0.1 0.01 --modes fwd_bwd

For every point (layer in->out, density, batch, threads) a SparseLinear (backend "auto") is
built from a seeded generator, with its twins holding bit-identical weights:

  masked           MaskedLinear (dense weight * mask): the reference of every check and ratio
  nn_linear        plain nn.Linear holding the masked dense weight
  torch_sparse_fn  torch_nerva's backend "torch": a torch.sparse CSR autograd Function
                   (CSR matmul, sampled_addmm), what a user would write with torch.sparse alone
  sparseprop       SparseProp's SparseLinear, when `import sparseprop` works
  nerva_<backend>  torch_nerva for every backend of torch_nerva.backends.available() but
                   "torch" (which is torch_sparse_fn's method), and nerva_auto

Modes: forward (no grad), fwd_bwd (forward + backward, input gradient too: a hidden layer),
step (fwd_bwd + SGD Nesterov step + zero_grad), infer1 (batch 1, eval, no grad). Each method is
checked against the masked twin (output; in fwd_bwd and step also the gradients of input, kept
weights and bias) and a mismatch is recorded, not timed. Then 3 warm-up calls each and R
repetitions that call every method in turn, rotating the order (and reshuffling it after each
full rotation, so no method always follows the same one). Results: median and quartiles,
time / masked time, and useful GFLOP/s (2 batch nnz per forward, 6 batch nnz with backward).

A TOML config (--config) may set batch, reps, threads, modes, methods, out and a list of
[[points]] tables (in, out, densities); flags override it, and --shapes/--densities replace its
points by their cross product.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import tomllib
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

import torch_nerva as tn
from torch_nerva.compare.harness import (environment, failure_status, quartiles,
                                         restored_threads, time_interleaved, write_results)

MODES = ("forward", "fwd_bwd", "step", "infer1")
DEFAULTS: Dict[str, Any] = {
    "shapes": ["3072x1024", "1024x512", "512x10", "4096x4096"],
    "densities": [0.1, 0.01, 0.001],
    "batch": 100, "reps": 30, "threads": None, "modes": list(MODES), "methods": None,
    "out": "results/kernels",
}
CONFIG_KEYS = {"points", "batch", "reps", "threads", "modes", "methods", "out"}
FIELDS = ["threads", "in_features", "out_features", "density", "nnz", "batch", "mode", "method",
          "backend", "status", "median_ms", "q1_ms", "q3_ms", "ratio", "gflops", "note"]
TOL = dict(rtol=1e-4, atol=1e-4)
LR = 0.01
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


# -- methods -----------------------------------------------------------------------------------
def sparseprop_available() -> bool:
    """Whether SparseProp can be imported (it is optional and never installed by us)."""
    return importlib.util.find_spec("sparseprop") is not None


def method_names() -> List[str]:
    """Every method this installation can run, the reference ``masked`` first."""
    names = ["masked", "nn_linear", "torch_sparse_fn"]
    if sparseprop_available():
        names.append("sparseprop")
    return names + ["nerva_auto"] + [f"nerva_{b}" for b in tn.backends.available() if b != "torch"]


def build(name: str, sparse: tn.SparseLinear, masked: nn.Module) -> nn.Module:
    """Method ``name``'s layer holding the weights of ``sparse`` (nerva_auto) and ``masked``."""
    if name == "masked":
        return masked
    if name == "nerva_auto":
        return sparse
    if name == "nn_linear":
        return tn.densify(masked)
    if name == "torch_sparse_fn":  # the library's pure torch.sparse backend (one implementation)
        return tn.to_sparse(masked, backend="torch")
    if name == "sparseprop":
        from sparseprop.modules import SparseLinear as SparsePropLinear
        linear = tn.densify(masked)
        return SparsePropLinear(linear.weight.detach().clone(), linear.bias)
    return tn.to_sparse(masked, backend=name.removeprefix("nerva_"))


def kept_weight_grad(layer: nn.Module, mask: Tensor) -> Tensor:
    """The gradient of the kept weights, in CSR (row-major) order."""
    for name in ("values", "W_val"):  # torch_nerva (torch_sparse_fn too); SparseProp
        if hasattr(layer, name):
            return getattr(layer, name).grad.view(-1)
    return layer.weight.grad[mask]


def resolved(layer: nn.Module) -> str:
    """The backend a torch_nerva layer computes with, "" for other layers."""
    return getattr(layer, "resolved_backend", "")


# -- one point ---------------------------------------------------------------------------------
def results(layer: nn.Module, mode: str, x: Tensor, grad: Tensor, mask: Tensor) -> List[Tensor]:
    """What the check compares: the output, and with backward the input, kept-weight and bias
    gradients."""
    if mode in ("forward", "infer1"):
        with torch.no_grad():
            return [layer(x)]
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y = layer(x)
    y.backward(grad)
    out = [y.detach(), x.grad, kept_weight_grad(layer, mask), layer.bias.grad]
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return out


def timed_call(layer: nn.Module, mode: str, x: Tensor, grad: Tensor):
    """The function timed for ``layer`` in ``mode``, and the untimed setup before each call."""
    if mode in ("forward", "infer1"):
        def forward():
            with torch.no_grad():
                layer(x)
        return forward, None

    def clear():
        x.grad = None

    if mode == "fwd_bwd":
        def fwd_bwd():
            layer(x).backward(grad)
        return fwd_bwd, lambda: (layer.zero_grad(set_to_none=True), clear())
    opt = torch.optim.SGD(layer.parameters(), lr=LR, momentum=0.9, nesterov=True)

    def step():
        layer(x).backward(grad)
        opt.step()
        opt.zero_grad()
    return step, clear


CPU_ONLY = ("sparseprop", "nerva_native", "nerva_mkl")


def run_point(in_f: int, out_f: int, density: float, batch: int, mode: str, methods: List[str],
              reps: int, seed: int = 0, device: str = "cpu") -> List[Dict[str, Any]]:
    """Rows (one per method) for one layer shape, density and mode at the current threads."""
    batch = 1 if mode == "infer1" else batch
    base = dict(threads=torch.get_num_threads(), in_features=in_f, out_features=out_f,
                density=density, batch=batch, mode=mode)
    rows = {m: dict(base, method=m, status="ok", note="") for m in methods}

    def fail(name: str, status: str, note: str) -> None:
        rows[name].update(status=status, note=note[:200].replace("\n", " "))

    layers: Dict[str, nn.Module] = {}
    try:
        sparse = tn.SparseLinear(in_f, out_f, density=density,
                                 generator=torch.Generator().manual_seed(seed))
        masked = tn.to_masked(sparse)
        mask = masked.mask
        for row in rows.values():
            row["nnz"] = sparse.nnz
        for name in methods:
            try:
                layers[name] = build(name, sparse, masked).to(device)
                rows[name]["backend"] = resolved(layers[name])
            except Exception as e:
                fail(name, failure_status(e), f"build: {e!r}")
        masked, mask = masked.to(device), mask.to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(batch, in_f, generator=gen).to(device)
        x.requires_grad_(mode in ("fwd_bwd", "step"))
        grad = torch.randn(batch, out_f, generator=gen).to(device)
        if mode == "infer1":
            for layer in layers.values():
                layer.eval()
        ref = results(masked, mode, x, grad, mask)
    except Exception as e:  # no reference: nothing can be checked or compared
        for name in methods:
            fail(name, failure_status(e), f"reference: {e!r}")
        return list(rows.values())
    for name, layer in list(layers.items()):
        try:
            for got, want, what in zip(results(layer, mode, x, grad, mask), ref,
                                       ("output", "grad input", "grad weight", "grad bias")):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m, w=what: f"{w}: {m}")
        except AssertionError as e:
            fail(name, "mismatch", str(e))
            del layers[name]
        except Exception as e:
            fail(name, failure_status(e), f"check: {e!r}")
            del layers[name]
    calls, setup = {}, {}
    for name, layer in layers.items():
        calls[name], before = timed_call(layer, mode, x, grad)
        if device != "cpu":  # time the work, not its launch
            calls[name] = (lambda f: lambda: (f(), torch.cuda.synchronize()))(calls[name])
        if before is not None:
            setup[name] = before
    times, errors = time_interleaved(calls, reps, setup=setup)
    for name, e in errors.items():
        fail(name, failure_status(e), f"timing: {e!r}")
    flops = (2 if mode in ("forward", "infer1") else 6) * batch * sparse.nnz
    ref_ms = quartiles(times["masked"])[1] * 1e3 if "masked" in times else None
    for name, t in times.items():
        q1, med, q3 = (v * 1e3 for v in quartiles(t))
        rows[name].update(median_ms=med, q1_ms=q1, q3_ms=q3,
                          ratio=med / ref_ms if ref_ms else None,
                          gflops=flops / (med * 1e-3) / 1e9 if med > 0 else None)
    return list(rows.values())


# -- output ------------------------------------------------------------------------------------
def _num(value: Any, spec: str) -> str:
    return "" if value in (None, "") else format(float(value), spec)


def format_row(row: Dict[str, Any]) -> str:
    """One printed table line (see :data:`HEADER`)."""
    method = row["method"] + (f" ({row['backend']})" if row.get("backend") else "")
    shape = f"{row['in_features']}x{row['out_features']}"
    return (f"{row['threads']:>3} {shape:>10} {float(row['density']):>8g} {row.get('nnz', ''):>8} "
            f"{row['mode']:>8} {method:<24} {row['status']:<8} "
            f"{_num(row.get('median_ms'), '.3f'):>9} {_num(row.get('q1_ms'), '.3f'):>8} "
            f"{_num(row.get('q3_ms'), '.3f'):>8} "
            f"{_num(row.get('ratio'), '.3f'):>7} {_num(row.get('gflops'), '.2f'):>8}")


HEADER = (f"{'thr':>3} {'in x out':>10} {'density':>8} {'nnz':>8} {'mode':>8} {'method':<24} "
          f"{'status':<8} {'median ms':>9} {'q1 ms':>8} {'q3 ms':>8} {'ratio':>7} {'GFLOP/s':>8}")


def plot(csv_path: Path, png_path: Path) -> Path:
    """Plot time / masked time against density (log-log), one panel per mode, one colour per
    method and one marker per layer shape (and thread count), from a saved results CSV."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok" and r["ratio"]]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = list(dict.fromkeys(f"{r['in_features']}x{r['out_features']} t{r['threads']}"
                                for r in rows))
    series = defaultdict(list)
    for r in rows:
        group = f"{r['in_features']}x{r['out_features']} t{r['threads']}"
        series[r["mode"], r["method"], group].append((float(r["density"]), float(r["ratio"])))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {g: "osD^v<>ph*"[i % 10] for i, g in enumerate(groups)}
    panels = max(len(modes), 1)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for (m, method, group), points in series.items():
            if m == mode:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, color=colours[method], marker=markers[group])
        ax.set(xscale="log", yscale="log", xlabel="density", title=mode)
        ax.axhline(1.0, color="grey", linewidth=0.8)
    axes[0][0].set_ylabel("time / masked time")
    handles = [Line2D([], [], color=c, label=m) for m, c in colours.items()]
    handles += [Line2D([], [], color="black", marker=k, linestyle="", label=g)
                for g, k in markers.items()]
    fig.legend(handles=handles, loc="center right", fontsize="small")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# -- command line ------------------------------------------------------------------------------
def parse_shape(text: str):
    """``"3072x1024"`` -> (3072, 1024): in_features x out_features."""
    try:
        in_f, out_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 3072x1024, got {text!r}") from None
    return in_f, out_f


def settings_from(args: argparse.Namespace) -> Dict[str, Any]:
    """Merge flags over the TOML config over the defaults; points as (in, out, density)."""
    cfg: Dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
        unknown = set(cfg) - CONFIG_KEYS
        if unknown:
            raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}; "
                             f"allowed: {sorted(CONFIG_KEYS)}")
    s = {k: getattr(args, k) if getattr(args, k) is not None else cfg.get(k, DEFAULTS[k])
         for k in ("batch", "reps", "threads", "modes", "methods", "out")}
    if args.shapes or args.densities or "points" not in cfg:
        shapes = args.shapes or [parse_shape(v) for v in DEFAULTS["shapes"]]
        densities = args.densities or DEFAULTS["densities"]
        s["points"] = [(i, o, d) for i, o in shapes for d in densities]
    else:
        s["points"] = [(p["in"], p["out"], d) for p in cfg["points"] for d in p["densities"]]
    s["threads"] = s["threads"] or [torch.get_num_threads()]
    bad = set(s["modes"]) - set(MODES)
    if bad:
        raise SystemExit(f"unknown modes {sorted(bad)}; choose from {list(MODES)}")
    names = method_names()
    wanted = set(names if s["methods"] is None else s["methods"])
    s["missing_methods"] = sorted(wanted - set(names))
    s["methods"] = [m for m in names if m in wanted or m == "masked"]
    return s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="TOML file (flags override it)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", help="in x out, e.g. 3072x1024")
    p.add_argument("--densities", type=float, nargs="+")
    p.add_argument("--batch", type=int)
    p.add_argument("--threads", type=int, nargs="+", help="default: torch's current")
    p.add_argument("--modes", nargs="+", help=f"subset of {' '.join(MODES)}")
    p.add_argument("--methods", nargs="+", help="subset filter (masked is always run)")
    p.add_argument("--reps", type=int)
    p.add_argument("--out", type=Path, help="output directory (default results/kernels)")
    p.add_argument("--plot-from", type=Path, help="only redraw the plot of this results CSV")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda: layers and data on that device, CPU-only "
                        "methods skipped, every timed call synchronised")
    return p.parse_args(argv)


def try_plot(csv_path: Path) -> None:
    """Draw ``csv_path``'s plot next to it, or say why not."""
    try:
        print(f"# plot: {plot(csv_path, csv_path.with_suffix('.png'))}")
    except ImportError:
        print("# matplotlib is not installed: no plot (pip install matplotlib, then --plot-from)")


def main(argv=None) -> int:
    """Run the benchmark; prints the table and writes kernels.csv, kernels.json, kernels.png."""
    args = parse_args(argv)
    if args.plot_from:
        try_plot(args.plot_from)
        return 0
    s = settings_from(args)
    notes = [] if sparseprop_available() else ["sparseprop is not installed: skipped"]
    if s["missing_methods"]:
        notes.append(f"methods not available here: {s['missing_methods']}")
    rows: List[Dict[str, Any]] = []
    for note in notes:
        print(f"# {note}")
    print(f"# batch {s['batch']}, median of {s['reps']} interleaved reps; ratio = time / masked "
          "time (lower is better)")
    print(HEADER)
    with restored_threads():
        for threads in s["threads"]:
            torch.set_num_threads(threads)
            for in_f, out_f, density in s["points"]:
                for mode in s["modes"]:
                    methods = [m for m in s["methods"]
                               if args.device == "cpu" or m not in CPU_ONLY]
                    point = run_point(in_f, out_f, density, s["batch"], mode, methods,
                                      s["reps"], device=args.device)
                    for row in point:
                        print(format_row(row))
                    rows += point
    meta = environment(s)
    meta["notes"] = notes
    paths = write_results(Path(s["out"]), "kernels", rows, meta, fields=FIELDS)
    print(f"# wrote {', '.join(map(str, paths))}")
    csv_path = paths[0]
    try_plot(csv_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
