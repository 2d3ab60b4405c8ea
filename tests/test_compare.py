"""The mask-versus-CSR comparison (``python -m torch_nerva.compare``) on tiny configs."""
import csv
import hashlib
import importlib.util
import json
import pickle
import textwrap

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_nerva
from torch_nerva import compare
from torch_nerva.compare import config, data, experiments, memory

TINY = """
title = "tiny"

[[experiment]]
kind = "density"
name = "syn"
dataset = "synthetic-cifar10"
train_samples = 300
test_samples = 100
hidden = [64, 32]
densities = [1.0, 0.1]
epochs = 2
check_steps = 3
inference_calls = 5

[[experiment]]
kind = "inference"
hidden = [32]
densities = [1.0, 0.1]
train_samples = 10
test_samples = 10
inference_calls = 5

[[experiment]]
kind = "depth"
depths = [1, 2]
width = 64
steps = 2
train_samples = 200
test_samples = 10
samples_per_epoch = 1000

[[experiment]]
kind = "width"
widths = [32, 512]
layers = 2
density = 0.05
steps = 2
train_samples = 200
test_samples = 10
memory_budget_gb = 0.01
"""


def _write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- config ---------------------------------------------------------------------------------

def test_shipped_configs_parse():
    root = compare.config.default_config_path().parent
    names = sorted(p.name for p in root.glob("*.toml"))
    for required in ("quick.toml", "paper.toml", "depth.toml", "width.toml", "inference.toml",
                     "dst.toml"):
        assert required in names
    for name in names:
        if name.startswith(("kernels", "graphchallenge")):
            continue  # the benchmarks' own formats
        cfg = config.load(root / name)
        assert cfg["experiments"]
    paper = config.load(root / "paper.toml")["experiments"][0]
    assert paper["epochs"] == 100 and paper["seeds"] == [0, 1, 2] and paper["batch_size"] == 100
    assert paper["densities"] == [1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.005, 0.001]
    assert config.lr_for(paper, 0.001) == 0.05 and config.lr_for(paper, 0.5) == 0.01
    quick = {e["kind"] for e in config.load(root / "quick.toml")["experiments"]}
    assert quick == {"density", "inference", "depth", "width"}


