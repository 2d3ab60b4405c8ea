// Shared helpers of the native CPU kernels: the device-independent checks (csrc/checks.h),
// made visible in torch_nerva::cpu, and the map from ATen's scalar types to the kernels'
// storage types (kernels.h).
#pragma once

#include "../checks.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace torch_nerva {
namespace cpu {

using torch_nerva::check_bias;
using torch_nerva::check_devices;
using torch_nerva::check_index_pair;
using torch_nerva::check_linear_grad;
using torch_nerva::check_linear_layout;
using torch_nerva::check_row_pointer_ends;
using torch_nerva::check_values;

// The kernels' storage type of an ATen scalar type: c10::BFloat16 and c10::Half are one
// uint16_t each, like bf16 and fp16, so their data pointers are reinterpreted.
template <typename T>
struct KernelType {
  typedef T type;
};
template <>
struct KernelType<c10::BFloat16> {
  typedef bf16 type;
};
template <>
struct KernelType<c10::Half> {
  typedef fp16 type;
};
template <typename T>
using kernel_t = typename KernelType<T>::type;
static_assert(sizeof(c10::BFloat16) == sizeof(bf16) && sizeof(c10::Half) == sizeof(fp16),
              "16-bit storage types must match ATen's");

template <typename T>
kernel_t<T>* kernel_data(const at::Tensor& t) {
  return reinterpret_cast<kernel_t<T>*>(t.data_ptr<T>());
}

}  // namespace cpu
}  // namespace torch_nerva

// The value types of the native kernels: float32, float64, bfloat16 and float16.
#define TORCH_NERVA_DISPATCH_VALUES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
