"""The experiment harness: what the comparison command (``python -m torch_nerva.compare``) and
the benchmarks (``benchmarks/*.py``) share.

- :func:`environment`: the run's record: torch and torch_nerva versions, build, backends, the
  instruction set the native kernels run with (:func:`kernel_isa`), threads, CPU model and count,
  platform, git revision, date, command line, ``/proc/loadavg`` and the run's settings.
- :func:`write_results`: the one results writer: ``<stem>.csv`` (one line per row; lists and
  tables as JSON text), ``<stem>.json`` (``{"meta": ..., <sections>, "rows": [...]}``) and,
  when given, ``<stem>.md`` (a markdown table); :func:`read_results` reads the JSON back.
- The timing discipline of the benchmarks: :func:`time_interleaved` (warm-up, rotated and
  reshuffled order, medians from :func:`quartiles`), :func:`restored_threads`,
  :func:`failure_status` (an out-of-memory point is recorded, not fatal).
- :func:`read_loadavg` and :func:`load_warning`: whether other work loaded the machine during a
  timed run.

Part of the experiments (``torch_nerva.compare``): the library proper never imports it.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

import torch

__all__ = ["environment", "write_results", "read_results", "markdown_table", "cpu_model",
           "cpu_count", "git_revision", "kernel_isa", "read_loadavg", "load_warning",
           "time_interleaved", "quartiles", "failure_status", "restored_threads", "field",
           "WARMUP"]


# -- the environment record --------------------------------------------------------------------
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


def cpu_count() -> Optional[int]:
    """The CPUs this process may run on (its affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()


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


def kernel_isa() -> Optional[str]:
    """The instruction set the native kernels run with (``torch_nerva.ops.kernel_isa()``:
    ``avx512``, ``avx2`` or ``base``), or None when the extension does not report it."""
    from .. import ops
    try:
        return ops.kernel_isa()
    except (AttributeError, RuntimeError):
        return None


def read_loadavg() -> Optional[Dict[str, float]]:
    """The machine's load averages from /proc/loadavg (``load1``, ``load5``, ``load15``: the
    mean number of runnable or uninterruptible tasks over 1, 5 and 15 minutes, exponentially
    weighted) and ``runnable`` (tasks runnable at this instant, this process included); None
    where /proc/loadavg cannot be read (not Linux)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            fields = f.read().split()
        return {"load1": float(fields[0]), "load5": float(fields[1]),
                "load15": float(fields[2]), "runnable": int(fields[3].split("/")[0])}
    except (OSError, ValueError, IndexError):
        return None


def _jsonable(value: Any) -> Any:
    """Settings as JSON can hold them: paths and other objects as strings."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def environment(settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The run's record: versions, build, backends, kernel instruction set, threads, machine,
    git revision, date, command line, the load average now and, when given, ``settings`` (the
    run's options; paths and other objects recorded as strings)."""
    import torch_nerva as tn
    record = {
        "torch_version": torch.__version__,
        "torch_nerva_version": tn.__version__,
        "build_info": {k: getattr(tn._build_info, k) for k in dir(tn._build_info)
                       if k.isupper()},
        "backends": tn.backends.available(),
        "kernel_isa": kernel_isa(),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "git_revision": git_revision(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "loadavg": read_loadavg(),
    }
    if settings is not None:
        record["settings"] = _jsonable(dict(settings))
    return record


def load_warning(before: Optional[Dict[str, float]], after: Optional[Dict[str, float]],
                 threads: int, cpus: Optional[int]) -> Optional[str]:
    """A warning when other work loaded the machine during a timed run, else None.

    The rule: ``other`` = max(1-min load before the run, 1-min load after it minus
    ``threads``) estimates the load that is not this run's own (the run itself adds at most
    ``threads`` runnable threads to the average after it, and nothing before it). The warning
    fires when ``other > cpus - threads + 0.5``: the run's threads plus the other work need more
    cores than there are (by more than half a core), so some of the run's threads waited for a
    core and its timings, the native kernels' above all, are contaminated. On 2 cores with 2
    threads that is ``other > 0.5``; with 1 thread, ``other > 1.5``. Unknown loads (no
    /proc/loadavg) or CPU count give None."""
    if not cpus or (before is None and after is None):
        return None
    estimates = []
    if before is not None:
        estimates.append(before["load1"])
    if after is not None:
        estimates.append(after["load1"] - threads)
    other = max(estimates)
    limit = cpus - threads + 0.5
    if other <= limit:
        return None
    seen = ", ".join(f"{v['load1']:.2f} {when}" for v, when in ((before, "before"),
                                                               (after, "after")) if v)
    return (f"the machine was loaded during this run: about {other:.2f} runnable tasks besides "
            f"it (1-min load average {seen}) on {cpus} CPUs with {threads} threads (limit "
            f"{limit:.2f}): timings are contaminated, rerun on a quiet machine or with fewer "
            f"threads")


# -- result files ------------------------------------------------------------------------------
def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    """A markdown (GitHub) table; numbers right-aligned, other columns left-aligned."""
    numeric = [all(isinstance(line[i], (int, float)) or _is_number(line[i]) for line in lines)
               if lines else False for i in range(len(header))]
    out = ["| " + " | ".join(str(h) for h in header) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in line) + " |"
            for line in lines]
    return "\n".join(out)


def _is_number(text: Any) -> bool:
    text = str(text).rstrip("x%")
    try:
        float(text)
    except ValueError:
        return text in ("n/a", "-", "")
    return True


def write_results(out: Path, stem: str, rows: Sequence[Mapping[str, Any]],
                  meta: Mapping[str, Any], *, fields: Optional[Sequence[str]] = None,
                  sections: Optional[Mapping[str, Any]] = None,
                  markdown: Optional[str] = None) -> List[Path]:
    """Write the results of one run; returns the paths written (CSV first, then JSON, then
    markdown).

    - ``<out>/<stem>.csv``: one line per row, the columns ``fields`` (default: every key of the
      rows, in order of appearance; keys not among ``fields`` are left out of the CSV only);
      lists and tables as JSON text.
    - ``<out>/<stem>.json``: ``{"meta": meta, **sections, "rows": rows}`` (``meta`` usually
      :func:`environment` plus the run's own facts; ``sections`` e.g. the experiment's config).
    - ``<out>/<stem>.md``, when ``markdown`` is given: that text (a table for the docs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
    sections = dict(sections or {})
    clash = {"meta", "rows"} & set(sections)
    if clash:
        raise ValueError(f"write_results: sections must not be named {sorted(clash)}")
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(v) for k, v in r.items()})
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"meta": dict(meta), **sections, "rows": [dict(r) for r in rows]}, f,
                  indent=2, default=str)
        f.write("\n")
    paths = [csv_path, json_path]
    if markdown is not None:
        md_path = out / f"{stem}.md"
        md_path.write_text(markdown.rstrip("\n") + "\n", encoding="utf-8")
        paths.append(md_path)
    return paths


def read_results(path: Path) -> Dict[str, Any]:
    """The document :func:`write_results` saved as ``path`` (a ``.json``)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- timing ------------------------------------------------------------------------------------
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
