// Shared argument checks and small vector helpers for the native CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <limits>

namespace torch_nerva {
namespace cpu {

// Checks that do not read index data: ranks, dtypes, lengths. The per-element
// checks (row pointer monotone, column in range) are done inside the kernels as
// they read each index, so a malformed layout raises instead of reading out of
// bounds, at no extra pass over the data.
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

inline void check_values(const char* op, const at::Tensor& values, const at::Tensor& x,
                         const char* x_name) {
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D (nnz), got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": ", x_name, " has dtype ",
              x.scalar_type(), " but values have dtype ", values.scalar_type(),
              "; cast one to match");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", x.scalar_type());
}

// Records the first malformed index seen by any thread; raised after the parallel region.
struct IndexErrors {
  std::atomic<int64_t> bad_row{-1};   // a row whose [crow[r], crow[r+1]) is not inside [0, nnz]
  std::atomic<int64_t> bad_pos{-1};   // a position k whose column index is out of range
  std::atomic<int64_t> bad_perm{-1};  // a position k whose perm entry is out of range

  static void record(std::atomic<int64_t>& slot, int64_t where) {
    int64_t expected = -1;
    slot.compare_exchange_strong(expected, where);
  }

  template <typename index_t>
  void raise_if_any(const char* op, const index_t* crow, const index_t* col, int64_t n_cols,
                    const index_t* perm, int64_t n_values) const {
    const int64_t r = bad_row.load();
    TORCH_CHECK(r < 0, op, ": malformed row pointer: row ", r, " spans [", (int64_t)crow[r], ", ",
                (int64_t)crow[r + 1], ") which is not a non-decreasing range inside [0, nnz]");
    const int64_t k = bad_pos.load();
    TORCH_CHECK(k < 0, op, ": column index out of range at position ", k, ": ", (int64_t)col[k],
                " not in [0, ", n_cols, ")");
    const int64_t p = bad_perm.load();
    TORCH_CHECK(p < 0, op, ": perm index out of range at position ", p, ": ",
                (perm ? (int64_t)perm[p] : -1), " not in [0, ", n_values, ")");
  }
};

template <typename index_t>
inline void check_row_pointer_ends(const char* op, const index_t* crow, int64_t n_rows,
                                   int64_t nnz) {
  TORCH_CHECK(crow[0] == 0, op, ": crow[0] must be 0, got ", (int64_t)crow[0]);
  TORCH_CHECK((int64_t)crow[n_rows] == nnz, op, ": crow[-1] must equal nnz = ", nnz, ", got ",
              (int64_t)crow[n_rows]);
}

// Parallel grain (in rows) so that a chunk has at least ~16k multiply-adds of work.
inline int64_t row_grain(int64_t nnz, int64_t n_rows, int64_t batch) {
  const int64_t work_per_row = std::max<int64_t>(1, (nnz / std::max<int64_t>(1, n_rows)) * batch);
  return std::max<int64_t>(1, 16384 / work_per_row);
}

// y[0:n] += a * x[0:n]
template <typename scalar_t>
inline void axpy(int64_t n, scalar_t a, const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// sum_i a[i] * b[i], with 8 independent partial sums so the compiler can vectorize.
template <typename scalar_t>
inline scalar_t dot(int64_t n, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b) {
  scalar_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  }
  scalar_t tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

}  // namespace cpu
}  // namespace torch_nerva
