"""Tables and plots of the comparison.

Each experiment's results are written by the harness (:func:`.harness.write_results`):
``<name>.csv`` (one line per result row, lists as JSON text), ``<name>.json`` (``{"meta":
environment, "experiment": its config, "rows": [...]}``) and ``<name>.md`` (the table below in
markdown); plots are drawn from those saved rows (:func:`plot_experiment`), so ``--plot-only DIR``
redraws them without rerunning anything.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .harness import markdown_table


# -- tables ------------------------------------------------------------------------------------
def _f(value: Optional[float], spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) + suffix


def _mb(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.2f}" if n < 100 * 2**20 else f"{n / 2**20:.0f}"


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f}+-{statistics.stdev(values):.4f}"


def median(values) -> Optional[float]:
    """The median of the values that are not None, or None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, or None when either is missing or ``b`` is 0."""
    return None if a is None or not b else a / b


def _table(header: Sequence[str], lines: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Aligned plain text, or a markdown table with ``markdown``."""
    if markdown:
        return markdown_table(header, lines) + "\n"
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out.append("-" * len(out[0]))
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def group_by_density(rows: Sequence[Dict[str, Any]]) -> Dict[float, List[Dict[str, Any]]]:
    groups: Dict[float, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["density"], []).append(r)
    return groups


def format_density(rows: Sequence[Dict[str, Any]], exp: Dict[str, Any], note: str,
                   markdown: bool = False) -> str:
    acc = "syn-acc" if rows and rows[0]["dataset"].startswith("synthetic") else "acc"
    model = exp.get("model", "mlp")
    dense_name = "nn.Linear" if model == "mlp" else "dense"
    header = ["density", "nnz", "mask s/ep", "CSR s/ep", "speedup", f"{acc} mask", f"{acc} CSR",
              "drift", "b1 mask us", "b1 CSR us", "b1 x", f"b1 {dense_name}", "param MB m/c",
              "peak MB m/c", "disk MB c"]
    lines = []
    for density, group in group_by_density(rows).items():
        mask_s = median([s for r in group for s in r["mask_epoch_s"]])
        csr_s = median([s for r in group for s in r["csr_epoch_s"]])
        drift = max((r["loss_drift"] for r in group if r["loss_drift"] is not None),
                    default=None)
        b1m = median([r["infer_mask_us"] for r in group])
        b1c = median([r["infer_csr_us"] for r in group])
        b1d = median([r.get("infer_dense_us") for r in group])
        g0 = group[0]
        lines.append([
            f"{density:g}", str(g0["nnz"]), _f(mask_s, ".3f"), _f(csr_s, ".3f"),
            _f(ratio(mask_s, csr_s), ".2f", "x"),
            _mean_std([r["best_acc_mask"] for r in group]),
            _mean_std([r["best_acc_csr"] for r in group]), _f(drift, ".1e"),
            _f(b1m, ".1f"), _f(b1c, ".1f"), _f(ratio(b1m, b1c), ".2f", "x"),
            _f(b1d, ".1f"), f"{_mb(g0['param_bytes_mask'])}/{_mb(g0['param_bytes_csr'])}",
            f"{_mb(g0['peak_bytes_mask'])}/{_mb(g0['peak_bytes_csr'])}",
            _mb(g0["disk_bytes_csr"]),
        ])
    seeds = len(exp["seeds"])
    text = [_table(header, lines, markdown),
            f"s/ep: median over epochs{' and seeds' if seeds > 1 else ''} of the summed step "
            f"times (forward+backward+SGD step+zero_grad; first step warm-up); speedup = mask / "
            f"CSR; acc: best test accuracy{' (mean+-std over seeds)' if seeds > 1 else ''}; "
            f"drift: max |loss mask - loss CSR| over the first {exp['check_steps']} steps; "
            f"b1: batch-1 inference (median of {exp['inference_calls']} calls; {dense_name}: "
            f"the trained CSR weights densified, no mask product); param: "
            f"parameters+buffers; peak: peak tensor memory of a training step; disk: "
            f"torch.save(state_dict) of the CSR model."]
    if model != "mlp":
        text.append(model_note(rows, exp))
    if rows and rows[0].get("dst", "none") != "none":
        updates = [r for r in rows if r.get("dst_updates")]
        text.append(f"dynamic sparse training: {rows[0]['dst']} on both twins (same seed), "
                    f"{max((r['dst_updates'] for r in rows), default=0)} topology updates per "
                    f"run, median CSR update "
                    f"{_f(median([r['dst_update_ms_csr'] for r in updates]), '.2f')} ms (included "
                    f"in s/ep); twins' topologies identical after every update "
                    f"({sum(r.get('dst_topology_checks') or 0 for r in rows)} checks) and at the "
                    f"end: {all(r['dst_same_topology'] for r in rows)}"
                    + ("" if all(r["dst_same_topology"] for r in rows) else
                       f" (at most {100 * max(r.get('dst_topology_diff') or 0 for r in rows):.3g}% "
                       "of the connections differed: the twins' float32 results differ in "
                       "rounding, which grows over training and reorders near-equal weights)"))
    if acc == "syn-acc":
        text.append("syn-acc: accuracy on SYNTHETIC data, not meaningful.")
    if note:
        text.append(f"note: {note}")
    return "\n".join(text)


