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
- :func:`load_state_dict`: ``model.load_state_dict`` that leaves the whole model unchanged
  when it raises.
- :func:`summary`: per-layer and total nnz, requested vs realised density, parameter bytes and
  training / inference FLOPs per example, as rows and as a printable table.

The weight's orientation is ``nn.Linear``'s: (out_features x in_features).
"""
from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .layout import CSRLayout, csr_tensor
from .nn._sparse import SparseWeightModule
from .nn.conv import MaskedConv2d, SparseConv2d
from .nn.linear import MaskedLinear, SparseLinear


def to_torch_sparse(layer: SparseLinear, layout: str = "csr") -> Tensor:
    """The weight as a ``torch.sparse_csr_tensor`` (``layout="csr"``) or a coalesced sparse
    COO tensor (``"coo"``), sharing no storage with the layer (detached copies)."""
    crow, col = layer.crow_indices.clone(), layer.col_indices.clone()
    w = csr_tensor(crow, col, layer.flat_values().detach().clone(), (layer.out_features,
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
    return sp.csr_matrix((layer.flat_values().detach().cpu().numpy().copy(),
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


#: Longest line a coordinate text file may have (a real line is a few dozen characters).
MAX_LINE = 1 << 12
#: Lines parsed per step: memory while reading is bounded by this plus what is returned.
_BLOCK_LINES = 1 << 18


def _open_text(path: Union[str, Path]):
    """A text stream of the file, gunzipped on the fly when it ends in .gz (never read whole)."""
    path = Path(path)
    if path.suffix == ".gz":
        import gzip
        return gzip.open(path, "rt", encoding="latin-1")
    return open(path, "r", encoding="latin-1")


def read_columns(path: Union[str, Path], columns: int, max_rows: Optional[int] = None,
                 check: Optional[Any] = None) -> np.ndarray:
    """The numbers of a text file of ``columns`` whitespace-separated numbers per line (blank
    lines and ``#`` comments skipped) as a float64 (rows x columns) array, read as a stream in
    blocks of lines: a line with another number of fields, a line longer than
    :data:`MAX_LINE`, more than ``max_rows`` lines, or a block that ``check(block, first_line)``
    rejects raises ValueError before the rest is read (``check`` gets the block and the 1-based
    number of its first entry, counting data lines only). Memory is that of the result plus one
    block, whatever the file's (or its decompressed) size."""
    blocks: List[np.ndarray] = []
    total = 0
    with _open_text(path) as f:
        lines_read = 0
        reader = iter(lambda: f.readline(MAX_LINE + 1), "")
        while True:
            lines = []
            for line in reader:
                if len(line) > MAX_LINE:
                    raise ValueError(f"{path}: line {lines_read + len(lines) + 1} is longer "
                                     f"than {MAX_LINE} characters")
                lines.append(line)
                if len(lines) == _BLOCK_LINES:
                    break
            if not lines:
                break
            first = lines_read + 1
            lines_read += len(lines)
            first_entry = total + 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "input contained no data"
                    block = np.loadtxt(lines, dtype=np.float64, ndmin=2)
            except ValueError as e:
                raise ValueError(f"{path}: lines {first}..{lines_read}: expected {columns} "
                                 f"numbers per line ({e})") from None
            if block.size == 0:
                continue
            if block.shape[1] != columns:
                raise ValueError(f"{path}: lines {first}..{lines_read}: expected {columns} "
                                 f"numbers per line, got {block.shape[1]}")
            total += block.shape[0]
            if max_rows is not None and total > max_rows:
                raise ValueError(f"{path}: more than {max_rows} entries, more than the matrix "
                                 "can hold without duplicates")
            if check is not None:
                check(block, first_entry)
            blocks.append(block)
    if not blocks:
        return np.zeros((0, columns))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _integral(path, what: str, column: np.ndarray, first_entry: int) -> np.ndarray:
    finite = np.isfinite(column)
    as_int = np.where(finite, column, 0).astype(np.int64)
    bad = ~finite | (as_int != column)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: {what} must be integers, got {column[i]!r} in entry "
                         f"{first_entry + i} (the {first_entry + i}-th data line)")
    return as_int


