// The CSR kernels built for one instruction set; see kernels.h and kernels_impl.h.
#include "kernels.h"

#pragma GCC push_options
// baseline x86-64 (SSE2): no target pragma
namespace torch_nerva {
namespace cpu {
namespace base {
#include "kernels_impl.h"
}  // namespace base
}  // namespace cpu
}  // namespace torch_nerva
#pragma GCC pop_options
