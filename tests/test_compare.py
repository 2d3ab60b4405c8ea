"""The mask-versus-CSR demo (``python -m torch_nerva.compare``) on tiny settings."""
import csv
import importlib.util
import json

import pytest
import torch

from torch_nerva import compare


def _check_results(out, densities, dataset):
    """Both result files hold one sane row per density; returns the JSON document."""
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    doc = json.loads((out / "results.json").read_text())
    assert [float(r["density"]) for r in csv_rows] == densities
    assert [r["density"] for r in doc["rows"]] == densities
    assert doc["meta"]["dataset"] == dataset
    assert doc["meta"]["threads"] == torch.get_num_threads()
    for row in doc["rows"]:
        assert row["dataset"] == dataset
        assert row["nnz_csr"] == row["nnz_mask"] > 0
        for key in ("mask_s_per_epoch", "csr_s_per_epoch", "infer_mask_us", "infer_csr_us"):
            assert row[key] > 0, key
        for key in ("best_acc_mask", "best_acc_csr"):
            assert 0.0 <= row[key] <= 1.0, key
        assert 0.0 <= row["drift"] < 1e-3
    return doc


def test_digits_tiny_run_writes_results(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert compare.main(["--epochs", "1", "--densities", "1.0", "0.1", "--hidden", "64",
                         "--out", str(tmp_path)]) == 0
    doc = _check_results(tmp_path, [1.0, 0.1], "digits")
    assert doc["meta"]["synthetic"] is False
    assert doc["meta"]["args"]["hidden"] == [64]
    nnz = [r["nnz_csr"] for r in doc["rows"]]
    assert nnz[0] == 64 * 64 + 64 * 10 and nnz[1] == round(0.1 * nnz[0])
    table = capsys.readouterr().out
    assert "dataset: digits" in table and "SYNTHETIC" not in table
    assert len([line for line in table.splitlines() if line.lstrip().startswith("0.1 ")]) == 1


def test_missing_sklearn_falls_back_to_synthetic(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as if scikit-learn were not installed
                        lambda name, *a: None if name == "sklearn" else real_find_spec(name, *a))
    assert compare.main(["--epochs", "1", "--densities", "0.1", "--hidden", "64",
                         "--check-steps", "3", "--out", str(tmp_path)]) == 0
    doc = _check_results(tmp_path, [0.1], "synthetic")
    assert doc["meta"]["synthetic"] is True
    captured = capsys.readouterr()
    assert "scikit-learn is not installed" in captured.err
    assert "SYNTHETIC" in captured.out
    # The fallback is the same data as asking for the synthetic set explicitly.
    explicit = compare.load_data("synthetic", seed=0)
    fallback = compare.load_data("digits", seed=0)
    assert fallback.name == "synthetic"
    assert torch.equal(explicit.x_train, fallback.x_train)
    assert torch.equal(explicit.y_test, fallback.y_test)
    assert explicit.x_train.shape == (1438, 64) and explicit.num_classes == 10


def test_dense_digits_learns():
    pytest.importorskip("sklearn")
    args = compare.parse_args(["--epochs", "3", "--densities", "1.0"])
    (row,) = compare.run(args)
    assert row["best_acc_mask"] > 0.85
    assert row["best_acc_csr"] > 0.85


def test_digits_match_scikit_learn_without_importing_it():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = compare._digits()
    ref = datasets.load_digits()
    assert torch.equal(x, torch.as_tensor(ref.data, dtype=torch.float32))
    assert torch.equal(y, torch.as_tensor(ref.target))
