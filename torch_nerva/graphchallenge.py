"""The MIT/IEEE Sparse Deep Neural Network Graph Challenge on torch_nerva layers.

Networks of L layers of N neurons (N = 1024, 4096, 16384, 65536), 32 nonzeros per row and per
column, all 1/16; inference ``Y <- min(max(Y W_l + b, 0), 32)`` with ``b`` = -0.30, -0.35,
-0.40, -0.45 for the four sizes; the answer ("categories") is the sorted list of inputs whose
final Y has a nonzero. The rate is ``inputs x 32 N L / inference time`` (edges per second).

- :func:`load_layer` reads an official ``nN-lK.tsv`` (1-based ``row col value``) into a
  :class:`~torch_nerva.SparseLinear` with ``layer(Y) == Y @ W``.
- :func:`generate_layer` builds layer ``index`` of the RadiX-Net structure the official networks
  have (exactly the official layers of the first, unpermuted group; later groups use seeded row
  permutations of our own), lazily, one layer at a time.
- :func:`make_inputs` makes binary inputs offline from scikit-learn's bundled 8x8 digits
  upsampled to sqrt(N) x sqrt(N) and thresholded (close to MNIST's density); MNIST itself is
  not available offline.
- :func:`infer` runs the network and returns the categories; with ``prune`` (default) inputs
  that died are dropped as they die (they can never revive since b < 0).
- :func:`reference_categories` is an independent SciPy CSR implementation for checking.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .interchange import _integral, from_tsv, read_columns
from .layout import CSRLayout
from .nn.linear import SparseLinear

#: The challenge's bias per neuron count.
BIAS = {1024: -0.30, 4096: -0.35, 16384: -0.40, 65536: -0.45}
YMAX = 32.0
NNZ_PER_ROW = 32
VALUE = 1.0 / 16


def _check_neurons(neurons: int) -> int:
    n = neurons // 16
    if neurons <= 0 or neurons % 16 or n & (n - 1) or n < 2:
        raise ValueError(f"neurons must be 16 x a power of two >= 2 (the challenge uses 1024, "
                         f"4096, 16384, 65536), got {neurons}")
    return n


def _layer(neurons: int, out_in_positions: Tensor, values: Tensor,
           dtype: torch.dtype) -> SparseLinear:
    """A bias-free SparseLinear over sorted flat (out, in) positions."""
    layout = CSRLayout.from_positions(out_in_positions, (neurons, neurons), torch.int32)
    return SparseLinear.from_layout(layout, values.to(dtype), has_bias=False)


def load_layer(path: Union[str, Path], neurons: int, dtype: torch.dtype = torch.float32
               ) -> SparseLinear:
    """The official weight file ``path`` (``row<TAB>col<TAB>value``, 1-based, plain or .gz) as a
    SparseLinear with ``layer(Y) == Y @ W``: W's row r / column c become input r / output c.
    Read and validated by :func:`torch_nerva.interchange.from_tsv` (``transpose=True``)."""
    _check_neurons(neurons)
    return from_tsv(path, (neurons, neurons), transpose=True, dtype=dtype)


def _group_permutation(neurons: int, group: int, seed: int) -> Optional[Tensor]:
    if group == 0:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + group)
    return torch.randperm(neurons, generator=g)


def generate_layer(neurons: int, index: int, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> SparseLinear:
    """Layer ``index`` (0-based) of the RadiX-Net network of ``neurons`` neurons: with
    n = neurons / 16, m = log2(n), k = index mod m, s = 2^k, W[r, c] = 1/16 exactly when
    (r - c) mod n is 0 or s; layers of group index // m >= 1 have their rows permuted by one
    permutation per group drawn from ``seed``. Group 0 equals the official files."""
    n = _check_neurons(neurons)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    m = int(math.log2(n))
    s = 1 << (index % m)
    out = torch.arange(neurons)
    j = torch.arange(16) * n
    # inputs r of output c: r = c + 0 or c + s (mod n), in each of the 16 blocks
    base = torch.cat([(out % n)[:, None] + j, ((out + s) % n)[:, None] + j], dim=1)
    perm = _group_permutation(neurons, index // m, seed)
    if perm is not None:  # W'[r, :] = W[perm[r], :]: input r holds what perm[r] held
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(neurons)
        base = inverse[base]
    base = base.sort(dim=1).values
    positions = (out[:, None] * neurons + base).flatten()
    return _layer(neurons, positions, torch.full((positions.numel(),), VALUE, dtype=dtype),
                  dtype)


def make_inputs(neurons: int, count: int, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """``count`` binary inputs (count x neurons) from the 8x8 digits: upsampled to
    sqrt(neurons)^2 bilinearly, thresholded at 12.5 of 16 (about 12% ink), then shifted by up to
    1/8 of the side (seeded) so that repeated digits differ. Falls back to seeded random
    strokes when scikit-learn is not installed."""
    side = math.isqrt(neurons)
    if side * side != neurons:
        raise ValueError(f"neurons must be a perfect square for image inputs, got {neurons}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    from .datasets import digits_arrays
    g = torch.Generator().manual_seed(seed)
    arrays = digits_arrays()
    if arrays is None:
        images = (torch.rand(max(count, 1), 1, 8, 8, generator=g) > 0.75).float() * 16
    else:
        images = arrays[0].view(-1, 1, 8, 8)
    pick = torch.randint(0, images.shape[0], (count,), generator=g)
    big = torch.nn.functional.interpolate(images[pick], size=(side, side), mode="bilinear",
                                          align_corners=False)
    binary = (big > 12.5).to(dtype)  # about 12% of the pixels (MNIST at 32x32: 10-19%)
    shift = max(side // 8, 1)
    dy = torch.randint(-shift, shift + 1, (count,), generator=g)
    dx = torch.randint(-shift, shift + 1, (count,), generator=g)
    out = torch.empty(count, side, side, dtype=dtype)
    for i in range(count):  # rolls are cheap next to inference; keeps it simple
        out[i] = torch.roll(binary[i, 0], (int(dy[i]), int(dx[i])), dims=(0, 1))
    return out.view(count, neurons)


def _as_list(layers: Iterable[SparseLinear]) -> List[SparseLinear]:
    layers = list(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, SparseLinear):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, expected SparseLinear")
        if i and layer.in_features != layers[i - 1].out_features:
            raise ValueError(f"layer {i} has in_features {layer.in_features} but layer {i - 1} "
                             f"has out_features {layers[i - 1].out_features}")
    return layers


def infer(layers: Iterable[SparseLinear], y0: Tensor, bias: float, ymax: float = YMAX, *,
          prune: bool = True, chunk: int = 128) -> Tensor:
    """The categories: sorted 0-based int64 indices of the rows of ``y0`` (inputs x neurons)
    whose activations after ``Y <- min(max(Y W_l + bias, 0), ymax)`` over all layers hold a
    nonzero. On CPU, one op runs chunks of ``chunk`` inputs through every layer per thread in
    cache-resident feature-major buffers; with ``prune`` inputs that died are dropped (exact for
    bias <= 0). Elsewhere (CUDA), layer by layer through the layers' own forward."""
    layers = _as_list(layers)
    if y0.dim() != 2:
        raise ValueError(f"y0 must be 2-D (inputs x neurons), got shape {tuple(y0.shape)}")
    if layers and y0.shape[1] != layers[0].in_features:
        raise ValueError(f"y0 has {y0.shape[1]} columns but the first layer has in_features "
                         f"{layers[0].in_features}")
    if any(layer.bias is not None for layer in layers):
        raise ValueError("Graph Challenge layers have no bias of their own (bias= applies to all)")
    if prune and bias > 0:
        raise ValueError("prune=True needs bias <= 0 (dead inputs could revive otherwise)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (inputs per thread task), got {chunk!r}")
    chunk = min(chunk, max(y0.shape[0], 1))
    if y0.device.type != "cpu":
        return _infer_layerwise(layers, y0, bias, ymax, prune)
    with torch.no_grad():
        y = y0.to(layers[0].values.dtype) if layers else y0
        alive = torch.ops.torch_nerva.sparse_chain(
            y, [m.flat_values().detach() for m in layers], [m.crow_indices for m in layers],
            [m.col_indices for m in layers], float(bias), 0.0, float(ymax), int(chunk),
            bool(prune))
    return alive.nonzero().flatten()


