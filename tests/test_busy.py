"""The busy-machine benchmark (benchmarks/busy.py): its busy process starts, spins on its core,
stops and never outlives its parent; a --quick run writes every row. No timing assertions."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import busy  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"),
                                reason="needs Linux CPU affinity")
CORE = max(os.sched_getaffinity(0))


def gone(pid, wait=10.0):
    """True once ``pid`` no longer exists (or is a zombie nobody reaped yet) within ``wait``."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_busy_process_spins_on_its_core_and_stops():
    with busy.BusyProcess(CORE, timeout=60) as b:
        pid = b.proc.pid
        assert b.running()
        assert os.sched_getaffinity(pid) == {CORE}
        first = b.cpu_seconds()
        time.sleep(0.3)
        assert b.cpu_seconds() > first  # it spins
    assert not b.running() and gone(pid)


def test_busy_process_ends_by_its_hard_timeout():
    b = busy.BusyProcess(CORE, timeout=0.5).start()
    try:
        assert b.proc.wait(timeout=30) == 0
    finally:
        b.stop()


def test_busy_process_dies_with_its_parent():
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import busy; "
            f"b = busy.BusyProcess({CORE}, 120).start(); print(b.proc.pid, flush=True); "
            "os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")],
                         capture_output=True, text=True, timeout=120, check=True)
    assert gone(int(out.stdout.split()[-1]))


def test_busy_process_refuses_bad_arguments():
    with pytest.raises(ValueError, match="not among the CPUs"):
        busy.BusyProcess(max(os.sched_getaffinity(0)) + 1000, 10)
    with pytest.raises(ValueError, match="timeout must be positive"):
        busy.BusyProcess(CORE, 0)
    with pytest.raises(SystemExit):
        busy.parse_args(["--busy-core", "100000"])
    with pytest.raises(SystemExit):
        busy.parse_args(["--densities", "0"])


def test_summary_ratios_from_given_samples():
    key = lambda cond, m, t=2: ("layer", 0.1, t, cond, m)  # noqa: E731
    samples = {key("idle", "masked"): [10.0] * 5, key("idle", "csr"): [1.0, 1, 1, 1, 11],
               key("loaded", "masked"): [20.0] * 5, key("loaded", "csr"): [4.0] * 5,
               key("idle", "csr", 1): [1.5] * 5}
    base = {k: dict(status="ok", note="", nnz=7) for k in samples}
    rows = {(r["condition"], r["method"], r["threads"]): r
            for r in busy.summarize(samples, base, [])}
    idle, loaded = rows[("idle", "csr", 2)], rows[("loaded", "csr", 2)]
    assert idle["median_us"] == pytest.approx(1e6) and idle["p90_us"] == pytest.approx(7e6)
    assert idle["ratio_to_masked"] == pytest.approx(0.1)
    assert loaded["ratio_to_masked"] == pytest.approx(0.2)
    assert loaded["loaded_over_idle"] == pytest.approx(4.0)
    assert rows[("loaded", "masked", 2)]["loaded_over_idle"] == pytest.approx(2.0)
    assert loaded["p90_over_idle_median"] == pytest.approx(4.0)
    assert idle["speedup_vs_1_thread"] == pytest.approx(1.5)
    assert busy.p90(list(range(11))) == pytest.approx(9.0)


def test_quick_run_writes_every_row_and_leaves_no_busy_process(tmp_path, capsys):
    assert busy.main(["--quick", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "busy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {(r["case"], r["threads"], r["condition"], r["method"]) for r in rows}
    assert keys == {(c, t, cond, m) for c in busy.CASES for t in ("2", "1")
                    for cond in ("idle", "loaded") for m in busy.METHODS}
    for r in rows:
        if r["case"] == "graphchallenge" and r["method"] == "masked":
            assert r["status"] == "n/a" and not r["median_us"]  # the engine has no twin
            continue
        assert r["status"] == "ok", r["note"]
        assert float(r["median_us"]) > 0 and float(r["p90_us"]) >= float(r["median_us"])
        assert int(r["nnz"]) > 0
        if r["case"] != "graphchallenge":
            assert float(r["ratio_to_masked"]) > 0
        if r["condition"] == "loaded":
            assert float(r["loaded_over_idle"]) > 0
        if r["threads"] == "2":
            assert float(r["speedup_vs_1_thread"]) > 0
    meta = json.loads((tmp_path / "busy.json").read_text())["meta"]
    assert "| layer | 0.1 | 2 |" in (tmp_path / "busy.md").read_text()
    assert meta["kernel_isa"] and meta["cpu_model"] and meta["thread_counts"] == [2, 1]
    loaded = [b for b in meta["blocks"] if b["condition"] == "loaded"]
    assert len(loaded) == 1 and len(meta["blocks"]) == 2
    assert loaded[0]["busy_core"] == CORE and loaded[0]["busy_alive_at_end"]
    assert loaded[0]["busy_cpu_s"] > 0
    for b in meta["blocks"]:
        assert b["loadavg_before"]["load1"] >= 0 and b["loadavg_after"]["load1"] >= 0
        assert 0 <= b["machine_busy_fraction"] <= 1 and b["other_cpu_cores"] >= 0
    assert gone(loaded[0]["busy_pid"], wait=1.0)
    assert "| layer | 0.1 | 2 |" in capsys.readouterr().out
