"""The experiments of the comparison (see :mod:`torch_nerva.compare.config` for their keys).

Every experiment builds the CSR model once with :func:`~torch_nerva.sparsify` and its masked twin
with :func:`~torch_nerva.to_masked` (bit-identical initial weights and mask), and times the two
alternately in one process: step by step, with the order swapped every step, so that slow drifts
of the machine affect both alike. Only forward, backward, optimizer step and zero_grad are
timed; data preparation and evaluation are not, and the first step of a run is warm-up.
"""
from __future__ import annotations

import io
import math
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import DenseWeightsWarning, densify, sparsify, to_masked
from ..nn.conv import MaskedConv2d, SparseConv2d
from ..nn.linear import MaskedLinear, SparseLinear
from . import memory
from .config import lr_for
from .data import Dataset
from .report import median, ratio

try:  # progress bars are a convenience: without tqdm the runs are just quiet
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

Row = Dict[str, Any]


# -- models ------------------------------------------------------------------------------------
def mlp_template(sizes: Sequence[int]) -> nn.Sequential:
    """A ReLU MLP with layer widths ``sizes`` on the meta device: shapes only, no memory."""
    layers: List[nn.Module] = []
    with torch.device("meta"):
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def build_csr(sizes: Sequence[int], density: float, seed: int,
              distribution: str = "er", dtype: str = "float32",
              backend: str = "auto") -> nn.Module:
    """The CSR MLP: topology and values drawn from a generator seeded with ``seed`` (in
    float32, then cast, so both dtypes start from the same weights)."""
    model = sparsify(mlp_template(sizes), density, distribution=distribution, device="cpu",
                     generator=torch.Generator().manual_seed(seed), backend=backend)
    return model.to(getattr(torch, dtype))


def build_twins(sizes: Sequence[int], density: float, seed: int,
                distribution: str = "er", dtype: str = "float32",
                backend: str = "auto") -> Tuple[nn.Module, nn.Module]:
    """(masked, CSR) twins of the ReLU MLP with layer widths ``sizes``."""
    csr = build_csr(sizes, density, seed, distribution, dtype, backend)
    return to_masked(csr), csr


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ``resnet18`` with the CIFAR stem: a 3x3 stride-1 first convolution and no
    max-pool (as benchmarks/resnet_step.py and tests/test_conv.py build it)."""
    try:
        import torchvision
    except ImportError as e:
        raise RuntimeError(f"model 'resnet18_cifar' needs torchvision ({e}): pip install "
                           f"torchvision") from None
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def digits_cnn(sample_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int],
               num_classes: int) -> nn.Sequential:
    """A small CNN: 3x3 convolutions (padding 1) of ``channels`` with ReLU, a 2x2 max-pool
    after each but the first, then ReLU linear layers of ``hidden`` widths and the
    classifier. For the 8x8 digits with channels [32, 64]: 8x8 -> 8x8 -> 4x4 x 64 = 1024
    features."""
    c, h, w = sample_shape
    layers: List[nn.Module] = []
    for i, out in enumerate(channels):
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
        if i:
            if min(h, w) < 2:
                raise ValueError(f"digits_cnn: {len(channels)} convolutions pool a "
                                 f"{sample_shape[1]}x{sample_shape[2]} input below 1x1")
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers.append(nn.Flatten())
    features = c * h * w
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def model_template(exp: Dict[str, Any], data: Dataset) -> Tuple[nn.Module, List[str]]:
    """The dense model of ``exp["model"]`` for ``data`` and the names of its layers that stay
    dense (CNNs: the first convolution and the classifier)."""
    if exp["model"] == "resnet18_cifar":
        model = cifar_resnet18(data.num_classes, data.sample_shape[0])
    elif exp["model"] == "digits_cnn":
        model = digits_cnn(data.sample_shape, exp["channels"], exp["hidden"], data.num_classes)
    else:
        raise ValueError(f"unknown model {exp['model']!r}")
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return model, [n for n in names if n in (first_conv, last_linear)]


def build_model_twins(exp: Dict[str, Any], data: Dataset, density: float,
                      seed: int) -> Tuple[nn.Module, nn.Module]:
    """(masked, CSR) twins of the experiment's model: the MLP of :func:`build_twins`, or a CNN
    whose convolutions and linear layers (but the first convolution and the classifier) are
    sparsified with ``sparsify(..., conv=True)``. The dense layers' initial weights come from
    ``torch.manual_seed(seed)`` (the global generator is restored afterwards), the sparse
    layers' from a generator seeded with ``seed``; the masked twin is ``to_masked`` (the same
    weights, bit for bit)."""
    if exp["model"] == "mlp":
        sizes = [data.in_features, *exp["hidden"], data.num_classes]
        return build_twins(sizes, density, seed, exp["distribution"], exp["dtype"],
                           exp["backend"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        template, dense = model_template(exp, data)
    with warnings.catch_warnings():  # the layers kept dense are chosen, not a surprise
        warnings.simplefilter("ignore", DenseWeightsWarning)
        csr = sparsify(template, density, distribution=exp["distribution"], conv=True,
                       filter_fn=lambda name, m: name not in dense, backend=exp["backend"],
                       generator=torch.Generator().manual_seed(seed))
    csr = csr.to(getattr(torch, exp["dtype"]))
    return to_masked(csr), csr


def use_model_inputs(exp: Dict[str, Any], data: Dataset) -> None:
    """Shape ``data``'s model inputs for the experiment's model: flat for the MLP, images for
    the CNNs."""
    data.flat = exp.get("model", "mlp") == "mlp"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastForward(nn.Module):
    """``module``'s forward under ``torch.autocast(device, dtype)``, logits returned in float32:
    the ``autocast`` option. Only the forward runs in the region (backward and optimizer steps
    outside, as PyTorch recommends); the weights stay float32 (``module`` holds them: its
    layers, state dict and DST see them as usual)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.module(x)
        return out.float()


