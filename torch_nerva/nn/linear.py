"""SparseLinear (truly sparse, CSR) and MaskedLinear (dense weight x fixed mask).

Both take the same constructor and draw the same random numbers in the same order (topology,
then values, then bias), so ``SparseLinear(..., generator=g1)`` and
``MaskedLinear(..., generator=g2)`` with equally seeded generators hold identical weights.
"""
from __future__ import annotations

import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, functional
from ..init import init_bias, init_values, round_half_up
from ..layout import CSRLayout, _check_index_dtype, check_density
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


class _ParametrizationDict(nn.ModuleDict):
    """``module.parametrizations`` of a sparse layer: a ModuleDict whose keys may be names
    that ModuleDict itself defines as methods (``values``): torch.nn.utils.parametrize reads
    and writes it by key only, and the plain ModuleDict refuses ``"values"`` with a KeyError."""

    def add_module(self, name: str, module: Optional[nn.Module]) -> None:
        if name in ("values", "keys", "items", "pop", "update", "clear"):
            self._modules[name] = module
            return
        super().add_module(name, module)


def _bump_versions(*tensors: Optional[Tensor]) -> None:
    """Mark tensors as modified in place for autograd: a graph that saved one of them raises
    ("modified by an inplace operation") instead of computing a gradient of a stale topology."""
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)


