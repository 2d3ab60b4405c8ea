// The sparse_linear forward and backward ops on the CPU, on the transposed layout of spmm.h.
// The forward returns the transposed input so the backward does not transpose it again.
#include "common.h"
#include "kernels.h"
#include "spmm.h"
#include "transpose.h"
#include "../nonfinite.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

namespace torch_nerva {
namespace cpu {
namespace {

void check_linear_layout(const char* op, const at::Tensor& values, const at::Tensor& crow,
                         const at::Tensor& col, const at::Tensor& crow_t,
                         const at::Tensor& col_t, const at::Tensor& perm) {
  check_devices(op, at::kCPU, {{"values", &values}, {"crow", &crow}, {"col", &col},
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

std::tuple<at::Tensor, at::Tensor> sparse_linear_cpu(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm) {
  const char* op = "torch_nerva.sparse_linear";
  check_spmm_args(op, x, values, crow, col, c10::nullopt, bias);
  check_linear_layout(op, values, crow, col, crow_t, col_t, perm);
  TORCH_CHECK(x.size(1) == crow_t.numel() - 1, op, ": x has ", x.size(1),
              " features but the layer has in_features = ", crow_t.numel() - 1);
  bool nonfinite = false;
  at::Tensor xt = transpose_padded(x, &nonfinite);
  at::Tensor y = spmm_transposed(op, xt, x.size(0), values, crow, col, at::Tensor(),
                                 bias.value_or(at::Tensor()));
  if (nonfinite) {  // dense math's NaN/Inf semantics (csrc/nonfinite.h); rare
    apply_dense_nonfinite(y, x, [&](const at::Tensor& indicator) {
      return spmm_transposed(op, transpose_padded(indicator), indicator.size(0),
                             at::ones({col.numel()}, indicator.options()), crow, col,
                             at::Tensor(), at::Tensor());
    });
  }
  return {y, xt};
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& xt, const at::Tensor& values,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, bool input_grad, bool values_grad) {
  const char* op = "torch_nerva.sparse_linear_backward";
  check_linear_layout(op, values, crow, col, crow_t, col_t, perm);
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == crow.numel() - 1, op,
              ": grad must be (batch x out_features = ", crow.numel() - 1, "), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == values.scalar_type(), op, ": grad has dtype ",
              grad.scalar_type(), " but values have dtype ", values.scalar_type());
  check_devices(op, at::kCPU, {{"grad", &grad}, {"xt", &xt}});
  const int64_t batch = grad.size(0);
  // Every check on xt comes before anything reads it; the kernels read it through its data
  // pointer as one dense (in_features x ld) array, so any other strides (expanded, transposed,
  // sliced) are made contiguous first.
  at::Tensor xt_c;
  if (values_grad) {
    const int64_t ld = [&] {
      int64_t out = 0;
      TORCH_NERVA_DISPATCH_VALUES(values.scalar_type(), "torch_nerva",
                                  [&] { out = padded_ld<kernel_t<scalar_t>>(batch); });
      return out;
    }();
    TORCH_CHECK(xt.dim() == 2 && xt.size(0) == crow_t.numel() - 1 && xt.size(1) == ld, op,
                ": saved input must be (in_features x ld) = (", crow_t.numel() - 1, " x ", ld,
                ") for a batch of ", batch, ", got ", xt.sizes());
    TORCH_CHECK(xt.scalar_type() == values.scalar_type(), op, ": saved input has dtype ",
                xt.scalar_type(), " but values have dtype ", values.scalar_type());
    xt_c = xt.contiguous();
  }
  bool nonfinite = false;
  at::Tensor gt = transpose_padded(grad, input_grad ? &nonfinite : nullptr);
  at::Tensor grad_x = input_grad
      ? spmm_transposed(op, gt, batch, values, crow_t, col_t, perm, at::Tensor())
      : at::empty({0}, grad.options());
  if (nonfinite) {  // dense math's NaN/Inf semantics for dX = dY W (csrc/nonfinite.h); rare
    apply_dense_nonfinite(grad_x, grad, [&](const at::Tensor& indicator) {
      return spmm_transposed(op, transpose_padded(indicator), indicator.size(0),
                             at::ones({col_t.numel()}, indicator.options()), crow_t, col_t,
                             at::Tensor(), at::Tensor());
    });
  }
  at::Tensor grad_values = values_grad ? sddmm_transposed(op, gt, xt_c, crow, col)
                                       : at::empty({0}, grad.options());
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cpu);
}

}  // namespace cpu
}  // namespace torch_nerva
