// The padded transposes between PyTorch's row-major (batch x features) tensors and the
// feature-major (features x ld) layout the kernels read and write (ld = padded_ld(batch)).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torch_nerva {
namespace cpu {

// (batch x n) -> (n x ld) transposed, zero-padded to ld = padded_ld(batch). With `nonfinite`,
// also reports whether x holds a NaN or +-Inf (found while transposing, at no extra pass).
at::Tensor transpose_padded(const at::Tensor& x, bool* nonfinite = nullptr);

// (n x ld) -> (batch x n): the first batch columns of yt, transposed.
at::Tensor untranspose(const at::Tensor& yt, int64_t batch);

}  // namespace cpu
}  // namespace torch_nerva
