"""Experiment configs for ``python -m torch_nerva.compare --config FILE.toml``.

A config is a TOML file with an optional top-level ``title`` and a list of ``[[experiment]]``
tables, each with a ``kind``:

- ``density``: the paper's main experiment. For every density and seed, a model is sparsified
  once (ER/ERK/uniform), its masked twin made with ``to_masked`` (bit-identical weights), and both
  are trained on the same batches in one process. ``model`` chooses it (see :data:`MODELS`): the
  paper's ReLU MLP (``hidden`` layer widths), torchvision's ResNet-18 with the CIFAR stem, or a
  small CNN for the 8x8 digits (``channels``, ``hidden``); the CNNs' convolutions are sparse too
  (``sparsify(..., conv=True)``), their first convolution and classifier stay dense. Reports time per epoch, best test accuracy,
  batch-1 inference time, parameter bytes, peak tensor memory of a training step, on-disk size
  and the twins' drift over the first ``check_steps`` steps.
- ``inference``: batch-1 inference time only (no training), per density (any ``model``).
- ``depth``: time per epoch for 1..N MLP hidden layers of one width at one density.
- ``width``: time per epoch and memory for a fixed number of hidden layers of growing width; the
  masked twin is skipped, with the memory it would need, when that exceeds the budget.
- ``fssl``: fine-tuned structured sparsity per lambda (accuracy, nnz and neurons removed,
  inference time against magnitude pruning to the same nnz); see :mod:`.fssl`.

Every key and its default is in :data:`DEFAULTS`; unknown keys are errors (a typo must not be
silently ignored). ``lr`` is a number, or a table from density (as a string, ``"0.01"``) to the
learning rate, with an optional ``default``.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from . import fssl as _fssl  # the fssl kind keeps its keys and checks beside its runner

KINDS = ("density", "inference", "depth", "width", "fssl")
DATASETS = ("cifar10", "digits", "synthetic-cifar10", "synthetic-digits")
BACKENDS = ("auto", "native", "dense", "torch", "mkl", "cusparse")  # torch_nerva.backends.NAMES
CONV_BACKENDS = ("auto", "native", "dense")  # what SparseConv2d supports

# The models of the density and inference kinds, with the keys only they take (and their
# defaults): a key of another model is an error, as an unknown key is.
#   mlp             the paper's ReLU MLP: input, ``hidden`` widths, classes; every layer sparse
#   resnet18_cifar  torchvision's resnet18 with the CIFAR stem (3x3 stride-1 first conv, no
#                   max-pool); convolutions sparse but the first, classifier (fc) dense
#   digits_cnn      3x3 convolutions of ``channels`` (padding 1, ReLU, a 2x2 max-pool after each
#                   but the first), then ReLU linear layers of ``hidden`` widths and the
#                   classifier; convolutions sparse but the first, linear layers sparse but the
#                   classifier
MODELS: Dict[str, Dict[str, Any]] = {
    "mlp": {"hidden": [1024, 512]},
    "resnet18_cifar": {},
    "digits_cnn": {"channels": [32, 64], "hidden": [128]},
}
MODEL_KEYS = {k for keys in MODELS.values() for k in keys}

_COMMON = {
    "name": None,              # defaults to the kind (made unique by a suffix)
    "dataset": "cifar10",      # see DATASETS; cifar10 falls back to synthetic-cifar10
    "data_dir": "data",        # where CIFAR-10 is looked for (and downloaded to)
    "download": True,          # try to download CIFAR-10 when it is not in data_dir
    "train_samples": 0,        # 0 = all; else the first n of a seeded permutation
    "test_samples": 0,
    "augment": True,           # CIFAR-10 only: random crop (padding 4) + horizontal flip
    "distribution": "er",
    "batch_size": 100,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 0.0,
    "seeds": [0],
    "threads": 0,              # 0 = the process setting
    "dtype": "float32",        # of weights and inputs; float64 makes the twins agree to ~1e-16
    # "none", "bf16" or "fp16": both twins' forward passes (and evaluation, inference) run under
    # torch.autocast("cpu", dtype) with float32 weights (dtype must be float32); the logits are
    # returned in float32, so the loss is float32 as well
    "autocast": "none",
    # torch_nerva backend of the sparse layers ("auto": per layer, the library's choice); the
    # CNN models take auto, native or dense (SparseConv2d's)
    "backend": "auto",
}

AUTOCAST = ("none", "bf16", "fp16")

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "density": {
        **_COMMON,
        "model": "mlp",                # see MODELS; its own keys (hidden, channels) below
        "hidden": [1024, 512],
        "channels": [32, 64],
        "densities": [1.0, 0.1, 0.01],
        "epochs": 2,
        "lr": 0.01,
        "lr_milestones": [0.5, 0.75],  # fractions of the epochs where lr is multiplied by gamma
        "lr_gamma": 0.1,
        "check_steps": 10,             # steps over which the twins' drift is measured
        "inference_calls": 100,
        "eval_every": 1,               # epochs between test evaluations (and the last one)
        # dynamic sparse training of both twins alike (torch_nerva.dst): "none" (static),
        # "set" (SET drop + random growth, constant fraction), "rigl" (magnitude drop +
        # gradient growth, cosine-annealed fraction) or "momentum" (magnitude drop + growth by
        # the gradient momentum of the last min(dst_every, 20) steps, beta 0.9, cosine);
        # every dst_every steps until dst_end of the training steps
        "dst": "none",
        "dst_fraction": 0.3,
        "dst_every": 100,
        "dst_end": 0.75,
    },
    "inference": {
        **_COMMON,
        "dataset": "synthetic-cifar10",
        "model": "mlp",
        "hidden": [1024, 512],
        "channels": [32, 64],
        "densities": [1.0, 0.1, 0.01, 0.001],
        "inference_calls": 200,
    },
    "depth": {
        **_COMMON,
        "dataset": "synthetic-cifar10",
        "depths": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "width": 1024,
        "density": 0.01,
        "steps": 20,                   # timed steps per model (after one warm-up step)
        "samples_per_epoch": 50000,    # epoch time = median step time x steps per epoch
        "lr": 0.01,
    },
    "width": {
        **_COMMON,
        "dataset": "synthetic-cifar10",
        "widths": [1024, 2048, 4096, 8192, 16384, 32768],
        "layers": 3,
        "density": 0.001,
        "steps": 5,
        "samples_per_epoch": 50000,
        "lr": 0.01,
        "memory_budget_gb": 0.0,       # 0 = 80% of the memory available at the start
    },
    "fssl": {**_COMMON, **_fssl.DEFAULTS},  # see torch_nerva/compare/fssl.py
}


class ConfigError(ValueError):
    """A config file that cannot be run; the message names the file, experiment and key."""


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"{where}: {message}")


def _check_density(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        _fail(where, f"{key} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_positive_ints(where: str, key: str, value: Any, allow_zero: bool = False) -> None:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        _fail(where, f"{key} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
            _fail(where, f"{key} must hold {'non-negative' if allow_zero else 'positive'} "
                         f"integers, got {value!r}")


def lr_for(exp: Dict[str, Any], density: float) -> float:
    """The learning rate of ``exp`` at ``density`` (``lr`` is a number or a table)."""
    lr = exp["lr"]
    if not isinstance(lr, dict):
        return float(lr)
    for key, value in lr.items():
        if key != "default" and math.isclose(float(key), density, rel_tol=1e-9):
            return float(value)
    return float(lr["default"])


def _validate(exp: Dict[str, Any], where: str) -> None:
    kind = exp["kind"]
    if exp["dataset"] not in DATASETS:
        _fail(where, f"dataset must be one of {', '.join(DATASETS)}, got {exp['dataset']!r}")
    if exp["distribution"] not in ("uniform", "er", "erk"):
        _fail(where, f"distribution must be uniform, er or erk, got {exp['distribution']!r}")
    if exp["dtype"] not in ("float32", "float64"):
        _fail(where, f"dtype must be float32 or float64, got {exp['dtype']!r}")
    if exp["autocast"] not in AUTOCAST:
        _fail(where, f"autocast must be one of {', '.join(AUTOCAST)}, got {exp['autocast']!r}")
    if exp["autocast"] != "none" and exp["dtype"] != "float32":
        _fail(where, f"autocast = {exp['autocast']!r} needs dtype = \"float32\" (autocast "
                     f"leaves float64 alone), got {exp['dtype']!r}")
    _check_positive_ints(where, "batch_size", exp["batch_size"])
    _check_positive_ints(where, "seeds", exp["seeds"], allow_zero=True)
    _check_positive_ints(where, "threads", exp["threads"], allow_zero=True)
    _check_positive_ints(where, "train_samples", exp["train_samples"], allow_zero=True)
    _check_positive_ints(where, "test_samples", exp["test_samples"], allow_zero=True)
    if not 0 <= exp["momentum"] < 1:
        _fail(where, f"momentum must be in [0, 1), got {exp['momentum']!r}")
    if exp["backend"] not in BACKENDS:
        _fail(where, f"backend must be one of {', '.join(BACKENDS)}, got {exp['backend']!r}")
    if exp.get("model", "mlp") != "mlp" and exp["backend"] not in CONV_BACKENDS:
        _fail(where, f"model {exp['model']!r} has sparse convolutions: backend must be one of "
                     f"{', '.join(CONV_BACKENDS)}, got {exp['backend']!r}")
    if "hidden" in exp:
        _check_positive_ints(where, "hidden", exp["hidden"])
    if "channels" in exp:
        _check_positive_ints(where, "channels", exp["channels"])
    if kind in ("density", "inference"):
        if not isinstance(exp["densities"], list) or not exp["densities"]:
            _fail(where, "densities must be a non-empty list")
        exp["densities"] = [_check_density(where, "densities", d) for d in exp["densities"]]
    if kind in ("depth", "width"):
        exp["density"] = _check_density(where, "density", exp["density"])
        _check_positive_ints(where, "steps", exp["steps"])
        _check_positive_ints(where, "samples_per_epoch", exp["samples_per_epoch"])
    if kind == "depth":
        _check_positive_ints(where, "depths", exp["depths"])
        _check_positive_ints(where, "width", exp["width"])
    if kind == "width":
        _check_positive_ints(where, "widths", exp["widths"])
        _check_positive_ints(where, "layers", exp["layers"])
        if exp["memory_budget_gb"] < 0:
            _fail(where, "memory_budget_gb must be >= 0 (0 = what the machine has available)")
    if kind == "density":
        _check_positive_ints(where, "epochs", exp["epochs"])
        _check_positive_ints(where, "check_steps", exp["check_steps"], allow_zero=True)
        _check_positive_ints(where, "eval_every", exp["eval_every"])
        if any(not 0 < m <= 1 for m in exp["lr_milestones"]):
            _fail(where, f"lr_milestones are fractions of the epochs in (0, 1], got "
                         f"{exp['lr_milestones']!r}")
    if kind in ("density", "inference"):
        _check_positive_ints(where, "inference_calls", exp["inference_calls"])
    if kind == "density":
        if exp["dst"] not in ("none", "set", "rigl", "momentum"):
            _fail(where, f"dst must be none, set, rigl or momentum, got {exp['dst']!r}")
        if not 0 <= exp["dst_fraction"] <= 1 or not 0 < exp["dst_end"] <= 1:
            _fail(where, "dst_fraction must be in [0, 1] and dst_end in (0, 1]")
        _check_positive_ints(where, "dst_every", exp["dst_every"])
    if kind == "fssl":
        _fssl.validate(exp, where, _fail)
    if "lr" in exp:
        lr = exp["lr"]
        if isinstance(lr, dict):
            for key, value in lr.items():
                if key != "default":
                    try:
                        float(key)
                    except ValueError:
                        _fail(where, f"lr keys must be densities like \"0.01\" or \"default\", "
                                     f"got {key!r}")
                if not isinstance(value, (int, float)) or value <= 0:
                    _fail(where, f"lr[{key!r}] must be a positive number, got {value!r}")
            densities = exp["densities"] if "densities" in exp else [exp["density"]]
            for d in densities:
                try:
                    lr_for(exp, d)
                except KeyError:
                    _fail(where, f"no learning rate for density {d:g}: add \"{d:g}\" or "
                                 f"\"default\" to lr")
        elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            _fail(where, f"lr must be a positive number or a table, got {lr!r}")


def _apply_model(exp: Dict[str, Any], item: Dict[str, Any], where: str) -> None:
    """Keep only the keys of ``exp["model"]`` (with its defaults); a key of another model given
    in the config is an error."""
    model = exp["model"]
    if model not in MODELS:
        _fail(where, f"model must be one of {', '.join(MODELS)}, got {model!r}")
    own = MODELS[model]
    foreign = sorted(k for k in item if k in MODEL_KEYS and k not in own)
    if foreign:
        _fail(where, f"keys {foreign} do not apply to model {model!r} (its keys: "
                     f"{', '.join(sorted(own)) or 'none'})")
    for key in MODEL_KEYS:
        if key not in own:
            exp.pop(key, None)
        elif key not in item:
            exp[key] = copy.deepcopy(own[key])


def parse(doc: Dict[str, Any], source: str = "<config>") -> Dict[str, Any]:
    """Validate a parsed TOML document; returns ``{"title", "experiments": [...]}`` with every
    experiment completed from :data:`DEFAULTS`."""
    unknown = set(doc) - {"title", "experiment"}
    if unknown:
        _fail(source, f"unknown top-level keys {sorted(unknown)} (expected title and "
                      f"[[experiment]] tables)")
    raw = doc.get("experiment", [])
    if not isinstance(raw, list) or not raw:
        _fail(source, "no [[experiment]] tables")
    experiments: List[Dict[str, Any]] = []
    names = set()
    for i, item in enumerate(raw):
        where = f"{source}: experiment {i + 1}"
        kind = item.get("kind")
        if kind not in KINDS:
            _fail(where, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        allowed = DEFAULTS[kind]
        unknown = set(item) - set(allowed) - {"kind"}
        if unknown:
            _fail(where, f"unknown keys for kind {kind!r}: {sorted(unknown)} (allowed: "
                         f"{', '.join(sorted(allowed))})")
        exp = copy.deepcopy(allowed)
        exp.update(copy.deepcopy(item))
        exp["kind"] = kind
        if "model" in allowed:
            _apply_model(exp, item, where)
        name = exp["name"] or kind
        base, n = name, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        exp["name"] = name
        _validate(exp, f"{source}: experiment {name!r}")
        experiments.append(exp)
    return {"title": doc.get("title", Path(source).stem), "experiments": experiments}


def load(path: Path) -> Dict[str, Any]:
    """Read and validate the TOML config at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(doc, str(path))


def default_config_path() -> Optional[Path]:
    """``configs/quick.toml`` in the working directory, else in the source checkout that holds
    this package (an editable install), else None."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / "configs" / "quick.toml"
        if candidate.is_file():
            return candidate
    return None
