// The padded transposes (transpose.h) on the CPU, through the per-ISA transpose kernels,
// parallel over panels of features claimed from the pool (pool.h, schedule.h).
#include "transpose.h"

#include "common.h"
#include "isa.h"
#include "schedule.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace torch_nerva {
namespace cpu {
namespace {

// Runs f(i0, i1) over panels of features [0, n) that cover it exactly once: whole
// 16-feature tiles, serial below 64k elements (n x ld) as before, otherwise chunks as for
// the SpMM phases (schedule.h).
template <typename F>
void parallel_panels(int64_t n, int64_t ld, const F& f) {
  const int64_t elems = n * std::max<int64_t>(ld, 1);
  const int64_t tiles = (n + 15) / 16;
  const int64_t chunks = elems < 65536 ? 1 : phase_chunks(elems, phase_threads(), tiles);
  if (chunks <= 1) {
    f(0, n);
    return;
  }
  parallel_chunks(chunks, phase_threads(), [&](int64_t t) {
    const int64_t i0 = std::min(n, tiles * t / chunks * 16);
    const int64_t i1 = std::min(n, tiles * (t + 1) / chunks * 16);
    if (i0 < i1) f(i0, i1);
  });
}

}  // namespace

at::Tensor transpose_padded(const at::Tensor& x, bool* nonfinite) {
  const at::Tensor xc = x.contiguous();
  const int64_t batch = xc.size(0), n = xc.size(1);
  at::Tensor xt;
  TORCH_NERVA_DISPATCH_VALUES(xc.scalar_type(), "torch_nerva", [&] {
    typedef kernel_t<scalar_t> S;
    const int64_t ld = padded_ld<S>(batch);
    xt = at::empty({n, ld}, xc.options());
    if (n == 0 || ld == 0) return;
    const auto table = transposes<S>();
    const S* src = kernel_data<scalar_t>(xc);
    if (batch == 1) {  // (1 x n) and (n x 1) share one memory order
      xt.view({1, n}).copy_(xc);
      if (nonfinite) *nonfinite = table.any_nonfinite(src, n);
      return;
    }
    S* dst = kernel_data<scalar_t>(xt);
    std::atomic<bool> found{false};
    parallel_panels(n, ld, [&](int64_t i0, int64_t i1) {
      if (table.transpose_pad(src, batch, n, ld, dst, i0, i1)) {
        found.store(true, std::memory_order_relaxed);
      }
    });
    if (nonfinite) *nonfinite = found.load();
  });
  return xt;
}

at::Tensor untranspose(const at::Tensor& yt, int64_t batch) {
  const int64_t n = yt.size(0), ld = yt.size(1);
  if (batch == 1) return yt.view({1, n});  // fresh tensor, same memory order
  at::Tensor y = at::empty({batch, n}, yt.options());
  if (n == 0 || batch == 0) return y;
  TORCH_NERVA_DISPATCH_VALUES(yt.scalar_type(), "torch_nerva", [&] {
    typedef kernel_t<scalar_t> S;
    const auto fn = transposes<S>().untranspose;
    const S* src = kernel_data<scalar_t>(yt);
    S* dst = kernel_data<scalar_t>(y);
    parallel_panels(n, ld, [&](int64_t i0, int64_t i1) {
      fn(src, batch, n, ld, dst, i0, i1);
    });
  });
  return y;
}

}  // namespace cpu
}  // namespace torch_nerva
