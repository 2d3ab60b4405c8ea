"""SparseLinear (truly sparse, CSR; on the shared core of ``_sparse.py``) and MaskedLinear
(dense weight x fixed mask).

Both take the same constructor and draw the same random numbers in the same order (topology,
then values, then bias), so ``SparseLinear(..., generator=g1)`` and
``MaskedLinear(..., generator=g2)`` with equally seeded generators hold identical weights.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, functional
from ..init import init_bias, init_values, round_half_up
from ..layout import CSRLayout, _check_index_dtype, check_density
from ._sparse import (SparseWeightModule, _ParametrizationDict, _bump_versions,  # noqa: F401
                      _plan_sparse_load, _tensor_problem, keep_largest, layout_equal)
from .weight import SparseWeight


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
    def weight_shape(self) -> Tuple[int, int]:
        """``(out_features, in_features)``: the shape of ``nn.Linear.weight``."""
        return (self.out_features, self.in_features)

    @property
    def matrix_shape(self):
        """(out_features, in_features): the weight matrix (the weight itself)."""
        return self.weight_shape

    @property
    def nnz(self) -> int:
        raise NotImplementedError

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0


class SparseLinear(SparseWeightModule, _LinearBase):
    r"""A drop-in for ``nn.Linear`` whose weight is stored in CSR form only.

    ``y = x W^T + b`` with W (out_features x in_features) holding ``nnz`` nonzeros. Trainable
    parameters are exactly ``values`` ((1, nnz), so that ``ndim < 2`` weight-decay rules treat it
    as a weight; ``flat_values()`` is the 1-D view) and ``bias``; the topology is
    ``crow_indices`` (out_features + 1) and ``col_indices`` (nnz), sorted by row then column, int32
    when it fits, plain tensor attributes saved in the state dict (not buffers: see
    ``_TOPOLOGY``). The transpose used by the input gradient is cached beside them. ``weight`` is
    a :class:`~torch_nerva.nn.weight.SparseWeight` for code written for ``nn.Linear``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        density: fraction of nonzeros in [0, 1]; nnz = floor(density x in x out + 1/2), placed
            uniformly at random.
        mask: a boolean (out_features x in_features) tensor giving the pattern.
        nnz: the exact number of nonzeros (placed uniformly at random).
        backend: ``"auto"`` (default), ``"native"``, ``"mkl"``, ``"cusparse"``, ``"dense"`` or
            ``"torch"`` (see :mod:`torch_nerva.backends`). ``auto`` is resolved when the
            topology is set (and on a device change; ``resolved_backend``): it computes small
            or dense-ish layers densely.
        device, dtype: factory kwargs as in ``nn.Linear``.
        generator: a CPU ``torch.Generator`` for the topology and the initial values.
        index_dtype: ``torch.int32`` or ``torch.int64`` (default: int32 when it fits).

    Exactly one of ``density``, ``mask`` and ``nnz`` must be given. The kept weights are
    initialised Glorot-uniform scaled for the realised density (see :mod:`torch_nerva.init`).
    """

    @property
    def weight(self) -> Tensor:
        """The (out x in) weight for code written for ``nn.Linear``: a :class:`SparseWeight`
        holding no data, whose linear products (``F.linear(x, layer.weight, layer.bias)``,
        ``x @ layer.weight.T``) run this layer's sparse kernel (hooks fire, gradients reach
        ``values``) and whose other uses see the dense weight (see
        :mod:`torch_nerva.nn.weight`). ``layer.weight.to_sparse_csr()`` is the
        ``torch.sparse`` CSR view of ``values``."""
        return SparseWeight(self)

    def _call_with_bias(self, x: Tensor, bias, detached: bool = False) -> Tensor:
        """``x W^T + bias`` for :class:`SparseWeight`: through ``self(x)`` (so forward hooks
        fire) with ``bias`` in place of the layer's own."""
        if detached:
            y = functional.sparse_linear(x, self.flat_values().detach(), None, self.crow_indices,
                                         self.col_indices, self.crow_indices_t,
                                         self.col_indices_t, self.perm_t,
                                         backend=self._backend_arg, dense=self._prefer_dense,
                                         positions=self.dense_positions)
            return y if bias is None else y + bias
        if bias is self.bias:
            return self(x)
        fits = bias is None or (isinstance(bias, Tensor) and bias.shape == (self.out_features,)
                                and bias.dtype == self.values.dtype
                                and bias.device == self.values.device)
        self.__dict__["_call_bias"] = bias if fits else None
        try:
            y = self(x)
        finally:
            del self.__dict__["_call_bias"]
        return y if fits else y + bias

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        # Read the registered tensors from the module's dicts (nn.Module.__getattr__ costs about
        # a microsecond per name, a tenth of a batch-1 layer); a parametrized ``values`` or
        # ``bias`` lives elsewhere and is read through getattr.
        p, d = self._parameters, self.__dict__
        values = p["values"] if "values" in p else self.values
        bias = d["_call_bias"] if "_call_bias" in d else p["bias"] if "bias" in p else self.bias
        return functional.sparse_linear(input, values.view(-1), bias, d["crow_indices"],
                                        d["col_indices"], d["crow_indices_t"],
                                        d["col_indices_t"], d["perm_t"],
                                        backend=d["_backend_arg"], dense=self._prefer_dense,
                                        positions=d["dense_positions"])

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-draw the kept values and the bias (topology unchanged)."""
        with torch.no_grad():
            self.values.copy_(init_values(self.nnz, self.in_features, self.out_features,
                                          dtype=self.values.dtype,
                                          generator=generator).view(self.values.shape))
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
        if not isinstance(layout, CSRLayout):
            raise TypeError(f"layout must be a CSRLayout, got {type(layout).__name__}")
        layout.validate()  # sorted, duplicate-free, in range: O(nnz)
        out_f, in_f = layout.shape
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor, got "
                            f"{getattr(values, 'dtype', type(values).__name__)}")
        if values.shape not in ((layout.nnz,), (1, layout.nnz)):
            raise ValueError(f"values must have shape ({layout.nnz},) (or (1, {layout.nnz})) "
                             f"for this layout, got {tuple(values.shape)}")
        if bias is not None and bias.shape != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        device = values.device if device is None else torch.device(device)
        with_bias = bias is not None if has_bias is None else has_bias
        # Built around the given layout directly (no placeholder topology of the full shape
        # first: for a layer of 10^9 rows that alone would be gigabytes).
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _check_features(in_f, out_f)
        layer.in_features, layer.out_features = in_f, out_f
        layer.backend = backends.check(backend)
        layer._init_weight(layout, values.detach().clone(), device)
        if with_bias:
            b = values.new_zeros(out_f) if bias is None else bias.detach().to(values.dtype)
            layer.bias = nn.Parameter(b.to(device, copy=True))
        else:
            layer.register_parameter("bias", None)
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

def _mask_grad(ref, grad: Tensor) -> Tensor:
    layer = ref()
    return grad if layer is None else grad.masked_fill(~layer.mask.to(grad.device), 0)


class MaskedLinear(_LinearBase):
    """The masked baseline of sparse-training papers: ``y = x (weight * mask)^T + bias``.

    Same constructor and same initial weights as :class:`SparseLinear` (given equally seeded
    generators). The mask is a fixed boolean buffer, applied in every forward, so the weight
    gradient is masked too. ``backend`` is accepted for signature compatibility and kept for
    :func:`torch_nerva.to_sparse`.

    ``weight`` is the raw parameter, zero outside the mask. Code that reads ``layer.weight``
    and computes with it directly (``F.linear(x, layer.weight)``, as torchvision's Swin does)
    skips the mask of the forward; so the first such read registers a hook that masks the
    weight's gradient, which keeps the weight zero outside the mask under any optimizer, and
    the direct product equal to the masked one. Layers only ever called as modules pay
    nothing for it (the library's own code reads the parameter without the hook).
    """

    @property
    def weight(self) -> nn.Parameter:
        w = self._parameters.get("weight")
        if w is None:
            raise AttributeError("weight")
        if self.__dict__.get("_grad_masked") is not w:
            ref = weakref.ref(self)
            w.register_hook(lambda g: _mask_grad(ref, g))
            self.__dict__["_grad_masked"] = w
        return w

    def _weight(self) -> nn.Parameter:
        """The weight parameter, without registering the gradient mask."""
        return self._parameters["weight"]

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns __dict__
        state.pop("_grad_masked", None)  # a copy's parameter has no hook yet
        return state

    def _init_weight(self, layout: CSRLayout, values: Tensor, device) -> None:
        weight = values.new_zeros(self.out_features * self.in_features)
        weight[layout.positions()] = values
        self.weight = nn.Parameter(weight.view(self.out_features, self.in_features).to(device))
        self.register_buffer("mask", layout.to_mask().to(device))

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """All or nothing for this layer, as SparseLinear's: shapes and the mask (boolean, or
        0/1 numbers) are checked before anything is copied."""
        problems = []
        for key, ref in (("weight", self._parameters["weight"]), ("mask", self.mask), ("bias", self.bias)):
            if prefix + key not in state_dict:
                continue
            value = state_dict[prefix + key]
            problem = _tensor_problem(prefix + key, value)
            if problem is None and ref is None:
                problem = f"the state has a {key}, the layer has none"
            elif problem is None and value.shape != ref.shape:
                problem = f"{key} has shape {tuple(value.shape)}, the layer {tuple(ref.shape)}"
            elif problem is None and key == "mask" and value.dtype != torch.bool and not bool(
                    ((value == 0) | (value == 1)).all()):
                problem = "mask must be boolean (or hold only 0 and 1)"
            elif problem is None and key != "mask" and not value.is_floating_point():
                problem = f"{key} must be floating point, got {value.dtype}"
            if problem:
                problems.append(problem)
        if problems:
            error_msgs.append(f"invalid masked state for {prefix[:-1] or 'MaskedLinear'} "
                              "(nothing of it was loaded): " + "; ".join(problems))
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


    def dense_weight(self) -> Tensor:
        return self._parameters["weight"] * self.mask

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self._parameters["weight"] * self.mask, self.bias)

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
            layer._weight().copy_(w * keep)
            layer.mask.copy_(keep)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer
