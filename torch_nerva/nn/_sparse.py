"""The sparse-weight core every truly sparse layer type shares: :class:`SparseWeightModule`.

A layer type (``linear.py``, and any other) is a subclass that says what its weight *matrix* is
(:attr:`~SparseWeightModule.matrix_shape`: rows x columns, e.g. ``(out_features,
in_features)``), how it computes (``forward``), and its fan-in / fan-out and FLOPs. The base
holds everything else: the trainable ``values`` ((1, nnz) Parameter), the CSR topology of the
matrix and its cached transpose (plain tensor attributes, not buffers), their device moves and
pickling, the dense views (``dense_weight``, ``mask``), topology replacement (``_adopt``, used by
DST and loading) and the all-or-nothing state dict.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..layout import CSRLayout


def keep_largest(weight: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest-magnitude entries of ``weight``."""
    flat = weight.detach().abs().flatten().cpu()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view(weight.shape)


class _Mask(Tensor):
    """The bool tensor :attr:`SparseWeightModule.mask` returns. ``mask`` used to be a method;
    calling the tensor (``layer.mask()``) still returns it, with a DeprecationWarning. Results of
    operations on it are plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, data: Tensor):
        return Tensor._make_subclass(cls, data)

    def __call__(self) -> Tensor:
        import warnings
        warnings.warn("layer.mask is a tensor property (as the masked twin's mask buffer); "
                      "layer.mask() is deprecated: drop the call", DeprecationWarning, stacklevel=2)
        return self.as_subclass(Tensor)


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


class SparseWeightModule(nn.Module):
    """Base of the truly sparse layers (see the module docstring). Subclasses (or a base they
    list after this one, as SparseLinear's _LinearBase) define ``matrix_shape`` ((rows,
    columns) of the weight matrix the CSR topology describes), ``forward`` and, where the
    matrix's defaults do not fit, ``fan_in``, ``fan_out`` and ``flops_per_example``; they set
    ``backend`` before the weight, and call ``_init_weight(layout, values, device)``."""

    @property
    def fan_in(self) -> int:
        """Inputs that feed one output (the matrix's columns for a linear layer)."""
        return self.matrix_shape[1]

    @property
    def fan_out(self) -> int:
        """Outputs one input feeds (the matrix's rows for a linear layer)."""
        return self.matrix_shape[0]

    def flops_per_example(self, *args) -> int:
        """Multiply-adds x 2 of one example's forward through the stored nonzeros."""
        return 2 * self.nnz

    def _prefer_dense_for(self, nnz: int) -> bool:
        """Whether ``backend="auto"`` computes this layer densely (decided per topology)."""
        rows, cols = self.matrix_shape
        return backends.prefer_dense(cols, rows, nnz)

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
                                        self.matrix_shape).transpose()
        device = crow.device
        self.crow_indices_t = crow_t.to(device)
        self.col_indices_t = col_t.to(device)
        self.perm_t = perm.to(device)
        # Decided once per topology: does backend="auto" compute this layer densely?
        self._prefer_dense = self._prefer_dense_for(col.numel())
        self._resolve_backend()
        self._update_positions()

    # -- backend -------------------------------------------------------------------------------
    # ``backend`` is what was asked for ("auto" or a name); it is resolved once, when the
    # topology is set, the layer moves to another device or ``backend`` is assigned, and the
    # choice is stored in ``_backend_arg``: the backend argument forward passes on (a concrete
    # name, so the op gets a constant; "auto" only where the choice depends on the batch, for a
    # layer that auto computes densely on the CPU: see backends.DENSE_MIN_BATCH).
    @property
    def backend(self) -> str:
        return self.__dict__["_backend_name"]

    @backend.setter
    def backend(self, name: str) -> None:
        self.__dict__["_backend_name"] = backends.check(name)
        if "crow_indices" in self.__dict__:
            self._resolve_backend()

    def _resolve_backend(self) -> None:
        device = self.crow_indices.device
        if self.backend != "auto":
            self._backend_arg = self.backend  # checked against the device at the call
            return
        choice = backends.resolve("auto", device, self._prefer_dense)
        self._backend_arg = "auto" if choice == "dense" and device.type == "cpu" else choice

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
        if "backend" in state:  # pickled before backend was resolved and stored
            state["_backend_name"] = state.pop("backend")
        super().__setstate__(state)
        if "_backend_arg" not in self.__dict__ and "_prefer_dense" in self.__dict__:
            self._resolve_backend()
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
        moved = False
        for name in self._TOPOLOGY:
            t = self.__dict__.get(name)
            if t is not None and t.device != device:
                self.__dict__[name] = t.to(device)
                moved = True
        if moved:  # auto's choice depends on the device
            self._resolve_backend()
        return self

    @property
    def resolved_backend(self) -> str:
        """What ``backend`` resolves to for this layer on its device."""
        return backends.resolve(self._backend_arg, self.values.device, self._prefer_dense)
    @property
    def layout(self) -> CSRLayout:
        return CSRLayout(self.crow_indices, self.col_indices, self.matrix_shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def flat_values(self) -> Tensor:
        """``values`` as the 1-D nnz vector in CSR order (a view; differentiable). The
        parameter itself is (1, nnz), so that the ``ndim < 2 -> no weight decay`` rules of
        common training code (timm, nanoGPT) decay it like a dense weight."""
        return self.values.view(-1)


    @property
    def density(self) -> float:
        rows, cols = self.matrix_shape
        return self.nnz / (rows * cols) if rows * cols else 0.0

    def dense_weight(self) -> Tensor:
        """The dense weight matrix (``matrix_shape``); differentiable w.r.t. ``values``."""
        rows, cols = self.matrix_shape
        flat = self.values.new_zeros(rows * cols)
        flat = flat.scatter(0, self.layout.positions(), self.values.reshape(-1))
        return flat.view(rows, cols)

    to_dense = dense_weight

    @property
    def mask(self) -> Tensor:
        """The boolean pattern of the weight, in the weight's shape (``weight_shape``: the
        masked twin's ``mask`` buffer has the same shape and contents). Read-only and dense:
        it allocates one bool per weight entry on every read."""
        return _Mask(self.layout.to_mask().view(self.weight_shape))

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

    # -- state dict: values, bias, crow_indices, col_indices (every entry a tensor); the matrix
    # shape goes into the state dict's metadata. A different topology is adopted on load.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # copies: code that updates a state dict in place (timm's ModelEmaV2 averages every
        # entry) must not reach the layer's topology
        destination[prefix + "crow_indices"] = self.crow_indices.clone()
        destination[prefix + "col_indices"] = self.col_indices.clone()
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["shape"] = self.matrix_shape

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


def _extra_state_problem(state, shape) -> Optional[str]:
    if not isinstance(state, dict):
        return (f"the saved _extra_state must be a dict with in_features and out_features, got "
                f"{type(state).__name__}")
    saved = (state.get("out_features"), state.get("in_features"))
    if saved != tuple(shape):
        return (f"the saved layer has shape (out, in) = {saved}, this layer is "
                f"{tuple(shape)}")
    return None


def _tensor_problem(key: str, value) -> Optional[str]:
    if not isinstance(value, Tensor):
        return f"{key} must be a torch.Tensor, got {type(value).__name__}"
    return None


def _plan_sparse_load(layer: "SparseWeightModule", state_dict, prefix, local_metadata,
                      error_msgs):
    """Validate everything a sparse layer's load would read; returns ``(layout or None,
    values)`` to apply, or None after recording the problems (the layer is then left
    untouched)."""
    name = prefix[:-1] or type(layer).__name__
    shape = layer.matrix_shape
    problems: List[str] = []
    given = {k: state_dict[prefix + k] for k in ("values", "crow_indices", "col_indices", "bias")
             if prefix + k in state_dict}
    for k, v in given.items():
        problem = _tensor_problem(prefix + k, v)
        if problem:
            problems.append(problem)
    if prefix + "_extra_state" in state_dict:  # checkpoints of versions that saved the shape so
        problem = _extra_state_problem(state_dict[prefix + "_extra_state"], shape)
        if problem:
            problems.append(problem)
    saved = (local_metadata or {}).get("shape")
    if saved is not None and tuple(saved) != tuple(shape):
        problems.append(f"the saved layer has shape (out, in) = {tuple(saved)}, this layer is "
                        f"{tuple(shape)}")
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
                                                shape)
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


