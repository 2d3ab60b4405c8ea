"""SparseConv2d (truly sparse, CSR; on the shared core of ``_sparse.py``) and MaskedConv2d
(dense weight x fixed mask): drop-ins for ``nn.Conv2d``.

The weight of a 2-D convolution is seen as the matrix ``(out_channels, in_channels / groups *
kh * kw)`` (``nn.Conv2d.weight.reshape(out_channels, -1)``); its nonzeros are stored in CSR like
a linear layer's. The forward, the input gradient and the values gradient are the direct sparse
convolution kernels of ``csrc/cpu/conv_cpu.cpp`` (work proportional to nnz x output pixels; no
dense weight, no im2col buffer). Both classes take the same constructor and draw the same random
numbers in the same order (topology, then values, then bias), so equally seeded generators give
identical initial weights.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..init import init_bias, init_values
from ..layout import CSRLayout
from ._sparse import SparseWeightModule
from .linear import _dense_mask, _make_layout

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(v, name: str, low: int) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) and e >= low
                              for e in t):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {v!r}")
    return t


class _ConvBase(nn.Module):
    """The constructor SparseConv2d and MaskedConv2d share (``nn.Conv2d``'s arguments and
    checks), and their random stream."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[int, Tuple[int, int], str] = 0, dilation=1, groups: int = 1,
                 bias: bool = True, padding_mode: str = "zeros", *,
                 density: Optional[float] = None, mask: Optional[Tensor] = None,
                 nnz: Optional[int] = None, backend: str = "auto", device=None, dtype=None,
                 generator: Optional[torch.Generator] = None, index_dtype=None) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("groups", groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "groups" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'groups' else 'non-negative'}"
                                 f" int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.dilation = _pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got "
                                 f"{padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding", 0)
        self.padding_mode = padding_mode
        self.backend = backends.check(backend)
        if backend not in ("auto", "native", "dense"):
            raise ValueError(f"{type(self).__name__} supports backend 'auto', 'native' or "
                             f"'dense', got {backend!r}")
        rows, cols = self.matrix_shape
        if mask is not None and isinstance(mask, Tensor) and mask.dim() == 4:
            if tuple(mask.shape) != self.weight_shape:
                raise ValueError(f"mask must have the weight's shape {self.weight_shape} (or "
                                 f"the matrix shape {(rows, cols)}), got {tuple(mask.shape)}")
            mask = mask.reshape(rows, cols)
        layout = _make_layout(cols, rows, density, mask, nnz, generator, index_dtype)
        self._init_weight(layout, self._draw_values(layout.nnz, dtype, generator), device)
        if bias:
            self.bias = nn.Parameter(self._draw_bias(dtype, generator).to(device))
        else:
            self.register_parameter("bias", None)

    def _draw_values(self, nnz: int, dtype, generator) -> Tensor:
        """Glorot uniform with PyTorch's conv fans, scaled for the realised density."""
        rows, cols = self.matrix_shape
        return init_values(nnz, self.fan_in, self.fan_out, dtype=dtype, generator=generator,
                           total=rows * cols)

    def _draw_bias(self, dtype, generator) -> Tensor:
        """As ``nn.Conv2d``'s: U(+-1/sqrt(fan_in))."""
        return init_bias(self.fan_in, self.out_channels, dtype=dtype, generator=generator)

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        """The shape of ``nn.Conv2d.weight``: (out, in / groups, kh, kw)."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def matrix_shape(self) -> Tuple[int, int]:
        """(out_channels, in_channels / groups x kh x kw): the weight as a matrix."""
        kh, kw = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups * kh * kw)

    @property
    def fan_in(self) -> int:
        return self.matrix_shape[1]

    @property
    def fan_out(self) -> int:
        return self.out_channels * self.kernel_size[0] * self.kernel_size[1]

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(Ho, Wo) for an input of ``height`` x ``width`` (as ``nn.Conv2d``)."""
        if self.padding == "same":
            return height, width
        pads = (0, 0) if self.padding == "valid" else self.padding
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((height, width), pads, self.dilation, self.kernel_size, self.stride))

    def flops_per_example(self, height: int = 1, width: int = 1) -> int:
        """2 x nnz x output pixels for an input of ``height`` x ``width``."""
        ho, wo = self.output_size(height, width)
        return 2 * self.nnz * max(ho, 0) * max(wo, 0)

    def _padded(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """The input padded as ``nn.Conv2d`` pads it, and the symmetric zero padding left for
        the kernel."""
        if self.padding == "valid":
            pads = (0, 0)
        elif self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            left = [t // 2 for t in totals]
            extra = [t - 2 * lo for t, lo in zip(totals, left)]
            if self.padding_mode != "zeros":
                x = F.pad(x, (left[1], totals[1] - left[1], left[0], totals[0] - left[0]),
                          mode=self.padding_mode)
                return x, (0, 0)
            if any(extra):  # asymmetric: the extra row / column at the end, as nn.Conv2d
                x = F.pad(x, (0, extra[1], 0, extra[0]))
            return x, (left[0], left[1])
        else:
            pads = self.padding
        if self.padding_mode != "zeros" and any(pads):
            x = F.pad(x, (pads[1], pads[1], pads[0], pads[0]), mode=self.padding_mode)
            return x, (0, 0)
        return x, pads

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else \
                f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", nnz={self.nnz}, density={self.density:.4g}"

def conv_args(conv: nn.Module) -> dict:
    """``nn.Conv2d``'s constructor arguments of a convolution (``nn.Conv2d``, SparseConv2d or
    MaskedConv2d): the same layer geometry under another class."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode)


def _conv_keep(conv: nn.Conv2d, density, mask) -> Tensor:
    """The boolean (out, in / groups, kh, kw) pattern kept from a dense conv: linear.py's
    rule (largest magnitudes, a mask, or the nonzeros), with a mask of the matrix shape
    accepted too."""
    if isinstance(mask, Tensor) and mask.numel() == conv.weight.numel():
        mask = mask.reshape(conv.weight.shape)
    return _dense_mask(conv, density, mask) != 0


class SparseConv2d(_ConvBase, SparseWeightModule):
    r"""A drop-in for ``nn.Conv2d`` whose weight is stored in CSR form only.

    Same arguments as ``nn.Conv2d`` (``padding`` an int, a pair, ``"same"`` or ``"valid"``;
    every ``padding_mode``; channels-last inputs accepted), plus, as
    :class:`~torch_nerva.SparseLinear`: exactly one of ``density`` / ``mask`` (the weight's
    shape or its matrix shape) / ``nnz``, ``backend`` (``"auto"``, ``"native"`` or ``"dense"``),
    ``generator`` and ``index_dtype``.

    Trainable parameters are ``values`` ((1, nnz)) and ``bias``; the topology is the CSR of the
    ``(out_channels, in_channels / groups * kh * kw)`` weight matrix, column
    ``(c * kh + ky) * kw + kx`` for input channel ``c`` of the group and kernel offset
    ``(ky, kx)``. ``dense_weight()`` gives that matrix, ``dense_weight4d()`` the
    ``nn.Conv2d``-shaped weight (both allocate densely; differentiable). Initial values: Glorot
    uniform scaled for the realised density with PyTorch's conv fan-in / fan-out; bias as
    ``nn.Conv2d``'s (U(+-1/sqrt(fan_in))).

    There is no ``weight`` attribute: code that writes into ``conv.weight`` (initialisers,
    conv-BN fusion) would otherwise silently write into a temporary; it gets an
    AttributeError instead.
    """

    def _prefer_dense_for(self, nnz: int) -> bool:
        rows, cols = self.matrix_shape
        # the kernels' fast ("flat") path needs stride 1 and an output as wide as the input
        pad_w = (0 if self.padding == "valid" else
                 self.dilation[1] * (self.kernel_size[1] - 1) // 2 if self.padding == "same"
                 else self.padding[1])
        flat = self.stride == (1, 1) and 2 * pad_w == self.dilation[1] * (self.kernel_size[1] - 1)
        threshold = DENSE_DENSITY if flat else DENSE_DENSITY_OTHER
        return self.backend == "auto" and rows * cols > 0 and nnz >= threshold * rows * cols

    def dense_weight4d(self) -> Tensor:
        """The ``nn.Conv2d``-shaped dense weight (differentiable w.r.t. ``values``)."""
        return self.dense_weight().view(self.weight_shape)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D (N, C, H, W) input, got "
                             f"shape {tuple(input.shape)}")
        if input.shape[1] != self.in_channels:
            raise ValueError(f"input has {input.shape[1]} channels, the layer expects "
                             f"{self.in_channels}")
        x, pads = self._padded(input)
        bias = self.bias
        if self.backend == "dense" or (self.backend == "auto" and (
                self._prefer_dense or x.device.type != "cpu")) \
                or torch._C._are_functorch_transforms_active():
            # auto off the CPU: the sparse conv kernels are CPU-only, so dense (e.g. cuDNN).
            # Under torch.func transforms (grad, vmap, jvp, ...): the op's autograd has no
            # functorch rules, so the dense form of the same function, which composes with all
            return F.conv2d(x, self.dense_weight4d(), bias, self.stride, pads, self.dilation,
                            self.groups)
        if x.device.type != "cpu":
            raise RuntimeError(f"{type(self).__name__}: backend 'native' runs on the CPU only "
                               f"(input on {x.device}); use backend='auto' or 'dense' there")
        from .. import ops
        d = self.__dict__
        values = self.values.view(-1)
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            # as nn.Conv2d under autocast: operands rounded to the region's dtype, output in it
            low = torch.get_autocast_dtype(x.device.type)
            x, values = x.to(low), values.to(low)
            bias = None if bias is None else bias.to(low)
        out_dtype = None
        if x.dtype in (torch.bfloat16, torch.float16):
            # the conv kernels compute in float32 / float64: 16-bit operands are widened (exact)
            # and the result rounded once to their dtype; gradients come back in their dtypes
            out_dtype = x.dtype
            x, values = x.float(), values.float()
            bias = None if bias is None else bias.float()
        if self._phase_planes_pay(x, pads) and math.isfinite(x.detach().sum().item()):
            # (a non-finite input takes the direct op, whose NaN/Inf rule is that of dense
            # math for this layer's own taps)
            y = self._strided(x, pads, values, bias)
        else:
            y = ops.sparse_conv2d(x, values, bias, d["crow_indices"], d["col_indices"],
                                  d["crow_indices_t"], d["col_indices_t"], d["perm_t"],
                                  self.kernel_size, self.stride, pads, self.dilation,
                                  self.groups)
        return y if out_dtype is None else y.to(out_dtype)

    # -- strided convolutions as stride-1 ones (space-to-depth) ---------------------------------
    # A stride-s convolution reads input row s*oy + ky; with ky = s*qy + ry that is row oy + qy
    # of the phase plane ry (rows = ry mod s). ``pixel_unshuffle`` makes the s*s phase planes of
    # each input channel channels of their own, and the layer becomes a stride-1 convolution
    # over C*s*s channels whose kernel taps are the (qy, qx), padded to an odd size so that its
    # output is as wide as its input: the kernels' fast path. Same nonzeros (reordered: a
    # gather of values, differentiable), same sums up to their order; the extra output row or
    # column the phase planes may have is cropped.
    def _s2d_plan(self):
        d = self.__dict__
        key = (id(d["crow_indices"]), id(d["col_indices"]))
        plan = d.get("_s2d")
        if plan is not None and plan[0] == key:
            return plan[1]
        from .. import ops
        (sh, sw), (kh, kw) = self.stride, self.kernel_size
        qh, qw = (kh - 1) // sh, (kw - 1) // sw  # largest tap of a phase plane
        kh2, kw2 = 2 * qh + 1, 2 * qw + 1
        crow, col = d["crow_indices"], d["col_indices"].long()
        rows = torch.repeat_interleave(torch.arange(self.out_channels, device=col.device),
                                       crow[1:] - crow[:-1])
        ci, ky, kx = col // (kh * kw), (col // kw) % kh, col % kw
        new_col = ((ci * sh + ky % sh) * sw + kx % sw) * (kh2 * kw2) \
            + (ky // sh + qh) * kw2 + (kx // sw + qw)
        n_cols2 = self.in_channels // self.groups * sh * sw * kh2 * kw2
        order = torch.argsort(rows * n_cols2 + new_col)
        col2 = new_col[order].to(d["col_indices"].dtype)
        crow_t, col_t, perm = ops.csr_transpose(crow, col2, n_cols2)
        plan = ((kh2, kw2), (qh, qw), crow, col2, crow_t, col_t, perm, order)
        d["_s2d"] = (key, plan)
        return plan

    def _phase_planes_pay(self, x: Tensor, pads) -> bool:
        """Whether this strided call runs on phase planes: measured faster than the direct
        kernel's row path only where the phase planes fit the AVX-512 register path (at most
        64 float32 pixels: 3x3 stride 2 on 8x8, batch 64: 0.4x the direct time at density
        0.01-0.05; on 16x16 and 32x32 inputs the direct op was 1.2-1.7x faster below density
        0.02). Not under torch.compile (the finiteness check would break the graph)."""
        if self.stride == (1, 1) or self.dilation != (1, 1) or x.dtype != torch.float32 \
                or torch.compiler.is_compiling():
            return False
        from .. import ops
        if ops.kernel_isa() != "avx512":
            return False
        (sh, sw), (ph, pw) = self.stride, pads
        return -(-(x.shape[2] + 2 * ph) // sh) * -(-(x.shape[3] + 2 * pw) // sw) <= 64

    def _strided(self, x: Tensor, pads, values: Tensor, bias) -> Tensor:
        from .. import ops
        (kh2, kw2), (qh, qw), crow, col2, crow_t, col_t, perm, order = self._s2d_plan()
        (sh, sw), (kh, kw) = self.stride, self.kernel_size
        ph, pw = pads
        n, c, h, w = x.shape
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"input of size {h}x{w} (padded {h + 2 * ph}x{w + 2 * pw}) is "
                             f"smaller than the kernel {kh}x{kw}")
        hp, wp = -(-(h + 2 * ph) // sh) * sh, -(-(w + 2 * pw) // sw) * sw
        xp = F.pad(x, (pw, wp - w - pw, ph, hp - h - ph))
        if sh == sw:
            phases = F.pixel_unshuffle(xp, sh)
        else:  # pixel_unshuffle takes one factor: the same reshape, by hand
            phases = xp.reshape(n, c, hp // sh, sh, wp // sw, sw).permute(0, 1, 3, 5, 2, 4) \
                .reshape(n, c * sh * sw, hp // sh, wp // sw)
        y = ops.sparse_conv2d(phases, values[order], bias, crow, col2, crow_t,
                              col_t, perm, (kh2, kw2), (1, 1), (qh, qw), (1, 1), self.groups)
        return y if y.shape[-2:] == (ho, wo) else y[..., :ho, :wo]

    @property
    def resolved_backend(self) -> str:
        """What the layer computes with on its current device: ``auto`` is ``dense`` for a
        dense-enough layer and off the CPU (the sparse conv kernels are CPU-only)."""
        off_cpu = self.values.device.type != "cpu"
        return "dense" if (self.backend == "dense" or (
            self.backend == "auto" and (self._prefer_dense or off_cpu))) else "native"

    def _update_positions(self) -> None:  # the dense path scatters through layout.positions()
        self.dense_positions = torch.empty(0, dtype=torch.long, device=self.crow_indices.device)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Re-draw the kept values and the bias (topology unchanged)."""
        with torch.no_grad():
            self.values.copy_(self._draw_values(self.nnz, self.values.dtype, generator)
                              .view(self.values.shape))
            if self.bias is not None:
                self.bias.copy_(self._draw_bias(self.bias.dtype, generator))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}" + (
            f"({self.resolved_backend})" if self.backend == "auto" else "")

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, density: Optional[float] = None,
                   mask: Optional[Tensor] = None, backend: str = "auto",
                   index_dtype=None) -> "SparseConv2d":
        """Keep the round(density x numel) largest-magnitude weights of ``conv`` (or those in
        ``mask``, or, with neither, its nonzeros); values and bias are copied."""
        keep = _conv_keep(conv, density, mask)
        w = conv.weight.detach()
        layer = cls(**conv_args(conv), nnz=0, backend=backend, device=w.device,
                    dtype=w.dtype, index_dtype=index_dtype)
        rows, cols = layer.matrix_shape
        layout = CSRLayout.from_mask(keep.reshape(rows, cols).cpu(), index_dtype)
        layer._adopt(layout, w.reshape(-1)[layout.positions().to(w.device)])
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer


