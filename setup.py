"""Build torch_nerva and its native extension.

Install with `pip install --no-build-isolation -e .` after torch (build isolation would fetch
another torch, and the extension must be compiled against the one it runs with).

Environment flags (read here, summarised in one printed line and in torch_nerva/_build_info.py):
  TORCH_NERVA_OPENMP=0|1   OpenMP for the CPU kernels (default: on when torch uses OpenMP;
                           without -fopenmp at::parallel_for silently runs on one thread)
  TORCH_NERVA_DEBUG=1      -O0 -g, for debuggers
  TORCH_NERVA_SANITIZE=address  build with AddressSanitizer (see README "Design in brief")
  TORCH_NERVA_CUDA=0|1     the cuSPARSE backend (default: on when torch is a CUDA build and the
                           toolkit (CUDA_HOME, default /usr/local/cuda) and cusparse.h are found;
                           no GPU needed to build). Its cuSPARSE calls are host code (.cpp); any
                           csrc/**/*.cu file (native CUDA kernels) is compiled by nvcc when it
                           is on, and ignored when it is off
  TORCH_NERVA_MKL=0|1      the MKL backend (default: on when mkl_spblas.h is found, e.g. from
                           `pip install mkl-include`, and torch has MKL); it calls the MKL inside
                           libtorch_cpu.so, so no second MKL or OpenMP runtime is loaded
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from `which nvcc`, which can be a wrapper outside the toolkit: prefer
# the standard location when it holds a toolkit (must be set before cpp_extension is imported).
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").is_file():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a message, not a code path
    sys.exit(
        "torch_nerva needs torch installed before it is built: "
        "pip install torch==2.14.1 torchvision==0.29.1, then "
        "pip install --no-build-isolation -e ."
    )

ROOT = Path(__file__).resolve().parent


def _flag(name, default):
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "")


def _torch_uses_openmp():
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


def _mkl_include():
    """The directory holding mkl_spblas.h (PyPI mkl-include installs it into <prefix>/include),
    or None."""
    candidates = [os.environ.get("MKLROOT", "") + "/include", sys.prefix + "/include",
                  sys.base_prefix + "/include", "/usr/include/mkl", "/opt/intel/oneapi/mkl/latest/include"]
    for d in candidates:
        if d and Path(d, "mkl_spblas.h").is_file():
            return d
    return None


def _cuda_paths():
    """(include dirs, library dirs) holding cusparse.h and libcusparse for torch's CUDA: the
    toolkit's, or those of the nvidia-* wheels pip torch depends on; None when not found."""
    major = (torch.version.cuda or "0").split(".")[0]
    roots = [Path(CUDA_HOME)] if CUDA_HOME else []
    for entry in sys.path:
        roots.append(Path(entry) / "nvidia" / f"cu{major}")
        roots.append(Path(entry) / "nvidia" / "cusparse")
    includes, libs = [], []
    for root in roots:
        if (root / "include" / "cusparse.h").is_file() and not includes:
            includes.append(str(root / "include"))
        for lib_dir in (root / "lib", root / "lib64"):
            if list(lib_dir.glob("libcusparse.so*")) and not libs:
                libs.append(str(lib_dir))
    return (includes, libs) if includes and libs else None


openmp = _flag("TORCH_NERVA_OPENMP", _torch_uses_openmp())
cuda_paths = _cuda_paths() if torch.version.cuda and CUDA_HOME else None
cuda = _flag("TORCH_NERVA_CUDA", cuda_paths is not None)
if cuda and cuda_paths is None:
    sys.exit("TORCH_NERVA_CUDA=1 but no CUDA toolkit (CUDA_HOME) with cusparse.h and libcusparse "
             "was found for torch's CUDA " + str(torch.version.cuda))
mkl_include = _mkl_include()
mkl = _flag("TORCH_NERVA_MKL", mkl_include is not None and torch.backends.mkl.is_available())
if mkl and mkl_include is None:
    sys.exit("TORCH_NERVA_MKL=1 but mkl_spblas.h was not found: pip install mkl-include "
             "(headers only; the MKL library used is the one inside torch)")
debug = _flag("TORCH_NERVA_DEBUG", False)
sanitize = os.environ.get("TORCH_NERVA_SANITIZE", "").strip()

cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
link_flags = []
if sanitize:  # e.g. address: run python with LD_PRELOAD=$(gcc -print-file-name=libasan.so)
    cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}"]
    link_flags.append(f"-fsanitize={sanitize}")
if openmp:
    cxx_flags.append("-fopenmp")
    # Resolves to torch's own libgomp.so.1, already loaded by `import torch`: one runtime.
    link_flags.append("-fopenmp")

include_dirs = [str(ROOT / "csrc")]
if mkl:
    cxx_flags.append("-DTORCH_NERVA_WITH_MKL")
    include_dirs.append(mkl_include)

library_dirs = []
if cuda:
    cxx_flags.append("-DTORCH_NERVA_WITH_CUDA")
    include_dirs += cuda_paths[0]
    library_dirs += cuda_paths[1]
    # pip's nvidia wheels ship only the versioned library (no libcusparse.so): name the file.
    sonames = sorted(p.name for p in Path(cuda_paths[1][0]).glob("libcusparse.so.*"))
    link_flags.append("-l:" + (sonames[0] if sonames else "libcusparse.so"))

sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
# CUDA kernels of our own (csrc/**/*.cu) are compiled by nvcc when the CUDA backend is built;
# there may be none (the cuSPARSE path is host code in .cpp files).
cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu")) if cuda else []
sources += cu_sources
compile_args = {"cxx": cxx_flags}
if cu_sources:
    # the optimisation level and the -D defines of the C++ side (no -fopenmp: device code does
    # not use OpenMP)
    compile_args["nvcc"] = (["-O0", "-g"] if debug else ["-O3"]) + [
        f for f in cxx_flags if f.startswith("-D")]

build_info = {
    "torch_version": torch.__version__,
    "openmp": openmp,
    "debug": debug,
    "backends": ["native"] + (["mkl"] if mkl else []) + (["cusparse"] if cuda else []),
    "cxx_flags": cxx_flags,
}
print(f"torch_nerva build: torch {torch.__version__}, openmp={openmp}, debug={debug}, cuda={cuda}, "
      f"backends={build_info['backends']}, .cu files={len(cu_sources)}"
      + (f" (MKL headers: {mkl_include})" if mkl else ""))
(ROOT / "torch_nerva" / "_build_info.py").write_text(
    "# Generated by setup.py at build time; do not edit.\n"
    + "".join(f"{k.upper()} = {v!r}\n" for k, v in build_info.items())
)

setup(
    name="torch_nerva",
    version="0.1.0",
    description="Truly sparse (CSR) linear layers for PyTorch, with a masked twin for comparison",
    packages=find_packages(include=["torch_nerva", "torch_nerva.*"]),
    package_data={"torch_nerva": ["py.typed"]},
    ext_modules=[
        (CUDAExtension if cuda else CppExtension)(
            "torch_nerva._C",
            sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_compile_args=compile_args,
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "tomli; python_version < '3.11'"],
    extras_require={
        "demo": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "hypothesis", "scikit-learn", "scipy", "matplotlib", "timm", "safetensors"],
        "bench": ["matplotlib"],
        "mkl": ["mkl-include"],  # headers only, needed before the build: see README
    },
)