class SparseLinear(_LinearBase):
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
        backend: ``"auto"`` (default), ``"native"``, ``"dense"`` or ``"torch"`` (see
            :mod:`torch_nerva.backends`). ``auto`` computes small or dense-ish layers densely.
        device, dtype: factory kwargs as in ``nn.Linear``.
        generator: a CPU ``torch.Generator`` for the topology and the initial values.
        index_dtype: ``torch.int32`` or ``torch.int64`` (default: int32 when it fits).

    Exactly one of ``density``, ``mask`` and ``nnz`` must be given. The kept weights are
    initialised Glorot-uniform scaled for the realised density (see :mod:`torch_nerva.init`).
    """

    def _init_weight(self, layout: CSRLayout, values: Tensor, device) -> None:
        self.values = nn.Parameter(values.reshape(1, -1).to(device))
        self._set_layout(layout.crow.to(device), layout.col.to(device))

    # -- topology ----------------------------------------------------------------------------
    # The topology and its caches are plain tensor attributes, not buffers: generic code that
    # walks ``module.buffers()`` and averages or overwrites them (``AveragedModel(use_buffers=
    # True)``, EMA utilities, DDP's per-forward buffer broadcast) must never touch integer
    # indices. They follow ``.to()``/``.cuda()`` (``_apply``) and are saved in the state dict
    # as copies (``_save_to_state_dict``), so an in-place update of a state dict (timm's
    # ModelEmaV2) cannot corrupt them either.
    _TOPOLOGY = ("crow_indices", "col_indices", "crow_indices_t", "col_indices_t", "perm_t",
                 "dense_positions")

    def _set_layout(self, crow: Tensor, col: Tensor) -> None:
        """Install a (validated) topology and rebuild the cached transpose."""
        self.crow_indices = crow
        self.col_indices = col
        crow_t, col_t, perm = CSRLayout(crow.cpu(), col.cpu(),
                                        (self.out_features, self.in_features)).transpose()
        device = crow.device
        self.crow_indices_t = crow_t.to(device)
        self.col_indices_t = col_t.to(device)
        self.perm_t = perm.to(device)
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
        self.dense_positions = positions

    def __setstate__(self, state) -> None:
        """Unpickling; a layer pickled by a version that kept the topology in buffers and
        ``values`` 1-D is brought to the current form."""
        super().__setstate__(state)
        buffers = self.__dict__.get("_buffers", {})
        for name in self._TOPOLOGY:
            if name in buffers:
                self.__dict__[name] = buffers.pop(name)
                self._non_persistent_buffers_set.discard(name)
        values = self._parameters.get("values")
        if values is not None and values.dim() == 1:
            values.data = values.data.reshape(1, -1)

    def topology_tensors(self) -> List[Tensor]:
        """The index tensors this layer holds (CSR, its cached transpose, dense positions)."""
        return [self.__dict__[n] for n in self._TOPOLOGY if n in self.__dict__]

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``...: the topology only follows the device (its
        dtype never changes, and ``to_empty`` must not replace it by uninitialised memory)."""
        super()._apply(fn, recurse)
        device = self.values.device
        for name in self._TOPOLOGY:
            t = self.__dict__.get(name)
            if t is not None and t.device != device:
                self.__dict__[name] = t.to(device)
        return self

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

    def flat_values(self) -> Tensor:
        """``values`` as the 1-D nnz vector in CSR order (a view; differentiable). The
        parameter itself is (1, nnz), so that the ``ndim < 2 -> no weight decay`` rules of
        common training code (timm, nanoGPT) decay it like a dense weight."""
        return self.values.view(-1)


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
                                         self.col_indices_t, self.perm_t, backend=self.backend,
                                         dense=self._prefer_dense,
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

    def dense_weight(self) -> Tensor:
        """The (out_features x in_features) dense weight; differentiable w.r.t. ``values``."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        flat = flat.scatter(0, self.layout.positions(), self.values.reshape(-1))
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
        p, d = self._parameters, self.__dict__
        values = p["values"] if "values" in p else self.values
        bias = d["_call_bias"] if "_call_bias" in d else p["bias"] if "bias" in p else self.bias
        return functional.sparse_linear(input, values.view(-1), bias, d["crow_indices"],
                                        d["col_indices"], d["crow_indices_t"],
                                        d["col_indices_t"], d["perm_t"], backend=self.backend,
                                        dense=self._prefer_dense,
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

    def _adopt(self, layout: CSRLayout, values: Tensor, grad: Optional[Tensor] = None) -> None:
        """Replace topology and values (same Parameter object, new size). ``layout`` must be
        valid. ``values.grad`` becomes ``grad`` (the caller's remapping of the old gradient to
        the new connections) or None: the old one belongs to connections that moved.

        Every tensor a pending autograd graph may have saved (values, the topology and its
        caches) is marked modified, so a backward through a forward of the old topology raises
        as it does for the masked twin, instead of mixing two topologies."""
        device = self.values.device
        _bump_versions(self.values, *(self.__dict__.get(n) for n in self._TOPOLOGY))
        new = values.detach().to(device=device, dtype=self.values.dtype).reshape(1, -1).clone()
        if new.shape != self.values.shape:
            # autograd caches one gradient accumulator per leaf, holding the leaf's shape; a graph
            # still alive (e.g. last step's loss) keeps it, and the next backward would refuse
            # a gradient of the new nnz. A .data of another dtype makes autograd drop it (only
            # when nnz changes: DDP hooks that accumulator, and keeps working when it stays).
            other = torch.float64 if new.dtype != torch.float64 else torch.float32
            self.values.data = torch.empty(0, dtype=other, device=device)
        self.values.data = new
        self.values.grad = None if grad is None else grad.to(self.values).view(new.shape)
        self._set_layout(layout.crow.to(device), layout.col.to(device))

    def __setattr__(self, name, value):
        if name == "parametrizations" and type(value) is nn.ModuleDict and not len(value):
            value = _ParametrizationDict()  # see _ParametrizationDict
        super().__setattr__(name, value)

    # -- state dict: values, bias, crow_indices, col_indices (every entry a tensor); the shape
    # (out_features, in_features) goes into the state dict's metadata. A different topology is
    # adopted on load.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # copies: code that updates a state dict in place (timm's ModelEmaV2 averages every
        # entry) must not reach the layer's topology
        destination[prefix + "crow_indices"] = self.crow_indices.clone()
        destination[prefix + "col_indices"] = self.col_indices.clone()
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["shape"] = (self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """All or nothing for this layer: every tensor it would read is checked first (tensors,
        shapes, the layout sorted, duplicate-free and in range, values' length, the extra
        state); on any problem the error is reported and nothing of the layer changes. A
        partial state (some of values / crow_indices / col_indices) combines the given tensors
        with the layer's own, validated together; a different topology is adopted (values,
        transpose cache, dense positions rebuilt; pending graphs of the old one invalidated,
        ``values.grad`` dropped).

        Missing and unexpected keys are judged by ``nn.Module.load_state_dict`` after every
        module has loaded (a module cannot see ``strict``): with ``strict=True`` it then raises
        with this layer already loaded from the keys that were present (consistently). For a
        load that leaves the whole model unchanged when it raises, use
        :func:`torch_nerva.load_state_dict`."""
        plan = _plan_sparse_load(self, state_dict, prefix, local_metadata, error_msgs)
        if plan is None:
            return
        layout, values = plan
        if layout is not None:
            self._adopt(layout, values)
        # nn.Module's loader copies values and bias; the topology keys are this layer's own
        # (not buffers), and an older checkpoint's _extra_state was checked by the plan: it
        # would call them unexpected, which they are not
        saved = state_dict.get(prefix + "values")
        if isinstance(saved, Tensor) and saved.shape != self.values.shape:
            state_dict = dict(state_dict)  # a checkpoint of 1-D values (nnz,): not the caller's
            state_dict[prefix + "values"] = saved.reshape(self.values.shape)
        n_unexpected = len(unexpected_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        own = (prefix + "crow_indices", prefix + "col_indices", prefix + "_extra_state")
        unexpected_keys[n_unexpected:] = [k for k in unexpected_keys[n_unexpected:]
                                          if k not in own]
        if strict:
            missing_keys.extend(prefix + k for k in ("crow_indices", "col_indices")
                                if prefix + k not in state_dict)


def _extra_state_problem(state, out_features: int, in_features: int) -> Optional[str]:
    if not isinstance(state, dict):
        return (f"the saved _extra_state must be a dict with in_features and out_features, got "
                f"{type(state).__name__}")
    shape = (state.get("out_features"), state.get("in_features"))
    if shape != (out_features, in_features):
        return (f"the saved layer has shape (out, in) = {shape}, this layer is "
                f"({out_features}, {in_features})")
    return None


def _tensor_problem(key: str, value) -> Optional[str]:
    if not isinstance(value, Tensor):
        return f"{key} must be a torch.Tensor, got {type(value).__name__}"
    return None


def _plan_sparse_load(layer: "SparseLinear", state_dict, prefix, local_metadata, error_msgs):
    """Validate everything SparseLinear's load would read; returns ``(layout or None, values)``
    to apply, or None after recording the problems (the layer is then left untouched)."""
    name = prefix[:-1] or "SparseLinear"
    problems: List[str] = []
    given = {k: state_dict[prefix + k] for k in ("values", "crow_indices", "col_indices", "bias")
             if prefix + k in state_dict}
    for k, v in given.items():
        problem = _tensor_problem(prefix + k, v)
        if problem:
            problems.append(problem)
    if prefix + "_extra_state" in state_dict:  # checkpoints of versions that saved the shape so
        problem = _extra_state_problem(state_dict[prefix + "_extra_state"], layer.out_features,
                                       layer.in_features)
        if problem:
            problems.append(problem)
    shape = (local_metadata or {}).get("shape")
    if shape is not None and tuple(shape) != (layer.out_features, layer.in_features):
        problems.append(f"the saved layer has shape (out, in) = {tuple(shape)}, this layer is "
                        f"({layer.out_features}, {layer.in_features})")
    layout = None
    values = given.get("values", layer.values.detach())
    if not problems:
        crow = given.get("crow_indices", layer.crow_indices)
        col = given.get("col_indices", layer.col_indices)
        try:
            if not values.is_floating_point() or not (
                    values.dim() == 1 or (values.dim() == 2 and values.shape[0] == 1)):
                raise ValueError(f"values must be a (1, nnz) (or 1-D) floating-point tensor, "
                                 f"got {values.dtype} of shape {tuple(values.shape)}")
            values = values.reshape(-1)
            if "crow_indices" in given or "col_indices" in given:
                layout = CSRLayout.from_tensors(crow.detach().cpu(), col.detach().cpu(),
                                                (layer.out_features, layer.in_features))
                nnz = layout.nnz
            else:
                nnz = layer.nnz
            if values.shape != (nnz,):
                raise ValueError(f"values has shape {tuple(values.shape)}, the layout has "
                                 f"nnz = {nnz}" + ("" if layout is not None else
                                                    " (load crow_indices and col_indices with "
                                                    "values of another length)"))
            bias = given.get("bias")
            if bias is not None:
                if layer.bias is None:
                    raise ValueError("the state has a bias, the layer has none")
                if bias.shape != layer.bias.shape or not bias.is_floating_point():
                    raise ValueError(f"bias must be a floating-point tensor of shape "
                                     f"{tuple(layer.bias.shape)}, got {bias.dtype} of shape "
                                     f"{tuple(bias.shape)}")
        except (RuntimeError, ValueError, TypeError) as e:
            problems.append(str(e))
    if problems:
        error_msgs.append(f"invalid sparse state for {name} (nothing of it was loaded): "
                          + "; ".join(problems))
        return None
    if layout is not None and layout_equal(layout, layer.layout):
        layout = None  # same topology: values are copied in place by nn.Module's loader
    return layout, values


def layout_equal(a: CSRLayout, b: CSRLayout) -> bool:
    """Same shape and the same nonzeros (index dtypes may differ)."""
    return (a.shape == b.shape and a.col.shape == b.col.shape
            and torch.equal(a.crow.cpu().long(), b.crow.cpu().long())
            and torch.equal(a.col.cpu().long(), b.col.cpu().long()))


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
