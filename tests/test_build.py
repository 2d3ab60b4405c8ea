"""What the build compiled, given what the environment offered."""
import sys
from pathlib import Path

import pytest

import torch_nerva as tn


def test_installed_mkl_headers_were_built_with():
    # Where mkl-include is installed (CI installs it) the build must have compiled the MKL
    # backend, and torch's MKL must provide the functions it calls.
    if not Path(sys.prefix, "include", "mkl_spblas.h").is_file():
        pytest.skip("mkl-include is not installed in this environment")
    assert "mkl" in tn._build_info.BACKENDS
    assert "mkl" in tn.backends.available()
