"""Getting sparse layers in and out, and counting what they cost.

- :func:`to_torch_sparse` / :func:`from_torch_sparse`: a layer's weight as a
  ``torch.sparse_csr_tensor`` or COO tensor, and back (validated).
- :func:`to_scipy` / :func:`from_scipy`: the same with ``scipy.sparse.csr_matrix``.
- :func:`save_npz` / :func:`load_npz`: a whole model's sparse layers in a compact ``.npz``
  (values, row pointers, column indices and bias per layer; the paper's storage format), with
  :func:`npz_bytes` reporting its size. :func:`load_npz` fills an existing model (same layer
  names and shapes), adopting the saved topologies.
- :func:`from_tsv` / :func:`to_tsv` (:func:`read_tsv`): 1-based ``row col value`` coordinate
  text files, plain or gzipped; ``transpose=True`` for ``Y @ W`` files such as the Graph
  Challenge's (:func:`torch_nerva.graphchallenge.load_layer` reads through it).
- :func:`summary`: per-layer and total nnz, requested vs realised density, parameter bytes and
  training / inference FLOPs per example, as rows and as a printable table.

The weight's orientation is ``nn.Linear``'s: (out_features x in_features).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .layout import CSRLayout, csr_tensor
from .modules import MaskedLinear, SparseLinear


def to_torch_sparse(layer: SparseLinear, layout: str = "csr") -> Tensor:
    """The weight as a ``torch.sparse_csr_tensor`` (``layout="csr"``) or a coalesced sparse
    COO tensor (``"coo"``), sharing no storage with the layer (detached copies)."""
    crow, col = layer.crow_indices.clone(), layer.col_indices.clone()
    w = csr_tensor(crow, col, layer.values.detach().clone(), (layer.out_features,
                                                               layer.in_features))
    if layout == "csr":
        return w
    if layout == "coo":
        return w.to_sparse_coo().coalesce()
    raise ValueError(f"layout must be 'csr' or 'coo', got {layout!r}")


def from_torch_sparse(weight: Tensor, bias: Optional[Tensor] = None,
                      backend: str = "auto") -> SparseLinear:
    """A SparseLinear holding the sparse (CSR or COO) ``weight`` (out x in); explicit zeros
    are kept as connections. Indices are validated."""
    if weight.layout == torch.sparse_coo:
        weight = weight.coalesce().to_sparse_csr()
    if weight.layout != torch.sparse_csr:
        raise TypeError(f"weight must be a sparse CSR or COO tensor, got layout {weight.layout}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    layout = CSRLayout.from_tensors(weight.crow_indices().cpu(), weight.col_indices().cpu(),
                                    (out_f, in_f))
    return _layer(layout, weight.values(), bias, backend)


def _layer(layout: CSRLayout, values: Tensor, bias: Optional[Tensor], backend: str
           ) -> SparseLinear:
    # rebuilt from positions: the index dtype is chosen for the shape, not inherited
    layout = CSRLayout.from_positions(layout.positions(), layout.shape)
    return SparseLinear.from_layout(layout, values, bias, backend=backend)


def to_scipy(layer: SparseLinear):
    """The weight as a ``scipy.sparse.csr_matrix`` (out x in)."""
    import scipy.sparse as sp
    return sp.csr_matrix((layer.values.detach().cpu().numpy().copy(),
                          layer.col_indices.cpu().numpy().copy(),
                          layer.crow_indices.cpu().numpy().copy()),
                         shape=(layer.out_features, layer.in_features))


def from_scipy(matrix, bias: Optional[Tensor] = None, backend: str = "auto",
               dtype: torch.dtype = torch.float32) -> SparseLinear:
    """A SparseLinear from any ``scipy.sparse`` matrix (out x in); duplicates are summed."""
    import scipy.sparse as sp
    if not sp.issparse(matrix):
        raise TypeError(f"expected a scipy.sparse matrix, got {type(matrix).__name__}")
    m = sp.csr_matrix(matrix)
    m.sum_duplicates()
    m.sort_indices()
    layout = CSRLayout.from_tensors(torch.from_numpy(m.indptr.astype(np.int64)),
                                    torch.from_numpy(m.indices.astype(np.int64)), m.shape)
    return _layer(layout, torch.from_numpy(m.data).to(dtype), bias, backend)


def _read_text(path: Union[str, Path]) -> bytes:
    """A file's bytes, gunzipped when it ends in .gz."""
    path = Path(path)
    if path.suffix == ".gz":
        import gzip
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read_tsv(path: Union[str, Path], shape) -> Tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, values)`` (0-based int64, float64) of a coordinate text file of 1-based
    ``row<TAB>col<TAB>value`` lines (any whitespace; plain or ``.gz``), validated against the
    file matrix ``shape``: integral indices in range, no duplicate entries."""
    n_rows, n_cols = int(shape[0]), int(shape[1])
    text = _read_text(path)
    try:
        data = np.array(text.split(), dtype=np.float64) if text.strip() else np.zeros(0)
    except ValueError as e:
        raise ValueError(f"{path}: not a file of numbers ({e})") from None
    if data.size % 3:
        raise ValueError(f"{path}: expected lines of 'row col value', got {data.size} numbers")
    triples = data.reshape(-1, 3)
    if not np.isfinite(triples[:, :2]).all():
        raise ValueError(f"{path}: row and column indices must be finite integers")
    rows = triples[:, 0].astype(np.int64) - 1
    cols = triples[:, 1].astype(np.int64) - 1
    if not np.array_equal(rows + 1, triples[:, 0]) or not np.array_equal(cols + 1, triples[:, 1]):
        raise ValueError(f"{path}: row and column indices must be integers")
    bad = (rows < 0) | (rows >= n_rows) | (cols < 0) | (cols >= n_cols)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: line {i + 1}: index ({rows[i] + 1}, {cols[i] + 1}) is outside "
                         f"1..{n_rows} x 1..{n_cols}")
    flat = np.sort(rows * n_cols + cols)
    if flat.size > 1 and bool((flat[1:] == flat[:-1]).any()):
        raise ValueError(f"{path}: duplicate (row, col) entries")
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(triples[:, 2])


def from_tsv(path: Union[str, Path], shape, *, transpose: bool = False,
             dtype: torch.dtype = torch.float32, backend: str = "auto") -> SparseLinear:
    """A bias-free SparseLinear from a coordinate text file (:func:`read_tsv`) holding a
    ``shape[0] x shape[1]`` matrix M. ``transpose=False``: M is the weight (out x in, as
    ``nn.Linear``); ``transpose=True``: M is used as ``Y @ M`` (the Graph Challenge's files:
    file row r = input r, file column c = output c), so the layer's weight is M^T."""
    rows, cols, values = read_tsv(path, shape)
    out_f, in_f = (int(shape[1]), int(shape[0])) if transpose else (int(shape[0]), int(shape[1]))
    out_idx, in_idx = (cols, rows) if transpose else (rows, cols)
    positions = out_idx * in_f + in_idx
    order = torch.argsort(positions)
    layout = CSRLayout.from_positions(positions[order], (out_f, in_f))
    return SparseLinear.from_layout(layout, values[order].to(dtype), has_bias=False,
                                    backend=backend)