def model_note(rows: Sequence[Dict[str, Any]], exp: Dict[str, Any]) -> str:
    """What a CNN experiment's CSR twin is: its sparse layers and the backends they ran with,
    per density, and the weights kept dense."""
    per_density = []
    for density, group in group_by_density(rows).items():
        counts = group[0].get("csr_backends") or {}
        per_density.append(f"{density:g}: " + ", ".join(f"{n} {b}" for b, n in
                                                         sorted(counts.items())))
    kept = rows[0].get("dense_weights") if rows else None
    return (f"model {exp['model']} ({exp['distribution']} densities, backend "
            f"{exp.get('backend', 'auto')}): convolutions and linear layers sparse but the first "
            f"convolution and the classifier ({kept} weights, dense in both twins; nnz counts "
            f"the sparse layers only); sparse layers by the backend they computed with: "
            + "; ".join(per_density) + " (auto takes the dense path for a layer dense enough "
            "that it is faster)")


def format_inference(rows: Sequence[Dict[str, Any]], exp: Dict[str, Any], note: str,
                     markdown: bool = False) -> str:
    model = exp.get("model", "mlp")
    dense_name = "nn.Linear" if model == "mlp" else "dense"
    header = ["density", "nnz", "b1 mask us", "b1 CSR us", "speedup", f"b1 {dense_name} us",
              "param MB m/c", "disk MB m/c"]
    lines = []
    for density, group in group_by_density(rows).items():
        b1m = median([r["infer_mask_us"] for r in group])
        b1c = median([r["infer_csr_us"] for r in group])
        b1d = median([r.get("infer_dense_us") for r in group])
        g0 = group[0]
        lines.append([f"{density:g}", str(g0["nnz"]), _f(b1m, ".1f"), _f(b1c, ".1f"),
                      _f(ratio(b1m, b1c), ".2f", "x"), _f(b1d, ".1f"),
                      f"{_mb(g0['param_bytes_mask'])}/{_mb(g0['param_bytes_csr'])}",
                      f"{_mb(g0['disk_bytes_mask'])}/{_mb(g0['disk_bytes_csr'])}"])
    return (_table(header, lines, markdown) + f"\nb1: batch-1 inference, median of "
            f"{exp['inference_calls']} calls (eval, no_grad); {dense_name}: the same weights "
            f"densified (torch_nerva.densify), no mask product; untrained models"
            + (f"\n{model_note(rows, exp)}" if model != "mlp" else "")
            + (f"\nnote: {note}" if note else ""))


def format_depth(rows: Sequence[Dict[str, Any]], exp: Dict[str, Any], note: str,
                 markdown: bool = False) -> str:
    header = ["hidden layers", "nnz", "mask s/ep", "CSR s/ep", "speedup"]
    lines = [[str(r["depth"]), str(r["nnz"]), _f(r["mask_s_per_epoch"], ".2f"),
              _f(r["csr_s_per_epoch"], ".2f"), _f(r["speedup"], ".2f", "x")] for r in rows]
    return (_table(header, lines, markdown) + f"\nwidth {exp['width']}, density "
            f"{exp['density']:g}; s/ep = median of {exp['steps']} timed steps x "
            f"{exp['samples_per_epoch']} / {exp['batch_size']} steps per epoch" + (f"\nnote: {note}" if note else ""))


def format_width(rows: Sequence[Dict[str, Any]], exp: Dict[str, Any], note: str,
                 markdown: bool = False) -> str:
    header = ["width", "nnz", "mask s/ep", "CSR s/ep", "speedup", "mask peak MB",
              "CSR peak MB", "mask needs GB (est.)", "note"]
    lines = [[str(r["width"]), str(r["nnz"]), _f(r["mask_s_per_epoch"], ".2f"),
              _f(r["csr_s_per_epoch"], ".2f"), _f(r["speedup"], ".2f", "x"),
              _mb(r["peak_bytes_mask"]), _mb(r["peak_bytes_csr"]),
              f"{r['estimated_bytes_mask'] / 2**30:.3g}", r["note"] or "-"] for r in rows]
    return (_table(header, lines, markdown) + f"\n{exp['layers']} hidden layers, density "
            f"{exp['density']:g}; s/ep = median of {exp['steps']} timed steps x steps per epoch; "
            f"peak: peak tensor memory of a training step" + (f"\nnote: {note}" if note else ""))


