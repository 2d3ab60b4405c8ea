// Forward SpMM Y = X W^T (+ bias) and the differentiable sparse_linear forward.
//
// X is transposed once to (in x B) so that each nonzero W[r, c] adds v * X^T[c, :] to a
// length-B accumulator: contiguous, vectorizable over the batch, no atomics (each thread
// owns whole output rows). The same kernel on the transposed layout gives dX = dY W.
#include "common.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace torch_nerva {
namespace cpu {
namespace {

template <typename scalar_t, typename index_t>
void spmm_kernel(const scalar_t* xt, int64_t batch, int64_t n_in, const scalar_t* values,
                 int64_t n_values, const index_t* crow, const index_t* col, const index_t* perm,
                 const scalar_t* bias, int64_t n_out, scalar_t* y, IndexErrors& errors) {
  const int64_t n_pos = (int64_t)crow[n_out];
  at::parallel_for(0, n_out, row_grain(n_pos, n_out, batch), [&](int64_t r0, int64_t r1) {
    std::vector<scalar_t> acc(batch);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t init = bias ? bias[r] : scalar_t(0);
      std::fill(acc.begin(), acc.end(), init);
      const int64_t start = crow[r], end = crow[r + 1];
      if (start < 0 || end < start || end > n_pos) {
        IndexErrors::record(errors.bad_row, r);
        continue;
      }
      for (int64_t k = start; k < end; ++k) {
        const int64_t c = col[k];
        if (c < 0 || c >= n_in) {
          IndexErrors::record(errors.bad_pos, k);
          continue;
        }
        int64_t p = k;
        if (perm) {
          p = perm[k];
          if (p < 0 || p >= n_values) {
            IndexErrors::record(errors.bad_perm, k);
            continue;
          }
        }
        axpy<scalar_t>(batch, values[p], xt + c * batch, acc.data());
      }
      for (int64_t b = 0; b < batch; ++b) y[b * n_out + r] = acc[b];
    }
  });
}

at::Tensor spmm_impl(const char* op, const at::Tensor& x, const at::Tensor& values,
                     const at::Tensor& crow, const at::Tensor& col,
                     const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch x in_features), got shape ", x.sizes());
  check_index_pair(op, crow, col);
  check_values(op, values, x, "x");
  const int64_t n_out = crow.numel() - 1;
  const int64_t batch = x.size(0), n_in = x.size(1);
  const int64_t n_pos = col.numel();
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 1 && perm->numel() == n_pos, op,
                ": perm must be 1-D with nnz = ", n_pos, " entries, got shape ", perm->sizes());
    TORCH_CHECK(perm->scalar_type() == crow.scalar_type(), op,
                ": perm must have the index dtype ", crow.scalar_type(), ", got ",
                perm->scalar_type());
  } else {
    TORCH_CHECK(values.numel() == n_pos, op, ": values has ", values.numel(),
                " entries but the layout has nnz = ", n_pos);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n_out, op, ": bias must have shape (",
                n_out, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but x has dtype ", x.scalar_type());
  }
  at::Tensor y = at::empty({batch, n_out}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (batch == 0 || n_out == 0) return y;
  // (in x B) contiguous; a free view when batch == 1 and x is contiguous.
  const at::Tensor xt = x.t().contiguous();
  const at::Tensor vals = values.contiguous();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor perm_c = perm.has_value() ? perm->contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "torch_nerva", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      const index_t* crow_p = crow_c.data_ptr<index_t>();
      check_row_pointer_ends(op, crow_p, n_out, n_pos);
      const index_t* col_p = col_c.data_ptr<index_t>();
      const index_t* perm_p = perm_c.defined() ? perm_c.data_ptr<index_t>() : nullptr;
      IndexErrors errors;
      spmm_kernel<scalar_t, index_t>(xt.data_ptr<scalar_t>(), batch, n_in,
                                     vals.data_ptr<scalar_t>(), vals.numel(), crow_p, col_p,
                                     perm_p, bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr,
                                     n_out, y.data_ptr<scalar_t>(), errors);
      errors.raise_if_any(op, crow_p, col_p, n_in, perm_p, vals.numel());
    });
  });
  return y;
}

at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                        const at::Tensor& col, const c10::optional<at::Tensor>& perm,
                        const c10::optional<at::Tensor>& bias) {
  return spmm_impl("torch_nerva.csr_spmm", x, values, crow, col, perm, bias);
}

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& crow,
                             const at::Tensor& col, const at::Tensor& crow_t,
                             const at::Tensor& col_t, const at::Tensor& perm) {
  const char* op = "torch_nerva.sparse_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch x in_features), got shape ", x.sizes());
  check_index_pair(op, crow_t, col_t);
  TORCH_CHECK(x.size(1) == crow_t.numel() - 1, op, ": x has ", x.size(1),
              " features but the layer has in_features = ", crow_t.numel() - 1);
  TORCH_CHECK(col_t.numel() == col.numel() && perm.numel() == col.numel() &&
                  values.numel() == col.numel(),
              op, ": inconsistent layout: nnz is ", col.numel(), " in col, ", col_t.numel(),
              " in col_t, ", perm.numel(), " in perm and ", values.numel(), " in values");
  return spmm_impl(op, x, values, crow, col, c10::nullopt, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
}

}  // namespace cpu
}  // namespace torch_nerva
