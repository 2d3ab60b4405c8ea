"""``SparseLinear.weight``: the (out x in) weight as other people's code uses it.

Code written for ``nn.Linear`` reads ``layer.weight`` directly: ``F.linear(x, layer.weight,
layer.bias)`` (torchvision's Swin), ``x @ layer.weight.T``, ``layer.weight.shape``, or hands it
to a fused kernel (``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast paths).
:class:`SparseWeight` is a tensor subclass that holds no data of its own (a wrapper of the
layer's shape, dtype and device) and routes, through ``__torch_function__``:

- the linear products ``F.linear(x, w, b)``, ``x @ w.T`` / ``torch.matmul(x, w.T)`` /
  ``torch.mm``, ``torch.addmm(b, x, w.T)`` and ``w @ y`` to the layer's own sparse kernel, by
  calling the layer (so its forward hooks fire; gradients reach ``values``);
- transposes (``.T``, ``.t()``, ``.mT``, ``transpose``) to a transposed SparseWeight;
- metadata (``shape``, ``dtype``, ``device``, ``requires_grad``, ``dim()``...) to the wrapper;
- in-place writes (``nn.init.*_``, ``w.mul_()``, ``w.copy_()``, ``w[...] = ...``) to the dense
  weight, after which the layer keeps the new values *at its nonzeros* (positions outside the
  pattern stay absent: the layer is sparse);
- every other operation to the dense weight ``layer.dense_weight()`` (out x in, allocated for
  that call; differentiable, so gradients still reach ``values``).

PyTorch's fused inference paths check for tensor subclasses with ``__torch_function__`` and
decline, so they fall back to their ordinary Python path instead of crashing.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

_F = torch.nn.functional

# functions that transpose a 2-D weight
_TRANSPOSES = {Tensor.t, torch.t, Tensor.T.__get__, Tensor.mT.__get__, Tensor.adjoint,
               torch.adjoint, Tensor.H.__get__, Tensor.mH.__get__}
def _functions(names):
    found = set()
    for name in names:
        attr = getattr(Tensor, name, None)
        if attr is None:
            continue
        found.add(attr.__get__ if hasattr(attr, "__get__") and not callable(attr) else attr)
    return found


# metadata reads: answered by the wrapper itself (properties are looked up by their getter)
_METADATA = _functions([
    "size", "dim", "numel", "is_floating_point", "element_size", "is_complex", "stride",
    "is_contiguous", "ndimension", "nelement", "get_device", "__len__", "__hash__"]) | {
    getattr(Tensor, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "requires_grad", "layout", "is_sparse", "is_cuda",
        "is_cpu", "is_meta", "is_leaf", "grad_fn", "is_quantized", "is_nested", "is_mkldnn",
        "is_sparse_csr", "itemsize", "nbytes", "grad") if hasattr(Tensor, name)}


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in (
        "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__",
        "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
        "__imatmul__", "__ifloordiv__", "__imod__")


class SparseWeight(Tensor):
    """The weight of a :class:`torch_nerva.SparseLinear` (``transposed``: its transpose)."""

    @staticmethod
    def __new__(cls, layer, transposed: bool = False, detached: bool = False):
        values = layer.values
        shape = ((layer.in_features, layer.out_features) if transposed
                 else (layer.out_features, layer.in_features))
        t = Tensor._make_wrapper_subclass(
            cls, shape, dtype=values.dtype, device=values.device,
            requires_grad=values.requires_grad and not detached)
        t._layer = layer
        t._transposed = transposed
        t._detached = detached
        return t

    def __init__(self, layer, transposed: bool = False, detached: bool = False):
        pass

    def __repr__(self, *, tensor_contents=None):
        layer = self._layer
        return (f"SparseWeight(shape={tuple(self.shape)}, nnz={layer.nnz}, "
                f"dtype={self.dtype}, device={self.device}"
                + (", transposed" if self._transposed else "") + ")")

    # -- the dense fallback ---------------------------------------------------------------------
    def dense(self) -> Tensor:
        """The dense (out x in, or in x out when transposed) weight, allocated for the call."""
        w = self._layer.dense_weight()
        if self._detached:
            w = w.detach()
        return w.t() if self._transposed else w

    def _write_back(self, dense: Tensor) -> None:
        """Keep ``dense`` (after an in-place op) at the layer's nonzeros."""
        layer = self._layer
        w = dense.t() if self._transposed else dense
        with torch.no_grad():
            positions = layer.layout.positions().to(w.device)
            layer.values.view(-1).copy_(w.reshape(-1)[positions])

    def _linear(self, x: Tensor, bias) -> Tensor:
        return self._layer._call_with_bias(x, bias, detached=self._detached)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Only reached by an operation that bypassed __torch_function__ (C++ code handed the
        # wrapper directly): it holds no data, so say what to do instead of computing garbage.
        raise RuntimeError(
            f"torch_nerva: {func} received SparseLinear.weight below Python, where it holds no "
            "data (the layer is CSR: values + indices). Pass layer.dense_weight() (dense, "
            "differentiable) or call the layer itself")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        w = args[0] if args and isinstance(args[0], SparseWeight) else None
        if w is not None and len(args) == 1 and not kwargs and func in _TRANSPOSES:
            return SparseWeight(w._layer, not w._transposed, w._detached)
        if w is not None and func in (Tensor.transpose, torch.transpose) and len(args) == 3:
            if sorted(d % 2 for d in args[1:]) == [0, 1]:
                return SparseWeight(w._layer, not w._transposed, w._detached)
        if w is not None and func in (Tensor.detach, torch.detach, Tensor.data.__get__):
            return SparseWeight(w._layer, w._transposed, detached=True)
        out = _route_product(func, args, kwargs)
        if out is not NotImplemented:
            return out
        if func in (Tensor.to_sparse_csr,) and w is not None and not w._transposed:
            from ..layout import csr_tensor
            layer = w._layer
            return csr_tensor(layer.crow_indices, layer.col_indices,
                              layer.flat_values().detach() if w._detached else layer.flat_values(),
                              (layer.out_features, layer.in_features))
        # everything else: the dense weight (in-place ops write back at the nonzeros)
        weights = []

        def materialise(a):
            if isinstance(a, SparseWeight):
                d = a.dense()
                if _is_inplace(func):
                    d = d.detach().clone()
                weights.append((a, d))
                return d
            return a

        args, kwargs = pytree.tree_map(materialise, (args, kwargs))
        result = func(*args, **kwargs)
        if _is_inplace(func) and weights:
            target, dense = weights[0]
            target._write_back(dense)
            if result is dense:
                return target
        return result


def _route_product(func, args, kwargs):
    """The linear products that the layer's own kernel computes; NotImplemented otherwise."""
    if func is _F.linear:
        x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(w, SparseWeight) and not w._transposed and not isinstance(x, SparseWeight) \
                and not isinstance(bias, SparseWeight):
            return w._linear(x, bias)
        return NotImplemented
    if func in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm) \
            and len(args) == 2 and not kwargs:
        a, b = args
        if isinstance(b, SparseWeight) and b._transposed and not isinstance(a, SparseWeight) \
                and a.dim() >= 1 and (func not in (torch.mm, Tensor.mm) or a.dim() == 2):
            return b._linear(a, None)  # x W^T
        if isinstance(a, SparseWeight) and not a._transposed and not isinstance(b, SparseWeight) \
                and b.dim() == 2:
            return a._linear(b.t(), None).t()  # W y = (y^T W^T)^T
        return NotImplemented
    if func is Tensor.__rmatmul__ and len(args) == 2 and not kwargs:
        return _route_product(torch.matmul, (args[1], args[0]), {})
    if func in (torch.addmm, Tensor.addmm):
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if len(args) == 3 and beta == 1 and alpha == 1:
            bias, a, b = args
            if isinstance(b, SparseWeight) and b._transposed and not isinstance(a, SparseWeight) \
                    and not isinstance(bias, SparseWeight) and a.dim() == 2:
                return b._linear(a, bias)
        return NotImplemented
    return NotImplemented