def with_autocast(model: Optional[nn.Module], exp: Dict[str, Any]) -> Optional[nn.Module]:
    """``model`` wrapped in :class:`AutocastForward` when the experiment asks for autocast."""
    if model is None or exp.get("autocast", "none") == "none":
        return model
    return AutocastForward(model, AUTOCAST_DTYPES[exp["autocast"]])


SPARSE_LAYERS = (SparseLinear, SparseConv2d)
MASKED_LAYERS = (MaskedLinear, MaskedConv2d)


def layer_nnz(model: nn.Module) -> List[int]:
    """Nonzeros of every sparse (or masked) layer, in module order."""
    return [m.nnz for m in model.modules() if isinstance(m, SPARSE_LAYERS + MASKED_LAYERS)]


def dense_weights(model: nn.Module) -> int:
    """Weights of the plain ``nn.Linear`` and ``nn.Conv2d`` layers (those kept dense)."""
    return sum(m.weight.numel() for m in model.modules()
               if type(m) in (nn.Linear, nn.Conv2d))


def csr_backends(model: nn.Module) -> Dict[str, int]:
    """How many sparse layers compute with each backend (``resolved_backend``: with backend
    ``auto``, a layer dense enough takes the dense path)."""
    counts: Dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, SPARSE_LAYERS):
            counts[m.resolved_backend] = counts.get(m.resolved_backend, 0) + 1
    return counts


def disk_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def make_optimizer(model: nn.Module, exp: Dict[str, Any], lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=exp["momentum"],
                           nesterov=exp["nesterov"] and exp["momentum"] > 0,
                           weight_decay=exp["weight_decay"])


# -- steps and timing --------------------------------------------------------------------------
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor,
               y: Tensor) -> Tuple[float, float]:
    """One step; returns (seconds for forward + backward + step + zero_grad, loss)."""
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start, loss.item()


def step_memory(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor,
                y: Tensor) -> int:
    """Peak tensor bytes of one training step: the model, the optimizer's state and every
    tensor the step creates, alive at once (see :class:`memory.TensorMemoryTracker`)."""
    base = memory.model_bytes(model) + memory.optimizer_bytes(optimizer)
    tracker = memory.TensorMemoryTracker()
    with tracker:
        train_step(model, optimizer, x, y)
    return base + tracker.peak


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1000) -> float:
    """Fraction of ``x`` classified as ``y`` in eval mode (the mode is restored)."""
    if y.numel() == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = sum((model(xc).argmax(dim=1) == yc).sum().item()
                  for xc, yc in zip(x.split(chunk), y.split(chunk)))
    model.train(was_training)
    return correct / y.numel()


