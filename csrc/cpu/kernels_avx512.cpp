// The CSR kernels built for one instruction set; see kernels.h and kernels_impl.h.
#include "kernels.h"

// GCC 12's AVX-512 headers initialise the "undefined" pass-through operand of intrinsics such
// as _mm512_cvtph_ps with itself, which -W(maybe-)uninitialized reports wherever they are inlined
// (a false positive: the operand is never read, the mask is all ones).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#define TORCH_NERVA_AVX2 1
#define TORCH_NERVA_AVX512 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace torch_nerva {
namespace cpu {
namespace avx512 {
#include "kernels_impl.h"
}  // namespace avx512
}  // namespace cpu
}  // namespace torch_nerva
#pragma GCC pop_options
