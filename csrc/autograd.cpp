// Autograd of sparse_linear, in C++ so that neither the forward nor the backward passes through
// Python (at low density the Python autograd machinery cost more than the kernels).
//
//   dX      = dY W              the SpMM kernel on the cached transpose (no atomics)
//   dvalues = (dY^T X)[pattern] the SDDMM kernel, from the transposed input saved by the forward
//   dbias   = sum_b dY
//
// Only the gradients autograd asks for are computed. Double backward is not supported: a
// backward with create_graph=True through this op raises.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

#include <string>

namespace torch_nerva {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SparseLinearFunction : public torch::autograd::Function<SparseLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& crow_t, const at::Tensor& col_t,
                               const at::Tensor& perm, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xt] =
        sparse_linear_op().call(x, values, bias, crow, col, crow_t, col_t, perm, backend);
    ctx->mark_non_differentiable({xt});
    ctx->set_materialize_grads(false);
    const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
    ctx->saved_data["bias_grad"] = bias_grad;
    ctx->saved_data["backend"] = std::string(backend);  // the backward uses the same backend
    // The transposed input is needed only for dvalues.
    ctx->save_for_backward({values.requires_grad() ? xt : at::Tensor(), values, crow, col,
                            crow_t, col_t, perm});
    return {y, xt};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    variable_list out(9);
    if (!grad.defined()) return out;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "torch_nerva.sparse_linear: double backward (create_graph=True) is not "
                "supported");
    const variable_list saved = ctx->get_saved_variables();
    // x and values are always the first two inputs; bias, when given, the third.
    const bool input_grad = ctx->needs_input_grad(0);
    const bool values_grad = ctx->needs_input_grad(1);
    const at::Tensor xt = saved[0].defined() ? saved[0] : saved[1].new_empty({0, 0});
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    auto [grad_x, grad_values] =
        sparse_linear_backward_op().call(grad, xt, saved[1], saved[2], saved[3], saved[4],
                                         saved[5], saved[6], input_grad, values_grad, backend);
    if (input_grad) out[0] = grad_x;
    if (values_grad) out[1] = grad_values;
    if (ctx->saved_data["bias_grad"].toBool()) out[2] = grad.sum(0);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> sparse_linear_autograd(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, c10::string_view backend) {
  auto out =
      SparseLinearFunction::apply(x, values, bias, crow, col, crow_t, col_t, perm, backend);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, Autograd, m) {
  m.impl("sparse_linear", &sparse_linear_autograd);
}

}  // namespace torch_nerva
