// The `backend` argument of the sparse_linear ops, shared by every device's kernels.
//
// The op family sparse_linear / sparse_linear_backward takes the backend as its last argument
// (`str backend="native"`, csrc/torch_nerva.cpp): the CPU kernel switches between the native
// kernels and MKL (csrc/mkl/), the CUDA kernel runs cuSPARSE (a native CUDA kernel does not
// exist yet). "auto", "dense" and "torch" are not backends of the op: "auto" is resolved once
// per layer in Python (torch_nerva/backends.py), "dense" and "torch" are pure-PyTorch paths.
// A backend that was not built raises with the command that builds it.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace torch_nerva {

enum class Backend { native, mkl, cusparse };

// How to get a backend that this build lacks (also the text of backends.py's messages, through
// the _how_to_build op): "mkl", "cusparse" or "native_cuda".
const char* how_to_build(c10::string_view backend);

// The backend named `name`; any other name raises, listing the op's backends.
inline Backend parse_backend(const char* op, c10::string_view name) {
  if (name == "native") return Backend::native;
  if (name == "mkl") return Backend::mkl;
  if (name == "cusparse") return Backend::cusparse;
  TORCH_CHECK(false, op, ": backend must be 'native', 'mkl' or 'cusparse', got '",
              std::string(name), "' ('auto', 'dense' and 'torch' are resolved in Python: use "
              "torch_nerva.functional.sparse_linear or a layer's backend)");
}

inline const char* backend_name(Backend b) {
  return b == Backend::native ? "native" : b == Backend::mkl ? "mkl" : "cusparse";
}

// Raised by a kernel asked for a backend that does not run on its device.
[[noreturn]] inline void raise_wrong_device(const char* op, Backend b, const c10::Device& device) {
  if (b == Backend::cusparse) {
    TORCH_CHECK(false, op, ": backend 'cusparse' runs on CUDA tensors only, got tensors on ",
                device, "; use backend='native' (or 'mkl') on the CPU");
  }
  TORCH_CHECK(false, op, ": backend '", backend_name(b), "' runs on CPU tensors only, got "
              "tensors on ", device, "; use backend='cusparse' on CUDA");
}

}  // namespace torch_nerva