FORMATTERS = {"density": format_density, "inference": format_inference, "depth": format_depth,
              "width": format_width}


# -- plots -------------------------------------------------------------------------------------
def _sparsity_axis(ax, xs) -> None:
    from matplotlib.ticker import NullFormatter
    ax.set_xscale("logit")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sparsity (1 - density), logit scale")


def plot_experiment(doc: Dict[str, Any], out: Path) -> List[Path]:
    """PNG plots of one saved experiment (``doc`` as written by :func:`write_results`);
    returns their paths. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp, rows, meta = doc["experiment"], doc["rows"], doc["meta"]
    kind, name = exp["kind"], exp["name"]
    subtitle = f"{meta['cpu_model']}, {meta['threads']} threads"
    paths: List[Path] = []

    def save(fig, suffix: str) -> None:
        path = out / f"{name}_{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    if kind in ("density", "inference"):
        groups = group_by_density(rows)
        sparse = sorted(d for d in groups if d < 1)
        dense = groups.get(1.0)
        xs = [1 - d for d in sparse]
        series = []
        if kind == "density":
            series.append(("accuracy", "best test accuracy",
                           [("best_acc_mask", "masked"), ("best_acc_csr", "CSR")], False))
            series.append(("time", "training time per epoch (s)",
                           [("mask_s_per_epoch", "masked"), ("csr_s_per_epoch", "CSR")], True))
        series.append(("inference", "batch-1 inference time (us)",
                       [("infer_mask_us", "masked"), ("infer_csr_us", "CSR"),
                        ("infer_dense_us", "dense nn.Linear" if exp.get("model", "mlp") == "mlp"
                         else "dense (densified)")], True))
        for suffix, ylabel, keys, logy in series:
            fig, ax = plt.subplots(figsize=(6, 4))
            for (key, label), color, marker in zip(keys, ("tab:orange", "tab:blue", "tab:gray"),
                                                   "so^"):
                if any(r.get(key) is None for r in rows):
                    continue
                ys = [median([r[key] for r in groups[d]]) for d in sparse]
                if xs:  # masked: large hollow squares, so that identical values stay visible
                    ax.plot(xs, ys, marker + "-", color=color, label=label,
                            markersize=9 if marker == "s" else 5,
                            markerfacecolor="none" if marker == "s" else color)
                if dense:
                    ref = median([r[key] for r in dense])
                    if ref is not None:
                        ax.axhline(ref, color=color, linestyle="--", linewidth=1,
                                   label=f"{label}, dense (density 1)")
            if xs:
                _sparsity_axis(ax, xs)
            if logy:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            synthetic = rows and str(rows[0].get("dataset", "")).startswith("synthetic")
            title = f"{name}: {ylabel}"
            if suffix == "accuracy" and synthetic:
                title += " (SYNTHETIC data: not meaningful)"
            ax.set_title(f"{title}\n{subtitle}", fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(True, alpha=0.3)
            save(fig, suffix)
    elif kind in ("depth", "width"):
        key = "depth" if kind == "depth" else "width"
        fig, axes = plt.subplots(1, 2 if kind == "width" else 1,
                                 figsize=(11 if kind == "width" else 6, 4), squeeze=False)
        ax = axes[0][0]
        for field, label, color in (("mask_s_per_epoch", "masked", "tab:orange"),
                                    ("csr_s_per_epoch", "CSR", "tab:blue")):
            pts = [(r[key], r[field]) for r in rows if r[field] is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=label)
        ax.set_xlabel("hidden layers" if kind == "depth" else "hidden width")
        ax.set_ylabel("training time per epoch (s)")
        ax.set_yscale("log")
        if kind == "width":
            ax.set_xscale("log", base=2)
            mem = axes[0][1]
            for field, label, color in (("peak_bytes_mask", "masked, measured", "tab:orange"),
                                        ("peak_bytes_csr", "CSR, measured", "tab:blue")):
                pts = [(r["width"], r[field] / 2**30) for r in rows if r[field] is not None]
                if pts:
                    mem.plot(*zip(*pts), "o-", color=color, label=label)
            est = [(r["width"], r["estimated_bytes_mask"] / 2**30) for r in rows
                   if r["peak_bytes_mask"] is None]
            if est:
                mem.plot(*zip(*est), "x", color="tab:orange", markersize=9,
                         label="masked, skipped (estimated need)")
            mem.axhline(rows[0]["budget_bytes"] / 2**30, color="gray", linestyle="--",
                        linewidth=1, label="memory budget")
            mem.set_xscale("log", base=2)
            mem.set_yscale("log")
            mem.set_xlabel("hidden width")
            mem.set_ylabel("peak training memory (GiB)")
            mem.legend(fontsize=8)
            mem.grid(True, alpha=0.3)
        ax.set_title(f"{name}: density {exp['density']:g}\n{subtitle}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        save(fig, "time")
    return paths
