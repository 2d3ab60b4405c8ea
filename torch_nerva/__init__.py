"""torch_nerva: truly sparse linear layers for PyTorch.

A :class:`SparseLinear` stores only its nonzero weights: a ``(1, nnz)`` ``values`` parameter and
a CSR topology (``crow_indices``, ``col_indices``). Forward, input gradient and weight
gradient are sparse kernels whose cost is proportional to ``nnz x batch``. A
:class:`MaskedLinear` is the dense ``weight * mask`` baseline used by sparse-training papers,
built from the same initial weights so the two can be compared in one process.
"""
import torch  # noqa: F401  (must be imported before the extension)

from . import _build_info


def _check_build():
    built = _build_info.TORCH_VERSION
    if built != torch.__version__:
        raise ImportError(
            f"torch_nerva was built against torch {built} but torch {torch.__version__} is "
            "installed; rebuild with: pip install --no-build-isolation -e ."
        )


_check_build()

from . import _C  # noqa: E402,F401  (registers torch.ops.torch_nerva.*)
from . import ops  # noqa: E402,F401  (fake kernels and autograd)
from . import backends  # noqa: E402
from .functional import sparse_linear  # noqa: E402
from .layout import CSRLayout  # noqa: E402
from .nn.linear import MaskedLinear, SparseLinear  # noqa: E402
from .nn.conv import MaskedConv2d, SparseConv2d  # noqa: E402
from .convert import DenseWeightsWarning, densify, sparsify, to_masked, to_sparse  # noqa: E402
from .nn.attention import SparseMultiheadAttention  # noqa: E402
from .nn.chain import fuse_for_inference  # noqa: E402
from .init import layer_densities  # noqa: E402
from . import interchange  # noqa: E402
from . import structured  # noqa: E402
from .interchange import load_state_dict, summary  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SparseLinear",
    "MaskedLinear",
    "SparseConv2d",
    "MaskedConv2d",
    "SparseMultiheadAttention",
    "DenseWeightsWarning",
    "fuse_for_inference",
    "CSRLayout",
    "sparse_linear",
    "sparsify",
    "to_masked",
    "to_sparse",
    "densify",
    "layer_densities",
    "backends",
    "interchange",
    "structured",
    "summary",
    "load_state_dict",
]