def _infer_layerwise(layers: List[SparseLinear], y0: Tensor, bias: float, ymax: float,
                     prune: bool) -> Tensor:
    """Layer by layer through each layer's forward (any device and backend)."""
    with torch.no_grad():
        y, ids = y0, torch.arange(y0.shape[0], device=y0.device)
        for layer in layers:
            y = (layer(y) + bias).clamp_(0, ymax)
            if prune:
                keep = y.ne(0).any(dim=1)
                y, ids = y[keep], ids[keep]
        return ids[y.ne(0).any(dim=1)].sort().values.cpu()


def reference_categories(weights: Sequence, y0: np.ndarray, bias: float,
                         ymax: float = YMAX) -> np.ndarray:
    """SciPy reference: ``weights`` are W matrices (scipy.sparse, ``Y @ W``) or SparseLinear
    layers (converted); plain float64 sparse products, no pruning."""
    import scipy.sparse as sp
    y = sp.csr_matrix(np.asarray(y0, dtype=np.float64))
    for w in weights:
        if isinstance(w, SparseLinear):
            crow, col = w.crow_indices.numpy(), w.col_indices.numpy()
            wt = sp.csr_matrix((w.flat_values().detach().double().numpy(), col, crow),
                               shape=(w.out_features, w.in_features))
            w = wt.T.tocsr()
        z = (y @ w).tocsr()
        z.data += bias  # the bias applies to the nonzeros of Y W
        z.data = np.clip(z.data, 0, ymax)
        z.eliminate_zeros()
        y = z
    return np.flatnonzero(np.diff(y.indptr) > 0).astype(np.int64)


