"""Smoke tests of the benchmarks (benchmarks/kernels.py, benchmarks/mlp_step.py) on tiny runs."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dst_update  # noqa: E402
import graphchallenge  # noqa: E402
import kernels  # noqa: E402
import mlp_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def kernels_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    assert kernels.main(["--config", str(ROOT / "configs" / "kernels_quick.toml"), "--reps", "2",
                         "--out", str(out)]) == 0
    return out / "kernels.csv"


def test_kernels_quick_config(kernels_csv):
    rows = read_csv(kernels_csv)
    doc = json.loads(kernels_csv.with_suffix(".json").read_text())
    meta = doc["meta"]
    assert meta["torch_version"] and meta["settings"]["reps"] == 2
    assert meta["kernel_isa"] == torch.ops.torch_nerva._kernel_isa("") and meta["cpu_model"]
    assert meta["threads"] >= 1 and meta["git_revision"] is not None
    assert len(doc["rows"]) == len(rows)
    points = {(r["in_features"], r["out_features"], r["density"]) for r in rows}
    assert len(points) == 3
    for point in points:
        for mode in kernels.MODES:
            got = {r["method"]: r for r in rows
                   if (r["in_features"], r["out_features"], r["density"]) == point
                   and r["mode"] == mode}
            for method in ("masked", "torch_sparse_fn", "nerva_auto"):
                assert got[method]["status"] == "ok", (point, mode, got[method]["note"])
                assert float(got[method]["median_ms"]) > 0
                assert float(got[method]["gflops"]) > 0
            assert float(got["masked"]["ratio"]) == 1.0
            assert got["nerva_auto"]["backend"] in ("native", "dense")
            assert got["torch_sparse_fn"]["backend"] == "torch"  # the library's backend


def test_benchmarks_share_the_harness():
    """One environment record, one results writer and one torch.sparse implementation: the
    benchmarks use torch_nerva.compare.harness and the library's "torch" backend."""
    import inspect
    from torch_nerva.compare import harness
    for module in (dst_update, graphchallenge, kernels, mlp_step):
        assert module.environment is harness.environment, module.__name__
        assert module.write_results is harness.write_results, module.__name__
    for path in (ROOT / "benchmarks").glob("*.py"):
        text = path.read_text()
        assert "autograd.Function" not in text, path.name
        assert "def environment(" not in text and "def write_results(" not in text, path.name
    assert not [c for _, c in inspect.getmembers(kernels, inspect.isclass)
                if issubclass(c, torch.autograd.Function)]


def test_kernels_plot(kernels_csv):
    pytest.importorskip("matplotlib")
    png = kernels.plot(kernels_csv, kernels_csv.with_suffix(".png"))
    assert png.stat().st_size > 0


def test_kernels_config_points_and_flags(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("batch = 4\n[[points]]\nin = 8\nout = 4\ndensities = [0.5, 0.25]\n")
    s = kernels.settings_from(kernels.parse_args(["--config", str(config), "--batch", "6",
                                                  "--methods", "nerva_auto"]))
    assert s["points"] == [(8, 4, 0.5), (8, 4, 0.25)] and s["batch"] == 6
    assert s["methods"] == ["masked", "nerva_auto"]
    s = kernels.settings_from(kernels.parse_args(["--shapes", "8x4", "2x2", "--densities", "0.5"]))
    assert s["points"] == [(8, 4, 0.5), (2, 2, 0.5)]


def test_mlp_step_tiny(tmp_path):
    assert mlp_step.main(["--hidden", "16", "8", "--densities", "1", "0.1", "--reps", "2",
                          "--infer-reps", "3", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "mlp_step.csv")
    assert [float(r["density"]) for r in rows] == [1.0, 0.1]
    for r in rows:
        assert r["status"] == "ok", r["note"]
        for key in ("nnz", "masked_ms", "csr_ms", "speedup", "masked_b1_us", "csr_b1_us"):
            assert float(r[key]) > 0, key
        assert len(r["backends"].split()) == 3
    meta = json.loads((tmp_path / "mlp_step.json").read_text())["meta"]
    assert meta["settings"]["hidden"] == [16, 8]


def test_dst_update_tiny(tmp_path):
    assert dst_update.main(["--hidden", "16", "8", "--densities", "0.2", "--reps", "2",
                            "--window", "2", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "dst_update.csv")
    assert [r["method"] for r in rows] == ["set", "rigl", "momentum"]
    for r in rows:
        assert r["status"] == "ok", r["note"]
        for key in ("nnz", "csr_update_ms", "masked_update_ms", "csr_step_ms"):
            assert float(r[key]) > 0, key


def test_kernels_records_mismatch_and_errors(monkeypatch):
    build = kernels.build

    def broken(name, sparse, masked):
        layer = build(name, sparse, masked)
        if name == "nn_linear":
            with torch.no_grad():
                layer.bias += 1
        if name == "torch_sparse_fn":
            raise MemoryError("no room")
        return layer

    monkeypatch.setattr(kernels, "build", broken)
    rows = {r["method"]: r for r in kernels.run_point(8, 4, 0.5, 3, "fwd_bwd",
                                                       kernels.method_names(), reps=1)}
    assert rows["nn_linear"]["status"] == "mismatch" and "median_ms" not in rows["nn_linear"]
    assert rows["torch_sparse_fn"]["status"] == "oom"
    assert rows["nerva_auto"]["status"] == "ok" and rows["nerva_auto"]["median_ms"] > 0


def test_graphchallenge_benchmark_tiny_run(tmp_path, capsys):
    pytest.importorskip("scipy")
    assert graphchallenge.main(["--neurons", "1024", "--layers", "12", "--inputs", "300",
                                "--reps", "1", "--check-inputs", "0", "--threads", "1", "2",
                                "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "graphchallenge.csv")
    assert [(r["threads"], r["prune"]) for r in rows] == [
        ("1", "True"), ("1", "False"), ("2", "True"), ("2", "False")]
    assert all(r["exact_vs_scipy"] == "True" and float(r["rate"]) > 0 for r in rows)
    assert len({r["categories"] for r in rows}) == 1
    meta = json.loads((tmp_path / "graphchallenge.json").read_text())["meta"]
    assert meta["settings"]["neurons"] == 1024
    assert "edges/s" in capsys.readouterr().out


def test_graphchallenge_benchmark_reads_the_official_format(tmp_path):
    pytest.importorskip("scipy")
    data = ROOT / "tests" / "data" / "graphchallenge"
    weights = tmp_path / "w"
    weights.mkdir()
    import gzip
    for i in range(1, 7):
        (weights / f"n1024-l{i}.tsv").write_bytes(gzip.decompress(
            (data / f"n1024-l{i}.tsv.gz").read_bytes()))
    config = tmp_path / "c.toml"
    config.write_text(f'neurons = 1024\nlayers = 6\ninputs = 200\nreps = 1\n'
                      f'weights_dir = "{weights}"\nout = "{tmp_path / "out"}"\n')
    assert graphchallenge.main(["--config", str(config)]) == 0


def test_resnet_step_tiny(capsys):
    pytest.importorskip("torchvision")
    import resnet_step
    assert resnet_step.main(["--densities", "0.05", "--batch", "2", "--reps", "1",
                             "--threads", "1"]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.strip().startswith("0.05")]
    assert line and "errors" not in line[0]
    dense, masked, csr = (float(v) for v in line[0].split()[2:5])
    assert dense > 0 and masked > 0 and csr > 0
