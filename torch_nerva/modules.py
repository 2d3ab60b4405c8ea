"""SparseLinear (truly sparse, CSR) and MaskedLinear (dense weight x fixed mask).

Both take the same constructor and draw the same random numbers in the same order (topology,
then values, then bias), so ``SparseLinear(..., generator=g1)`` and
``MaskedLinear(..., generator=g2)`` with equally seeded generators hold identical weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, functional
from .init import init_bias, init_values, round_half_up
from .layout import CSRLayout, _check_index_dtype, check_density, csr_tensor


def _make_layout(in_features: int, out_features: int, density, mask, nnz, generator,
                 index_dtype) -> CSRLayout:
    given = [name for name, v in (("density", density), ("mask", mask), ("nnz", nnz))
             if v is not None]
    if len(given) != 1:
        raise TypeError("give exactly one of density=, mask= or nnz= to choose the sparsity "
                        f"pattern, got {given or 'none'}")
    _check_index_dtype(index_dtype)
    n_total = in_features * out_features
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask must have shape (out_features, in_features) = "
                             f"({out_features}, {in_features}), got {tuple(mask.shape)}")
        return CSRLayout.from_mask(mask, index_dtype)
    if density is not None:
        nnz = round_half_up(check_density(density) * n_total)
    if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= n_total:
        raise ValueError(f"nnz must be an int in [0, {n_total}], got {nnz!r}")
    return CSRLayout.random(out_features, in_features, nnz, generator=generator,
                            index_dtype=index_dtype)


def _check_features(in_features, out_features):
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def keep_largest(weight: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest-magnitude entries of ``weight``."""
    flat = weight.detach().abs().flatten().cpu()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(weight.shape)


def _dense_mask(linear: nn.Linear, density, mask) -> Tensor:
    if density is not None and mask is not None:
        raise TypeError("give density= or mask=, not both")
    if mask is not None:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(linear.weight.shape):
            raise ValueError(f"mask must be a tensor of shape {tuple(linear.weight.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask)}")
        return mask
    if density is not None:
        return keep_largest(linear.weight, round_half_up(check_density(density) * linear.weight.numel()))
    return linear.weight.detach() != 0