#: ``auto`` computes a SparseConv2d densely (oneDNN) from this density on: forward + backward
#: of the 3x3 ResNet-18 CIFAR layers at batch 64 (2 threads, AVX-512 float32) took 0.39-0.45
#: (32x32, 16x16), 0.90 (8x8) and 0.63 (4x4) of dense at density 0.08 with the tile kernels,
#: before the small planes' values gradient was made 1.3-2x faster (docs/benchmarks.md, "Sparse
#: convolution"); the crossover was at 0.063-0.08 with the earlier kernels.
DENSE_DENSITY = 0.08
#: ... and from this density on for the other shapes (stride 2, or an output narrower than the
#: input), which take the kernels' slower row path: measured crossover 0.01-0.02 for the 3x3
#: stride-2 ResNet-18 layers (64->128 at 32x32, 128->256 at 16x16, 256->512 at 8x8).
DENSE_DENSITY_OTHER = 0.01


class MaskedConv2d(_ConvBase):
    """The masked baseline: ``F.conv2d(x, weight * mask, bias, ...)`` with a dense
    ``nn.Conv2d``-shaped weight and a fixed boolean mask buffer of the same shape. Same
    constructor and initial weights as :class:`SparseConv2d` (equally seeded generators)."""

    def _init_weight(self, layout: CSRLayout, values: Tensor, device) -> None:
        rows, cols = self.matrix_shape
        weight = values.new_zeros(rows * cols)
        weight[layout.positions()] = values
        self.weight = nn.Parameter(weight.view(self.weight_shape).to(device))
        self.register_buffer("mask", layout.to_mask().view(self.weight_shape).to(device))

    def _weight(self) -> nn.Parameter:
        """The weight parameter (the library's accessor, as MaskedLinear's)."""
        return self._parameters["weight"]

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel() if self.mask.numel() else 0.0

    def dense_weight(self) -> Tensor:
        """The weight matrix (out, in / groups x kh x kw), masked."""
        return (self.weight * self.mask).reshape(self.matrix_shape)

    def dense_weight4d(self) -> Tensor:
        return self.weight * self.mask

    def forward(self, input: Tensor) -> Tensor:
        x, pads = self._padded(input)
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, pads,
                        self.dilation, self.groups)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, density: Optional[float] = None,
                   mask: Optional[Tensor] = None, backend: str = "auto") -> "MaskedConv2d":
        """As :meth:`SparseConv2d.from_dense`, keeping a dense weight and a mask."""
        keep = _conv_keep(conv, density, mask)
        w = conv.weight
        layer = cls(**conv_args(conv), nnz=0, backend=backend, device=w.device,
                    dtype=w.dtype)
        keep = keep.to(w.device)
        with torch.no_grad():
            layer.weight.copy_(w * keep)
            layer.mask.copy_(keep)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer
