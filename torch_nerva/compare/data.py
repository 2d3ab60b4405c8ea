"""Datasets of the comparison: CIFAR-10 (torchvision), scikit-learn's digits, and synthetic
sets of the same shapes for when the real ones cannot be had.

Image sets are kept as uint8 ``(N, 3, 32, 32)`` and turned into float batches only when used
(:meth:`Dataset.prepare`): scaled to [0, 1], optionally augmented (random crop with zero padding
4 and horizontal flip, as in the paper), normalised per channel with the training set's mean and
standard deviation, and flattened to ``(N, 3072)``. The digits are float features standardised
with the training set's statistics. For a convolutional model (``Dataset.flat = False``) the
inputs keep their image shape instead: ``(N, 3, 32, 32)``, and ``(N, 1, 8, 8)`` for the digits.
"""
from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..datasets import digits_arrays  # noqa: F401  (re-exported: the library owns it)

DIGITS_SAMPLES, DIGITS_FEATURES, DIGITS_CLASSES = 1797, 64, 10
DIGITS_SHAPE = (1, 8, 8)  # the 64 features are an 8x8 image, row by row
CIFAR_TRAIN, CIFAR_TEST, CIFAR_CLASSES = 50000, 10000, 10
TRAIN_FRACTION = 0.8  # of the digits
DATA_SEED = 0         # subsets, splits and synthetic data do not depend on the run's seed
DOWNLOAD_TIMEOUT_S = 30


class DataUnavailable(RuntimeError):
    """The requested dataset cannot be loaded here (the message says why)."""


@dataclass
class Dataset:
    """A train/test split. ``note`` says what was substituted for what, if anything."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    note: str = ""
    mean: Optional[Tensor] = None  # per channel, images only
    std: Optional[Tensor] = None
    dtype: torch.dtype = torch.float32  # of the model inputs (prepare, test_inputs)
    # (channels, height, width) of one sample as an image; flat: model inputs (batch, features)
    # for an MLP, else (batch, *sample_shape) for a CNN
    sample_shape: Tuple[int, ...] = ()
    flat: bool = True
    _test_cache: Optional[Tensor] = field(default=None, repr=False)

    @property
    def synthetic(self) -> bool:
        return self.name.startswith("synthetic")

    @property
    def image(self) -> bool:
        return self.x_train.dtype == torch.uint8

    @property
    def in_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    @property
    def train_size(self) -> int:
        return self.x_train.shape[0]

    def prepare(self, x: Tensor, augment: bool = False,
                generator: Optional[torch.Generator] = None) -> Tensor:
        """Model input (of ``self.dtype``) from raw samples ``x``: ``(batch, in_features)``,
        or ``(batch, *sample_shape)`` when not ``flat``."""
        if not self.image:
            x = x.to(self.dtype)
            return x if self.flat else x.reshape(x.shape[0], *self.sample_shape)
        x = x.float().div_(255)
        if augment:
            x = random_crop_flip(x, generator)
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return (x.flatten(1) if self.flat else x.contiguous()).to(self.dtype)

    def test_inputs(self) -> Tensor:
        """The whole test set as model input (computed once per dtype and shape)."""
        cache = self._test_cache
        if cache is None or cache.dtype != self.dtype or (cache.dim() == 2) != self.flat:
            self._test_cache = self.prepare(self.x_test)
        return self._test_cache


def random_crop_flip(x: Tensor, generator: Optional[torch.Generator], padding: int = 4) -> Tensor:
    """Per sample: a random ``H x W`` crop of ``x`` zero-padded by ``padding`` on every side,
    then a horizontal flip with probability 1/2 (torchvision's RandomCrop(padding=4) and
    RandomHorizontalFlip, batched)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    rows = oy + torch.arange(h)
    cols = ox + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


# -- sources -----------------------------------------------------------------------------------
def cifar10_arrays(data_dir: Path, download: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 through torchvision: uint8 (N, 3, 32, 32) images and int64 labels, train then
    test. Raises :class:`DataUnavailable` with the reason when it cannot be had."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as e:
        raise DataUnavailable(f"torchvision is not importable ({e})") from None
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        sets = [CIFAR10(str(data_dir), train=train, download=download and train)
                for train in (True, False)]
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, OSError
        reason = f"{type(e).__name__}: {e}".strip()
        raise DataUnavailable(f"CIFAR-10 is not in {data_dir}"
                              + (" and could not be downloaded" if download else "")
                              + f" ({reason})") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    out = []
    for s in sets:
        out.append(torch.from_numpy(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2))))
        out.append(torch.as_tensor(s.targets, dtype=torch.int64))
    return out[0], out[1], out[2], out[3]