class _LinearBase(nn.Module):
    """What SparseLinear and MaskedLinear share: the constructor and its random stream.

    Random numbers are drawn in one order (topology, then values, then bias), so the two
    classes built with equally seeded generators hold identical weights.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 density: Optional[float] = None, mask: Optional[Tensor] = None,
                 nnz: Optional[int] = None, backend: str = "auto", device=None, dtype=None,
                 generator: Optional[torch.Generator] = None, index_dtype=None) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backends.check(backend)
        layout = _make_layout(in_features, out_features, density, mask, nnz, generator,
                              index_dtype)
        values = init_values(layout.nnz, in_features, out_features, dtype=dtype,
                             generator=generator)
        self._init_weight(layout, values, device)
        if bias:
            self.bias = nn.Parameter(init_bias(in_features, out_features, dtype=dtype,
                                               generator=generator).to(device))
        else:
            self.register_parameter("bias", None)

    def _init_weight(self, layout: CSRLayout, values: Tensor, device) -> None:
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        raise NotImplementedError

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0


class SparseLinear(_LinearBase):
    r"""A drop-in for ``nn.Linear`` whose weight is stored in CSR form only.

    ``y = x W^T + b`` with W (out_features x in_features) holding ``nnz`` nonzeros. Trainable
    parameters are exactly ``values`` (1-D, nnz) and ``bias``; the topology lives in the buffers
    ``crow_indices`` (out_features + 1) and ``col_indices`` (nnz), sorted by row then column, int32
    when it fits. The transpose used by the input gradient is cached in non-persistent buffers.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        density: fraction of nonzeros in [0, 1]; nnz = floor(density x in x out + 1/2), placed
            uniformly at random.
        mask: a boolean (out_features x in_features) tensor giving the pattern.
        nnz: the exact number of nonzeros (placed uniformly at random).
        backend: ``"auto"`` (default), ``"native"``, ``"dense"`` or ``"torch"`` (see
            :mod:`torch_nerva.backends`). ``auto`` computes small or dense-ish layers densely.
        device, dtype: factory kwargs as in ``nn.Linear``.
        generator: a CPU ``torch.Generator`` for the topology and the initial values.
        index_dtype: ``torch.int32`` or ``torch.int64`` (default: int32 when it fits).

    Exactly one of ``density``, ``mask`` and ``nnz`` must be given. The kept weights are
    initialised Glorot-uniform scaled for the realised density (see :mod:`torch_nerva.init`).
    """

    def _init_weight(self, layout: CSRLayout, values: Tensor, device) -> None:
        self.values = nn.Parameter(values.to(device))
        self._set_layout(layout.crow.to(device), layout.col.to(device))

    # -- topology ----------------------------------------------------------------------------
    def _set_layout(self, crow: Tensor, col: Tensor) -> None:
        """Install a (validated) topology and rebuild the cached transpose."""
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        crow_t, col_t, perm = CSRLayout(crow.cpu(), col.cpu(),
                                        (self.out_features, self.in_features)).transpose()
        device = crow.device
        self.register_buffer("crow_indices_t", crow_t.to(device), persistent=False)
        self.register_buffer("col_indices_t", col_t.to(device), persistent=False)
        self.register_buffer("perm_t", perm.to(device), persistent=False)
        # Decided once per topology: does backend="auto" compute this layer densely?
        self._prefer_dense = backends.prefer_dense(self.in_features, self.out_features,
                                                   col.numel())
        self._update_positions()

    def _update_positions(self) -> None:
        """Flat positions for the dense path, kept only for layers that may take it."""
        if self.backend == "dense" or (self.backend == "auto" and self._prefer_dense):
            positions = self.layout.positions()
        else:
            positions = torch.empty(0, dtype=torch.long, device=self.crow_indices.device)
        self.register_buffer("dense_positions", positions, persistent=False)

    @property
    def resolved_backend(self) -> str:
        """What ``backend`` resolves to for this layer on its device."""
        return backends.resolve(self.backend, self.values.device, self._prefer_dense)
    @property
    def layout(self) -> CSRLayout:
        return CSRLayout(self.crow_indices, self.col_indices, (self.out_features, self.in_features))

    @property
    def nnz(self) -> int:
        return self.values.numel()


    @property
    def weight(self) -> Tensor:
        """The weight as a ``torch.sparse_csr_tensor`` view of ``values`` (no dense copy)."""
        return csr_tensor(self.crow_indices, self.col_indices, self.values,
                          (self.out_features, self.in_features))

    def dense_weight(self) -> Tensor:
        """The (out_features x in_features) dense weight; differentiable w.r.t. ``values``."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        flat = flat.scatter(0, self.layout.positions(), self.values)
        return flat.view(self.out_features, self.in_features)

    to_dense = dense_weight

    def mask(self) -> Tensor:
        """The boolean (out_features x in_features) pattern (allocates it densely)."""
        return self.layout.to_mask()

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        # Read the registered tensors from the module's dicts (nn.Module.__getattr__ costs about
        # a microsecond per name, a tenth of a batch-1 layer); a parametrized ``values`` or
        # ``bias`` lives elsewhere and is read through getattr.
        p, b = self._parameters, self._buffers
        values = p["values"] if "values" in p else self.values
        bias = p["bias"] if "bias" in p else self.bias
        return functional.sparse_linear(input, values, bias, b["crow_indices"],
                                        b["col_indices"], b["crow_indices_t"],
                                        b["col_indices_t"], b["perm_t"], backend=self.backend,
                                        dense=self._prefer_dense,
                                        positions=b["dense_positions"])

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-draw the kept values and the bias (topology unchanged)."""
        with torch.no_grad():
            self.values.copy_(init_values(self.nnz, self.in_features, self.out_features,
                                          dtype=self.values.dtype, generator=generator))
            if self.bias is not None:
                self.bias.copy_(init_bias(self.in_features, self.out_features,
                                          dtype=self.bias.dtype, generator=generator))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4g}, "
                f"backend={self.backend}"
                + (f"({self.resolved_backend})" if self.backend == "auto" else ""))

    # -- construction from a layout or from dense ---------------------------------------------
    @classmethod
    def from_layout(cls, layout: CSRLayout, values: Tensor, bias: Optional[Tensor] = None, *,
                    has_bias: Optional[bool] = None, backend: str = "auto",
                    device=None) -> "SparseLinear":
        """A layer over an existing (validated or self-built) ``layout``, ``values`` in its
        order (copied) and ``bias`` (copied; ``has_bias=True`` without ``bias`` makes a zero
        bias). dtype from ``values``; device from ``device``, else from ``values``."""
        out_f, in_f = layout.shape
        if values.shape != (layout.nnz,):
            raise ValueError(f"values must have shape ({layout.nnz},) for this layout, got "
                             f"{tuple(values.shape)}")
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        device = values.device if device is None else device
        layer = cls(in_f, out_f, bias is not None if has_bias is None else has_bias, nnz=0,
                    backend=backend, device=device, dtype=values.dtype)
        layer._adopt(layout, values)
        if layer.bias is not None:
            with torch.no_grad():
                if bias is None:
                    layer.bias.zero_()
                else:
                    layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, density: Optional[float] = None,
                   mask: Optional[Tensor] = None, backend: str = "auto",
                   index_dtype=None) -> "SparseLinear":
        """Keep the round(density x numel) largest-magnitude weights of ``linear`` (or those in
        ``mask``, or, with neither, its nonzeros); values and bias are copied."""
        w = linear.weight
        layout = CSRLayout.from_mask(_dense_mask(linear, density, mask), index_dtype)
        return cls.from_layout(layout, w.detach().flatten()[layout.positions().to(w.device)],
                               linear.bias, backend=backend)

    def _adopt(self, layout: CSRLayout, values: Tensor) -> None:
        """Replace topology and values (same Parameter object, new size)."""
        device = self.values.device
        self.values.data = values.detach().to(device=device, dtype=self.values.dtype).clone()
        self._set_layout(layout.crow.to(device), layout.col.to(device))

    # -- state dict: carries values, indices and shape; a different topology is adopted -----
    def get_extra_state(self):
        return {"in_features": self.in_features, "out_features": self.out_features}

    def set_extra_state(self, state) -> None:
        shape = (state.get("out_features"), state.get("in_features"))
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"SparseLinear state is for shape (out, in) = {shape}, this layer "
                             f"is ({self.out_features}, {self.in_features})")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        crow = state_dict.get(prefix + "crow_indices")
        col = state_dict.get(prefix + "col_indices")
        values = state_dict.get(prefix + "values")
        if crow is not None and col is not None and values is not None:
            try:
                layout = CSRLayout.from_tensors(crow.cpu(), col.cpu(),
                                                (self.out_features, self.in_features))
                if values.shape != (layout.nnz,):
                    raise ValueError(f"values has shape {tuple(values.shape)}, the saved layout "
                                     f"has nnz = {layout.nnz}")
            except (RuntimeError, ValueError, TypeError) as e:
                error_msgs.append(f"invalid sparse layout for {prefix or 'SparseLinear'}: {e}")
                return
            if (not torch.equal(layout.crow, self.crow_indices.cpu().to(layout.crow.dtype))
                    or layout.col.shape != self.col_indices.shape
                    or not torch.equal(layout.col, self.col_indices.cpu().to(layout.col.dtype))):
                # Adopt the saved topology (values are then copied by the default loader).
                self._adopt(layout, values)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MaskedLinear(_LinearBase):
    """The masked baseline of sparse-training papers: ``y = x (weight * mask)^T + bias``.

    Same constructor and same initial weights as :class:`SparseLinear` (given equally seeded
    generators). The mask is a fixed boolean buffer, applied in every forward, so the weight
    gradient is masked too. ``backend`` is accepted for signature compatibility and kept for
    :func:`torch_nerva.to_sparse`.
    """

    def _init_weight(self, layout: CSRLayout, values: Tensor, device) -> None:
        weight = values.new_zeros(self.out_features * self.in_features)
        weight[layout.positions()] = values
        self.weight = nn.Parameter(weight.view(self.out_features, self.in_features).to(device))
        self.register_buffer("mask", layout.to_mask().to(device))

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())


    def dense_weight(self) -> Tensor:
        return self.weight * self.mask

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}, density={self.density:.4g}")

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, density: Optional[float] = None,
                   mask: Optional[Tensor] = None, backend: str = "auto") -> "MaskedLinear":
        """As :meth:`SparseLinear.from_dense`, keeping a dense weight and a mask."""
        w = linear.weight
        keep = _dense_mask(linear, density, mask)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, nnz=0,
                    backend=backend, device=w.device, dtype=w.dtype)
        keep = keep.to(device=w.device) != 0
        with torch.no_grad():
            layer.weight.copy_(w * keep)
            layer.mask.copy_(keep)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer
