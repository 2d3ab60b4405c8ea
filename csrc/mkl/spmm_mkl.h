// The MKL backend's product, called by the CPU kernels of sparse_linear (csrc/cpu/linear_cpu.cpp)
// when backend == "mkl". Defined in every build: without MKL, available() is false and spmm()
// raises with the command that builds the backend.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torch_nerva {
namespace mkl {

// Built with MKL, and the MKL inside this torch exports the sparse BLAS functions used.
bool available();

// y = x W^T (transpose = false: x is B x n_cols, y is B x n_rows) or y = x W (transpose = true:
// x is B x n_rows, y is B x n_cols) for the CSR W (n_rows = crow.numel() - 1, n_cols), through
// mkl_sparse_?_mm on the row-major tensors as they are. float32 and float64; int32 indices (an
// int64 layout is validated, then converted: an O(nnz) copy per call). Every index is checked
// before MKL reads it.
at::Tensor spmm(const char* op, const at::Tensor& x, const at::Tensor& values,
                const at::Tensor& crow, const at::Tensor& col, int64_t n_cols, bool transpose);

}  // namespace mkl
}  // namespace torch_nerva
