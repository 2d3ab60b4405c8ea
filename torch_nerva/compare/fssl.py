"""The ``fssl`` experiment: fine-tuned structured sparsity (:mod:`torch_nerva.structured`).

Per network: a sparse network is trained (``pretrain_epochs``), then for every ``lambda`` a copy
is fine-tuned with proximal group lasso (:func:`~torch_nerva.structured.fssl_finetune`: rows and
input-column groups, lambda warm-up, stop at ``target_nnz_fraction`` of the stored connections
or after ``finetune_steps``) and compacted (:func:`~torch_nerva.structured.compact`). The fair
baseline is unstructured magnitude pruning of the same starting network to the same nnz *per
layer* as the compacted one, fine-tuned for as many steps as FSSL used (same optimizer and
learning rate, no penalty). Reported: test accuracy of the three, nnz and hidden neurons removed,
and batch-``batch_inference`` and batch-1 inference time of (a) the start, (b) the compacted
FSSL network, (c) the magnitude-pruned one (eval, no_grad, medians of calls interleaved in one
process).

Networks (``network``):

- ``mlp``: a ReLU MLP ``[in, *hidden, classes]`` on ``dataset`` (the digits MLP: ``digits``
  with hidden [1024, 512]; the paper MLP 3072-1024-512-10: ``cifar10``, or offline ``digits``
  with ``upsample = 32``, the digits as 3 x 32 x 32 images: a real task of the paper's shape),
  ER-sparsified at ``density``.
- ``graphchallenge``: ``gc_layers`` RadiX-Net layers of ``gc_neurons`` neurons from
  :func:`torch_nerva.graphchallenge.generate_layer` (32 nonzeros per row, all 1/16, bias
  ``gc_bias``) with the challenge's activation min(max(x, 0), 32) (``nn.Hardtanh(0, 32)``) and a
  dense ``nn.Linear`` readout to the 10 digit classes, trained with cross-entropy on the digits
  upsampled to sqrt(N) x sqrt(N) and thresholded as ``graphchallenge.make_inputs`` does (train
  and test images from the digits' own split).

This module holds the kind's keys (:data:`DEFAULTS`) and checks (:func:`validate`), read by
``config.py``; the runner imports the rest of the comparison lazily (no import cycle).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import structured

NETWORKS = ("mlp", "graphchallenge")

#: The keys of ``kind = "fssl"`` (besides the common ones of config.py) and their defaults.
DEFAULTS: Dict[str, Any] = {
    "dataset": "digits",
    "network": "mlp",
    "hidden": [1024, 512],         # mlp: hidden widths
    "upsample": 0,                 # mlp on digits: > 0 = images upsampled to this side, RGB
                                   # (32: the paper MLP's 3072 inputs with a real task offline)
    "density": 0.1,                # mlp: ER density of the starting network
    "gc_neurons": 1024,            # graphchallenge: neurons per layer
    "gc_layers": 24,               # graphchallenge: RadiX-Net layers
    "gc_values": "he",             # graphchallenge: "he" (N(0, 2/32) values, bias 0: trainable)
                                   # or "challenge" (all 1/16, bias gc_bias)
    "gc_bias": -0.3,               # graphchallenge: initial bias with gc_values = "challenge"
    "pretrain_epochs": 10,         # training of the starting network
    "pretrain_steps": 0,           # > 0: at most this many pretraining steps (time-only runs)
    "lr": 0.05,
    "finetune_lr": 0.0,            # 0 = lr
    "lambdas": [1e-4, 3e-4, 1e-3],
    "groups": ["rows", "cols"],
    "weights": "dense",            # group weight sqrt(|g|): dense size, "nnz" or "one"
    "finetune_steps": 1500,        # at most; stops earlier at the target
    "warmup": 50,                  # steps of linear lambda warm-up
    "target_nnz_fraction": 0.1,    # stop when the stored nnz falls to this fraction
    "prune_every": 10,             # steps between prune_zeros_ calls
    "recover_steps": 0,            # then plain fine-tuning (no penalty, topology fixed)
    "batch_inference": 100,        # the batch of the "batch" inference time
    "inference_calls": 50,         # timed calls per model and batch size
}


def validate(exp: Dict[str, Any], where: str, fail: Callable[[str, str], None]) -> None:
    """The fssl kind's checks (``fail(where, message)`` raises ConfigError)."""
    if exp["network"] not in NETWORKS:
        fail(where, f"network must be one of {', '.join(NETWORKS)}, got {exp['network']!r}")
    for key in ("hidden",):
        v = exp[key]
        if not isinstance(v, list) or not v or any(
                isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in v):
            fail(where, f"{key} must be a non-empty list of positive integers, got {v!r}")
    for key in ("gc_neurons", "gc_layers", "finetune_steps", "batch_inference",
                "inference_calls", "prune_every"):
        v = exp[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail(where, f"{key} must be a positive integer, got {v!r}")
    for key in ("pretrain_epochs", "pretrain_steps", "warmup", "recover_steps", "upsample"):
        v = exp[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            fail(where, f"{key} must be a non-negative integer, got {v!r}")
    if exp["upsample"] and not exp["dataset"].endswith("digits"):
        fail(where, f"upsample needs dataset digits (or synthetic-digits), got "
                    f"{exp['dataset']!r}")
    if exp["gc_values"] not in ("he", "challenge"):
        fail(where, f"gc_values must be 'he' or 'challenge', got {exp['gc_values']!r}")
    if exp["network"] == "graphchallenge":
        n = exp["gc_neurons"]
        if math.isqrt(n) ** 2 != n or n % 16 or (n // 16) & (n // 16 - 1):
            fail(where, f"gc_neurons must be a perfect square and 16 x a power of two (1024, "
                        f"4096...), got {n}")
    d = exp["density"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
        fail(where, f"density must be a number in (0, 1], got {d!r}")
    for key in ("lr", "finetune_lr"):
        v = exp[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or \
                (key == "lr" and v == 0):
            fail(where, f"{key} must be a {'positive' if key == 'lr' else 'non-negative'} "
                        f"number, got {v!r}")
    lams = exp["lambdas"]
    if not isinstance(lams, list) or not lams or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in lams):
        fail(where, f"lambdas must be a non-empty list of numbers >= 0, got {lams!r}")
    t = exp["target_nnz_fraction"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
        fail(where, f"target_nnz_fraction must be in [0, 1], got {t!r}")
    try:
        structured._check_groups(exp["groups"])
        structured._check_weights(None if exp["weights"] == "dense" else exp["weights"])
    except ValueError as e:
        fail(where, str(e))


# -- networks and data -------------------------------------------------------------------------
def _gc_images(x: Tensor, neurons: int, seed: int) -> Tensor:
    """Digits (N, 64) of 0..16 as Graph Challenge inputs, the way
    :func:`torch_nerva.graphchallenge.make_inputs` makes them: bilinear upsampling to
    sqrt(N) x sqrt(N), threshold 12.5, a seeded shift of up to 1/8 of the side."""
    side = math.isqrt(neurons)
    g = torch.Generator().manual_seed(seed)
    big = F.interpolate(x.view(-1, 1, 8, 8).float(), size=(side, side), mode="bilinear",
                        align_corners=False)
    binary = (big[:, 0] > 12.5).float()
    shift = max(side // 8, 1)
    dy = torch.randint(-shift, shift + 1, (x.shape[0],), generator=g)
    dx = torch.randint(-shift, shift + 1, (x.shape[0],), generator=g)
    out = torch.stack([torch.roll(binary[i], (int(dy[i]), int(dx[i])), dims=(0, 1))
                       for i in range(x.shape[0])])
    return out.view(-1, neurons)


def upsample_digits(x: Tensor, side: int) -> Tensor:
    """Standardised digits features (N, 64) as RGB images of ``side`` x ``side`` (bilinear,
    the three channels equal), flattened: (N, 3 side^2)."""
    big = F.interpolate(x.reshape(-1, 1, 8, 8), size=(side, side), mode="bilinear",
                        align_corners=False)
    return big.expand(-1, 3, side, side).reshape(x.shape[0], 3 * side * side).contiguous()


def graphchallenge_data(neurons: int, seed: int = 0):
    """(x_train, y_train, x_test, y_test): the digits' train / test split (the comparison's
    own, :func:`torch_nerva.compare.data.load_data`) as binary Graph Challenge inputs, each
    image twice with different shifts in the training set. None without scikit-learn."""
    from ..datasets import digits_arrays
    from .data import DATA_SEED, TRAIN_FRACTION
    arrays = digits_arrays()
    if arrays is None:
        return None
    x, y = arrays
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(DATA_SEED))
    n_train = round(TRAIN_FRACTION * x.shape[0])
    train, test = order[:n_train], order[n_train:]
    xtr = torch.cat([_gc_images(x[train], neurons, seed), _gc_images(x[train], neurons, seed + 1)])
    ytr = torch.cat([y[train], y[train]])
    return xtr, ytr, _gc_images(x[test], neurons, seed + 2), y[test]


def graphchallenge_network(neurons: int, layers: int, bias: float, classes: int,
                           seed: int = 0, values: str = "he") -> nn.Sequential:
    """RadiX-Net layers (``generate_layer``: ``layer(Y) = Y @ W``, 32 nonzeros per row) with a
    trainable bias, the challenge's min(max(x, 0), 32), and a dense readout.

    ``values="challenge"`` keeps the challenge's weights (all 1/16) and ``bias``: a benchmark,
    not a classifier: on the digit images every input's activations either die or saturate at
    32 within about 12 layers (measured: 38% saturated, the rest zero, at layer 12 of 24), so
    no gradient flows and the network stays at chance. ``values="he"`` (default) keeps the
    topology with values drawn N(0, 2 / 32) (He, fan-in 32) and bias 0: it trains."""
    from ..graphchallenge import YMAX, generate_layer
    g = torch.Generator().manual_seed(seed)
    mods: List[nn.Module] = []
    for i in range(layers):
        layer = generate_layer(neurons, i, seed)
        if values == "he":
            with torch.no_grad():
                layer.values.copy_(torch.randn(layer.values.shape, generator=g)
                                   * math.sqrt(2.0 / 32))
            layer = structured_with_bias(layer, 0.0)
        else:
            layer = structured_with_bias(layer, bias)
        mods += [layer, nn.Hardtanh(0.0, YMAX)]
    readout = nn.Linear(neurons, classes)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        readout.weight.copy_(torch.randn(classes, neurons, generator=g) / math.sqrt(neurons))
        readout.bias.zero_()
    mods.append(readout)
    return nn.Sequential(*mods)


def structured_with_bias(layer, bias: float):
    """The bias-free SparseLinear ``layer`` with a bias of ``bias`` everywhere."""
    from ..nn.linear import SparseLinear
    return SparseLinear.from_layout(layer.layout, layer.values.detach(),
                                    torch.full((layer.out_features,), bias,
                                               dtype=layer.values.dtype))


def _batches(x: Tensor, y: Tensor, batch: int, gen: torch.Generator, epochs: Optional[int] = None,
             prepare=None):
    """Shuffled batches, epoch after epoch (forever when ``epochs`` is None)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            b = perm[i:i + batch]
            xb = x[b] if prepare is None else prepare(x[b])
            yield xb, y[b]
        epoch += 1


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int) -> None:
    """``steps`` plain training steps (cross-entropy) on ``batches``."""
    model.train()
    for step, (x, y) in enumerate(batches):
        if step >= steps:
            break
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def magnitude_prune_like(start: nn.Module, reference: nn.Module) -> nn.Module:
    """A copy of ``start`` whose sparse layers keep their largest-magnitude weights, as many per
    layer as the corresponding layer of ``reference`` stores (same architecture order)."""
    from ..layout import CSRLayout
    pruned = copy.deepcopy(start)
    mine = [m for _, m in structured.structured_layers(pruned)]
    theirs = [m for _, m in structured.structured_layers(reference)]
    if len(mine) != len(theirs):
        raise RuntimeError("magnitude_prune_like: the models have different sparse layers")
    for layer, ref in zip(mine, theirs):
        k = min(ref.nnz, layer.nnz)
        v = layer.values.detach().view(-1)
        keep = torch.topk(v.abs(), k, sorted=False).indices.sort().values
        positions = layer.layout.positions()[keep]
        layout = CSRLayout.from_positions(positions, layer.matrix_shape,
                                          layer.col_indices.dtype)
        layer._adopt(layout, v[keep])
    return pruned


def inference_us(models: Sequence[nn.Module], x: Tensor, calls: int) -> List[float]:
    """Median microseconds of one forward of ``x`` per model (eval, no_grad), after 5 warm-up
    calls, the models called in turn with the order rotated every call."""
    from .experiments import inference_us as timed
    return timed(models, x, calls, warmup=5)


def hidden_neurons(model: nn.Module) -> int:
    """Outputs of every weight layer but the last (the hidden neurons or channels)."""
    outs = [m.out_features for m in model.modules()
            if isinstance(m, (nn.Linear,) + structured._LINEAR)]
    return sum(outs[:-1])


def hidden_sizes(model: nn.Module) -> List[int]:
    return [m.out_features for m in model.modules()
            if isinstance(m, (nn.Linear,) + structured._LINEAR)][:-1]


# -- the runner --------------------------------------------------------------------------------
def run_fssl(exp: Dict[str, Any], data, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """One row per lambda (see the module docstring)."""
    from .experiments import accuracy, build_csr
    dtype = getattr(torch, exp["dtype"])
    seed = exp["seeds"][0]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prepare = data.prepare
    note = data.note
    if exp["network"] == "graphchallenge":
        arrays = graphchallenge_data(exp["gc_neurons"], seed)
        if arrays is None:
            raise RuntimeError("the graphchallenge network needs scikit-learn's digits "
                               "(pip install scikit-learn)")
        xtr, ytr, xte, yte = (t.to(dtype) if t.is_floating_point() else t for t in arrays)
        prepare = None
        model = graphchallenge_network(exp["gc_neurons"], exp["gc_layers"], exp["gc_bias"],
                                       10, seed, exp["gc_values"]).to(dtype)
        dataset = f"digits as {exp['gc_neurons']}-pixel binary images"
        synthetic = False
    else:
        xtr, ytr = data.x_train, data.y_train
        xte, yte = data.test_inputs(), data.y_test
        n_in = data.in_features
        if exp["upsample"]:
            xtr = upsample_digits(data.prepare(xtr), exp["upsample"])
            xte = upsample_digits(xte, exp["upsample"])
            prepare, n_in = None, xtr.shape[1]
        sizes = [n_in, *exp["hidden"], data.num_classes]
        model = build_csr(sizes, exp["density"], seed, exp["distribution"], exp["dtype"])
        dataset = data.name + (f" upsampled to 3x{exp['upsample']}x{exp['upsample']}"
                               if exp["upsample"] else "")
        synthetic = data.synthetic
    lr = exp["lr"]
    ft_lr = exp["finetune_lr"] or lr

    def optimizer(m, rate):
        return torch.optim.SGD(m.parameters(), lr=rate, momentum=exp["momentum"],
                               nesterov=exp["nesterov"] and exp["momentum"] > 0,
                               weight_decay=exp["weight_decay"])

    # the starting network
    start_time = time.perf_counter()
    opt = optimizer(model, lr)
    steps = 0
    for x, y in _batches(xtr, ytr, exp["batch_size"], gen, exp["pretrain_epochs"], prepare):
        if exp["pretrain_steps"] and steps >= exp["pretrain_steps"]:
            break
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    acc_start = accuracy(model, xte, yte)
    nnz_start = structured.count_nnz(model)
    log(f"  {exp['network']}: start trained {steps} steps in "
        f"{time.perf_counter() - start_time:.1f} s, test accuracy {acc_start:.4f}, nnz "
        f"{nnz_start}, hidden {hidden_sizes(model)}")
    x_batch = xte[:exp["batch_inference"]]
    if x_batch.shape[0] < exp["batch_inference"]:  # a small test set: repeat it
        reps = -(-exp["batch_inference"] // max(x_batch.shape[0], 1))
        x_batch = x_batch.repeat(reps, 1)[:exp["batch_inference"]]
    rows = []
    groups = exp["groups"]
    weights = None if exp["weights"] == "dense" else exp["weights"]
    for lam in exp["lambdas"]:
        t0 = time.perf_counter()
        fine = copy.deepcopy(model).train()
        opt = optimizer(fine, ft_lr)
        result = structured.fssl_finetune(
            fine, _batches(xtr, ytr, exp["batch_size"], gen, None, prepare), F.cross_entropy,
            opt, lam=float(lam), warmup=exp["warmup"],
            target_nnz_fraction=exp["target_nnz_fraction"], max_steps=exp["finetune_steps"],
            groups=groups, weights=weights, prune_every=exp["prune_every"])
        _train(fine, opt, _batches(xtr, ytr, exp["batch_size"], gen, None, prepare),
               exp["recover_steps"])
        fine.eval()
        small, report = structured.compact(fine)
        small.eval()
        fssl_s = time.perf_counter() - t0
        acc_fssl = accuracy(small, xte, yte)
        acc_check = accuracy(fine, xte, yte)
        # the baseline: magnitude pruning to the same nnz per layer, fine-tuned as many steps
        mag = magnitude_prune_like(model, small).train()
        opt = optimizer(mag, ft_lr)
        _train(mag, opt, _batches(xtr, ytr, exp["batch_size"], gen, None, prepare),
               result["steps"] + exp["recover_steps"])
        mag.eval()
        acc_mag = accuracy(mag, xte, yte)
        models = [model, small, mag]
        batch_us = inference_us(models, x_batch, exp["inference_calls"])
        one_us = inference_us(models, x_batch[:1], exp["inference_calls"])
        nnz_fssl = structured.count_nnz(small)
        row = {
            "network": exp["network"], "dataset": dataset, "synthetic": synthetic,
            "lambda": float(lam), "finetune_steps": result["steps"],
            "recover_steps": exp["recover_steps"],
            "reached_target": result["reached_target"], "fssl_seconds": fssl_s,
            "acc_start": acc_start, "acc_fssl": acc_fssl, "acc_fssl_uncompacted": acc_check,
            "acc_magnitude": acc_mag,
            "nnz_start": nnz_start, "nnz_finetuned": result["nnz"], "nnz_fssl": nnz_fssl,
            "nnz_magnitude": structured.count_nnz(mag),
            "removed_fraction": 1 - nnz_fssl / nnz_start if nnz_start else 0.0,
            "hidden_start": hidden_sizes(model), "hidden_fssl": hidden_sizes(small),
            "neurons_removed": report.neurons_removed, "constants_folded": report.folded,
            "batch": exp["batch_inference"],
            "infer_batch_start_us": batch_us[0], "infer_batch_fssl_us": batch_us[1],
            "infer_batch_magnitude_us": batch_us[2],
            "infer_b1_start_us": one_us[0], "infer_b1_fssl_us": one_us[1],
            "infer_b1_magnitude_us": one_us[2],
            "speedup_batch_vs_magnitude": batch_us[2] / batch_us[1],
            "speedup_b1_vs_magnitude": one_us[2] / one_us[1],
            "speedup_batch_vs_start": batch_us[0] / batch_us[1],
            "left_alone": [f"{n}: {why}" for n, why in report.left_alone],
        }
        rows.append(row)
        log(f"  lambda {lam:g}: {result['steps']} steps ({fssl_s:.1f} s), nnz {nnz_start} -> "
            f"{nnz_fssl} ({100 * row['removed_fraction']:.1f}% removed), hidden "
            f"{row['hidden_fssl']}, acc {acc_start:.4f} -> {acc_fssl:.4f} (magnitude "
            f"{acc_mag:.4f}); batch {exp['batch_inference']}: start {batch_us[0]:.0f} us, FSSL "
            f"{batch_us[1]:.0f} us, magnitude {batch_us[2]:.0f} us")
    return rows


def format_fssl(rows: Sequence[Dict[str, Any]], exp: Dict[str, Any], note: str,
                markdown: bool = False) -> str:
    """The per-lambda table (aligned text, or markdown with ``markdown``)."""
    from .report import _f, _table
    header = ["lambda", "steps", "acc start", "acc FSSL", "acc magn.", "nnz start", "nnz FSSL",
              "removed", "hidden FSSL", f"b{exp['batch_inference']} start/FSSL/magn. us",
              "b1 start/FSSL/magn. us", "FSSL vs magn. b/b1"]
    lines = []
    for r in rows:
        lines.append([f"{r['lambda']:g}", str(r["finetune_steps"]), _f(r["acc_start"], ".4f"),
                      _f(r["acc_fssl"], ".4f"), _f(r["acc_magnitude"], ".4f"),
                      str(r["nnz_start"]), str(r["nnz_fssl"]),
                      _f(100 * r["removed_fraction"], ".1f", "%"),
                      "-".join(str(h) for h in r["hidden_fssl"]),
                      f"{r['infer_batch_start_us']:.0f}/{r['infer_batch_fssl_us']:.0f}/"
                      f"{r['infer_batch_magnitude_us']:.0f}",
                      f"{r['infer_b1_start_us']:.0f}/{r['infer_b1_fssl_us']:.0f}/"
                      f"{r['infer_b1_magnitude_us']:.0f}",
                      f"{r['speedup_batch_vs_magnitude']:.2f}x/"
                      f"{r['speedup_b1_vs_magnitude']:.2f}x"])
    text = [_table(header, lines, markdown),
            f"{rows[0]['network'] if rows else exp['network']} on "
            f"{rows[0]['dataset'] if rows else exp['dataset']}; FSSL: prox group lasso "
            f"({', '.join(exp['groups'])}), warm-up {exp['warmup']} steps, stop at "
            f"{exp['target_nnz_fraction']:g} of the nnz or {exp['finetune_steps']} steps"
            + (f", {exp['recover_steps']} steps without penalty" if exp["recover_steps"] else "")
            + ", then compact; magn.: magnitude pruning of the start to the compacted nnz per "
            f"layer, fine-tuned as many steps in all; times: median of "
            f"{exp['inference_calls']} calls (eval, no_grad)"]
    if rows and rows[0]["synthetic"]:
        text.append("accuracy on SYNTHETIC data: not meaningful (timing only)")
    if note:
        text.append(f"note: {note}")
    return "\n".join(text)