def to_tsv(layer: SparseLinear, path: Union[str, Path], *, transpose: bool = False) -> int:
    """Write the layer's weight (M = W, or W^T with ``transpose=True``) as 1-based
    ``row<TAB>col<TAB>value`` lines, row-major; returns the number of entries. Values are
    written with repr precision (float64 round trip)."""
    rows = layer.layout.row_indices().cpu().numpy() + 1
    cols = layer.col_indices.cpu().numpy().astype(np.int64) + 1
    values = layer.values.detach().cpu().double().numpy()
    if transpose:
        rows, cols = cols, rows
        order = np.lexsort((cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
    with open(path, "w") as f:
        for r, c, v in zip(rows.tolist(), cols.tolist(), values.tolist()):
            f.write(f"{r}\t{c}\t{v!r}\n")
    return len(values)


def _sparse_layers(model: nn.Module) -> Dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def save_npz(model: nn.Module, path: Union[str, Path, io.IOBase], compressed: bool = False
             ) -> int:
    """Every SparseLinear of ``model`` as ``<name>.values``, ``.crow``, ``.col``, ``.shape``
    (and ``.bias``) arrays in one ``.npz`` (int32 indices when they fit); returns its size in
    bytes."""
    arrays: Dict[str, np.ndarray] = {}
    for name, layer in _sparse_layers(model).items():
        key = name or "layer"
        idx = np.int32 if layer.crow_indices.dtype == torch.int32 else np.int64
        arrays[f"{key}.values"] = layer.values.detach().cpu().numpy()
        arrays[f"{key}.crow"] = layer.crow_indices.cpu().numpy().astype(idx)
        arrays[f"{key}.col"] = layer.col_indices.cpu().numpy().astype(idx)
        arrays[f"{key}.shape"] = np.array([layer.out_features, layer.in_features], np.int64)
        if layer.bias is not None:
            arrays[f"{key}.bias"] = layer.bias.detach().cpu().numpy()
    if not arrays:
        raise ValueError("the model has no SparseLinear layers")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    if isinstance(path, (str, Path)):
        path = Path(path)
        return (path if path.suffix == ".npz" else path.with_suffix(".npz")).stat().st_size
    return path.tell()


def npz_bytes(model: nn.Module, compressed: bool = False) -> int:
    """The size :func:`save_npz` would write."""
    return save_npz(model, io.BytesIO(), compressed)


def load_npz(model: nn.Module, path: Union[str, Path, io.IOBase]) -> nn.Module:
    """Fill the SparseLinear layers of ``model`` from :func:`save_npz`'s file, adopting the saved
    topologies (validated); every layer of the file must exist with the same shape."""
    with np.load(path) as data:
        names = sorted({k.rsplit(".", 1)[0] for k in data.files})
        layers = _sparse_layers(model)
        for key in names:
            name = "" if key == "layer" and "" in layers else key
            if name not in layers:
                raise KeyError(f"the file has layer {key!r}, the model has no SparseLinear of "
                               f"that name (it has {sorted(layers)})")
            layer = layers[name]
            shape = tuple(int(v) for v in data[f"{key}.shape"])
            if shape != (layer.out_features, layer.in_features):
                raise ValueError(f"layer {key!r}: the file holds shape {shape}, the model "
                                 f"{(layer.out_features, layer.in_features)}")
            layout = CSRLayout.from_tensors(torch.from_numpy(data[f"{key}.crow"].astype(np.int64)),
                                            torch.from_numpy(data[f"{key}.col"].astype(np.int64)),
                                            shape)
            values = torch.from_numpy(data[f"{key}.values"])
            if values.shape != (layout.nnz,):
                raise ValueError(f"layer {key!r}: values has shape {tuple(values.shape)}, the "
                                 f"saved layout has nnz = {layout.nnz}")
            layer._adopt(CSRLayout.from_positions(layout.positions(), shape), values)
            if f"{key}.bias" in data.files:
                if layer.bias is None:
                    raise ValueError(f"layer {key!r}: the file has a bias, the layer has none")
                with torch.no_grad():
                    layer.bias.copy_(torch.from_numpy(data[f"{key}.bias"]))
    return model


def summary(model: nn.Module, requested: Optional[float] = None,
            print_table: bool = False) -> List[Dict[str, Any]]:
    """One row per linear layer (SparseLinear, MaskedLinear, nn.Linear) and a total row:
    shape, nnz, density (realised; ``requested`` is echoed in the total), parameter bytes
    (parameters and persistent buffers of the layer) and FLOPs per example: inference 2 nnz,
    training 6 nnz (forward, input gradient, weight gradient) for a sparse layer, the dense
    counts for masked and dense layers (that is what they compute)."""
    rows: List[Dict[str, Any]] = []
    for name, m in model.named_modules():
        if not isinstance(m, (SparseLinear, MaskedLinear, nn.Linear)):
            continue
        size = m.in_features * m.out_features
        nnz = m.nnz if isinstance(m, (SparseLinear, MaskedLinear)) else size
        computed = nnz if isinstance(m, SparseLinear) else size
        state = list(m.parameters(recurse=False)) + [b for n, b in m.named_buffers(recurse=False)
                                                     if n not in m._non_persistent_buffers_set]
        rows.append({"layer": name or type(m).__name__, "type": type(m).__name__,
                     "shape": f"{m.out_features}x{m.in_features}", "nnz": nnz,
                     "density": nnz / size if size else 0.0,
                     "param_bytes": sum(t.numel() * t.element_size() for t in state),
                     "infer_flops": 2 * computed, "train_flops": 6 * computed})
    total = {"layer": "total", "type": "", "shape": "",
             "nnz": sum(r["nnz"] for r in rows),
             "param_bytes": sum(r["param_bytes"] for r in rows),
             "infer_flops": sum(r["infer_flops"] for r in rows),
             "train_flops": sum(r["train_flops"] for r in rows)}
    size = sum(int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) for r in rows)
    total["density"] = total["nnz"] / size if size else 0.0
    total["requested_density"] = requested
    rows.append(total)
    if print_table:
        print(format_summary(rows))
    return rows


def format_summary(rows: List[Dict[str, Any]]) -> str:
    header = f"{'layer':<16} {'type':<13} {'shape':>11} {'nnz':>11} {'density':>9} " \
             f"{'param KB':>10} {'infer MFLOP':>12} {'train MFLOP':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['layer'][:16]:<16} {r['type']:<13} {r['shape']:>11} {r['nnz']:>11,} "
                     f"{r['density']:>9.4g} {r['param_bytes'] / 1024:>10.1f} "
                     f"{r['infer_flops'] / 1e6:>12.3f} {r['train_flops'] / 1e6:>12.3f}")
    req = rows[-1].get("requested_density")
    if req is not None:
        lines.append(f"requested density {req:g}, realised {rows[-1]['density']:.6g}")
    lines.append("FLOPs per example: inference 2 x computed weights, training 6 x (forward, "
                 "input and weight gradients); masked layers compute densely")
    return "\n".join(lines)