@pytest.mark.parametrize("body,message", [
    ('[[experiment]]\nkind = "density"\ndensitys = [0.1]\n', "unknown keys"),
    ('[[experiment]]\nkind = "density"\ndensities = [0.1, 1.5]\n', "in (0, 1]"),
    ('[[experiment]]\nkind = "density"\ndensities = [0.0]\n', "in (0, 1]"),
    ('[[experiment]]\nkind = "mystery"\n', "kind must be one of"),
    ('[[experiment]]\nkind = "density"\ndataset = "mnist"\n', "dataset must be one of"),
    ('[[experiment]]\nkind = "density"\ndensities = [0.1]\nlr = {"0.2" = 0.1}\n',
     "no learning rate for density 0.1"),
    ('[[experiment]]\nkind = "width"\nwidths = [0]\n', "positive integers"),
    ('title = "x"\n', "no [[experiment]]"),
    ('[[experiment]]\nkind = "density"\nepochs = 0\n', "epochs"),
    ('[[experiment]\n', "not valid TOML"),
    ('[[experiment]]\nkind = "density"\ndtype = "float16"\n', "dtype must be"),
])
def test_bad_configs_are_refused_with_the_key_named(tmp_path, body, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config.load(_write(tmp_path, body))


def test_main_reports_config_errors_without_a_traceback(tmp_path, capsys):
    assert compare.main(["--config", str(_write(tmp_path, '[[experiment]]\nkind = "x"\n'))]) == 2
    assert "kind must be one of" in capsys.readouterr().err
    assert compare.main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_lr_per_density_table():
    exp = {"lr": {"default": 0.01, "0.1": 0.2}}
    assert config.lr_for(exp, 0.1) == 0.2 and config.lr_for(exp, 0.5) == 0.01
    assert config.lr_for({"lr": 0.3}, 0.7) == 0.3


# ---- the whole command on a tiny config -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    out = tmp / "out"
    assert compare.main(["--config", str(_write(tmp, TINY)), "--out", str(out)]) == 0
    return out


def _doc(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_density_rows(tiny_run):
    doc = _doc(tiny_run, "syn")
    rows = doc["rows"]
    assert [r["density"] for r in rows] == [1.0, 0.1]
    assert doc["meta"]["synthetic"] is True and doc["meta"]["threads"] >= 1
    assert doc["meta"]["cpu_model"] and doc["experiment"]["hidden"] == [64, 32]
    total = 3072 * 64 + 64 * 32 + 32 * 10
    assert rows[0]["nnz"] == total and rows[1]["nnz"] == round(0.1 * total)
    for r in rows:
        assert len(r["mask_epoch_s"]) == len(r["csr_epoch_s"]) == 2
        for key in ("mask_s_per_epoch", "csr_s_per_epoch", "infer_mask_us", "infer_csr_us",
                    "infer_dense_us"):
            assert r[key] > 0, key
        assert 0 <= r["best_acc_mask"] <= 1 and 0 <= r["best_acc_csr"] <= 1
        assert r["loss_drift"] < 1e-4 and r["weight_drift"] < 1e-4 and r["drift_steps"] == 3
        assert r["disk_bytes_csr"] > 0 and r["peak_bytes_csr"] > r["param_bytes_csr"]
    sparse = rows[1]
    # The CSR model at density 0.1 holds a fraction of the masked twin's memory, on disk too.
    assert sparse["param_bytes_csr"] < 0.5 * sparse["param_bytes_mask"]
    assert sparse["peak_bytes_csr"] < sparse["peak_bytes_mask"]
    assert sparse["disk_bytes_csr"] < 0.5 * sparse["disk_bytes_mask"]
    with open(tiny_run / "syn.csv", newline="") as f:
        assert [float(r["density"]) for r in csv.DictReader(f)] == [1.0, 0.1]


def test_depth_width_inference_rows(tiny_run):
    depth = _doc(tiny_run, "depth")["rows"]
    assert [r["depth"] for r in depth] == [1, 2]
    assert all(r["mask_s_per_epoch"] > 0 and r["csr_s_per_epoch"] > 0 for r in depth)
    width = _doc(tiny_run, "width")["rows"]
    small, big = width
    assert small["mask_s_per_epoch"] > 0 and small["peak_bytes_mask"] > 0
    # 512 wide is over the 10 MB budget for the masked twin: skipped before allocating, with
    # the memory it would need; the CSR model still trains.
    assert big["estimated_bytes_mask"] > 0.01 * 2**30
    assert big["mask_s_per_epoch"] is None and big["peak_bytes_mask"] is None
    assert "masked skipped: would need" in big["note"]
    assert big["csr_s_per_epoch"] > 0 and big["peak_bytes_csr"] > 0
    inference = _doc(tiny_run, "inference")["rows"]
    assert [r["density"] for r in inference] == [1.0, 0.1]
    assert all(r["infer_csr_us"] > 0 and r["infer_dense_us"] > 0 for r in inference)


def test_plots_are_written_and_can_be_redrawn(tiny_run, capsys):
    pytest.importorskip("matplotlib")
    for name in ("syn_accuracy", "syn_time", "syn_inference", "inference_inference",
                 "depth_time", "width_time"):
        assert (tiny_run / f"{name}.png").stat().st_size > 1000, name
    (tiny_run / "syn_time.png").unlink()
    assert compare.main(["--plot-only", str(tiny_run)]) == 0
    assert (tiny_run / "syn_time.png").is_file()


def test_only_selects_experiments_and_rejects_unknown_names(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    assert compare.main(["--config", str(path), "--out", str(tmp_path / "o"), "--only",
                         "depth", "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["depth.csv", "depth.json",
                                                                  "depth.md"]
    assert (tmp_path / "o" / "depth.md").read_text().startswith("## depth (depth)\n\n| hidden")
    assert compare.main(["--config", str(path), "--only", "nope"]) == 2
    assert "no experiments named" in capsys.readouterr().err


def test_digits_twins_learn_the_same():
    pytest.importorskip("sklearn")
    exp = config.parse({"experiment": [{"kind": "density", "dataset": "digits",
                                        "hidden": [64], "densities": [1.0, 0.5], "epochs": 3,
                                        "lr": 0.05, "check_steps": 40,
                                        "inference_calls": 3}]})["experiments"][0]
    d = data.load_data("digits")
    rows = experiments.run_density(exp, d, lambda s: None)
    for r in rows:
        assert r["best_acc_mask"] > 0.85 and r["best_acc_csr"] > 0.85
        assert abs(r["best_acc_mask"] - r["best_acc_csr"]) <= 1 / d.y_test.numel()
        assert r["weight_drift"] < 1e-5


# ---- data -------------------------------------------------------------------------------------

def _fake_cifar(root, n_per_batch=6, n_test=5):
    """CIFAR-10's on-disk format (python pickles) with a few random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        arr = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        images[name] = (arr, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": arr, "labels": labels, "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    return images, md5


def test_cifar10_loader_reads_cifar_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    images, md5 = _fake_cifar(tmp_path)
    # torchvision checks the real files' checksums: point it at the generated ones instead.
    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]]
                                            for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {"filename": "batches.meta", "key": "label_names",
                                      "md5": md5["batches.meta"]})
    d = data.load_data("cifar10", tmp_path, download=False)
    assert d.name == "cifar10" and not d.synthetic and d.note == ""
    assert d.x_train.shape == (30, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    first, labels = images["data_batch_1"]
    assert torch.equal(d.x_train[0].flatten(), torch.from_numpy(first[0]))  # CHW order kept
    assert d.y_train[:6].tolist() == labels
    assert d.y_test.tolist() == images["test_batch"][1]
    x = d.prepare(d.x_train[:4])
    assert x.shape == (4, 3072) and x.dtype == torch.float32
    # normalised with the training set's per-channel statistics
    full = d.prepare(d.x_train).view(30, 3, -1)
    assert full.mean(dim=(0, 2)).abs().max() < 1e-4
    assert (full.std(dim=(0, 2)) - 1).abs().max() < 1e-2
    aug = d.prepare(d.x_train[:4], augment=True, generator=torch.Generator().manual_seed(0))
    assert aug.shape == (4, 3072) and not torch.equal(aug, x)


def test_missing_cifar10_falls_back_to_synthetic_with_a_notice(tmp_path, capsys):
    d = data.load_data("cifar10", tmp_path / "empty", download=False, train_samples=50,
                       test_samples=20)
    assert d.name == "synthetic-cifar10" and d.synthetic
    assert d.x_train.shape == (50, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    err = capsys.readouterr().err
    assert "CIFAR-10 is not in" in err and "accuracy is not" in err
    assert "CIFAR-10 is not in" in d.note


def test_missing_sklearn_falls_back_to_synthetic_digits(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    d = data.load_data("digits")
    assert d.name == "synthetic-digits" and d.x_train.shape == (1438, 64)
    assert "scikit-learn is not installed" in capsys.readouterr().err
    assert torch.equal(d.x_train, data.load_data("synthetic-digits").x_train)


def test_digits_match_scikit_learn_without_importing_it():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = data.digits_arrays()
    ref = datasets.load_digits()
    assert torch.equal(x, torch.as_tensor(ref.data, dtype=torch.float32))
    assert torch.equal(y, torch.as_tensor(ref.target))


def test_random_crop_flip_takes_shifted_windows():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(x, g, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))
                    for oy in range(5) for ox in range(5)
                    for w in [padded[i, :, oy:oy + 8, ox:ox + 8]])
        assert found
    flips = data.random_crop_flip(x[:1].expand(64, 3, 8, 8), g, padding=0)
    n_flipped = sum(torch.equal(f, x[0].flip(-1)) for f in flips)
    assert 0 < n_flipped < 64  # both happen


# ---- memory -------------------------------------------------------------------------------------

def test_tracker_counts_live_tensors_once():
    tracker = memory.TensorMemoryTracker()
    with tracker:
        a = torch.ones(1000)          # 4000 bytes
        b = a.view(10, 100)           # a view: nothing new
        a.add_(1)                     # in place: nothing new
        del a, b
        c = torch.ones(500)           # 2000 bytes, after a was freed
        d = torch.ones(250)           # 1000 bytes
    assert tracker.peak == 4000
    assert tracker.current == 3000
    del c, d


def test_masked_estimate_bounds_the_measured_step():
    sizes = [3072, 256, 128, 10]
    masked, csr = experiments.build_twins(sizes, 0.05, 0)
    x, y = torch.randn(100, 3072), torch.randint(0, 10, (100,))
    exp = {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0}
    for model, is_masked in ((masked, True), (csr, False)):
        opt = experiments.make_optimizer(model, exp, 0.01)
        experiments.train_step(model, opt, x, y)
        peak = experiments.step_memory(model, opt, x, y)
        est = memory.estimate_training_bytes(sizes, experiments.layer_nnz(csr), 100, is_masked)
        assert peak <= est <= 3 * peak, (is_masked, peak, est)


@pytest.mark.parametrize("method,dtype", [("set", "float32"), ("rigl", "float32"),
                                          ("momentum", "float32"), ("momentum", "float64")])
def test_dst_runs_on_both_twins_alike(method, dtype):
    exp = config.parse({"experiment": [{"kind": "density", "dataset": "synthetic-digits",
                                        "hidden": [32], "densities": [0.2], "epochs": 2,
                                        "check_steps": 30, "inference_calls": 2, "dst": method,
                                        "dst_every": 4, "dst_end": 1.0,
                                        "dtype": dtype}]})["experiments"][0]
    ds = data.load_data("synthetic-digits")
    ds.dtype = getattr(torch, dtype)
    (row,) = experiments.run_density(exp, ds, lambda s: None)
    assert row["dst"] == method and row["dst_updates"] >= 5
    assert row["dst_same_topology"] is True and row["dst_update_ms_csr"] > 0
    assert row["dst_topology_checks"] == row["dst_updates"] and row["dst_topology_diff"] == 0
    assert row["loss_drift"] < 1e-4 and row["weight_drift"] < 1e-4


# ---- machine load in the results ------------------------------------------------------------

def test_load_warning_rule():
    from torch_nerva.compare.harness import load_warning
    quiet, busy = {"load1": 0.3}, {"load1": 1.4}
    assert load_warning(quiet, {"load1": 2.3}, threads=2, cpus=2) is None  # only the run itself
    assert "contaminated" in load_warning(busy, {"load1": 2.3}, threads=2, cpus=2)
    assert "contaminated" in load_warning(quiet, {"load1": 3.2}, threads=2, cpus=2)  # others after
    assert load_warning(busy, busy, threads=1, cpus=2) is None  # one thread fits beside it
    assert load_warning({"load1": 1.6}, None, threads=1, cpus=2) is not None
    assert load_warning(None, None, threads=2, cpus=2) is None
    assert load_warning(busy, busy, threads=2, cpus=None) is None


@pytest.mark.parametrize("load1, warned", [(0.1, False), (3.0, True)])
def test_results_record_isa_threads_and_load(tmp_path, monkeypatch, capsys, load1, warned):
    calls = []

    def fake_loadavg():
        calls.append(load1)
        return {"load1": load1 + len(calls) / 100, "load5": 1.0, "load15": 1.0, "runnable": 1}
    monkeypatch.setattr(compare, "read_loadavg", fake_loadavg)
    monkeypatch.setattr(compare.harness, "cpu_count", lambda: 2)
    out = tmp_path / "o"
    assert compare.main(["--config", str(_write(tmp_path, TINY)), "--out", str(out), "--only",
                         "depth", "--no-plots", "--threads", "1"]) == 0
    meta = _doc(out, "depth")["meta"]
    assert meta["threads"] == 1 and meta["kernel_isa"] == torch.ops.torch_nerva._kernel_isa("")
    assert meta["loadavg_before"]["load1"] == pytest.approx(load1 + 0.01)
    assert meta["loadavg_after"]["load1"] == pytest.approx(load1 + 0.02)
    printed = capsys.readouterr().out
    if warned:
        assert "contaminated" in meta["load_warning"] and "WARNING (depth)" in printed
    else:
        assert meta["load_warning"] is None and "WARNING" not in printed


# ---- convolutional models -----------------------------------------------------------------------

TINY_CNN = """
title = "tiny-cnn"

[[experiment]]
kind = "density"
name = "dcnn"
model = "digits_cnn"
dataset = "digits"
channels = [4, 8]
hidden = [16]
distribution = "erk"
densities = [1.0, 0.3]
seeds = [0, 1]
train_samples = 128
test_samples = 64
batch_size = 32
epochs = 2
lr = 0.05
check_steps = 3
inference_calls = 3

[[experiment]]
kind = "density"
name = "resnet"
model = "resnet18_cifar"
dataset = "synthetic-cifar10"
train_samples = 16
test_samples = 8
batch_size = 8
distribution = "erk"
densities = [0.02]
backend = "native"
epochs = 1
lr = 0.05
weight_decay = 5e-4
check_steps = 2
inference_calls = 2
dtype = "float64"  # float32 BatchNorm over 8 images amplifies summation-order rounding to ~1e-4

[[experiment]]
kind = "inference"
name = "dcnn-infer"
model = "digits_cnn"
dataset = "synthetic-digits"
channels = [4, 8]
hidden = [16]
densities = [1.0, 0.2]
train_samples = 32
test_samples = 8
inference_calls = 3
"""


def test_conv_configs_parse_and_model_keys_are_checked(tmp_path):
    root = compare.config.default_config_path().parent
    (dcnn,) = config.load(root / "digits_cnn.toml")["experiments"]
    assert dcnn["model"] == "digits_cnn" and dcnn["dataset"] == "digits"
    assert len(dcnn["seeds"]) >= 2 and 1.0 in dcnn["densities"] and len(dcnn["densities"]) >= 3
    assert dcnn["channels"] and dcnn["hidden"] and dcnn["distribution"] == "erk"
    resnet = config.load(root / "resnet_cifar.toml")["experiments"]
    assert {e["model"] for e in resnet} == {"resnet18_cifar"}
    assert all("hidden" not in e and "channels" not in e for e in resnet)
    assert resnet[0]["densities"] == [1.0, 0.05, 0.01] and resnet[0]["dataset"] == "cifar10"
    mlp = config.parse({"experiment": [{"kind": "density"}]})["experiments"][0]
    assert mlp["model"] == "mlp" and "channels" not in mlp and mlp["backend"] == "auto"
    cnn = config.parse({"experiment": [{"kind": "inference", "model": "digits_cnn"}]})
    assert cnn["experiments"][0]["hidden"] == config.MODELS["digits_cnn"]["hidden"]
    for body, message in [
        ({"model": "resnet18_cifar", "hidden": [10]}, "do not apply to model 'resnet18_cifar'"),
        ({"channels": [4]}, "do not apply to model 'mlp'"),
        ({"model": "vgg"}, "model must be one of"),
        ({"model": "digits_cnn", "backend": "torch"}, "backend must be one of auto, native"),
        ({"backend": "fast"}, "backend must be one of"),
        ({"model": "digits_cnn", "channels": [0]}, "positive integers"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.parse({"experiment": [{"kind": "density", **body}]})
    with pytest.raises(config.ConfigError, match="unknown keys"):
        config.parse({"experiment": [{"kind": "depth", "model": "digits_cnn"}]})


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    pytest.importorskip("torchvision")
    tmp = tmp_path_factory.mktemp("cnn")
    out = tmp / "out"
    assert compare.main(["--config", str(_write(tmp, TINY_CNN)), "--out", str(out),
                         "--no-plots"]) == 0
    return out


def test_digits_cnn_tiny_run(cnn_run):
    pytest.importorskip("sklearn")
    doc = _doc(cnn_run, "dcnn")
    meta, rows = doc["meta"], doc["rows"]
    assert meta["kernel_isa"] == torch.ops.torch_nerva._kernel_isa("") and meta["threads"] >= 1
    assert meta["dataset"] == "digits" and not meta["synthetic"]
    assert [(r["density"], r["seed"]) for r in rows] == [(1.0, 0), (1.0, 1), (0.3, 0), (0.3, 1)]
    sparse_weights = 4 * 8 * 9 + 8 * 16 * 16  # conv 4->8 and linear 128->16; the rest dense
    for r in rows:
        assert r["model"] == "digits_cnn" and r["dataset"] == "digits"
        assert r["dense_weights"] == 1 * 4 * 9 + 16 * 10
        assert len(r["layer_nnz"]) == 2 and sum(r["csr_backends"].values()) == 2
        assert r["mask_s_per_epoch"] > 0 and r["csr_s_per_epoch"] > 0
        assert len(r["mask_epoch_s"]) == len(r["csr_epoch_s"]) == 2
        assert 0 <= r["best_acc_mask"] <= 1 and 0 <= r["best_acc_csr"] <= 1
        assert r["loss_drift"] < 1e-4 and r["weight_drift"] < 1e-4 and r["drift_steps"] == 3
        assert r["infer_mask_us"] > 0 and r["infer_csr_us"] > 0 and r["infer_dense_us"] > 0
        assert r["peak_bytes_csr"] > 0 and r["disk_bytes_csr"] > 0
    assert rows[0]["nnz"] == sparse_weights and rows[2]["nnz"] < 0.5 * sparse_weights
    table = (cnn_run / "dcnn.md").read_text()
    assert "| density |" in table and "b1 dense" in table and "first convolution" in table
    with open(cnn_run / "dcnn.csv", newline="") as f:
        assert json.loads(next(csv.DictReader(f))["layer_nnz"]) == rows[0]["layer_nnz"]


def test_resnet18_cifar_tiny_run(cnn_run):
    (row,) = _doc(cnn_run, "resnet")["rows"]
    assert row["model"] == "resnet18_cifar" and row["dataset"] == "synthetic-cifar10"
    # every convolution but the first is sparse, all on the native kernels (backend native)
    assert row["csr_backends"] == {"native": 19} and len(row["layer_nnz"]) == 19
    assert row["dense_weights"] == 3 * 64 * 9 + 512 * 10
    assert row["mask_s_per_epoch"] > 0 and row["csr_s_per_epoch"] > 0
    assert row["loss_drift"] < 1e-10 and row["weight_drift"] < 1e-10 and row["drift_steps"] == 2
    assert row["param_bytes_csr"] < row["param_bytes_mask"]
    (infer_a, infer_b) = _doc(cnn_run, "dcnn-infer")["rows"]
    assert infer_a["model"] == "digits_cnn" and infer_b["nnz"] < infer_a["nnz"]
    assert infer_b["infer_csr_us"] > 0 and infer_b["infer_dense_us"] > 0


class _OpCounter(TorchDispatchMode):
    """Counts the torch_nerva ops that run (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("torch_nerva."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model,backend,density", [("digits_cnn", "auto", 0.05),
                                                   ("resnet18_cifar", "auto", 0.01),
                                                   ("resnet18_cifar", "native", 0.05)])
def test_csr_twin_convs_run_the_sparse_conv_op(model, backend, density):
    """The CSR twin's converted convolutions run torch_nerva's sparse conv op (forward and
    backward): once per SparseConv2d whose resolved backend is native, which is how the
    results count them; the masked twin runs none. Both twins start equal (float64)."""
    if model == "resnet18_cifar":
        pytest.importorskip("torchvision")
    exp = config.parse({"experiment": [{"kind": "density", "model": model, "backend": backend,
                                        "distribution": "erk", "dtype": "float64",
                                        "dataset": "synthetic-cifar10"
                                        if model == "resnet18_cifar" else "synthetic-digits"}]}
                       )["experiments"][0]
    ds = data.load_data(exp["dataset"], train_samples=4, test_samples=2)
    ds.dtype = torch.float64
    experiments.use_model_inputs(exp, ds)
    masked, csr = experiments.build_model_twins(exp, ds, density, seed=0)
    convs = [m for m in csr.modules() if isinstance(m, torch_nerva.SparseConv2d)]
    sparse = [m for m in csr.modules() if isinstance(m, experiments.SPARSE_LAYERS)]
    assert experiments.csr_backends(csr).get("native", 0) == sum(
        m.resolved_backend == "native" for m in sparse)
    native_convs = sum(m.resolved_backend == "native" for m in convs)
    assert native_convs > 0
    if backend == "native":
        assert native_convs == len(convs)
    x = ds.prepare(ds.x_train[:2])
    y = ds.y_train[:2]
    assert x.dim() == 4
    if model == "resnet18_cifar":  # a smaller image: the same layers, a quarter of the work
        x = x[..., 8:24, 8:24]
    torch.testing.assert_close(csr(x), masked(x), rtol=1e-10, atol=1e-12)
    for twin, expected in ((csr, native_convs), (masked, 0)):
        with _OpCounter() as counter:
            torch.nn.functional.cross_entropy(twin(x), y).backward()
        assert counter.counts.get("torch_nerva.sparse_conv2d", 0) == expected
        assert counter.counts.get("torch_nerva.sparse_conv2d_backward", 0) == expected


def test_digits_images_are_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")
    x, _ = data.digits_arrays()
    ref = datasets.load_digits()
    assert torch.equal(x.view(-1, 8, 8), torch.as_tensor(ref.images, dtype=torch.float32))
    d = data.load_data("digits")
    flat = d.prepare(d.x_train[:3])
    d.flat = False
    image = d.prepare(d.x_train[:3])
    assert image.shape == (3, 1, 8, 8) and torch.equal(image.flatten(1), flat)
    assert d.test_inputs().shape == (d.y_test.numel(), 1, 8, 8)
    d.flat = True
    assert d.test_inputs().shape == (d.y_test.numel(), 64)
