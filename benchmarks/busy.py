"""The busy machine: CSR against its masked twin, idle and with a process spinning on one core.

    python benchmarks/busy.py                    # 2 threads, densities 0.001 0.01 0.1

The command starts its own load: a child Python process pinned to one CPU
(``os.sched_setaffinity``; ``--busy-core``, default the last CPU this process may use) that
spins until it is stopped or its hard timeout (``--busy-timeout``) runs out; it also asks the
kernel to kill it when this process dies (``PR_SET_PDEATHSIG``), and it is stopped in a
``finally`` and at exit, so it cannot outlive the benchmark. Before measuring, the benchmark
checks that the child is running on its core (its CPU time grows).

Measured, for each condition (``idle``, ``loaded``) and thread count (``--threads`` and 1),
each case interleaved with its masked twin (``torch_nerva.compare.harness.time_interleaved``):

* ``layer``: SparseLinear 3072->1024, batch 100, forward + backward with the input gradient,
  per density;
* ``mlp_step``: the paper MLP 3072-1024-512-10 (ER densities), one training step (forward,
  cross-entropy, backward, SGD momentum 0.9 Nesterov step, zero_grad), batch 100, per density;
* ``batch1``: a forward of one input through that MLP under ``torch.inference_mode()``;
* ``batch1_fused``: the same with the CSR model through ``tn.fuse_for_inference`` (one op call
  for the whole chain), the masked twin as in ``batch1``;
* ``graphchallenge``: the Graph Challenge engine (``graphchallenge.infer``, pruning dead
  inputs) on the RadiX-Net network of 1024 neurons (``--gc-layers`` layers, ``--gc-inputs``
  digit inputs; density 32/1024). It has no masked twin: its rows give the CSR side only, and
  the rate (inputs x edges / second) follows from the median.

The conditions alternate ``--rounds`` times (idle, loaded, idle, loaded, ...; a fresh busy
process each loaded round) and the samples of a condition are pooled over the rounds. Printed
and written (``--out``: busy.csv, one row per case x density x threads x condition x method;
busy.json, the run's metadata with, per round, /proc/loadavg before and after, the busy
process's CPU seconds, the machine's CPU utilisation and ``other_cpu_cores``, the CPU time
that processes other than this one and its busy child took during the round, in cores: well
above zero means the timings are contaminated): median and p90 per call, the ratio CSR /
masked, the loaded / idle slowdown of each, the p90 over the idle median, and the speedup of
``--threads`` threads over 1 thread.
"""
from __future__ import annotations

import argparse
import atexit
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import torch_nerva as tn
from mlp_step import mlp
from torch_nerva import graphchallenge as gc
from torch_nerva.compare.harness import (environment, failure_status, kernel_isa, read_loadavg,
                                         restored_threads, time_interleaved, write_results)

# The busy child: pin to one core, die with the parent, spin until the deadline.
BUSY_CODE = r"""
import ctypes, os, signal, sys, time
core, seconds, parent = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:  # the parent died before the line above
    sys.exit(0)
os.sched_setaffinity(0, {core})
deadline = time.monotonic() + seconds
x = 0
while time.monotonic() < deadline:
    for _ in range(20000):
        x += 1
"""

FIELDS = ["case", "density", "nnz", "threads", "condition", "method", "n", "median_us",
          "p90_us", "p90_over_median", "ratio_to_masked", "loaded_over_idle",
          "p90_over_idle_median", "speedup_vs_1_thread", "load1_before", "load1_after",
          "status", "note"]
