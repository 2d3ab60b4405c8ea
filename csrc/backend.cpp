// The build-dependent facts about backends: what was built (_mkl_available, _cusparse_built:
// defined in every build, false when not built) and how to build what was not (_how_to_build).
#include "backend.h"

#include <torch/library.h>

#include <string>

namespace torch_nerva {

namespace mkl {
bool available();  // csrc/mkl/spmm_mkl.cpp (false when not built)
}

const char* how_to_build(c10::string_view backend) {
  if (backend == "mkl") {
    return "it is built when MKL's headers are present at build time and uses the MKL inside "
           "torch: pip install mkl-include, then rebuild with "
           "pip install --no-build-isolation -e . (TORCH_NERVA_MKL=1 makes a missing header "
           "an error)";
  }
  if (backend == "cusparse") {
    return "it is built when torch is a CUDA build and a CUDA toolkit with cusparse.h is "
           "found (CUDA_HOME, default /usr/local/cuda; pip torch's nvidia wheels provide "
           "cusparse.h): rebuild with pip install --no-build-isolation -e . "
           "(TORCH_NERVA_CUDA=1 makes a missing toolkit an error)";
  }
  if (backend == "native_cuda") {
    return "none is written yet; use backend='cusparse' on CUDA tensors";
  }
  TORCH_CHECK(false, "torch_nerva: no build instructions for backend '", std::string(backend),
              "' (it is always built)");
}

namespace {

bool mkl_available() { return mkl::available(); }

bool cusparse_built() {
#ifdef TORCH_NERVA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string how_to_build_op(c10::string_view backend) { return how_to_build(backend); }

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CompositeExplicitAutograd, m) {
  m.impl("_mkl_available", &mkl_available);
  m.impl("_cusparse_built", &cusparse_built);
  m.impl("_how_to_build", &how_to_build_op);
}

}  // namespace torch_nerva
