"""Mask-versus-CSR comparison: ``python -m torch_nerva.compare [--config FILE] [--out DIR]``.

Reproduces the Nerva paper's experiments side by side in one process (see
:mod:`torch_nerva.compare.config` for the experiment kinds and their keys): the model is built
once with :func:`~torch_nerva.sparsify`, its masked twin with :func:`~torch_nerva.to_masked`
(bit-identical initial weights), and both are trained on the same batches. Tables are printed;
CSV and JSON results with environment metadata and PNG plots go to ``--out`` (default
``results/compare/<config title>``).

Without ``--config`` the quick configuration ``configs/quick.toml`` runs (a few minutes on two
cores, offline: CIFAR-10 when it is in ``data/`` or can be downloaded, else a synthetic
CIFAR-shaped set for timing, plus scikit-learn's bundled digits for a real accuracy check).

``--autocast bf16|fp16`` (or an experiment's ``autocast`` key) runs both twins' forward passes
under ``torch.autocast("cpu", dtype)`` with float32 weights (docs/mixed_precision.md); every
result row, the experiment and the run metadata record it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import config as config_mod
from .config import ConfigError
from .data import Dataset, load_data
from .experiments import RUNNERS, build_twins
from .harness import (cpu_model, environment, git_revision, load_warning, read_loadavg,
                      read_results, write_results)
from .report import FORMATTERS, plot_experiment

__all__ = ["main", "run_config", "load_data", "Dataset", "build_twins", "cpu_model",
           "git_revision", "ConfigError"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m torch_nerva.compare",
        description="Train MLPs with masked dense layers and with CSR SparseLinear layers side "
                    "by side (the Nerva paper's experiments) and compare time, accuracy, "
                    "inference and memory.")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML experiment file (default: configs/quick.toml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for CSV/JSON results and PNG plots "
                             "(default: results/compare/<title>)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only the experiments with these names")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every experiment (overrides the config)")
    parser.add_argument("--autocast", choices=config_mod.AUTOCAST, default=None,
                        help="run both twins' forward passes under torch.autocast('cpu', "
                             "bfloat16 or float16), for every experiment (overrides the "
                             "config's autocast key; needs dtype float32)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="DIR",
                        help="only redraw the plots of the results saved in DIR")
    return parser.parse_args(argv)


def _plots(docs, out: Path) -> None:
    try:
        for doc in docs:
            for path in plot_experiment(doc, out):
                print(f"plot: {path}")
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, then "
              f"--plot-only {out})", file=sys.stderr)


def run_config(cfg, out: Path, only=None, threads: Optional[int] = None,
               plots: bool = True, log=print, autocast: Optional[str] = None) -> list:
    """Run every experiment of a parsed config; returns the saved documents. ``autocast``
    ("none", "bf16" or "fp16") overrides every experiment's ``autocast`` key."""
    docs = []
    names = {e["name"] for e in cfg["experiments"]}
    if only:
        missing = set(only) - names
        if missing:
            raise ConfigError(f"--only: no experiments named {sorted(missing)} (the config has "
                              f"{sorted(names)})")
    if autocast is not None:
        if autocast not in config_mod.AUTOCAST:
            raise ConfigError(f"--autocast must be one of {', '.join(config_mod.AUTOCAST)}, "
                              f"got {autocast!r}")
        bad = [e["name"] for e in cfg["experiments"]
               if autocast != "none" and e["dtype"] != "float32"]
        if bad:
            raise ConfigError(f"--autocast {autocast} needs dtype = \"float32\"; experiments "
                              f"{bad} use another dtype")
        cfg = dict(cfg, experiments=[dict(e, autocast=autocast) for e in cfg["experiments"]])
    default_threads = torch.get_num_threads()
    for exp in cfg["experiments"]:
        if only and exp["name"] not in only:
            continue
        n_threads = threads or exp["threads"] or default_threads
        torch.set_num_threads(n_threads)
        data = load_data(exp["dataset"], Path(exp["data_dir"]), exp["download"],
                         exp["train_samples"], exp["test_samples"])
        data.dtype = getattr(torch, exp["dtype"])
        amp = exp.get("autocast", "none")
        log(f"== {exp['name']} ({exp['kind']}) | dataset {data.name} ({data.train_size} train / "
            f"{data.y_test.numel()} test) | {n_threads} threads | {cpu_model()}"
            + ("" if amp == "none" else f" | autocast {amp}"))
        meta = environment()  # at the start: the code and machine state the run began with
        load_before = read_loadavg()
        start = time.perf_counter()
        rows = RUNNERS[exp["kind"]](exp, data, log)
        seconds = time.perf_counter() - start
        load_after = read_loadavg()
        warning = load_warning(load_before, load_after, n_threads, meta["cpu_count"])
        del meta["loadavg"]  # loadavg_before and loadavg_after below say more
        meta.update(dataset=data.name, synthetic=data.synthetic, data_note=data.note,
                    train_samples=data.train_size, test_samples=int(data.y_test.numel()),
                    seconds=seconds, config_title=cfg["title"], autocast=amp,
                    loadavg_before=load_before, loadavg_after=load_after,
                    load_warning=warning)
        log(FORMATTERS[exp["kind"]](rows, exp, data.note))
        if warning:
            log(f"WARNING ({exp['name']}): {warning}")
        table = FORMATTERS[exp["kind"]](rows, exp, data.note, markdown=True)
        for path in write_results(out, exp["name"], rows, meta, sections={"experiment": exp},
                                  markdown=f"## {exp['name']} ({exp['kind']})\n\n{table}"):
            log(f"wrote {path}")
        doc = {"meta": meta, "experiment": exp, "rows": rows}
        if plots:
            _plots([doc], out)
        docs.append(doc)
    torch.set_num_threads(default_threads)
    return docs


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.plot_only is not None:
        docs = [read_results(p) for p in sorted(args.plot_only.glob("*.json"))]
        if not docs:
            print(f"no results (*.json) in {args.plot_only}", file=sys.stderr)
            return 2
        _plots(docs, args.plot_only)
        return 0
    path = args.config or config_mod.default_config_path()
    if path is None:
        print("no --config given and configs/quick.toml not found (run from the repository "
              "root or pass --config)", file=sys.stderr)
        return 2
    try:
        cfg = config_mod.load(path)
        out = args.out or Path("results") / "compare" / cfg["title"]
        print(f"config {path} -> {out}")
        run_config(cfg, out, args.only, args.threads, not args.no_plots, autocast=args.autocast)
    except ConfigError as e:
        print(f"torch_nerva.compare: {e}", file=sys.stderr)
        return 2
    return 0