CASES = ("layer", "mlp_step", "batch1", "batch1_fused", "graphchallenge")
BATCH1_CASES = ("batch1", "batch1_fused")
METHODS = ("masked", "csr")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> Optional[Tuple[int, int]]:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class BusyProcess:
    """A child process spinning on CPU ``core`` for at most ``timeout`` seconds; a context
    manager that starts it, checks that it runs (its CPU time grows) and stops it."""

    def __init__(self, core: int, timeout: float):
        if core not in os.sched_getaffinity(0):
            raise ValueError(f"--busy-core {core} is not among the CPUs this process may use "
                             f"{sorted(os.sched_getaffinity(0))}")
        if timeout <= 0:
            raise ValueError(f"the busy process's timeout must be positive, got {timeout}")
        self.core, self.timeout = core, timeout
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0

    def start(self) -> "BusyProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BUSY_CODE, str(self.core), str(self.timeout), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        atexit.register(self.stop)
        self.started = time.perf_counter()
        try:
            self._check_running()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_running(self, wait: float = 5.0) -> None:
        """Return once the child has been seen spinning on its core; raise if it has not
        within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        first = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the busy process exited with {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode(errors='replace')[-500:]}")
            try:
                used = cpu_seconds(self.proc.pid)
                pinned = os.sched_getaffinity(self.proc.pid) == {self.core}
            except OSError:
                used, pinned = None, False
            if used is not None and pinned:
                if first is None:
                    first = used
                elif used > first:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the busy process (pid {self.proc.pid}) did not start spinning on "
                           f"CPU {self.core} within {wait} s")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> Optional[float]:
        try:
            return cpu_seconds(self.proc.pid) if self.running() else None
        except OSError:
            return None

    def stop(self) -> None:
        """Terminate the child (kill it if it does not end within 5 s) and reap it."""
        atexit.unregister(self.stop)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> "BusyProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the measured calls -------------------------------------------------------------------------
Calls = Dict[str, Callable[[], Any]]


def check_twins(sparse: torch.nn.Module, masked: torch.nn.Module, x: torch.Tensor) -> None:
    """Raise AssertionError unless the CSR model and its masked twin agree on ``x``."""
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked(x), rtol=1e-4, atol=1e-4)


def layer_case(density: float, args: argparse.Namespace) -> Tuple[int, Calls, Calls]:
    """nnz, the timed forward + backward of the layer and its masked twin, their setups."""
    sparse = tn.SparseLinear(args.layer[0], args.layer[1], density=density,
                             generator=torch.Generator().manual_seed(args.seed))
    masked = tn.to_masked(sparse)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.layer[0], generator=gen)
    grad = torch.randn(args.batch, args.layer[1], generator=gen)
    check_twins(sparse, masked, x)
    x.requires_grad_(True)
    calls, setup = {}, {}
    for name, layer in (("masked", masked), ("csr", sparse)):
        def fwd_bwd(layer=layer):
            layer(x).backward(grad)

        def clear(layer=layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
        calls[name], setup[name] = fwd_bwd, clear
    return sparse.nnz, calls, setup


def mlp_cases(density: float, args: argparse.Namespace) -> Tuple[int, Calls, Calls, Calls]:
    """nnz, the training steps of the MLP and its twin, their batch-1 inferences (plain, and
    the CSR model fused for inference)."""
    sparse = tn.sparsify(mlp(args.hidden), density, distribution="er",
                         generator=torch.Generator().manual_seed(args.seed))
    masked = tn.to_masked(sparse)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3072, generator=gen)
    y = torch.randint(10, (args.batch,), generator=gen)
    check_twins(sparse, masked, x)
    steps, infers, fused_infers = {}, {}, {}
    x1 = x[:1].clone()
    fused = tn.fuse_for_inference(sparse.eval())
    with torch.inference_mode():
        torch.testing.assert_close(fused(x1), sparse(x1), rtol=1e-5, atol=1e-5)
    sparse.train()

    def infer_fused():
        with torch.inference_mode():
            fused(x1)
    for name, model in (("masked", masked), ("csr", sparse)):
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)

        def step(model=model, opt=opt):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        def infer(model=model):
            with torch.inference_mode():
                model(x1)
        steps[name], infers[name] = step, infer
    fused_infers.update(masked=infers["masked"], csr=infer_fused)
    nnz = sum(m.nnz for m in sparse.modules() if isinstance(m, tn.SparseLinear))
    return nnz, steps, infers, fused_infers


def graphchallenge_case(args: argparse.Namespace) -> Tuple[int, Calls]:
    """nnz and the engine's call (CSR only) on the 1024-neuron network."""
    neurons = 1024
    layers = [gc.generate_layer(neurons, i, seed=args.seed) for i in range(args.gc_layers)]
    y0 = gc.make_inputs(neurons, args.gc_inputs, seed=args.seed)
    expected = gc.infer(layers, y0, gc.BIAS[neurons], prune=False)
    assert torch.equal(gc.infer(layers, y0, gc.BIAS[neurons]), expected), "pruning changed it"

    def engine():
        gc.infer(layers, y0, gc.BIAS[neurons])
    return sum(m.nnz for m in layers), {"csr": engine}