@torch.no_grad()
def inference_us(models: Sequence[nn.Module], x: Tensor, calls: int,
                 warmup: int = 10) -> List[float]:
    """Median microseconds of one forward of ``x`` per model (eval mode, no_grad), after
    ``warmup`` calls each, the models timed call by call in turn with the order rotated; each
    model's training mode is restored."""
    modes = [m.training for m in models]
    for model in models:
        model.eval()
        for _ in range(warmup):
            model(x)
    times: List[List[float]] = [[] for _ in models]
    for call in range(calls):
        for k in range(len(models)):
            i = (call + k) % len(models)
            start = time.perf_counter()
            models[i](x)
            times[i].append(time.perf_counter() - start)
    for model, mode in zip(models, modes):
        model.train(mode)
    return [1e6 * statistics.median(t) for t in times]


def batch1_inference_us(models: Sequence[nn.Module], x: Tensor, calls: int) -> List[float]:
    """:func:`inference_us` of the first row of ``x``, after min(10, calls) warm-up calls."""
    return inference_us(models, x[:1], calls, warmup=min(10, calls))


def _progress(total: int, desc: str):
    if tqdm is None:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=None, file=sys.stderr)


def weight_drift(masked: nn.Module, csr: nn.Module) -> float:
    """Largest |masked weight - CSR value| over the nonzeros and over the biases of the sparse
    layers, and over every parameter of the layers both keep dense."""
    drift = 0.0
    for a, b in zip(_dense_parameters(masked), _dense_parameters(csr)):
        if a.numel():
            drift = max(drift, (a.detach() - b.detach()).abs().max().item())
    for m, s in zip((m for m in masked.modules() if isinstance(m, MASKED_LAYERS)),
                    (m for m in csr.modules() if isinstance(m, SPARSE_LAYERS))):
        positions = s.layout.positions()
        w = m.dense_weight().detach().flatten()[positions]
        drift = max(drift, (w - s.flat_values().detach()).abs().max().item() if w.numel() else 0.0)
        if m.bias is not None:
            drift = max(drift, (m.bias.detach() - s.bias.detach()).abs().max().item())
    return drift


# -- density -----------------------------------------------------------------------------------
def run_density(exp: Dict[str, Any], data: Dataset, log: Callable[[str], None]) -> List[Row]:
    """One row per (density, seed): the paper's main table."""
    exp = {"model": "mlp", "backend": "auto", **exp}
    use_model_inputs(exp, data)
    rows = []
    for density in exp["densities"]:
        for seed in exp["seeds"]:
            row = train_twins(exp, data, density, seed)
            log(f"  density {density:g} seed {seed}: mask {_fmt_s(row['mask_s_per_epoch'])} "
                f"CSR {_fmt_s(row['csr_s_per_epoch'])} per epoch, acc mask "
                f"{row['best_acc_mask']:.4f} CSR {row['best_acc_csr']:.4f}")
            rows.append(row)
    return rows


def _fmt_s(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}s"