def _teacher_labels(x: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """Labels from a fixed random linear teacher on centred features (a learnable task)."""
    flat = x.reshape(x.shape[0], -1)
    teacher = torch.randn(flat.shape[1], num_classes, generator=generator)
    labels = [(chunk.float() - chunk.float().mean()) @ teacher for chunk in flat.split(4096)]
    return torch.cat(labels).argmax(dim=1) if labels else torch.zeros(0, dtype=torch.int64)


def synthetic_cifar10(n_train: int, n_test: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random uint8 images of CIFAR-10's shape with teacher labels: valid for timing only."""
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = _teacher_labels(x, CIFAR_CLASSES, g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def synthetic_digits() -> Tuple[Tensor, Tensor]:
    """Gaussian features shaped like the digits, labelled by a fixed random linear teacher."""
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(DIGITS_SAMPLES, DIGITS_FEATURES, generator=g)
    teacher = torch.randn(DIGITS_FEATURES, DIGITS_CLASSES, generator=g)
    return x, (x @ teacher).argmax(dim=1)


# -- loading -----------------------------------------------------------------------------------
def _subset(x: Tensor, y: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    if not n or n >= x.shape[0]:
        return x, y
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(DATA_SEED))[:n]
    keep = keep.sort().values
    return x[keep], y[keep]


def _channel_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (std 1 where it is 0)."""
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double().div_(255)
        mean += c.sum(dim=(0, 2, 3))
        sq += c.square().sum(dim=(0, 2, 3))
    count = max(x.shape[0] * x.shape[2] * x.shape[3], 1)
    mean /= count
    std = (sq / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


def _split_digits(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(DATA_SEED))
    n_train = round(TRAIN_FRACTION * x.shape[0])
    train, test = order[:n_train], order[n_train:]
    mean, std = x[train].mean(dim=0), x[train].std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def load_data(name: str = "digits", data_dir: Path = Path("data"), download: bool = False,
              train_samples: int = 0, test_samples: int = 0, quiet: bool = False) -> Dataset:
    """Load ``name`` (one of ``cifar10``, ``digits``, ``synthetic-cifar10``,
    ``synthetic-digits``; ``synthetic`` means ``synthetic-digits``).

    A real dataset that cannot be had is replaced by the synthetic one of the same shape, with a
    notice on stderr (unless ``quiet``) and in ``Dataset.note``. ``train_samples`` and
    ``test_samples`` keep a fixed random subset (0 keeps all).
    """
    if name == "synthetic":
        name = "synthetic-digits"
    note = ""
    if name == "cifar10":
        try:
            xtr, ytr, xte, yte = cifar10_arrays(Path(data_dir), download)
        except DataUnavailable as e:
            note = f"{e}; using the synthetic CIFAR-shaped set: timings are valid, accuracy is not"
            name = "synthetic-cifar10"
    if name == "synthetic-cifar10":
        xtr, ytr, xte, yte = synthetic_cifar10(train_samples or CIFAR_TRAIN,
                                               test_samples or CIFAR_TEST)
    if name == "digits":
        arrays = digits_arrays()
        if arrays is None:
            note = ("scikit-learn is not installed (pip install scikit-learn), using the "
                    "synthetic digits-shaped set: accuracy is not meaningful")
            name = "synthetic-digits"
        else:
            xtr, ytr, xte, yte = _split_digits(*arrays)
    if name == "synthetic-digits":
        xtr, ytr, xte, yte = _split_digits(*synthetic_digits())
    if name not in ("cifar10", "digits", "synthetic-cifar10", "synthetic-digits"):
        raise ValueError(f"unknown dataset {name!r} (cifar10, digits, synthetic-cifar10, "
                         f"synthetic-digits)")
    if note and not quiet:
        print(f"torch_nerva.compare: {note}", file=sys.stderr)
    xtr, ytr = _subset(xtr, ytr, train_samples)
    xte, yte = _subset(xte, yte, test_samples)
    image = xtr.dtype == torch.uint8
    data = Dataset(name, xtr, ytr, xte, yte, CIFAR_CLASSES if image else DIGITS_CLASSES, note,
                   sample_shape=tuple(xtr.shape[1:]) if image else DIGITS_SHAPE)
    if data.image:
        data.mean, data.std = _channel_stats(xtr)
    return data