# -- statistics ---------------------------------------------------------------------------------
def p90(times: Sequence[float]) -> float:
    """The 90th percentile (linear interpolation between order statistics)."""
    if len(times) < 2:
        return times[0]
    return statistics.quantiles(times, n=10, method="inclusive")[-1]


def summarize(samples: Dict[tuple, List[float]], base: Dict[tuple, Dict[str, Any]],
              blocks: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (case, density, threads, condition, method) from the pooled samples (keys
    of ``samples`` and ``base``), with the ratios between rows."""
    rows = []
    for key, info in base.items():
        case, density, threads, condition, method = key
        row = dict(case=case, density=density, threads=threads, condition=condition,
                   method=method, **info)
        loads = [b for b in blocks if b["condition"] == condition]
        row["load1_before"] = " ".join(f"{b['loadavg_before']['load1']:.2f}" for b in loads
                                       if b["loadavg_before"])
        row["load1_after"] = " ".join(f"{b['loadavg_after']['load1']:.2f}" for b in loads
                                      if b["loadavg_after"])
        t = samples.get(key)
        if t:
            row.update(n=len(t), median_us=statistics.median(t) * 1e6, p90_us=p90(t) * 1e6)
            row["p90_over_median"] = row["p90_us"] / row["median_us"]
        rows.append(row)
    by_key = {(r["case"], r["density"], r["threads"], r["condition"], r["method"]): r
              for r in rows}

    def ratio(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]], field: str = "median_us"
              ) -> Optional[float]:
        if not a or not b or a.get(field) is None or b.get("median_us") is None:
            return None
        return a[field] / b["median_us"]

    for (case, density, threads, condition, method), r in by_key.items():
        r["ratio_to_masked"] = ratio(r, by_key.get((case, density, threads, condition,
                                                     "masked")))
        idle = by_key.get((case, density, threads, "idle", method))
        if condition == "loaded":
            r["loaded_over_idle"] = ratio(r, idle)
            r["p90_over_idle_median"] = ratio(r, idle, "p90_us")
        else:
            r["p90_over_idle_median"] = r.get("p90_over_median")
        if threads != 1:
            one = by_key.get((case, density, 1, condition, method))
            r["speedup_vs_1_thread"] = ratio(one, r)
    return rows


# -- the run ------------------------------------------------------------------------------------
def build_cases(args: argparse.Namespace) -> Tuple[List[Tuple[str, float, Calls, Calls]],
                                                   Dict[Tuple[str, float], Dict[str, Any]]]:
    """The timed cases (case, density, calls, setup) and per (case, density) the row fields
    known before timing (nnz, status, note)."""
    cases, info = [], {}
    for density in args.densities:
        for case in CASES[:-1]:
            info[(case, density)] = dict(status="ok", note="")
        try:
            nnz, calls, setup = layer_case(density, args)
            cases.append(("layer", density, calls, setup))
            info[("layer", density)]["nnz"] = nnz
        except Exception as e:  # recorded, not fatal
            info[("layer", density)].update(status=_status(e), note=repr(e)[:200])
        mlp_names = ("mlp_step", "batch1", "batch1_fused")
        try:
            nnz, steps, infers, fused = mlp_cases(density, args)
            cases += [("mlp_step", density, steps, {}), ("batch1", density, infers, {}),
                      ("batch1_fused", density, fused, {})]
            for case in mlp_names:
                info[(case, density)]["nnz"] = nnz
        except Exception as e:  # recorded, not fatal
            for case in mlp_names:
                info[(case, density)].update(status=_status(e), note=repr(e)[:200])
    if args.gc_layers > 0:
        density = 32 / 1024
        info[("graphchallenge", density)] = dict(status="ok", note="")
        try:
            nnz, calls = graphchallenge_case(args)
            cases.append(("graphchallenge", density, calls, {}))
            info[("graphchallenge", density)]["nnz"] = nnz
        except Exception as e:  # recorded, not fatal
            info[("graphchallenge", density)].update(status=_status(e), note=repr(e)[:200])
    return cases, info


def _status(e: BaseException) -> str:
    return "mismatch" if isinstance(e, AssertionError) else failure_status(e)


def run(args: argparse.Namespace, log=print) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Measure every case; returns the rows and the metadata."""
    thread_counts = [args.threads] + ([1] if args.threads > 1 else [])
    cases, info = build_cases(args)
    samples: Dict[tuple, List[float]] = {}
    base: Dict[tuple, Dict[str, Any]] = {}
    for (case, density), fields in info.items():
        for threads in thread_counts:
            for condition in ("idle", "loaded"):
                for method in METHODS:
                    row = dict(fields)
                    if case == "graphchallenge" and method == "masked":
                        row.update(status="n/a", note="the engine has no masked twin")
                    base[(case, density, threads, condition, method)] = row
    blocks = []
    for rnd in range(args.rounds):
        for condition in ("idle", "loaded"):
            block: Dict[str, Any] = dict(round=rnd, condition=condition,
                                         loadavg_before=read_loadavg())
            jiffies = machine_jiffies()
            own_cpu0 = time.process_time()
            start = time.perf_counter()
            busy = BusyProcess(args.busy_core, args.busy_timeout) if condition == "loaded" \
                else None
            try:
                if busy:
                    busy.start()
                    block.update(busy_pid=busy.proc.pid, busy_core=args.busy_core)
                    busy_cpu0 = busy.cpu_seconds()
                for threads in thread_counts:
                    with restored_threads(threads):
                        for case, density, calls, setup in cases:
                            reps = (args.infer_reps if case in BATCH1_CASES else
                                    args.gc_reps if case == "graphchallenge" else args.reps)
                            times, errors = time_interleaved(calls, reps, setup=setup)
                            for method in METHODS:
                                key = (case, density, threads, condition, method)
                                samples.setdefault(key, []).extend(times.get(method, []))
                                if method in errors:
                                    base[key].update(status=failure_status(errors[method]),
                                                     note=repr(errors[method])[:200])
                if busy:
                    block["busy_alive_at_end"] = busy.running()
                    busy_cpu1 = busy.cpu_seconds()
                    block["busy_cpu_total_s"] = busy_cpu1
                    if busy_cpu0 is not None and busy_cpu1 is not None:
                        block["busy_cpu_s"] = busy_cpu1 - busy_cpu0
                        block["busy_cpu_fraction"] = (block["busy_cpu_s"]
                                                      / (time.perf_counter() - start))
            finally:
                if busy:
                    busy.stop()
            block["wall_s"] = time.perf_counter() - start
            own_cpu = time.process_time() - own_cpu0
            block["loadavg_after"] = read_loadavg()
            end_jiffies = machine_jiffies()
            if jiffies and end_jiffies and end_jiffies[1] > jiffies[1]:
                block["machine_busy_fraction"] = ((end_jiffies[0] - jiffies[0])
                                                  / (end_jiffies[1] - jiffies[1]))
                # CPU time the machine spent on neither this process nor its busy child, in
                # cores: the other work that ran during the block (the contamination).
                machine_cpu = (end_jiffies[0] - jiffies[0]) / os.sysconf("SC_CLK_TCK")
                block["other_cpu_cores"] = max(0.0, machine_cpu - own_cpu
                                               - (block.get("busy_cpu_total_s") or 0.0)
                                               ) / block["wall_s"]
            blocks.append(block)
            log(f"# round {rnd} {condition}: {block['wall_s']:.1f} s, load1 "
                f"{_load1(block['loadavg_before'])} -> {_load1(block['loadavg_after'])}"
                + (f", busy process {block.get('busy_cpu_s', 0):.1f} CPU s on CPU "
                   f"{args.busy_core}" if busy else "")
                + (f", machine {100 * block['machine_busy_fraction']:.0f}% busy, other "
                   f"processes {block['other_cpu_cores']:.2f} cores"
                   if "machine_busy_fraction" in block else ""))
            if busy and not block.get("busy_alive_at_end"):
                log("# WARNING: the busy process ended before the loaded round did (raise "
                    "--busy-timeout): part of that round ran idle")
    rows = summarize(samples, base, blocks)
    meta = environment(vars(args))
    meta.update(blocks=blocks, thread_counts=thread_counts,
                cpus=sorted(os.sched_getaffinity(0)))
    return rows, meta


def _load1(load: Optional[Dict[str, float]]) -> str:
    return "?" if not load else f"{load['load1']:.2f}"


# -- output -------------------------------------------------------------------------------------
def _num(row: Optional[Dict[str, Any]], key: str, spec: str) -> str:
    return "-" if not row or row.get(key) is None else format(row[key], spec)


def _time(row: Optional[Dict[str, Any]]) -> str:
    """``median / p90`` in ms (us for batch-1 calls)."""
    if not row or row.get("median_us") is None:
        return "-" if not row else row.get("status", "-")
    scale, spec = (1, ".0f") if row["case"] in BATCH1_CASES else (1e-3, ".2f")
    return f"{row['median_us'] * scale:{spec}} / {row['p90_us'] * scale:{spec}}"


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """The markdown table: per case, density and threads, idle and loaded medians / p90 of both
    twins, the CSR / masked ratios, the loaded / idle slowdowns, and CSR's loaded p90 over its
    idle median."""
    by = {(r["case"], r["density"], r["threads"], r["condition"], r["method"]): r for r in rows}
    header = ["case", "density", "threads", "idle masked med / p90", "idle CSR med / p90",
              "idle CSR/masked", "loaded masked med / p90", "loaded CSR med / p90",
              "loaded CSR/masked", "slowdown masked", "slowdown CSR", "CSR loaded p90 / idle med",
              "CSR 2nd-thread speedup idle / loaded"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = sorted({(r["case"], r["density"], r["threads"]) for r in rows},
                  key=lambda k: (CASES.index(k[0]), k[1], -k[2]))
    for case, density, threads in keys:
        get = lambda cond, m: by.get((case, density, threads, cond, m))  # noqa: E731
        csr_loaded = get("loaded", "csr")
        lines.append("| " + " | ".join([
            case, f"{density:g}", str(threads),
            _time(get("idle", "masked")), _time(get("idle", "csr")),
            _num(get("idle", "csr"), "ratio_to_masked", ".3f"),
            _time(get("loaded", "masked")), _time(csr_loaded),
            _num(csr_loaded, "ratio_to_masked", ".3f"),
            _num(get("loaded", "masked"), "loaded_over_idle", ".2f"),
            _num(csr_loaded, "loaded_over_idle", ".2f"),
            _num(csr_loaded, "p90_over_idle_median", ".2f"),
            "-" if threads == 1 else
            f"{_num(get('idle', 'csr'), 'speedup_vs_1_thread', '.2f')} / "
            f"{_num(csr_loaded, 'speedup_vs_1_thread', '.2f')}"]) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (also measured: 1 thread); default 2")
    p.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    p.add_argument("--reps", type=int, default=40,
                   help="timed calls per twin, round and condition (layer, MLP step)")
    p.add_argument("--infer-reps", type=int, default=100,
                   help="timed batch-1 forwards per twin, round and condition")
    p.add_argument("--rounds", type=int, default=2,
                   help="idle / loaded alternations; samples are pooled over rounds")
    p.add_argument("--busy-core", type=int, default=None,
                   help="CPU the busy process spins on (default: the last CPU in this "
                        "process's affinity)")
    p.add_argument("--busy-timeout", type=float, default=600.0,
                   help="hard limit in seconds on each busy process's life")
    p.add_argument("--layer", type=int, nargs=2, default=[3072, 1024], metavar=("IN", "OUT"))
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--gc-layers", type=int, default=120,
                   help="layers of the Graph Challenge network (1024 neurons); 0 skips it")
    p.add_argument("--gc-inputs", type=int, default=2000)
    p.add_argument("--gc-reps", type=int, default=8,
                   help="timed Graph Challenge inferences per round and condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run (tiny layer and MLP, density 0.1, 3 reps)")
    p.add_argument("--out", type=Path, default=Path("results/busy"))
    args = p.parse_args(argv)
    if args.quick:
        args.layer, args.hidden, args.batch, args.densities = [256, 64], [64, 32], 8, [0.1]
        args.reps, args.infer_reps, args.rounds = 3, 5, 1
        args.gc_layers, args.gc_inputs, args.gc_reps = 3, 40, 2
        args.busy_timeout = min(args.busy_timeout, 120.0)
    if args.busy_core is None:
        args.busy_core = max(os.sched_getaffinity(0))
    for name in ("threads", "reps", "infer_reps", "rounds", "batch", "gc_inputs", "gc_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not all(0 < d <= 1 for d in args.densities):
        p.error(f"--densities must be in (0, 1], got {args.densities}")
    if args.busy_core not in os.sched_getaffinity(0):
        p.error(f"--busy-core {args.busy_core} is not among this process's CPUs "
                f"{sorted(os.sched_getaffinity(0))}")
    return args


def main(argv=None) -> int:
    """Run the benchmark; prints the table and writes busy.csv and busy.json."""
    args = parse_args(argv)
    with restored_threads(args.threads):
        isa = kernel_isa()
        print(f"# busy machine: layer {args.layer[0]}->{args.layer[1]}, MLP "
              f"{'-'.join(map(str, [3072, *args.hidden, 10]))}, batch {args.batch}; threads "
              f"{args.threads} and 1; busy process on CPU {args.busy_core} of "
              f"{sorted(os.sched_getaffinity(0))}; ISA {isa}; {args.rounds} idle/loaded "
              f"rounds of {args.reps} calls ({args.infer_reps} batch-1) per twin")
        rows, meta = run(args)
    markdown = table(rows)
    print(markdown)
    for r in rows:
        if r["case"] == "graphchallenge" and r["method"] == "csr" and r.get("median_us"):
            rate = args.gc_inputs * 32 * 1024 * args.gc_layers / (r["median_us"] * 1e-6)
            print(f"# Graph Challenge 1024 x {args.gc_layers}, {args.gc_inputs} inputs, "
                  f"{r['threads']} threads, {r['condition']}: {rate:.3g} edges/s (median)")
    print("# med / p90 in ms (batch1, batch1_fused: us); CSR/masked = median ratio; slowdown = loaded median "
          "/ idle median; 2nd-thread speedup = 1-thread median / N-thread median")
    paths = write_results(args.out, "busy", rows, meta, fields=FIELDS, markdown=markdown)
    print(f"# wrote {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
