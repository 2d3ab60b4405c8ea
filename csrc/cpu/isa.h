// Instruction-set dispatch: which per-ISA build of the kernels (kernels.h) the ops call.
#pragma once

#include "kernels.h"

namespace torch_nerva {
namespace cpu {

enum class Isa { base, avx2, avx512 };

// The instruction set in use: TORCH_NERVA_ISA when set, else the best this CPU supports;
// the _kernel_isa op changes it.
Isa& active_isa();

template <typename S, typename I>
KernelTable<S, I> kernels() {
  switch (active_isa()) {
    case Isa::avx512: return avx512::kernel_table<S, I>();
    case Isa::avx2: return avx2::kernel_table<S, I>();
    default: return base::kernel_table<S, I>();
  }
}

template <typename S>
TransposeTable<S> transposes() {
  switch (active_isa()) {
    case Isa::avx512: return avx512::transpose_table<S>();
    case Isa::avx2: return avx2::transpose_table<S>();
    default: return base::transpose_table<S>();
  }
}

}  // namespace cpu
}  // namespace torch_nerva
