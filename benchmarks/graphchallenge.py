"""Sparse DNN Graph Challenge inference rate: python benchmarks/graphchallenge.py --config FILE.

Builds (or loads) the network, makes (or loads) the inputs, runs torch_nerva's inference with
and without pruning of dead inputs, checks the categories against the SciPy reference (on a
subset of inputs when `check_inputs` is set, since SciPy is slow on dense activations) and, when
given, the official categories file; prints the rates and writes CSV + JSON with the
environment. The rate is the challenge's: inputs x 32 x neurons x layers / inference seconds
(loading and building are timed separately and not included).

Config keys (TOML): neurons, layers, inputs, seed, chunk (inputs per thread per pass), reps,
threads (list), check_inputs (0 = all), weights_dir (official nN-lK.tsv files instead of the
generator), inputs_file (official sparse-images-N.tsv), categories_file, out.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_nerva.compare.harness import environment, restored_threads, write_results  # noqa: E402

from torch_nerva import graphchallenge as gc  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULTS = {"neurons": 1024, "layers": 120, "inputs": 60000, "seed": 0, "chunk": 256, "reps": 3,
            "threads": [], "check_inputs": 2000, "weights_dir": "", "inputs_file": "",
            "categories_file": "", "out": "results/graphchallenge"}
FIELDS = ["neurons", "layers", "inputs", "threads", "prune", "chunk", "median_s", "min_s",
          "rate", "categories", "exact_vs_scipy", "checked_inputs", "exact_vs_official",
          "build_s", "peak_rss_mb"]


def settings(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="TOML file")
    for key in ("neurons", "layers", "inputs", "chunk", "reps", "check_inputs"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int)
    p.add_argument("--threads", type=int, nargs="+")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    s = dict(DEFAULTS)
    if args.config:
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
        unknown = set(cfg) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}")
        s.update(cfg)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    s["threads"] = s["threads"] or [torch.get_num_threads()]
    return s


def build(s):
    n, n_layers = s["neurons"], s["layers"]
    if s["weights_dir"]:
        paths = [Path(s["weights_dir"]) / f"n{n}-l{i + 1}.tsv" for i in range(n_layers)]
        layers = [gc.load_layer(p, n) for p in paths]
    else:
        layers = [gc.generate_layer(n, i, seed=s["seed"]) for i in range(n_layers)]
    if s["inputs_file"]:
        y0 = gc.load_inputs(s["inputs_file"], n, s["inputs"])
    else:
        y0 = gc.make_inputs(n, s["inputs"], seed=s["seed"])
    return layers, y0


def main(argv=None) -> int:
    s = settings(argv)
    n, n_layers, n_inputs = s["neurons"], s["layers"], s["inputs"]
    bias = gc.BIAS.get(n)
    if bias is None:
        raise SystemExit(f"neurons must be one of {sorted(gc.BIAS)}")
    start = time.perf_counter()
    layers, y0 = build(s)
    build_s = time.perf_counter() - start
    edges = n_inputs * gc.NNZ_PER_ROW * n * n_layers
    print(f"# Graph Challenge {n} neurons x {n_layers} layers, {n_inputs} inputs (density "
          f"{y0.mean().item():.3f}), bias {bias}; built in {build_s:.1f} s; "
          f"{'official weights' if s['weights_dir'] else 'generated RadiX-Net weights'}, "
          f"{'official inputs' if s['inputs_file'] else 'digits-based inputs'}")
    check_n = s["check_inputs"] or n_inputs
    official = gc.load_categories(s["categories_file"]) if s["categories_file"] else None
    rows = []
    with restored_threads():
        for threads in s["threads"]:
            torch.set_num_threads(threads)
            for prune in (True, False):
                times, cats = [], None
                for _ in range(s["reps"]):
                    t0 = time.perf_counter()
                    cats = gc.infer(layers, y0, bias, prune=prune, chunk=s["chunk"])
                    times.append(time.perf_counter() - t0)
                row = {"neurons": n, "layers": n_layers, "inputs": n_inputs, "threads": threads,
                       "prune": prune, "chunk": s["chunk"], "median_s": statistics.median(times),
                       "min_s": min(times), "rate": edges / statistics.median(times),
                       "categories": int(cats.numel()), "cats": cats,
                       "checked_inputs": check_n,
                       "exact_vs_official": (None if official is None
                                             else bool(np.array_equal(cats.numpy(), official))),
                       "build_s": build_s,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                rows.append(row)
                print(f"threads {threads} prune {str(prune):5}: {row['median_s']:.3f} s "
                      f"(median of {s['reps']}), rate {row['rate']:.3e} edges/s, "
                      f"{row['categories']} categories"
                      + ("" if official is None else f", vs official: {row['exact_vs_official']}"))
    # The reference runs after the timings: SciPy's BLAS threads must not share the cores.
    start = time.perf_counter()
    ref = gc.reference_categories(layers, y0[:check_n].numpy(), bias)
    print(f"# SciPy reference on the first {check_n} inputs: {len(ref)} categories in "
          f"{time.perf_counter() - start:.1f} s")
    for row in rows:
        cats = row.pop("cats")
        row["exact_vs_scipy"] = bool(np.array_equal(cats[cats < check_n].numpy(), ref))
        print(f"threads {row['threads']} prune {str(row['prune']):5}: exact vs SciPy: "
              f"{row['exact_vs_scipy']}")
    meta = environment(s)
    paths = write_results(Path(s["out"]), "graphchallenge", rows, meta, fields=FIELDS)
    print(f"# wrote {', '.join(map(str, paths))}")
    ok = all(r["exact_vs_scipy"] and r["exact_vs_official"] is not False for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
