// Argument checks shared by every device's kernels: ranks, dtypes, lengths, devices and the
// row pointer's ends. They read no index data beyond crow's two ends; the per-element checks
// (row pointer monotone, column in range) are done inside the kernels as they read each index,
// so a malformed layout raises instead of reading out of bounds, at no extra pass.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

namespace torch_nerva {

// Every defined tensor of `named` lives on `device` (a kernel registered for one device key
// is reached whenever any argument has that key: a CPU tensor beside a CUDA or meta one must
// raise here, never be read through a pointer of the wrong kind).
inline void check_devices(const char* op, const at::Device& device,
                          std::initializer_list<std::pair<const char*, const at::Tensor*>> named) {
  for (const auto& [name, t] : named) {
    TORCH_CHECK(!t->defined() || t->device() == device, op, ": ", name, " is on ", t->device(),
                " but the other arguments are on ", device, "; move them to one device");
  }
}

inline void check_index_pair(const char* op, const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK(crow.dim() == 1, op, ": crow must be 1-D (n_rows + 1), got shape ", crow.sizes());
  TORCH_CHECK(col.dim() == 1, op, ": col must be 1-D (nnz), got shape ", col.sizes());
  TORCH_CHECK(crow.numel() >= 1, op, ": crow must have n_rows + 1 >= 1 entries, got 0");
  TORCH_CHECK(crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong, op,
              ": index tensors must be int32 or int64, got crow of dtype ", crow.scalar_type());
  TORCH_CHECK(col.scalar_type() == crow.scalar_type(), op,
              ": crow and col must have the same index dtype, got ", crow.scalar_type(), " and ",
              col.scalar_type());
}

// Whether the native kernels take this value type: float32 and float64, and bfloat16 and
// float16 (stored in 16 bits, accumulated in float32).
inline bool native_value_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// values 1-D, of x's dtype, and a dtype the op supports: float32/float64, and with
// `low_precision` also bfloat16/float16.
inline void check_values(const char* op, const at::Tensor& values, const at::Tensor& x,
                         const char* x_name, bool low_precision = false) {
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz), got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": ", x_name, " has dtype ",
              x.scalar_type(), " but values have dtype ", values.scalar_type(),
              "; cast one to match");
  if (low_precision) {
    TORCH_CHECK(native_value_type(x.scalar_type()), op,
                ": only float32, float64, bfloat16 and float16 are supported, got ",
                x.scalar_type());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": only float32 and float64 are supported, got ", x.scalar_type(),
                " (the native backend also takes bfloat16 and float16)");
  }
}

// bias (optional): 1-D with n_out entries of x's dtype.
inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t n_out,
                       const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == n_out, op, ": bias must have shape (", n_out,
              "), got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ",
              bias->scalar_type(), " but x has dtype ", x.scalar_type());
}

// A layer's layout: W's CSR (crow, col), the CSR of W^T (crow_t, col_t) and perm (values_t =
// values[perm]), all on `device`, one index dtype, one nnz shared with values.
inline void check_linear_layout(const char* op, const at::Device& device, const at::Tensor& values,
                                const at::Tensor& crow, const at::Tensor& col,
                                const at::Tensor& crow_t, const at::Tensor& col_t,
                                const at::Tensor& perm) {
  check_devices(op, device, {{"values", &values}, {"crow", &crow}, {"col", &col},
                             {"crow_t", &crow_t}, {"col_t", &col_t}, {"perm", &perm}});
  check_index_pair(op, crow, col);
  check_index_pair(op, crow_t, col_t);
  TORCH_CHECK(crow_t.scalar_type() == crow.scalar_type() &&
                  perm.scalar_type() == crow.scalar_type(),
              op, ": the layout and its transpose must share one index dtype");
  TORCH_CHECK(col_t.numel() == col.numel() && perm.dim() == 1 && perm.numel() == col.numel() &&
                  values.dim() == 1 && values.numel() == col.numel(),
              op, ": inconsistent layout: nnz is ", col.numel(), " in col, ", col_t.numel(),
              " in col_t, ", perm.numel(), " in perm and ", values.numel(), " in values");
}

// grad of sparse_linear_backward: (batch x out_features) of values' dtype.
inline void check_linear_grad(const char* op, const at::Tensor& grad, const at::Tensor& values,
                              const at::Tensor& crow) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == crow.numel() - 1, op,
              ": grad must be (batch x out_features = ", crow.numel() - 1, "), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == values.scalar_type(), op, ": grad has dtype ",
              grad.scalar_type(), " but values have dtype ", values.scalar_type());
}

template <typename index_t>
inline void check_row_pointer_ends(const char* op, const index_t* crow, int64_t n_rows,
                                   int64_t nnz) {
  TORCH_CHECK(crow[0] == 0, op, ": crow[0] must be 0, got ", (int64_t)crow[0]);
  TORCH_CHECK((int64_t)crow[n_rows] == nnz, op, ": crow[-1] must equal nnz = ", nnz, ", got ",
              (int64_t)crow[n_rows]);
}

}  // namespace torch_nerva