def read_tsv(path: Union[str, Path], shape) -> Tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, values)`` (0-based int64, float64) of a coordinate text file of 1-based
    ``row<TAB>col<TAB>value`` lines (any whitespace; plain or ``.gz``), validated against the
    file matrix ``shape``: exactly three numbers per line, integral indices in range, no
    duplicate entries. Read as a stream (see :func:`read_columns`): a malformed file raises
    before it is read further, and memory stays within a small multiple of the result."""
    n_rows, n_cols = int(shape[0]), int(shape[1])

    def check(block, first):
        rows = _integral(path, "row indices", block[:, 0], first)
        cols = _integral(path, "column indices", block[:, 1], first)
        bad = (rows < 1) | (rows > n_rows) | (cols < 1) | (cols > n_cols)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{path}: entry {first + i} (the {first + i}-th data line): index "
                             f"({rows[i]}, {cols[i]}) is outside 1..{n_rows} x 1..{n_cols}")

    triples = read_columns(path, 3, max_rows=n_rows * n_cols, check=check)
    rows = triples[:, 0].astype(np.int64) - 1
    cols = triples[:, 1].astype(np.int64) - 1
    flat = np.sort(rows * n_cols + cols)
    if flat.size > 1 and bool((flat[1:] == flat[:-1]).any()):
        i = int(np.argmax(flat[1:] == flat[:-1]))
        raise ValueError(f"{path}: duplicate entry ({flat[i] // n_cols + 1}, "
                         f"{flat[i] % n_cols + 1})")
    return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(triples[:, 2].copy())


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
    del rows, cols, out_idx, in_idx
    positions, order = torch.sort(positions)
    values = values[order].to(dtype)
    del order
    layout = CSRLayout.from_positions(positions, (out_f, in_f))
    del positions
    return SparseLinear.from_layout(layout, values, has_bias=False, backend=backend)


def to_tsv(layer: SparseLinear, path: Union[str, Path], *, transpose: bool = False) -> int:
    """Write the layer's weight (M = W, or W^T with ``transpose=True``) as 1-based
    ``row<TAB>col<TAB>value`` lines, row-major; returns the number of entries. Values are
    written with repr precision (float64 round trip)."""
    rows = layer.layout.row_indices().cpu().numpy() + 1
    cols = layer.col_indices.cpu().numpy().astype(np.int64) + 1
    values = layer.flat_values().detach().cpu().double().numpy()
    if transpose:
        rows, cols = cols, rows
        order = np.lexsort((cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
    with open(path, "w") as f:
        for r, c, v in zip(rows.tolist(), cols.tolist(), values.tolist()):
            f.write(f"{r}\t{c}\t{v!r}\n")
    return len(values)


def _sparse_layers(model: nn.Module) -> Dict[str, SparseWeightModule]:
    """Every truly sparse layer (SparseLinear, SparseConv2d, ...) by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseWeightModule)}


def save_npz(model: nn.Module, path: Union[str, Path, io.IOBase], compressed: bool = False
             ) -> int:
    """Every sparse layer of ``model`` (SparseLinear, SparseConv2d) as ``<name>.values``,
    ``.crow``, ``.col``, ``.shape`` (the weight matrix's: a convolution's is (out, in / groups x
    kh x kw)) and ``.bias`` arrays in one ``.npz`` (int32 indices when they fit); returns its
    size in bytes."""
    arrays: Dict[str, np.ndarray] = {}
    for name, layer in _sparse_layers(model).items():
        key = name or "layer"
        idx = np.int32 if layer.crow_indices.dtype == torch.int32 else np.int64
        arrays[f"{key}.values"] = layer.flat_values().detach().cpu().numpy()
        arrays[f"{key}.crow"] = layer.crow_indices.cpu().numpy().astype(idx)
        arrays[f"{key}.col"] = layer.col_indices.cpu().numpy().astype(idx)
        arrays[f"{key}.shape"] = np.array(layer.matrix_shape, np.int64)
        if layer.bias is not None:
            arrays[f"{key}.bias"] = layer.bias.detach().cpu().numpy()
    if not arrays:
        raise ValueError("the model has no sparse layers (SparseLinear, SparseConv2d)")
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    if isinstance(path, (str, Path)):
        path = Path(path)
        return (path if path.suffix == ".npz" else path.with_suffix(".npz")).stat().st_size
    return path.tell()


