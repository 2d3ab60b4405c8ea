// The CSR kernels built for one instruction set; see kernels.h and kernels_impl.h.
#include "kernels.h"

#include <immintrin.h>

#define TORCH_NERVA_AVX2 1

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace torch_nerva {
namespace cpu {
namespace avx2 {
#include "kernels_impl.h"
}  // namespace avx2
}  // namespace cpu
}  // namespace torch_nerva
#pragma GCC pop_options
