// Topology helpers: CSR transpose with the value permutation, full CSR validation, and a
// probe that reports how many threads at::parallel_for really uses (guards a build that
// lost -fopenmp, where every kernel would silently run on one thread), and one that runs the
// kernels' chunk pool (pool.h) on chunks that only record who ran them.
#include "common.h"
#include "pool.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <set>
#include <tuple>
#include <vector>

namespace torch_nerva {
namespace cpu {
namespace {

// Validates crow/col as a sorted, duplicate-free CSR of shape (n_rows x n_cols).
template <typename index_t>
void check_csr_data(const char* op, const index_t* crow, const index_t* col, int64_t n_rows,
                    int64_t n_cols, int64_t nnz) {
  check_row_pointer_ends(op, crow, n_rows, nnz);
  // The whole row pointer first, so that a non-monotone one is reported as such (and not as
  // unsorted columns of a row it made too long).
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t start = crow[r], end = crow[r + 1];
    TORCH_CHECK(start <= end && end <= nnz, op, ": malformed row pointer: crow[", r, "] = ", start,
                " and crow[", r + 1, "] = ", end, " (must be non-decreasing and <= nnz = ", nnz,
                ")");
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t start = crow[r], end = crow[r + 1];
    for (int64_t k = start; k < end; ++k) {
      const int64_t c = col[k];
      TORCH_CHECK(c >= 0 && c < n_cols, op, ": column index out of range in row ", r,
                  " at position ", k, ": ", c, " not in [0, ", n_cols, ")");
      if (k > start) {
        const int64_t prev = col[k - 1];
        TORCH_CHECK(c != prev, op, ": duplicate column index ", c, " in row ", r,
                    " at position ", k);
        TORCH_CHECK(c > prev, op, ": column indices of row ", r, " are not sorted: ", prev,
                    " then ", c, " at position ", k);
      }
    }
  }
}

void csr_check_cpu(const at::Tensor& crow, const at::Tensor& col, int64_t n_rows, int64_t n_cols) {
  const char* op = "torch_nerva.csr_check";
  check_devices(op, at::kCPU, {{"crow", &crow}, {"col", &col}});
  check_index_pair(op, crow, col);
  TORCH_CHECK(n_rows >= 0 && n_cols >= 0, op, ": shape must be non-negative, got (", n_rows, ", ",
              n_cols, ")");
  TORCH_CHECK(crow.numel() == n_rows + 1, op, ": crow must have n_rows + 1 = ", n_rows + 1,
              " entries, got ", crow.numel());
  if (crow.scalar_type() == at::kInt) {
    TORCH_CHECK(n_rows <= std::numeric_limits<int32_t>::max() &&
                    n_cols <= std::numeric_limits<int32_t>::max(),
                op, ": shape (", n_rows, ", ", n_cols, ") does not fit int32 indices; use int64");
  }
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
    check_csr_data<index_t>(op, crow_c.data_ptr<index_t>(), col_c.data_ptr<index_t>(), n_rows,
                            n_cols, col.numel());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(const at::Tensor& crow,
                                                                 const at::Tensor& col,
                                                                 int64_t n_cols) {
  const char* op = "torch_nerva.csr_transpose";
  check_devices(op, at::kCPU, {{"crow", &crow}, {"col", &col}});
  check_index_pair(op, crow, col);
  TORCH_CHECK(n_cols >= 0, op, ": n_cols must be non-negative, got ", n_cols);
  const int64_t n_rows = crow.numel() - 1, nnz = col.numel();
  at::Tensor crow_t = at::zeros({n_cols + 1}, crow.options());
  at::Tensor col_t = at::empty({nnz}, crow.options());
  at::Tensor perm = at::empty({nnz}, crow.options());
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
    const index_t* rp = crow_c.data_ptr<index_t>();
    const index_t* cp = col_c.data_ptr<index_t>();
    check_row_pointer_ends(op, rp, n_rows, nnz);
    index_t* tp = crow_t.data_ptr<index_t>();
    // Count the nonzeros of every column (validating as we go), then prefix-sum.
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t start = rp[r], end = rp[r + 1];
      TORCH_CHECK(start <= end && end <= nnz, op, ": malformed row pointer at row ", r, ": [",
                  start, ", ", end, ")");
      for (int64_t k = start; k < end; ++k) {
        const int64_t c = cp[k];
        TORCH_CHECK(c >= 0 && c < n_cols, op, ": column index out of range at position ", k,
                    ": ", c, " not in [0, ", n_cols, ")");
        tp[c + 1] += 1;
      }
    }
    for (int64_t c = 0; c < n_cols; ++c) tp[c + 1] += tp[c];
    // Scatter in row order: every transposed row comes out sorted by original row. tp[c] serves
    // as column c's next free slot (no second array of n_cols entries: peak memory stays the
    // output's); afterwards tp[c] holds the old tp[c + 1], so it is shifted back by one.
    index_t* ct = col_t.data_ptr<index_t>();
    index_t* pp = perm.data_ptr<index_t>();
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
        const index_t pos = tp[cp[k]]++;
        ct[pos] = (index_t)r;
        pp[pos] = (index_t)k;
      }
    }
    for (int64_t c = n_cols; c > 0; --c) tp[c] = tp[c - 1];
    tp[0] = 0;
  });
  return {crow_t, col_t, perm};
}