def npz_bytes(model: nn.Module, compressed: bool = False) -> int:
    """The size :func:`save_npz` would write."""
    return save_npz(model, io.BytesIO(), compressed)


class _NpzMembers:
    """The arrays of an ``.npz`` read one at a time, each only after its header (shape, dtype)
    passed a check: a small compressed file cannot make the reader allocate more than the
    arrays it was asked for, whose sizes the caller bounds."""

    def __init__(self, zf: zipfile.ZipFile, where) -> None:
        self.zf, self.where = zf, where
        self.names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        others = [n for n in zf.namelist() if not n.endswith(".npy")]
        if others:
            raise ValueError(f"{where}: not an .npz of arrays (member {others[0]!r})")

    def header(self, name: str):
        with self.zf.open(name + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
        return shape, dtype

    def read(self, name: str, shape, kind: str) -> np.ndarray:
        """The array ``name``, which must have ``shape`` and a dtype of ``kind`` ("i": integer,
        "f": floating point); checked before its data is read."""
        got, dtype = self.header(name)
        if dtype.hasobject or dtype.kind not in (("i", "u") if kind == "i" else ("f",)):
            raise ValueError(f"{self.where}: {name} must be "
                             f"{'an integer' if kind == 'i' else 'a floating-point'} array, got "
                             f"dtype {dtype}")
        if tuple(got) != tuple(shape):
            raise ValueError(f"{self.where}: {name} has shape {tuple(got)}, expected "
                             f"{tuple(shape)}")
        with self.zf.open(name + ".npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)


_NPZ_FIELDS = ("values", "crow", "col", "shape", "bias")


def load_npz(model: nn.Module, path: Union[str, Path, io.IOBase]) -> nn.Module:
    """Fill the SparseLinear layers of ``model`` from :func:`save_npz`'s file, adopting the saved
    topologies. Every layer of the file must exist in the model with the same shape.

    All or nothing: every array of every layer is checked first (its header before its data:
    integer indices, floating-point values and bias, exact shapes, the layout sorted,
    duplicate-free and in range), then the layers change; a bad file leaves the model as it
    was. Memory is bounded by the model's own layer sizes, not by what the file claims."""
    where = path if isinstance(path, (str, Path)) else "npz file"
    layers = _sparse_layers(model)
    plans = []
    with zipfile.ZipFile(path) as zf:
        members = _NpzMembers(zf, where)
        keys = sorted({n.rsplit(".", 1)[0] for n in members.names})
        for n in sorted(members.names):
            if "." not in n or n.rsplit(".", 1)[1] not in _NPZ_FIELDS:
                raise ValueError(f"{where}: unexpected array {n!r} (expected <layer>."
                                 f"{{{','.join(_NPZ_FIELDS)}}})")
        for key in keys:
            name = "" if key == "layer" and "" in layers else key
            if name not in layers:
                raise KeyError(f"the file has layer {key!r}, the model has no sparse layer of "
                               f"that name (it has {sorted(layers)})")
            layer = layers[name]
            missing = [f for f in ("values", "crow", "col", "shape") if f"{key}.{f}" not in
                       members.names]
            if missing:
                raise ValueError(f"{where}: layer {key!r} lacks {missing}")
            shape = tuple(int(v) for v in members.read(f"{key}.shape", (2,), "i"))
            out_f, in_f = layer.matrix_shape
            if shape != (out_f, in_f):
                raise ValueError(f"layer {key!r}: the file holds shape {shape}, the model "
                                 f"{(out_f, in_f)}")
            crow = members.read(f"{key}.crow", (out_f + 1,), "i").astype(np.int64)
            nnz = int(crow[-1])
            if not 0 <= nnz <= out_f * in_f:
                raise ValueError(f"layer {key!r}: crow[-1] = {nnz} is not a possible nnz for "
                                 f"a {out_f} x {in_f} layer")
            col = members.read(f"{key}.col", (nnz,), "i").astype(np.int64)
            layout = CSRLayout.from_tensors(torch.from_numpy(crow), torch.from_numpy(col), shape)
            values = torch.from_numpy(members.read(f"{key}.values", (nnz,), "f"))
            bias = None
            if f"{key}.bias" in members.names:
                if layer.bias is None:
                    raise ValueError(f"layer {key!r}: the file has a bias, the layer has none")
                bias = torch.from_numpy(members.read(f"{key}.bias", (out_f,), "f"))
            plans.append((layer, layout, values, bias))
    for layer, layout, values, bias in plans:  # everything checked: now change the model
        layer._adopt(CSRLayout.from_positions(layout.positions(), layout.shape), values)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
    return model


def load_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """``model.load_state_dict(state_dict, strict)``, all or nothing for the whole model.

    Every torch_nerva layer already loads all or nothing by itself (it checks its own keys
    before changing anything), but ``nn.Module.load_state_dict`` loads module after module and
    raises at the end, so a problem in one module leaves the modules loaded before it changed
    (PyTorch's own behaviour, for any module). This wrapper keeps a copy of the model's state
    (parameters, buffers, extra states and gradients; memory: one copy of the state) and puts it
    back when the load raises, then re-raises. Returns what ``load_state_dict`` returns."""
    backup = {k: (v.detach().clone() if isinstance(v, Tensor) else v)
              for k, v in model.state_dict().items()}
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except Exception:
        model.load_state_dict(backup, strict=True)
        for p, g in grads:
            p.grad = g
        raise


def summary(model: nn.Module, requested: Optional[float] = None,
            print_table: bool = False, input_size: Optional[Sequence[int]] = None
            ) -> List[Dict[str, Any]]:
    """One row per linear and 2-D convolution layer (SparseLinear, MaskedLinear, nn.Linear,
    SparseConv2d, MaskedConv2d, nn.Conv2d) and a total row: weight-matrix shape (a
    convolution's is (out, in / groups x kh x kw)), nnz, density (realised; ``requested`` is
    echoed in the total), parameter bytes (what the layer's state dict holds: values, indices,
    bias; or weight, mask, bias) and FLOPs per example: inference 2 nnz, training 6 nnz
    (forward, input gradient, weight gradient) for a sparse layer, the dense counts for masked
    and dense layers (that is what they compute). A convolution's FLOPs are multiplied by its
    output pixels, measured by one forward of a zero input of ``input_size`` (C, H, W) (batch
    1, no gradients); without ``input_size`` they are per output pixel (``pixels`` = 1)."""
    convs = (SparseConv2d, MaskedConv2d, nn.Conv2d)
    pixels: Dict[int, int] = {}
    if input_size is not None:
        def record(module, args, output):
            pixels[id(module)] = int(output.shape[-1] * output.shape[-2])
        handles = [m.register_forward_hook(record) for m in model.modules()
                   if isinstance(m, convs)]
        try:
            p = next(model.parameters(), None)
            x = torch.zeros(1, *input_size, dtype=p.dtype if p is not None else None,
                            device=p.device if p is not None else None)
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
    rows: List[Dict[str, Any]] = []
    for name, m in model.named_modules():
        if not isinstance(m, (SparseLinear, MaskedLinear, nn.Linear) + convs):
            continue
        if isinstance(m, nn.Conv2d):
            rows_, cols = m.out_channels, m.weight[0].numel()
        else:
            rows_, cols = m.matrix_shape if hasattr(m, "matrix_shape") else (
                m.out_features, m.in_features)
        size = rows_ * cols
        nnz = m.nnz if isinstance(m, (SparseLinear, MaskedLinear, SparseConv2d,
                                      MaskedConv2d)) else size
        computed = nnz if isinstance(m, SparseWeightModule) else size
        per_example = pixels.get(id(m), 1) if isinstance(m, convs) else 1
        state = list(m.parameters(recurse=False)) + [
            b for n, b in m.named_buffers(recurse=False)
            if n not in m._non_persistent_buffers_set]
        if isinstance(m, SparseWeightModule):  # the saved topology (read in place, not copied)
            state += [m.crow_indices, m.col_indices]
        rows.append({"layer": name or type(m).__name__, "type": type(m).__name__,
                     "shape": f"{rows_}x{cols}", "nnz": nnz,
                     "density": nnz / size if size else 0.0, "pixels": per_example,
                     "param_bytes": sum(t.numel() * t.element_size() for t in state),
                     "infer_flops": 2 * computed * per_example,
                     "train_flops": 6 * computed * per_example})
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
