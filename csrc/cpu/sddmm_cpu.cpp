// Weight-values gradient by SDDMM: dvalues[k] = <dY[:, row(k)], X[:, col(k)]>, computed only
// at W's nonzeros (never the dense dY^T X). Both operands are transposed once to (features x B)
// so every nonzero is one contiguous dot product of length B. Each thread owns whole rows.
#include "common.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace torch_nerva {
namespace cpu {
namespace {

template <typename scalar_t, typename index_t>
void sddmm_kernel(const scalar_t* gt, const scalar_t* xt, int64_t batch, int64_t n_in,
                  const index_t* crow, const index_t* col, int64_t n_out, scalar_t* out,
                  IndexErrors& errors) {
  const int64_t nnz = crow[n_out];
  at::parallel_for(0, n_out, row_grain(nnz, n_out, batch), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t start = crow[r], end = crow[r + 1];
      if (start < 0 || end < start || end > nnz) {
        IndexErrors::record(errors.bad_row, r);
        continue;
      }
      const scalar_t* g = gt + r * batch;
      for (int64_t k = start; k < end; ++k) {
        const int64_t c = col[k];
        if (c < 0 || c >= n_in) {
          IndexErrors::record(errors.bad_pos, k);
          out[k] = 0;
          continue;
        }
        out[k] = dot<scalar_t>(batch, g, xt + c * batch);
      }
    }
  });
}

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                         const at::Tensor& col) {
  const char* op = "torch_nerva.csr_sddmm";
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2, op,
              ": grad_out and x must be 2-D, got shapes ", grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out has batch ", grad_out.size(0),
              " but x has batch ", x.size(0));
  check_index_pair(op, crow, col);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", x.scalar_type());
  const int64_t n_out = crow.numel() - 1;
  TORCH_CHECK(grad_out.size(1) == n_out, op, ": grad_out has ", grad_out.size(1),
              " columns but the layout has ", n_out, " rows");
  const int64_t batch = x.size(0), n_in = x.size(1), nnz = col.numel();
  at::Tensor out = at::empty({nnz}, x.options());
  if (nnz == 0) return out;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  if (batch == 0) {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      check_row_pointer_ends(op, crow_c.data_ptr<index_t>(), n_out, nnz);
    });
    return out.zero_();
  }
  const at::Tensor gt = grad_out.t().contiguous();
  const at::Tensor xt = x.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "torch_nerva", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      const index_t* crow_p = crow_c.data_ptr<index_t>();
      const index_t* col_p = col_c.data_ptr<index_t>();
      check_row_pointer_ends(op, crow_p, n_out, nnz);
      IndexErrors errors;
      sddmm_kernel<scalar_t, index_t>(gt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), batch,
                                      n_in, crow_p, col_p, n_out, out.data_ptr<scalar_t>(),
                                      errors);
      errors.raise_if_any<index_t>(op, crow_p, col_p, n_in, nullptr, 0);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) { m.impl("csr_sddmm", &csr_sddmm_cpu); }

}  // namespace cpu
}  // namespace torch_nerva
