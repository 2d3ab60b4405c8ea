"""Helpers shared by the benchmarks: interleaved timing, run metadata and result files."""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

import torch_nerva as tn
from torch_nerva.compare.report import cpu_model, git_revision

WARMUP = 3


def time_interleaved(calls: Mapping[str, Callable[[], Any]], reps: int, warmup: int = WARMUP,
                     setup: Optional[Mapping[str, Callable[[], Any]]] = None, burst: int = 1
                     ) -> Tuple[Dict[str, List[float]], Dict[str, BaseException]]:
    """Seconds per call of each ``calls[name]``: ``warmup`` untimed calls each, then ``reps``
    rounds that call every function once, the order rotated by one each round so that machine
    noise hits all of them alike. The base order is reshuffled (seeded) every ``len(calls)``
    rounds, so that no function always follows the same one: a call right after a different
    op was measured up to ~5 us slower than after itself. ``setup[name]``, if given, runs
    untimed before each call.

    With ``burst > 1`` each turn calls a function ``burst`` times in a row and times all but the
    first, which re-warms the caches the other functions used: the steady state of a training
    loop that runs only this model. ``burst=1`` times calls that follow other work (colder).

    A function that raises is dropped from then on; returns ``(times, errors)``.
    """
    setup = setup or {}
    times: Dict[str, List[float]] = {name: [] for name in calls}
    errors: Dict[str, BaseException] = {}

    def call(name: str, timed: bool) -> None:
        try:
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            calls[name]()
            if timed:
                times[name].append(time.perf_counter() - start)
        except Exception as e:  # recorded, not fatal
            errors[name] = e

    order = list(calls)
    for name in order:
        for _ in range(warmup):
            if name not in errors:
                call(name, False)
    rng = random.Random(0)
    for rep in range(reps):
        k = rep % len(order)
        if k == 0:  # a new base order every len(order) reps: varied predecessors (see above)
            rng.shuffle(order)
        for name in order[k:] + order[:k]:
            for i in range(burst):
                if name not in errors:
                    call(name, burst == 1 or i > 0)
    return {n: t for n, t in times.items() if n not in errors}, errors


def quartiles(times: Sequence[float]) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``times``."""
    if len(times) < 2:
        return times[0], times[0], times[0]
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, med, q3


def failure_status(e: BaseException) -> str:
    """``"oom"`` for an out-of-memory error, else ``"error"``."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e):
        return "oom"
    return "error"


@contextlib.contextmanager
def restored_threads(threads: Optional[int] = None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (if given) and restore the
    previous count afterwards, also when the block sets other counts or raises."""
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)


def field(row: Mapping[str, Any], key: str, spec: str) -> str:
    """``row[key]`` formatted with ``spec``, or "" when it is missing (a failed point)."""
    return "" if row.get(key) is None else format(row[key], spec)


def environment(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Run metadata: versions, build, kernel instruction set, machine, git, date, command.
    Paths among ``settings`` are recorded as strings."""
    try:
        isa = tn.ops.kernel_isa()
    except AttributeError:
        isa = None
    return {
        "torch_version": torch.__version__,
        "torch_nerva_version": tn.__version__,
        "build_info": {k: getattr(tn._build_info, k) for k in dir(tn._build_info) if k.isupper()},
        "backends": tn.backends.available(),
        "kernel_isa": isa,
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "git_revision": git_revision(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
    }


def write_results(out: Path, stem: str, rows: Sequence[Mapping[str, Any]],
                  fields: Sequence[str], meta: Mapping[str, Any]) -> Path:
    """Write ``out/stem.csv`` (``fields`` of every row) and the sidecar ``out/stem.json``
    (``meta``); returns the CSV path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(out / f"{stem}.json", "w") as f:
        json.dump(meta, f, indent=2, default=str)
    return path
