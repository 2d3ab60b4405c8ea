// The SpMM / SDDMM drivers on the transposed layout, and the argument checks of the ops that
// call them.
//
// Layout (README "Design in brief"): activations are transposed once to (features x ld), ld the
// batch padded to whole 64-byte vectors (transpose.h), so every nonzero W[r, c] is a vector
// multiply-add of X^T[c, :] into row r's accumulator held in registers (forward, and dX on the
// transposed layout), or one vector dot product dY^T[r, :] . X^T[c, :] (SDDMM). Threads own
// whole output rows (schedule.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace torch_nerva {
namespace cpu {

// yt (n_out x ld) from xt (n_in x ld) and a CSR with n_out rows over n_in columns, optionally
// clamped to [lo, hi]; `batch` columns are meaningful (all ld are computed).
at::Tensor spmm_feature_major(const char* op, const at::Tensor& xt, int64_t batch,
                              const at::Tensor& values, const at::Tensor& crow,
                              const at::Tensor& col, const at::Tensor& perm,
                              const at::Tensor& bias, bool clamp = false, double lo = 0,
                              double hi = 0);

// y (batch x n_out) from xt (n_in x ld) and a CSR with n_out rows over n_in columns.
at::Tensor spmm_transposed(const char* op, const at::Tensor& xt, int64_t batch,
                           const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const at::Tensor& perm,
                           const at::Tensor& bias);

// out[k] for W's nonzeros from gt (n_out x ld) and xt (n_in x ld).
at::Tensor sddmm_transposed(const char* op, const at::Tensor& gt, const at::Tensor& xt,
                            const at::Tensor& crow, const at::Tensor& col);

void check_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& values,
                     const at::Tensor& crow, const at::Tensor& col,
                     const c10::optional<at::Tensor>& perm,
                     const c10::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace torch_nerva
