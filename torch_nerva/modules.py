"""Former home of the layers, kept so that imports and pickled models that name
``torch_nerva.modules`` keep working; the layers live in :mod:`torch_nerva.nn`."""
from .nn.linear import *  # noqa: F401,F403
from .nn.linear import MaskedLinear, SparseLinear, keep_largest, layout_equal  # noqa: F401