at::Tensor parallel_probe_cpu(int64_t n) {
  std::mutex mu;
  std::set<int> seen;
  at::parallel_for(0, std::max<int64_t>(n, 1), 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    std::lock_guard<std::mutex> lock(mu);
    seen.insert(id);
  });
  return at::scalar_tensor((int64_t)seen.size(), at::TensorOptions().dtype(at::kLong));
}

// Runs n_chunks chunks on the pool with n_threads threads, each chunk busy for spin_us
// microseconds; returns (how many times each chunk ran, a small id of the thread that ran it,
// 0 being the calling thread).
std::tuple<at::Tensor, at::Tensor> schedule_probe_cpu(int64_t n_chunks, int64_t n_threads,
                                                      int64_t spin_us) {
  TORCH_CHECK(n_chunks >= 0 && n_threads >= 1 && spin_us >= 0,
              "torch_nerva._schedule_probe: needs n_chunks >= 0, n_threads >= 1, spin_us >= 0");
  at::Tensor counts = at::zeros({n_chunks}, at::TensorOptions().dtype(at::kLong));
  at::Tensor who = at::full({n_chunks}, -1, at::TensorOptions().dtype(at::kLong));
  std::vector<std::atomic<int64_t>> ran(n_chunks);
  for (auto& r : ran) r.store(0);
  std::vector<std::thread::id> ids(n_chunks);
  const std::thread::id caller = std::this_thread::get_id();
  parallel_chunks(n_chunks, n_threads, [&](int64_t i) {
    ran[i].fetch_add(1);
    ids[i] = std::this_thread::get_id();
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
    while (std::chrono::steady_clock::now() < end) {
    }
  });
  std::map<std::thread::id, int64_t> small{{caller, 0}};
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* w = who.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_chunks; ++i) {
    c[i] = ran[i].load();
    auto it = small.find(ids[i]);
    if (it == small.end()) it = small.emplace(ids[i], (int64_t)small.size()).first;
    w[i] = it->second;
  }
  return {counts, who};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("csr_check", &csr_check_cpu);
  m.impl("csr_transpose", &csr_transpose_cpu);
}

// The probe takes no tensor, so it is registered for every dispatch key.
TORCH_LIBRARY_IMPL(torch_nerva, CompositeExplicitAutograd, m) {
  m.impl("_parallel_probe", &parallel_probe_cpu);
  m.impl("_schedule_probe", &schedule_probe_cpu);
  m.impl("_scheduler", [](const std::string& name) { return scheduler(name); });
  m.impl("_stall_guard", [](const std::string& action, int64_t delay) {
    return stall_guard(action, delay);
  });
}

}  // namespace cpu
}  // namespace torch_nerva
