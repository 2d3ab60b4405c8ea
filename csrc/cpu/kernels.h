// Interface between the ATen-side ops and the per-ISA kernel builds.
//
// The kernels (kernels_impl.h) are plain C++ over raw pointers, compiled once per instruction
// set (kernels_avx512.cpp, kernels_avx2.cpp, kernels_base.cpp) into separate namespaces, and
// chosen at run time by what the CPU supports. They include no library headers, so no inline
// function compiled for AVX-512 can be picked by the linker for another instruction set.
#pragma once

#include <cstdint>

namespace torch_nerva {
namespace cpu {

// 16-bit storage types, bit-compatible with c10::BFloat16 and c10::Half (one uint16_t each).
// The kernels store activations, values and results in them and accumulate in float32
// (acc_t); every conversion is explicit (widen / narrow in kernels_impl.h).
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// The accumulation type of a storage type: itself for float and double, float for 16-bit.
template <typename S>
struct Acc {
  typedef S type;
};
template <>
struct Acc<bf16> {
  typedef float type;
};
template <>
struct Acc<fp16> {
  typedef float type;
};
template <typename S>
using acc_t = typename Acc<S>::type;

// The first malformed index a chunk of rows met (-1: none).
struct KernelError {
  int64_t row = -1;   // a row whose [crow[r], crow[r+1]) is not a range inside [0, nnz]
  int64_t pos = -1;   // a position whose column index is out of range
  int64_t perm = -1;  // a position whose perm entry is out of range
};

// Y^T (n_out x ld) = (X W^T (+ bias))^T, W in CSR (n_out rows). X is given transposed and
// padded: xt is (n_in x ld), ld >= batch, zero beyond batch; the value of nonzero k is
// values[perm[k]] when perm is set. Rows of yt are written whole (padding lanes included).
template <typename S, typename I>
struct SpmmArgs {
  const S* xt;
  int64_t batch, ld, n_in;
  const S* values;
  int64_t n_values;
  const I* crow;
  const I* col;
  const I* perm;
  const S* bias;
  int64_t n_out;
  S* yt;
  // With `clamp`, every output is min(max(y, lo), hi) (the Graph Challenge's ReLU capped at 32,
  // fused into the store; compared in the accumulation type, before rounding to S).
  bool clamp = false;
  acc_t<S> lo = 0, hi = 0;
};

// out[k] = sum_b G[b, row(k)] X[b, col(k)] with G and X transposed and padded alike:
// gt is (n_out x ld), xt is (n_in x ld). Summed in acc_t<S>, rounded to S once.
template <typename S, typename I>
struct SddmmArgs {
  const S* gt;
  const S* xt;
  int64_t ld, n_in;
  const I* crow;
  const I* col;
  int64_t n_out;
  S* out;
};

template <typename S, typename I>
struct KernelTable {
  // Rows [r0, r1) of the output.
  void (*spmm)(const SpmmArgs<S, I>&, int64_t r0, int64_t r1, KernelError&);
  void (*sddmm)(const SddmmArgs<S, I>&, int64_t r0, int64_t r1, KernelError&);
};

template <typename S>
struct TransposeTable {
  // xt[i * ld + b] = x[b * n + i] for b < batch, 0 for batch <= b < ld; features [i0, i1).
  // Returns whether any of the values copied is NaN or +-Inf (checked while the panel is in L1).
  bool (*transpose_pad)(const S* x, int64_t batch, int64_t n, int64_t ld, S* xt, int64_t i0,
                        int64_t i1);
  // Whether any of p[0, n) is NaN or +-Inf.
  bool (*any_nonfinite)(const S* p, int64_t n);
  // y[b * n + i] = yt[i * ld + b] for b < batch; features [i0, i1).
  void (*untranspose)(const S* yt, int64_t batch, int64_t n, int64_t ld, S* y, int64_t i0,
                      int64_t i1);
};

// Per-ISA entry points (defined in kernels_<isa>.cpp).
#define TORCH_NERVA_DECLARE_ISA(isa)                        \
  namespace isa {                                           \
  template <typename S, typename I>                         \
  KernelTable<S, I> kernel_table();                         \
  template <typename S>                                     \
  TransposeTable<S> transpose_table();                      \
  }
TORCH_NERVA_DECLARE_ISA(avx512)
TORCH_NERVA_DECLARE_ISA(avx2)
TORCH_NERVA_DECLARE_ISA(base)
#undef TORCH_NERVA_DECLARE_ISA

// Lanes of one 64-byte vector of the accumulation type (an AVX-512 register of float or
// double): the batch padding unit. 16-bit types pad like float (16 lanes): their accumulators
// are floats, and padding to 32 would cost up to 14% more work at batch 100 for nothing.
template <typename S>
constexpr int64_t lanes() {
  return 64 / static_cast<int64_t>(sizeof(acc_t<S>));
}

// The padded leading dimension for a batch: the batch itself when it is narrower than one
// vector (batch-1 inference pays no padding), else rounded up to whole vectors.
template <typename S>
inline int64_t padded_ld(int64_t batch) {
  const int64_t l = lanes<S>();
  return batch < l ? batch : (batch + l - 1) / l * l;
}

}  // namespace cpu
}  // namespace torch_nerva
