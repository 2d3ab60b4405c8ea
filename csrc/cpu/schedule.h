// The parallel row schedule of the SpMM / SDDMM drivers: chunks own whole output rows, split
// so that each gets about the same number of nonzeros, claimed by threads from the pool
// (pool.h): no atomics on results, results independent of the thread count. Then one error
// report for the malformed indices the kernels met.
#pragma once

#include "kernels.h"
#include "pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace torch_nerva {
namespace cpu {

// The thread count of a parallel phase: torch's, or 1 inside an OpenMP region or a chunk of
// the pool (nested ops run serially).
inline int64_t phase_threads() {
  if (at::in_parallel_region() || in_pool_chunk()) return 1;
  return std::max<int64_t>(1, at::get_num_threads());
}

// How many chunks a phase of `work` units is split into on `threads` threads: serial below
// 16384 units (about 10 us of SpMM; 32768 before, lowered so that the first layer of a
// batch-1 inference runs on 2 threads: paper MLP 34 -> 28 us, docs/scheduling.md); otherwise
// more chunks than threads (up to 8 per thread, at least ~16k units each), so that a thread the
// OS has descheduled leaves little for the others to wait on.
inline int64_t phase_chunks(int64_t work, int64_t threads, int64_t max_chunks) {
  if (work < 16384 || threads <= 1) return 1;
  const int64_t want = std::max<int64_t>(threads, std::min<int64_t>(8 * threads, work / 16384));
  return std::max<int64_t>(1, std::min(want, max_chunks));
}

// Splits rows [0, n_rows) into chunks of about equal nnz + rows each (crow[r] + r is
// non-decreasing for a valid layout; for a malformed one the split is forced monotone so that
// every row is still visited, and checked, exactly once) and runs them on the pool (pool.h).
// Each output row is written by exactly one chunk, so results do not depend on the split or the
// thread count. `err` receives the first malformed index found of each kind, in row order.
template <typename I, typename F>
void parallel_rows(const I* crow, int64_t n_rows, int64_t batch, KernelError& err,
                   const F& body) {
  const int64_t nnz = crow[n_rows];
  const int64_t cost = std::max<int64_t>(nnz, 0) + n_rows;
  const int64_t work = cost * std::max<int64_t>(batch, 1);
  const int64_t chunks = phase_chunks(work, phase_threads(), n_rows);
  if (chunks <= 1) {
    body(0, n_rows, err);
    return;
  }
  std::vector<int64_t> split(chunks + 1, n_rows);
  split[0] = 0;
  for (int64_t t = 1; t < chunks; ++t) {
    const int64_t target = cost * t / chunks;
    int64_t lo = 0, hi = n_rows;  // first r with crow[r] + r >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if ((int64_t)crow[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    split[t] = std::max(lo, split[t - 1]);
  }
  std::vector<KernelError> errors(chunks);
  parallel_chunks(chunks, phase_threads(),
                  [&](int64_t t) { body(split[t], split[t + 1], errors[t]); });
  for (const KernelError& e : errors) {
    if (err.row < 0) err.row = e.row;
    if (err.pos < 0) err.pos = e.pos;
    if (err.perm < 0) err.perm = e.perm;
  }
}

template <typename I>
void raise_if_any(const char* op, const KernelError& err, const I* crow, const I* col,
                  int64_t n_cols, const I* perm, int64_t n_values) {
  TORCH_CHECK(err.row < 0, op, ": malformed row pointer: row ", err.row, " spans [",
              (int64_t)crow[err.row], ", ", (int64_t)crow[err.row + 1],
              ") which is not a non-decreasing range inside [0, nnz]");
  TORCH_CHECK(err.pos < 0, op, ": column index out of range at position ", err.pos, ": ",
              (int64_t)col[err.pos], " not in [0, ", n_cols, ")");
  TORCH_CHECK(err.perm < 0, op, ": perm index out of range at position ", err.perm, ": ",
              (perm ? (int64_t)perm[err.perm] : -1), " not in [0, ", n_values, ")");
}

}  // namespace cpu
}  // namespace torch_nerva
