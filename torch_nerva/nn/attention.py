"""SparseMultiheadAttention: ``nn.MultiheadAttention`` with four separate (sparse) projections.

``nn.MultiheadAttention`` keeps its query/key/value projections packed in one dense
``in_proj_weight`` (or three dense ``*_proj_weight`` parameters) and reads its ``out_proj``'s
weight directly, so a conversion that swaps ``nn.Linear`` submodules cannot make it sparse.
:class:`SparseMultiheadAttention` computes the same function with the four projections as
submodules ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``, each *called*, never read:

    q = q_proj(query), k = k_proj(key), v = v_proj(value)      (each split into num_heads heads)
    head_i = softmax(q_i k_i^T / sqrt(head_dim) + mask) v_i
    out = out_proj(concat(head_1, ..., head_h))

so the same class works whatever the projections are: :class:`torch_nerva.SparseLinear`
(the point), :class:`torch_nerva.MaskedLinear` (after :func:`torch_nerva.to_masked`) or
``nn.Linear`` (after :func:`torch_nerva.densify`). Masks, ``is_causal``, ``add_bias_kv``,
``add_zero_attn``, dropout, ``batch_first`` and unbatched inputs follow
``torch.nn.functional.multi_head_attention_forward`` step by step; attention weights are
computed explicitly when ``need_weights`` asks for them, otherwise by
``F.scaled_dot_product_attention``.

torch's fused inference paths (``nn.MultiheadAttention``'s own, and those of
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``) read a packed ``in_proj_weight``;
this module declines them: ``_qkv_same_embed_dim`` is False, ``in_proj_bias`` is None and
``in_proj_weight`` is an empty marker tensor that carries ``__torch_function__`` (see
:class:`NoPackedInProjection`), so every check in torch's transformer.py falls back to calling
``self_attn(...)`` with ordinary tensors.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..init import round_half_up
from ..layout import check_density
from .linear import SparseLinear, keep_largest

__all__ = ["SparseMultiheadAttention", "NoPackedInProjection"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class NoPackedInProjection(Tensor):
    """What :attr:`SparseMultiheadAttention.in_proj_weight` returns: an empty tensor that is
    not a weight. Its only job is to make torch's fused transformer fast paths decline:
    ``nn.TransformerEncoder.forward`` tests ``torch.overrides.has_torch_function`` over
    ``self_attn.in_proj_weight`` (among others) before turning a padded batch into a nested
    tensor, and a tensor subclass with ``__torch_function__`` makes that test true. ``None``
    would not do: the encoder would then read ``None.requires_grad`` (an AttributeError in
    ``eval()`` with autograd on) or pass nested tensors on under ``no_grad``.

    Any computation with it raises, naming the projections to use instead."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            "SparseMultiheadAttention has no packed in_proj_weight: its projections are the "
            "separate submodules q_proj, k_proj and v_proj (use their dense_weight() or "
            f"weight, or SparseMultiheadAttention.to_dense()); got a call to {func}")

    def __repr__(self, *args, **kwargs) -> str:
        return "NoPackedInProjection()"

    def __reduce_ex__(self, protocol):
        return (_no_packed_in_projection, ())


def _no_packed_in_projection() -> NoPackedInProjection:
    return torch.empty(0).as_subclass(NoPackedInProjection)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_dims(embed_dim, num_heads, kdim, vdim) -> Tuple[int, int]:
    _check_positive_int("embed_dim", embed_dim)
    _check_positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} "
                         f"and num_heads={num_heads}")
    kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
    vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
    return kdim, vdim


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    return float(dropout)


def _check_nnz(nnz, shapes: Sequence[Tuple[int, int]]) -> List[int]:
    if isinstance(nnz, (str, bytes, Tensor)) or not isinstance(nnz, Sequence) or len(nnz) != 4:
        raise ValueError("nnz must be a sequence of 4 ints, one per projection (q, k, v, out), "
                         f"got {nnz!r}")
    for name, k, (o, i) in zip(_PROJECTIONS, nnz, shapes):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= o * i:
            raise ValueError(f"nnz for {name} ({o} x {i}) must be an int in [0, {o * i}], "
                             f"got {k!r}")
    return list(nnz)


