// Typed dispatcher handles of the ops that other kernels call back into (the autograd and
// autocast kernels redispatch to sparse_linear below their own key, the autograd kernel's
// backward calls sparse_linear_backward). One definition of each signature, so a schema change
// is made in one place besides csrc/torch_nerva.cpp.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace torch_nerva {

using SparseLinearSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view);

using SparseLinearBackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool,
    c10::string_view);

inline const c10::TypedOperatorHandle<SparseLinearSig>& sparse_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_nerva::sparse_linear", "")
                             .typed<SparseLinearSig>();
  return op;
}

inline const c10::TypedOperatorHandle<SparseLinearBackwardSig>& sparse_linear_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_nerva::sparse_linear_backward", "")
                             .typed<SparseLinearBackwardSig>();
  return op;
}

}  // namespace torch_nerva
