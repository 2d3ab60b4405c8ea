// Typed dispatcher handles of the ops that other kernels call back into (the autograd and
// autocast kernels redispatch to sparse_linear below their own key). One definition of each
// signature, so a schema change is made in one place besides csrc/torch_nerva.cpp.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace torch_nerva {

inline const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>&
sparse_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_nerva::sparse_linear", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&,
                                 const c10::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&)>();
  return op;
}

}  // namespace torch_nerva