def train_twins(exp: Dict[str, Any], data: Dataset, density: float, seed: int) -> Row:
    """Train the masked and CSR twins of the experiment's model side by side on the same
    batches; one result row."""
    masked, csr = build_model_twins(exp, data, density, seed)
    twins = (with_autocast(masked, exp), with_autocast(csr, exp))
    lr = lr_for(exp, density)
    optimizers = [make_optimizer(m, exp, lr) for m in twins]
    epochs = exp["epochs"]
    milestones = sorted({max(1, round(f * epochs)) for f in exp["lr_milestones"]})
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, milestones, exp["lr_gamma"])
                  for o in optimizers]
    schedules = [None, None]
    if exp["dst"] != "none":
        from ..dst import DynamicSparsity
        total = epochs * math.ceil(data.train_size / exp["batch_size"])
        set_ = exp["dst"] == "set"
        schedules = [DynamicSparsity(m, o, drop_fraction=exp["dst_fraction"],
                                     drop="set" if set_ else "magnitude",
                                     grow={"set": "random", "rigl": "gradient",
                                           "momentum": "momentum"}[exp["dst"]],
                                     update_every=exp["dst_every"],
                                     end=max(2, int(exp["dst_end"] * total)),
                                     anneal="constant" if set_ else "cosine", seed=seed,
                                     loss_fn=F.cross_entropy, momentum=0.9,
                                     momentum_window=min(exp["dst_every"], 20))
                     for m, o in zip(twins, optimizers)]
    update_s: List[float] = []
    dst_checked, dst_diff = 0, 0.0
    order_gen = torch.Generator().manual_seed(seed)
    augment_gen = torch.Generator().manual_seed(seed + 1)
    augment = exp["augment"] and data.image
    epoch_times: Tuple[List[float], List[float]] = ([], [])
    best_acc = [0.0, 0.0]
    loss_drift: Optional[float] = None
    w_drift: Optional[float] = None
    step = 0
    n_batches = math.ceil(data.train_size / exp["batch_size"])
    bar = _progress(epochs * n_batches, f"{exp['name']} d={density:g} seed {seed}")
    for epoch in range(epochs):
        epoch_time = [0.0, 0.0]
        timed = False
        order = torch.randperm(data.train_size, generator=order_gen)
        for batch in order.split(exp["batch_size"]):
            x = data.prepare(data.x_train[batch], augment, augment_gen)
            y = data.y_train[batch]
            losses = [0.0, 0.0]
            for i in ((0, 1) if step % 2 == 0 else (1, 0)):
                seconds, losses[i] = train_step(twins[i], optimizers[i], x, y)
                if schedules[i] is not None:  # a topology update is training time too
                    start = time.perf_counter()
                    if schedules[i].step(batch=(x, y)) is not None and i == 1:
                        update_s.append(time.perf_counter() - start)
                    seconds += time.perf_counter() - start
                if step > 0:
                    epoch_time[i] += seconds
                    timed = True
            step += 1
            if schedules[0] is not None and schedules[0].history and \
                    schedules[0].history[-1]["step"] == schedules[0].steps:
                dst_checked += 1  # both twins updated at this step: compare the topologies
                dst_diff = max(dst_diff, topology_difference(csr, masked))
            if step <= exp["check_steps"]:
                loss_drift = max(loss_drift or 0.0, abs(losses[0] - losses[1]))
                if step == exp["check_steps"]:
                    w_drift = weight_drift(masked, csr)
            if bar is not None:
                bar.update()
        for i in range(2):
            schedulers[i].step()
            if timed:
                epoch_times[i].append(epoch_time[i])
        if (epoch + 1) % exp["eval_every"] == 0 or epoch + 1 == epochs:
            x_test = data.test_inputs()
            for i, m in enumerate(twins):
                best_acc[i] = max(best_acc[i], accuracy(m, x_test, data.y_test))
    if bar is not None:
        bar.close()
    if w_drift is None and exp["check_steps"]:
        w_drift = weight_drift(masked, csr)  # the run was shorter than check_steps
    infer = batch1_inference_us((*twins, with_autocast(densify(csr), exp)), data.test_inputs(),
                                exp["inference_calls"])
    x = data.prepare(data.x_train[: exp["batch_size"]])
    y = data.y_train[: exp["batch_size"]]
    peak = [step_memory(m, o, x, y) for m, o in zip(twins, optimizers)]
    mask_s, csr_s = (median(t) for t in epoch_times)
    return {
        "dataset": data.name,
        "model": exp["model"],
        "density": density,
        "seed": seed,
        "lr": lr,
        "nnz": sum(layer_nnz(csr)),
        "layer_nnz": layer_nnz(csr),
        "dense_weights": dense_weights(csr),
        "csr_backends": csr_backends(csr),
        "mask_s_per_epoch": mask_s,
        "csr_s_per_epoch": csr_s,
        "speedup": ratio(mask_s, csr_s),
        "best_acc_mask": best_acc[0],
        "best_acc_csr": best_acc[1],
        "loss_drift": loss_drift,
        "weight_drift": w_drift,
        "drift_steps": min(step, exp["check_steps"]),
        "infer_mask_us": infer[0],
        "infer_csr_us": infer[1],
        "infer_speedup": ratio(infer[0], infer[1]),
        "infer_dense_us": infer[2],
        "param_bytes_mask": memory.model_bytes(masked),
        "param_bytes_csr": memory.model_bytes(csr),
        "peak_bytes_mask": peak[0],
        "peak_bytes_csr": peak[1],
        "disk_bytes_mask": disk_bytes(masked),
        "disk_bytes_csr": disk_bytes(csr),
        "autocast": exp.get("autocast", "none"),
        "mask_epoch_s": epoch_times[0],
        "csr_epoch_s": epoch_times[1],
        "dst": exp["dst"],
        "dst_updates": len(update_s),
        "dst_update_ms_csr": 1e3 * statistics.median(update_s) if update_s else None,
        "dst_same_topology": (None if schedules[0] is None
                              else dst_diff == 0 and topology_difference(csr, masked) == 0),
        "dst_topology_checks": dst_checked,
        "dst_topology_diff": None if schedules[0] is None else dst_diff,
    }


