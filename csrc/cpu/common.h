// Shared helpers of the native CPU kernels: the device-independent checks (csrc/checks.h),
// made visible in torch_nerva::cpu.
#pragma once

#include "../checks.h"

#include <ATen/Parallel.h>

namespace torch_nerva {
namespace cpu {

using torch_nerva::check_devices;
using torch_nerva::check_index_pair;
using torch_nerva::check_row_pointer_ends;
using torch_nerva::check_values;

}  // namespace cpu
}  // namespace torch_nerva
