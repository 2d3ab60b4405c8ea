"""Small datasets the library itself needs (the Graph Challenge's image inputs); the
comparison command's loaders live in :mod:`torch_nerva.compare.data`, which uses this one."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


def digits_arrays() -> Optional[Tuple[Tensor, Tensor]]:
    """The scikit-learn digits as (features, labels), or None when scikit-learn is missing.

    The data file that scikit-learn ships is read directly, without importing scikit-learn:
    importing it loads its own copy of libgomp, and the process should hold exactly one OpenMP
    runtime (torch's) while it is timed.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return torch.from_numpy(table[:, :-1].copy()), torch.from_numpy(table[:, -1].astype(np.int64))
