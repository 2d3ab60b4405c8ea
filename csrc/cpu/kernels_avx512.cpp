// The CSR kernels built for one instruction set; see kernels.h and kernels_impl.h.
#include "kernels.h"

#include <immintrin.h>

#define TORCH_NERVA_AVX2 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace torch_nerva {
namespace cpu {
namespace avx512 {
#include "kernels_impl.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace torch_nerva
#pragma GCC pop_options