def _dense_parameters(model: nn.Module) -> List[Tensor]:
    """The parameters of every module that is not a sparse or masked layer (kept-dense layers,
    batch norms), in module order."""
    inside = {id(sub) for m in model.modules() if isinstance(m, SPARSE_LAYERS + MASKED_LAYERS)
              for sub in m.modules()}
    return [p for m in model.modules() if id(m) not in inside
            for p in m.parameters(recurse=False)]


def topology_difference(csr: nn.Module, masked: nn.Module) -> float:
    """The fraction of connections that differ between every sparse layer of ``csr`` and its
    masked twin (0: identical topologies)."""
    differ = total = 0
    for s, m in zip((m for m in csr.modules() if isinstance(m, SPARSE_LAYERS)),
                    (m for m in masked.modules() if isinstance(m, MASKED_LAYERS))):
        differ += int((s.mask.flatten() != m.mask.flatten()).sum()) // 2
        total += s.nnz
    return differ / total if total else 0.0


# -- inference ---------------------------------------------------------------------------------
def run_inference(exp: Dict[str, Any], data: Dataset, log: Callable[[str], None]) -> List[Row]:
    """Batch-1 inference time and model size per density (untrained models)."""
    exp = {"model": "mlp", "backend": "auto", **exp}
    use_model_inputs(exp, data)
    x = data.test_inputs()[:1]
    rows = []
    for density in exp["densities"]:
        for seed in exp["seeds"]:
            masked, csr = build_model_twins(exp, data, density, seed)
            infer = batch1_inference_us([with_autocast(m, exp) for m in
                                         (masked, csr, densify(csr))], x,
                                        exp["inference_calls"])
            rows.append({
                "model": exp["model"], "density": density, "seed": seed,
                "nnz": sum(layer_nnz(csr)), "dense_weights": dense_weights(csr),
                "csr_backends": csr_backends(csr),
                "infer_mask_us": infer[0], "infer_csr_us": infer[1],
                "infer_speedup": ratio(infer[0], infer[1]), "infer_dense_us": infer[2],
                "param_bytes_mask": memory.model_bytes(masked),
                "param_bytes_csr": memory.model_bytes(csr),
                "disk_bytes_mask": disk_bytes(masked), "disk_bytes_csr": disk_bytes(csr),
                "autocast": exp.get("autocast", "none"),
            })
            log(f"  density {density:g}: batch-1 mask {infer[0]:.1f} us, CSR {infer[1]:.1f} us, "
                f"dense nn.Linear {infer[2]:.1f} us")
    return rows


# -- depth and width ---------------------------------------------------------------------------
def time_steps(models: Sequence[Optional[nn.Module]], exp: Dict[str, Any], data: Dataset,
               seed: int, desc: str) -> List[Optional[float]]:
    """Median seconds of a training step per model (None entries are skipped), over
    ``exp["steps"]`` steps after one warm-up step, on the same batches, alternating."""
    live = [(i, m) for i, m in enumerate(models) if m is not None]
    optimizers = {i: make_optimizer(m, exp, lr_for(exp, exp["density"])) for i, m in live}
    gen = torch.Generator().manual_seed(seed)
    times: Dict[int, List[float]] = {i: [] for i, _ in live}
    bar = _progress(exp["steps"] + 1, desc)
    for step in range(exp["steps"] + 1):
        batch = torch.randint(0, data.train_size, (exp["batch_size"],), generator=gen)
        x, y = data.prepare(data.x_train[batch]), data.y_train[batch]
        for i, m in (live if step % 2 == 0 else live[::-1]):
            seconds, _ = train_step(m, optimizers[i], x, y)
            if step > 0:
                times[i].append(seconds)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return [statistics.median(times[i]) if i in times else None for i in range(len(models))]


def _epoch_seconds(step_s: Optional[float], exp: Dict[str, Any]) -> Optional[float]:
    if step_s is None:
        return None
    return step_s * math.ceil(exp["samples_per_epoch"] / exp["batch_size"])