def load_categories(path: Union[str, Path]) -> np.ndarray:
    """An official ``neuronN-lL-categories.tsv`` (1-based, one per line) as 0-based indices."""
    data = read_columns(path, 1)
    ids = _integral(path, "categories", data[:, 0], 1) - 1
    if (ids < 0).any():
        raise ValueError(f"{path}: categories are 1-based, got {int(ids.min()) + 1}")
    return ids


def load_inputs(path: Union[str, Path], neurons: int, count: Optional[int] = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """An official ``sparse-images-N.tsv`` (1-based ``image pixel value``) as a dense
    (count x neurons) tensor; ``count`` defaults to the largest image index."""
    def check(block, first):
        img = _integral(path, "image indices", block[:, 0], first)
        pix = _integral(path, "pixel indices", block[:, 1], first)
        if (pix < 1).any() or (pix > neurons).any() or (img < 1).any() or \
                (count is not None and (img > count).any()):
            raise ValueError(f"{path}: an image or pixel index out of range in entries from "
                             f"{first} (pixels 1..{neurons}, images 1..{count or 'any'})")

    data = read_columns(path, 3, max_rows=None if count is None else count * neurons,
                        check=check)
    img = data[:, 0].astype(np.int64) - 1
    pix = data[:, 1].astype(np.int64) - 1
    count = (int(img.max()) + 1 if img.size else 0) if count is None else count
    y = torch.zeros(count, neurons, dtype=dtype)
    y[torch.from_numpy(img), torch.from_numpy(pix)] = torch.from_numpy(data[:, 2]).to(dtype)
    return y
