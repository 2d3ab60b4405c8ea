// The sparse_linear forward and backward ops on the CPU, for the backends "native" (the
// transposed layout of spmm.h) and "mkl" (csrc/mkl/: forward and dX by MKL on the row-major
// tensors, dvalues by the native SDDMM, as torch's MKL has no sampled product). On both, the
// forward returns the input transposed to (in x ld) (never an alias of x), so that the
// backward computes dvalues without transposing it again.
#include "common.h"
#include "kernels.h"
#include "spmm.h"
#include "transpose.h"
#include "../backend.h"
#include "../mkl/spmm_mkl.h"
#include "../nonfinite.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

namespace torch_nerva {
namespace cpu {
namespace {

// The backend of a CPU kernel: native or mkl (cusparse raises, naming the device).
Backend cpu_backend(const char* op, c10::string_view name) {
  const Backend b = parse_backend(op, name);
  if (b == Backend::cusparse) raise_wrong_device(op, b, at::kCPU);
  return b;
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_cpu(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, c10::string_view backend) {
  const char* op = "torch_nerva.sparse_linear";
  const Backend which = cpu_backend(op, backend);
  check_spmm_args(op, x, values, crow, col, c10::nullopt, bias);
  check_linear_layout(op, at::kCPU, values, crow, col, crow_t, col_t, perm);
  TORCH_CHECK(x.size(1) == crow_t.numel() - 1, op, ": x has ", x.size(1),
              " features but the layer has in_features = ", crow_t.numel() - 1);
  bool nonfinite = false;
  at::Tensor xt = transpose_padded(x, &nonfinite);
  at::Tensor y;
  if (which == Backend::mkl) {
    y = mkl::spmm(op, x, values, crow, col, x.size(1), /*transpose=*/false);
    if (bias.has_value()) y.add_(*bias);  // after the product, as the dense x W^T + b
  } else {
    y = spmm_transposed(op, xt, x.size(0), values, crow, col, at::Tensor(),
                        bias.value_or(at::Tensor()));
  }
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
    const at::Tensor& col_t, const at::Tensor& perm, bool input_grad, bool values_grad,
    c10::string_view backend) {
  const char* op = "torch_nerva.sparse_linear_backward";
  const Backend which = cpu_backend(op, backend);
  check_linear_layout(op, at::kCPU, values, crow, col, crow_t, col_t, perm);
  check_linear_grad(op, grad, values, crow);
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
  at::Tensor grad_x;
  if (!input_grad) {
    grad_x = at::empty({0}, grad.options());
  } else if (which == Backend::mkl) {  // dX^T = W^T dY^T: MKL's transposed product on W's CSR
    grad_x = mkl::spmm(op, grad, values, crow, col, crow_t.numel() - 1, /*transpose=*/true);
  } else {
    grad_x = spmm_transposed(op, gt, batch, values, crow_t, col_t, perm, at::Tensor());
  }
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