def run_depth(exp: Dict[str, Any], data: Dataset, log: Callable[[str], None]) -> List[Row]:
    """Time per epoch for 1..N hidden layers of one width at one density."""
    rows = []
    seed = exp["seeds"][0]
    use_model_inputs(exp, data)
    for depth in exp["depths"]:
        sizes = [data.in_features, *([exp["width"]] * depth), data.num_classes]
        masked, csr = build_twins(sizes, exp["density"], seed, exp["distribution"], exp["dtype"],
                                  exp.get("backend", "auto"))
        step_s = time_steps((with_autocast(masked, exp), with_autocast(csr, exp)), exp, data,
                            seed, f"depth {depth}")
        mask_s, csr_s = (_epoch_seconds(s, exp) for s in step_s)
        rows.append({"depth": depth, "width": exp["width"], "density": exp["density"],
                     "nnz": sum(layer_nnz(csr)), "mask_s_per_epoch": mask_s,
                     "csr_s_per_epoch": csr_s, "speedup": ratio(mask_s, csr_s),
                     "autocast": exp.get("autocast", "none")})
        log(f"  depth {depth}: mask {_fmt_s(mask_s)} CSR {_fmt_s(csr_s)} per epoch")
    return rows


def run_width(exp: Dict[str, Any], data: Dataset, log: Callable[[str], None]) -> List[Row]:
    """Time per epoch and memory for ``layers`` hidden layers of each width. A twin whose
    estimated training memory exceeds the budget is skipped before anything is allocated."""
    available = memory.available_bytes()
    budget = (exp["memory_budget_gb"] * 2**30 if exp["memory_budget_gb"]
              else 0.8 * available if available else float("inf"))
    seed = exp["seeds"][0]
    use_model_inputs(exp, data)
    rows = []
    for width in exp["widths"]:
        sizes = [data.in_features, *([width] * exp["layers"]), data.num_classes]
        scale = 2 if exp["dtype"] == "float64" else 1  # the estimates are for float32
        need_mask = scale * memory.estimate_training_bytes(sizes, None, exp["batch_size"], True)
        row: Row = {"width": width, "layers": exp["layers"], "density": exp["density"],
                    "dense_weights": sum(o * i for o, i in memory.layer_shapes(sizes)),
                    "estimated_bytes_mask": need_mask, "budget_bytes": budget}
        csr = build_csr(sizes, exp["density"], seed, exp["distribution"], exp["dtype"],
                        exp.get("backend", "auto"))
        nnz = layer_nnz(csr)
        need_csr = scale * memory.estimate_training_bytes(sizes, nnz, exp["batch_size"], False)
        row.update(nnz=sum(nnz), estimated_bytes_csr=need_csr)
        notes = []
        if need_csr > budget:
            csr = None
            notes.append(f"CSR skipped: would need {need_csr / 2**30:.1f} GB, budget "
                         f"{budget / 2**30:.1f} GB")
        masked = None
        if need_mask > budget:
            notes.append(f"masked skipped: would need {need_mask / 2**30:.1f} GB, budget "
                         f"{budget / 2**30:.1f} GB")
        elif csr is not None:
            masked = to_masked(csr)
        masked, csr = with_autocast(masked, exp), with_autocast(csr, exp)
        step_s = time_steps((masked, csr), exp, data, seed, f"width {width}")
        mask_s, csr_s = (_epoch_seconds(s, exp) for s in step_s)
        x = data.prepare(data.x_train[: exp["batch_size"]])
        y = data.y_train[: exp["batch_size"]]
        peaks = []
        for m in (masked, csr):
            if m is None:
                peaks.append(None)
                continue
            opt = make_optimizer(m, exp, lr_for(exp, exp["density"]))
            train_step(m, opt, x, y)  # momentum buffers exist from here on, as in training
            peaks.append(step_memory(m, opt, x, y))
        row.update(mask_s_per_epoch=mask_s, csr_s_per_epoch=csr_s,
                   speedup=ratio(mask_s, csr_s),
                   param_bytes_csr=memory.model_bytes(csr) if csr is not None else None,
                   param_bytes_mask=memory.model_bytes(masked) if masked is not None else None,
                   peak_bytes_mask=peaks[0], peak_bytes_csr=peaks[1], note="; ".join(notes),
                   autocast=exp.get("autocast", "none"))
        rows.append(row)
        log(f"  width {width}: mask {_fmt_s(mask_s)} CSR {_fmt_s(csr_s)} per epoch"
            + (f" ({row['note']})" if notes else ""))
        del masked, csr
    return rows


RUNNERS = {"density": run_density, "inference": run_inference, "depth": run_depth,
           "width": run_width}


# the fssl kind (torch_nerva/compare/fssl.py): its runner, and its table for the report
from .fssl import format_fssl, run_fssl  # noqa: E402
from .report import FORMATTERS  # noqa: E402

RUNNERS["fssl"] = run_fssl
FORMATTERS.setdefault("fssl", format_fssl)
