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


def test_cuda_toolkit_present_means_cusparse_was_built():
    # CI machines have torch's CUDA build and a toolkit: the cuSPARSE code must compile there
    # even without a GPU.
    import torch
    if not torch.version.cuda or not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("no CUDA build of torch or no toolkit at /usr/local/cuda")
    assert "cusparse" in tn._build_info.BACKENDS
    assert torch.ops.torch_nerva._cusparse_built()