def _shapes(embed_dim: int, kdim: int, vdim: int) -> List[Tuple[int, int]]:
    return [(embed_dim, embed_dim), (embed_dim, kdim), (embed_dim, vdim),
            (embed_dim, embed_dim)]


def _dense_weight(proj: nn.Module) -> Tensor:
    dense = getattr(proj, "dense_weight", None)
    return dense() if callable(dense) else proj.weight


def _canonical_mask(mask: Optional[Tensor], name: str, target: torch.dtype) -> Optional[Tensor]:
    """Boolean masks (True = do not attend) become additive float masks (-inf where True), as
    ``nn.MultiheadAttention`` does; float masks are added as they are."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=target).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


class SparseMultiheadAttention(nn.Module):
    r"""``nn.MultiheadAttention`` whose four projections are separate (sparse) linear layers.

    Same constructor arguments, forward signature and results as ``nn.MultiheadAttention``;
    the projections ``q_proj`` (embed_dim -> embed_dim), ``k_proj`` (kdim -> embed_dim),
    ``v_proj`` (vdim -> embed_dim) and ``out_proj`` (embed_dim -> embed_dim) are
    :class:`~torch_nerva.SparseLinear` layers when built here, and may be replaced by any module
    computing ``x W^T + b`` (``MaskedLinear``, ``nn.Linear``) by the model conversions.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
        batch_first, device, dtype: as ``nn.MultiheadAttention``.
        density: the density of every projection (nnz = floor(density x in x out + 1/2), placed
            uniformly at random), or
        nnz: a sequence of four nonzero counts for (q_proj, k_proj, v_proj, out_proj).
            Exactly one of ``density`` and ``nnz`` must be given.
        backend, generator, index_dtype: passed to each :class:`~torch_nerva.SparseLinear`.

    The kept projection weights are drawn as :class:`~torch_nerva.SparseLinear` draws them
    (Glorot-uniform per projection, scaled for the realised density, see
    :mod:`torch_nerva.init`; ``nn.MultiheadAttention`` draws its packed (3 embed_dim x
    embed_dim) ``in_proj_weight`` as one matrix, a bound sqrt(2) smaller for q, k, v at density
    1); biases are zero and ``bias_k``/``bias_v`` Glorot-normal, as ``nn.MultiheadAttention``
    initialises them. With a
    ``generator``, the random numbers are drawn in one order: q, k, v, out (topology, then
    values, then the bias that is zeroed afterwards), then bias_k, bias_v.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 batch_first: bool = False, *, density: Optional[float] = None,
                 nnz: Optional[Sequence[int]] = None, backend: str = "auto", device=None,
                 dtype=None, generator: Optional[torch.Generator] = None,
                 index_dtype=None) -> None:
        super().__init__()
        kdim, vdim = _check_dims(embed_dim, num_heads, kdim, vdim)
        _check_dropout(dropout)
        shapes = _shapes(embed_dim, kdim, vdim)
        if (density is None) == (nnz is None):
            raise TypeError("give exactly one of density= (for every projection) or nnz= (a "
                            "sequence of four counts for q_proj, k_proj, v_proj, out_proj), got "
                            + ("both" if density is not None else "neither"))
        if density is not None:
            d = check_density(density)
            counts = [round_half_up(d * o * i) for o, i in shapes]
        else:
            counts = _check_nnz(nnz, shapes)
        backends.check(backend)
        projections = []
        for (o, i), k in zip(shapes, counts):
            layer = SparseLinear(i, o, bias, nnz=k, backend=backend, device=device, dtype=dtype,
                                 generator=generator, index_dtype=index_dtype)
            if layer.bias is not None:
                with torch.no_grad():
                    layer.bias.zero_()
            projections.append(layer)
        bias_k = bias_v = None
        if add_bias_kv:
            # drawn on the CPU (the generator's device), then placed
            drawn = [nn.init.xavier_normal_(torch.empty((1, 1, embed_dim), dtype=dtype),
                                            generator=generator) for _ in range(2)]
            bias_k, bias_v = (nn.Parameter(t.to(device)) for t in drawn)
        self._setup(embed_dim, num_heads, dropout, add_zero_attn, kdim, vdim, batch_first,
                    projections, bias_k, bias_v)

    def _setup(self, embed_dim, num_heads, dropout, add_zero_attn, kdim, vdim, batch_first,
               projections, bias_k, bias_v) -> None:
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.dropout = _check_dropout(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        # Separate projections: torch's fused paths (which need a packed in_proj) decline.
        self._qkv_same_embed_dim = False
        self.in_proj_bias = None
        for name, proj in zip(_PROJECTIONS, projections):
            setattr(self, name, proj)
        self.bias_k = bias_k
        self.bias_v = bias_v

    @property
    def in_proj_weight(self) -> NoPackedInProjection:
        """Not a weight: a marker that makes torch's fused fast paths decline (see
        :class:`NoPackedInProjection`). The weights are in ``q_proj``, ``k_proj``, ``v_proj``."""
        return _no_packed_in_projection()

    @staticmethod
    def dense_shapes(mha: nn.Module) -> List[Tuple[int, int]]:
        """``(out_features, in_features)`` of the q, k, v and out projections of ``mha`` (an
        ``nn.MultiheadAttention`` or a SparseMultiheadAttention), in that order: the shapes
        :func:`torch_nerva.sparsify` distributes nonzeros over."""
        for name in ("embed_dim", "kdim", "vdim"):
            if not isinstance(getattr(mha, name, None), int):
                raise TypeError("dense_shapes expects an nn.MultiheadAttention (or a "
                                f"SparseMultiheadAttention), got {type(mha).__name__}")
        return _shapes(mha.embed_dim, mha.kdim, mha.vdim)

    # -- construction from a dense nn.MultiheadAttention -------------------------------------
    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, *, nnz: Optional[Sequence[int]] = None,
                   density: Optional[float] = None, init: str = "magnitude",
                   backend: str = "auto", generator: Optional[torch.Generator] = None,
                   index_dtype=None, device=None) -> "SparseMultiheadAttention":
        """The sparse equivalent of ``mha``.

        The packed ``in_proj_weight``/``in_proj_bias`` (or the separate ``q_proj_weight``,
        ``k_proj_weight``, ``v_proj_weight`` when kdim/vdim differ from embed_dim) are split
        into ``q_proj``, ``k_proj``, ``v_proj``; ``out_proj`` is the out projection.

        ``init="magnitude"`` (default) keeps the largest-magnitude weights of each projection
        (``nnz`` per projection, in q, k, v, out order, or ``round(density x numel)`` of each;
        with neither, each projection's nonzeros, so the result computes what ``mha`` does)
        and copies the biases. ``init="xavier"`` draws fresh sparse projections with those
        nonzero counts (with neither, each projection's count of nonzeros), biases zero, as a
        newly built :class:`SparseMultiheadAttention`. Either way ``bias_k``/``bias_v``,
        dropout, ``batch_first``, ``add_zero_attn`` and the training mode are taken from
        ``mha``; ``device`` moves the result (default: ``mha``'s device).

        An ``mha`` built on the ``meta`` device is a shape template: ``init="xavier"`` with
        ``nnz``/``density`` and ``device`` builds the sparse layers without ever allocating
        the dense weights (``bias_k``/``bias_v`` are then drawn Glorot-normal).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_dense expects an nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        if init not in ("magnitude", "xavier"):
            raise ValueError(f"init must be 'magnitude' or 'xavier', got {init!r}")
        if nnz is not None and density is not None:
            raise TypeError("give nnz= (per projection) or density= (for all), not both")
        backends.check(backend)
        E = mha.embed_dim
        shapes = cls.dense_shapes(mha)
        if mha.in_proj_weight is not None:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        weights = [wq, wk, wv, mha.out_proj.weight]
        if mha.in_proj_bias is not None:
            biases = [*mha.in_proj_bias.chunk(3), mha.out_proj.bias]
        else:
            biases = [None, None, None, mha.out_proj.bias]
        if nnz is not None:
            counts = _check_nnz(nnz, shapes)
        elif density is not None:
            d = check_density(density)
            counts = [round_half_up(d * o * i) for o, i in shapes]
        else:
            counts = None  # keep the nonzeros
        if device is not None:
            device = torch.device(device)
        on_meta = any(w.is_meta for w in weights)
        if on_meta and init == "magnitude":
            raise ValueError("init='magnitude' keeps the largest existing weights, but mha is on "
                             "the meta device (no values); use init='xavier' with nnz= or "
                             "density= and device=")
        if on_meta and counts is None:
            raise ValueError("mha is on the meta device, so its nonzeros cannot be counted: give "
                             "nnz= or density=")
        if on_meta and device is None:
            raise ValueError("mha is on the meta device: give device= to place the new layers")

        projections = []
        for j, (w, b) in enumerate(zip(weights, biases)):
            if init == "magnitude":
                holder = nn.Linear(w.shape[1], w.shape[0], b is not None, device="meta")
                holder.weight = nn.Parameter(w.detach(), requires_grad=False)
                if b is not None:
                    holder.bias = nn.Parameter(b.detach(), requires_grad=False)
                mask = None if counts is None else keep_largest(w, counts[j])
                layer = SparseLinear.from_dense(holder, mask=mask, backend=backend,
                                                index_dtype=index_dtype)
                if device is not None:
                    layer = layer.to(device)
            else:
                k = int((w != 0).sum()) if counts is None else counts[j]
                layer = SparseLinear(w.shape[1], w.shape[0], b is not None, nnz=k,
                                     backend=backend,
                                     device=w.device if device is None else device,
                                     dtype=w.dtype, generator=generator,
                                     index_dtype=index_dtype)
                if layer.bias is not None:
                    with torch.no_grad():
                        layer.bias.zero_()
            projections.append(layer)

        def copy_param(p: Optional[Tensor]) -> Optional[nn.Parameter]:
            if p is None:
                return None
            if p.is_meta:  # a shape template: drawn as nn.MultiheadAttention draws it
                fresh = torch.empty(p.shape, dtype=p.dtype)
                nn.init.xavier_normal_(fresh, generator=generator)
                return nn.Parameter(fresh.to(device))
            return nn.Parameter(p.detach().to(p.device if device is None else device,
                                              copy=True))

        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(E, mha.num_heads, mha.dropout, mha.add_zero_attn, mha.kdim, mha.vdim,
                    mha.batch_first, projections, copy_param(mha.bias_k), copy_param(mha.bias_v))
        self.train(mha.training)
        return self

    def to_dense(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (packed ``in_proj_weight`` when kdim == vdim
        == embed_dim), whatever the projections are (their ``dense_weight()`` when they have
        one, else ``weight``). Weights are copied; the result is independent of this module."""
        projections = [getattr(self, name) for name in _PROJECTIONS]
        weights = [_dense_weight(p).detach() for p in projections]
        biases = [getattr(p, "bias", None) for p in projections]
        has_bias = {b is not None for b in biases}
        if len(has_bias) != 1:
            raise ValueError("to_dense: nn.MultiheadAttention has biases on all four projections "
                             "or on none; this module has them on "
                             + ", ".join(n for n, b in zip(_PROJECTIONS, biases) if b is not None))
        if (self.bias_k is None) != (self.bias_v is None):
            raise ValueError("to_dense: bias_k and bias_v must both be set or both be None")
        w0 = weights[0]
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                    bias=has_bias.pop(), add_bias_kv=self.bias_k is not None,
                                    add_zero_attn=self.add_zero_attn, kdim=self.kdim,
                                    vdim=self.vdim, batch_first=self.batch_first,
                                    device=w0.device, dtype=w0.dtype)
        with torch.no_grad():
            if mha.in_proj_weight is not None:
                mha.in_proj_weight.copy_(torch.cat(weights[:3]))
            else:
                mha.q_proj_weight.copy_(weights[0])
                mha.k_proj_weight.copy_(weights[1])
                mha.v_proj_weight.copy_(weights[2])
            mha.out_proj.weight.copy_(weights[3])
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([b.detach() for b in biases[:3]]))
                mha.out_proj.bias.copy_(biases[3])
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        mha.train(self.training)
        return mha

    # -- forward ---------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """As ``nn.MultiheadAttention.forward``: returns ``(attn_output, attn_weights)``, the
        weights averaged over heads (``average_attn_weights``) or per head, or None when
        ``need_weights`` is False."""
        H, D, E = self.num_heads, self.head_dim, self.embed_dim
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        # Masks as nn.MultiheadAttention.forward canonicalises them (before the causal hint).
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention); you may use "
                               "nn.Transformer.generate_square_subsequent_mask to create it.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint alone goes to scaled_dot_product_attention
        else:
            is_causal = False  # attn_mask is used as given (merged with the padding mask)

        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        # To (batch, seq, embed_dim).
        if not batched:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        N, L, S = q.shape[0], q.shape[1], k.shape[1]

        if self.bias_k is not None or self.bias_v is not None:
            if self.bias_k is None or self.bias_v is None:
                raise RuntimeError("bias_k and bias_v must both be set or both be None")
            k = torch.cat([k, self.bias_k.reshape(1, 1, E).expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, E).expand(N, 1, E)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask,
                                                                           (0, 1))
        # (batch, heads, seq, head_dim)
        q = q.reshape(N, L, H, D).transpose(1, 2)
        k = k.reshape(N, k.shape[1], H, D).transpose(1, 2)
        v = v.reshape(N, v.shape[1], H, D).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(N, H, 1, D)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask,
                                                                           (0, 1))
        S = k.shape[2]

        # One additive mask, broadcastable to (batch, heads, L, S).
        mask = None
        if attn_mask is not None:
            mask = (attn_mask.reshape(1, 1, L, S) if attn_mask.dim() == 2
                    else attn_mask.reshape(N, H, L, S))
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(D))
            scores = q_scaled @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                 is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise NotImplementedError(
                    f"SparseMultiheadAttention does not take nested tensors ({name} is one); "
                    "pad the sequences and pass key_padding_mask")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got "
                             f"{query.dim()}-D of shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"for a {query.dim()}-D query, key and value must be "
                             f"{query.dim()}-D too, got {key.dim()}-D and {value.dim()}-D")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features in its last dimension "
                                 f"(embed_dim={self.embed_dim}, kdim={self.kdim}, "
                                 f"vdim={self.vdim}), got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same sequence and batch dimensions, "
                             f"got {tuple(key.shape)} and {tuple(value.shape)}")
        seq, bat = (1, 0) if self.batch_first else (0, 1)
        if batched:
            L, N, S = query.shape[seq], query.shape[bat], key.shape[seq]
            if key.shape[bat] != N:
                raise ValueError(f"query and key must have the same batch size, got {N} and "
                                 f"{key.shape[bat]} (batch_first={self.batch_first})")
        else:
            L, N, S = query.shape[0], 1, key.shape[0]
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor):
                raise TypeError("key_padding_mask must be a torch.Tensor or None, got "
                                f"{type(key_padding_mask).__name__}")
            want = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"key_padding_mask must have shape {want} (batch, source length)"
                                 f", got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise TypeError(f"attn_mask must be a torch.Tensor or None, got "
                                f"{type(attn_mask).__name__}")
            if tuple(attn_mask.shape) not in ((L, S), (N * self.num_heads, L, S)):
                raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)} or "
                                 f"(batch * num_heads, L, S) = {(N * self.num_heads, L, S)}, "
                                 f"got {tuple(attn_mask.shape)}")
        return batched

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}",
                 f"batch_first={self.batch_first}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        if self.bias_k is not None:
            parts.append("add_bias_kv=True")
        if self.add_zero_attn:
            parts.append("add_zero_attn=True")
        return ", ".join(parts)
