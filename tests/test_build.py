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


def test_build_facts_agree_with_build_info():
    # _mkl_available and _cusparse_built are schemas in every build (false when not built)
    import torch
    assert torch.ops.torch_nerva._cusparse_built() == ("cusparse" in tn._build_info.BACKENDS)
    if "mkl" not in tn._build_info.BACKENDS:
        assert not torch.ops.torch_nerva._mkl_available()


@pytest.mark.parametrize("cuda", ["0", "1"])
def test_setup_adds_cu_files_only_when_cuda_is_built(tmp_path, cuda):
    """setup.py's sources: csrc/**/*.cu join them when the CUDA backend is built, never
    otherwise (run on a scratch tree with one .cpp and one .cu; `setup.py --name` evaluates the
    configuration without compiling)."""
    import shutil
    import subprocess
    import torch

    if cuda == "1" and not (torch.version.cuda and Path("/usr/local/cuda/bin/nvcc").is_file()):
        pytest.skip("no CUDA build of torch or no toolkit at /usr/local/cuda")
    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "a.cpp").write_text("")
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("")
    (tmp_path / "torch_nerva").mkdir()
    env = dict(__import__("os").environ, TORCH_NERVA_CUDA=cuda, TORCH_NERVA_MKL="0")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert f"cuda={cuda == '1'}" in out
    assert f".cu files={1 if cuda == '1' else 0}" in out
