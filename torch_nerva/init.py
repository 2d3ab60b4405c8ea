"""Per-layer density distributions and initialisation of the kept weights.

Density distributions (:func:`layer_nnz`), for layers of shape (out_i x in_i), n_i = out_i in_i,
and a global density D with target T = floor(D * sum n_i + 1/2) nonzeros in total:

- ``"uniform"``: every layer gets density D.
- ``"er"`` (Erdos-Renyi, Mocanu et al. 2018): nnz_i = eps (in_i + out_i), i.e. density
  proportional to (in_i + out_i) / (in_i out_i), with eps chosen so the total is T. A layer whose
  density would exceed 1 is made fully dense and eps is solved again for the rest (repeated
  until no layer exceeds 1).
- ``"erk"`` (Evci et al. 2020) adds the kernel dimensions to ER: nnz_i = eps (in_i + out_i +
  kh_i + kw_i) for a convolution of shape (out, in / groups, kh, kw), whose size n_i counts the
  kernel positions; a linear layer has none, so for ``nn.Linear`` layers ERK equals ER. (ER on
  a convolution: nnz_i = eps (in_i + out_i).)

Fractional counts are rounded by the largest-remainder method, so the total is exactly T.

Initialisation of a layer with realised density d = nnz / (in x out) (:func:`xavier_bound`):
values ~ U(-a, a) with a = sqrt(6 / (d (fan_in + fan_out))): Glorot/Xavier uniform with fan-in
and fan-out counted over the kept connections (d fan_in and d fan_out on average), so each unit's
pre-activation variance matches the dense Glorot case. At d = 1 this is exactly
``nn.init.xavier_uniform_``. Biases are initialised as ``nn.Linear`` does:
U(-1/sqrt(in_features), 1/sqrt(in_features)).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .layout import check_density

DISTRIBUTIONS = ("uniform", "er", "erk")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def layer_nnz(shapes: Sequence[Tuple[int, int]], density: float,
              distribution: str = "er") -> List[int]:
    """Nonzeros per layer for ``shapes`` ((out, in) for a linear layer, (out, in / groups, kh,
    kw) for a convolution) so that the total is round(density x total)."""
    density = check_density(density)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    for s in shapes:
        if len(s) not in (2, 4):
            raise ValueError(f"a layer shape is (out, in) or (out, in, kh, kw), got {s}")
    sizes = [math.prod(s) for s in shapes]
    target = round_half_up(density * sum(sizes))
    if distribution == "uniform":
        raw = [density * n for n in sizes]
    else:
        # ER: out + in; ERK adds the kernel dimensions (Evci et al. 2020)
        weight = [float(sum(s) if distribution == "erk" else s[0] + s[1]) if n > 0 else 0.0
                  for s, n in zip(shapes, sizes)]
        dense: set = set()
        while True:
            free = [j for j in range(len(sizes)) if j not in dense and weight[j] > 0]
            remaining = target - sum(sizes[j] for j in dense)
            total_weight = sum(weight[j] for j in free)
            eps = remaining / total_weight if total_weight > 0 else 0.0
            over = [j for j in free if eps * weight[j] > sizes[j]]
            if not over:
                break
            # Make the layer that overflows most dense, then solve again.
            dense.add(max(over, key=lambda j: eps * weight[j] / sizes[j]))
        raw = [float(sizes[j]) if j in dense else eps * weight[j] for j in range(len(sizes))]
    return _largest_remainder(raw, sizes, target)


def _largest_remainder(raw: Sequence[float], caps: Sequence[int], target: int) -> List[int]:
    counts = [min(int(math.floor(r)), c) for r, c in zip(raw, caps)]
    short = target - sum(counts)
    order = sorted(range(len(raw)), key=lambda j: (-(raw[j] - math.floor(raw[j])), j))
    while short > 0:
        progressed = False
        for j in order:
            if short == 0:
                break
            if counts[j] < caps[j]:
                counts[j] += 1
                short -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot place {target} nonzeros in layers of sizes {list(caps)}")
    for j in reversed(order):  # float round-off can overshoot by a unit: take it back
        if short >= 0:
            break
        if counts[j] > 0:
            counts[j] -= 1
            short += 1
    return counts


def layer_densities(shapes: Sequence[Tuple[int, int]], density: float,
                    distribution: str = "er") -> List[float]:
    """Realised density per layer of :func:`layer_nnz`."""
    return [k / math.prod(s) if math.prod(s) else 0.0
            for k, s in zip(layer_nnz(shapes, density, distribution), shapes)]


def xavier_bound(nnz: int, in_features: int, out_features: int,
                 total: Optional[int] = None) -> float:
    """a = sqrt(6 / (d (in + out))) with d = nnz / total the realised density (``total``: the
    number of weights, in x out unless given: a convolution's fans count kernel positions)."""
    if nnz == 0:
        return 0.0
    d = nnz / (in_features * out_features if total is None else total)
    return math.sqrt(6.0 / (d * (in_features + out_features)))


def init_values(nnz: int, in_features: int, out_features: int, *, dtype=None,
                generator: Optional[torch.Generator] = None, total: Optional[int] = None
                ) -> Tensor:
    a = xavier_bound(nnz, in_features, out_features, total)
    return torch.empty(nnz, dtype=dtype or torch.get_default_dtype()).uniform_(-a, a, generator=generator)


def init_bias(in_features: int, out_features: int, *, dtype=None,
              generator: Optional[torch.Generator] = None) -> Tensor:
    a = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
    return torch.empty(out_features, dtype=dtype or torch.get_default_dtype()).uniform_(
        -a, a, generator=generator)
