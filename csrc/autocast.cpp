// torch.autocast for the products that are linear layers: sparse_linear and csr_spmm behave
// like aten::linear, which autocast puts on its lower-precision list. Inside an autocast region
// for the tensors' device, the floating-point inputs (x, values, bias) are cast to the region's
// dtype (at::autocast::get_autocast_dtype: bfloat16 by default on the CPU, float16 on CUDA) and
// the op runs below autocast, so its outputs are in that dtype.
//
// The casts are ATen's own cached_cast (what aten::linear's autocast kernel uses): ordinary
// differentiable `to` calls, recorded by autograd (the Autocast keys sit above Autograd), so the
// gradient of a float32 `values` Parameter arrives in float32; a float32 leaf that requires grad
// is cast once per autocast region (the cache). float64 tensors and index tensors are not
// touched (autocast leaves float64 alone, as for aten::linear).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "op_handles.h"

namespace torch_nerva {
namespace {

using at::autocast::cached_cast;

template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> sparse_linear_autocast(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, c10::string_view backend) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return sparse_linear_op().call(cached_cast(dtype, x, device),
                                 cached_cast(dtype, values, device),
                                 cached_cast(dtype, bias, device), crow, col, crow_t, col_t, perm,
                                 backend);
}

template <c10::DeviceType device>
at::Tensor csr_spmm_autocast(const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& crow, const at::Tensor& col,
                             const c10::optional<at::Tensor>& perm,
                             const c10::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torch_nerva::csr_spmm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const c10::optional<at::Tensor>&)>();
  return op.call(cached_cast(dtype, x, device), cached_cast(dtype, values, device), crow, col,
                 perm, cached_cast(dtype, bias, device));
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, AutocastCPU, m) {
  m.impl("sparse_linear", &sparse_linear_autocast<c10::DeviceType::CPU>);
  m.impl("csr_spmm", &csr_spmm_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(torch_nerva, AutocastCUDA, m) {
  m.impl("sparse_linear", &sparse_linear_autocast<c10::DeviceType::CUDA>);
  m.impl("csr_spmm", &csr_spmm_autocast<c10::DeviceType::CUDA>);
}

}  // namespace torch_nerva
