// The SpMM / SDDMM ops and the sparse_linear forward and backward on the CPU.
//
// Layout (README "Design in brief"): activations are transposed once to (features x ld), ld the
// batch padded to whole 64-byte vectors, so every nonzero W[r, c] is a vector multiply-add of
// X^T[c, :] into row r's accumulator held in registers (forward, and dX on the transposed
// layout), or one vector dot product dY^T[r, :] . X^T[c, :] (SDDMM). The forward returns the
// transposed input so the backward does not transpose it again. Threads own whole output rows,
// split so that each gets about the same number of nonzeros: no atomics, results independent
// of the thread count.
#include "common.h"
#include "kernels.h"
#include "../nonfinite.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace torch_nerva {
namespace cpu {

// ---- instruction-set dispatch ---------------------------------------------------------------
namespace {

enum class Isa { base, avx2, avx512 };

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
}

const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "base";
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return Isa::avx2;
  if (name == "base") return Isa::base;
  TORCH_CHECK(false, "torch_nerva: unknown instruction set '", name,
              "' (expected avx512, avx2 or base)");
}

Isa best_isa() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::base;
}

Isa& active_isa() {
  static Isa isa = [] {
    const char* env = std::getenv("TORCH_NERVA_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    const Isa wanted = parse_isa(env);
    TORCH_CHECK(cpu_supports(wanted), "TORCH_NERVA_ISA=", env, ": this CPU does not support it");
    return wanted;
  }();
  return isa;
}

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

// Test and benchmark hook: "" reports the active instruction set, a name selects it.
std::string kernel_isa(const std::string& name) {
  if (!name.empty()) {
    const Isa wanted = parse_isa(name);
    TORCH_CHECK(cpu_supports(wanted), "torch_nerva: this CPU does not support ", name);
    active_isa() = wanted;
  }
  return isa_name(active_isa());
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::base}) {
    if (cpu_supports(isa)) out.push_back(isa_name(isa));
  }
  return out;
}

// ---- parallel schedule ------------------------------------------------------------------------

// Splits rows [0, n_rows) into one contiguous range per thread with about equal
// nnz + rows each (crow[r] + r is non-decreasing for a valid layout; for a malformed one the
// split is forced monotone so that every row is still visited, and checked, exactly once).
// `err` receives the first malformed index found, in row order.
template <typename I, typename F>
void parallel_rows(const I* crow, int64_t n_rows, int64_t batch, KernelError& err,
                   const F& body) {
  const int64_t nnz = crow[n_rows];
  const int64_t cost = std::max<int64_t>(nnz, 0) + n_rows;
  const int64_t work = cost * std::max<int64_t>(batch, 1);
  int64_t chunks = std::min<int64_t>(at::get_num_threads(), n_rows);
  if (work < 32768 || at::in_parallel_region()) chunks = 1;
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
  at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) body(split[t], split[t + 1], errors[t]);
  });
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

// Features per parallel chunk of a transpose: ~64k elements, whole 16-feature tiles.
int64_t transpose_grain(int64_t ld) {
  return std::max<int64_t>(16, 65536 / std::max<int64_t>(ld, 1)) / 16 * 16;
}

// (batch x n) -> (n x ld) transposed, zero-padded to ld = padded_ld(batch). With `nonfinite`,
// also reports whether x holds a NaN or +-Inf (found while transposing, at no extra pass).
at::Tensor transpose_padded(const at::Tensor& x, bool* nonfinite = nullptr) {
  const at::Tensor xc = x.contiguous();
  const int64_t batch = xc.size(0), n = xc.size(1);
  at::Tensor xt;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "torch_nerva", [&] {
    const int64_t ld = padded_ld<scalar_t>(batch);
    xt = at::empty({n, ld}, xc.options());
    if (n == 0 || ld == 0) return;
    const auto table = transposes<scalar_t>();
    const scalar_t* src = xc.data_ptr<scalar_t>();
    if (batch == 1) {  // (1 x n) and (n x 1) share one memory order
      xt.view({1, n}).copy_(xc);
      if (nonfinite) *nonfinite = table.any_nonfinite(src, n);
      return;
    }
    scalar_t* dst = xt.data_ptr<scalar_t>();
    std::atomic<bool> found{false};
    at::parallel_for(0, n, transpose_grain(ld), [&](int64_t i0, int64_t i1) {
      if (table.transpose_pad(src, batch, n, ld, dst, i0, i1)) {
        found.store(true, std::memory_order_relaxed);
      }
    });
    if (nonfinite) *nonfinite = found.load();
  });
  return xt;
}

// (n x ld) -> (batch x n): the first batch columns of yt, transposed.
at::Tensor untranspose(const at::Tensor& yt, int64_t batch) {
  const int64_t n = yt.size(0), ld = yt.size(1);
  if (batch == 1) return yt.view({1, n});  // fresh tensor, same memory order
  at::Tensor y = at::empty({batch, n}, yt.options());
  if (n == 0 || batch == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(yt.scalar_type(), "torch_nerva", [&] {
    const auto fn = transposes<scalar_t>().untranspose;
    const scalar_t* src = yt.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, transpose_grain(ld), [&](int64_t i0, int64_t i1) {
      fn(src, batch, n, ld, dst, i0, i1);
    });
  });
  return y;
}

// yt (n_out x ld) from xt (n_in x ld) and a CSR with n_out rows over n_in columns, optionally
// clamped to [lo, hi]; `batch` columns are meaningful (all ld are computed).
at::Tensor spmm_feature_major(const char* op, const at::Tensor& xt, int64_t batch,
                              const at::Tensor& values, const at::Tensor& crow,
                              const at::Tensor& col, const at::Tensor& perm,
                              const at::Tensor& bias, bool clamp = false, double lo = 0,
                              double hi = 0) {
  const int64_t n_out = crow.numel() - 1, n_in = xt.size(0), n_pos = col.numel();
  at::Tensor yt = at::empty({n_out, xt.size(1)}, xt.options());
  if (batch == 0 || n_out == 0) return yt;
  const at::Tensor vals = values.contiguous();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor perm_c = perm.defined() ? perm.contiguous() : perm;
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  AT_DISPATCH_FLOATING_TYPES(xt.scalar_type(), "torch_nerva", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      const index_t* crow_p = crow_c.data_ptr<index_t>();
      check_row_pointer_ends(op, crow_p, n_out, n_pos);
      SpmmArgs<scalar_t, index_t> args{
          xt.data_ptr<scalar_t>(), batch, xt.size(1), n_in, vals.data_ptr<scalar_t>(),
          vals.numel(), crow_p, col_c.data_ptr<index_t>(),
          perm_c.defined() ? perm_c.data_ptr<index_t>() : nullptr,
          bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, n_out,
          yt.data_ptr<scalar_t>(), clamp, static_cast<scalar_t>(lo), static_cast<scalar_t>(hi)};
      const auto fn = kernels<scalar_t, index_t>().spmm;
      KernelError err;
      parallel_rows(crow_p, n_out, batch, err,
                    [&](int64_t r0, int64_t r1, KernelError& e) { fn(args, r0, r1, e); });
      raise_if_any(op, err, crow_p, args.col, n_in, args.perm, vals.numel());
    });
  });
  return yt;
}

// y (batch x n_out) from xt (n_in x ld) and a CSR with n_out rows over n_in columns.
at::Tensor spmm_transposed(const char* op, const at::Tensor& xt, int64_t batch,
                           const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const at::Tensor& perm,
                           const at::Tensor& bias) {
  if (batch == 0 || crow.numel() == 1) return at::empty({batch, crow.numel() - 1}, xt.options());
  return untranspose(spmm_feature_major(op, xt, batch, values, crow, col, perm, bias), batch);
}

// out[k] for W's nonzeros from gt (n_out x ld) and xt (n_in x ld).
at::Tensor sddmm_transposed(const char* op, const at::Tensor& gt, const at::Tensor& xt,
                            const at::Tensor& crow, const at::Tensor& col) {
  const int64_t n_out = crow.numel() - 1, nnz = col.numel();
  at::Tensor out = at::empty({nnz}, xt.options());
  if (nnz == 0) return out;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  AT_DISPATCH_FLOATING_TYPES(xt.scalar_type(), "torch_nerva", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      const index_t* crow_p = crow_c.data_ptr<index_t>();
      check_row_pointer_ends(op, crow_p, n_out, nnz);
      SddmmArgs<scalar_t, index_t> args{gt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
                                        xt.size(1), xt.size(0), crow_p,
                                        col_c.data_ptr<index_t>(), n_out,
                                        out.data_ptr<scalar_t>()};
      const auto fn = kernels<scalar_t, index_t>().sddmm;
      KernelError err;
      parallel_rows(crow_p, n_out, xt.size(1), err,
                    [&](int64_t r0, int64_t r1, KernelError& e) { fn(args, r0, r1, e); });
      raise_if_any<index_t>(op, err, crow_p, args.col, args.n_in, nullptr, 0);
    });
  });
  return out;
}

// ---- argument checks ---------------------------------------------------------------------------

void check_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& values,
                     const at::Tensor& crow, const at::Tensor& col,
                     const c10::optional<at::Tensor>& perm,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch x in_features), got shape ", x.sizes());
  const at::Tensor no_tensor;
  check_devices(op, at::kCPU, {{"x", &x}, {"values", &values}, {"crow", &crow}, {"col", &col},
                               {"perm", perm.has_value() ? &*perm : &no_tensor},
                               {"bias", bias.has_value() ? &*bias : &no_tensor}});
  check_index_pair(op, crow, col);
  check_values(op, values, x, "x");
  const int64_t n_out = crow.numel() - 1, n_pos = col.numel();
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 1 && perm->numel() == n_pos, op,
                ": perm must be 1-D with nnz = ", n_pos, " entries, got shape ", perm->sizes());
    TORCH_CHECK(perm->scalar_type() == crow.scalar_type(), op,
                ": perm must have the index dtype ", crow.scalar_type(), ", got ",
                perm->scalar_type());
  } else {
    TORCH_CHECK(values.numel() == n_pos, op, ": values has ", values.numel(),
                " entries but the layout has nnz = ", n_pos);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n_out, op, ": bias must have shape (",
                n_out, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but x has dtype ", x.scalar_type());
  }
}

void check_linear_layout(const char* op, const at::Tensor& values, const at::Tensor& crow,
                         const at::Tensor& col, const at::Tensor& crow_t,
                         const at::Tensor& col_t, const at::Tensor& perm) {
  check_devices(op, at::kCPU, {{"values", &values}, {"crow", &crow}, {"col", &col},
                               {"crow_t", &crow_t}, {"col_t", &col_t}, {"perm", &perm}});
  check_index_pair(op, crow, col);
  check_index_pair(op, crow_t, col_t);
  TORCH_CHECK(crow_t.scalar_type() == crow.scalar_type() &&
                  perm.scalar_type() == crow.scalar_type(),
              op, ": the layout and its transpose must share one index dtype");
  TORCH_CHECK(col_t.numel() == col.numel() && perm.dim() == 1 && perm.numel() == col.numel() &&
                  values.dim() == 1 && values.numel() == col.numel(),
              op, ": inconsistent layout: nnz is ", col.numel(), " in col, ", col_t.numel(),
              " in col_t, ", perm.numel(), " in perm and ", values.numel(), " in values");
}

// ---- ops ----------------------------------------------------------------------------------------

at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                        const at::Tensor& col, const c10::optional<at::Tensor>& perm,
                        const c10::optional<at::Tensor>& bias) {
  const char* op = "torch_nerva.csr_spmm";
  check_spmm_args(op, x, values, crow, col, perm, bias);
  return spmm_transposed(op, transpose_padded(x), x.size(0), values, crow, col,
                         perm.value_or(at::Tensor()), bias.value_or(at::Tensor()));
}

// Feature-major SpMM for inference pipelines that keep activations transposed across layers:
// yt = clamp(W xt + bias, lo, hi), xt (n_in x ld) with ld padded as padded_ld (or < one
// vector); every column is computed.
at::Tensor csr_spmm_fm_cpu(const at::Tensor& xt, const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const c10::optional<at::Tensor>& bias,
                           c10::optional<double> lo, c10::optional<double> hi) {
  const char* op = "torch_nerva.csr_spmm_fm";
  check_spmm_args(op, xt, values, crow, col, c10::nullopt, bias);
  TORCH_CHECK(xt.is_contiguous(), op, ": xt must be contiguous (n_in x ld)");
  TORCH_CHECK(lo.has_value() == hi.has_value() && (!lo.has_value() || *lo <= *hi), op,
              ": give both lo and hi (lo <= hi) or neither");
  const int64_t ld = xt.size(1);
  const int64_t lanes = 64 / static_cast<int64_t>(xt.element_size());
  TORCH_CHECK(ld < lanes || ld % lanes == 0, op, ": xt's columns must be fewer than ", lanes,
              " or a multiple of it (pad with zero columns), got ", ld);
  return spmm_feature_major(op, xt, ld, values, crow, col, at::Tensor(),
                            bias.value_or(at::Tensor()), lo.has_value(), lo.value_or(0),
                            hi.value_or(0));
}

// ---- a chain of sparse layers for inference (the Graph Challenge) -------------------------------

// Runs the inputs (rows of y0) through every layer, Y <- clamp(Y W_l^T + bias, lo, hi), and
// returns for each input whether its final activations hold a nonzero. Inputs are processed in
// chunks of `chunk` columns, each chunk by one thread through all layers in feature-major
// buffers that stay in cache: no transposes between layers, no barrier per layer. With `prune`,
// columns that became all zero are dropped after each layer (with lo = 0 and bias <= 0 they can
// never revive; the caller guarantees that).
template <typename S, typename I>
void chain_chunk(const S* y0, int64_t n0, int64_t first, int64_t width,
                 const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& crows,
                 const std::vector<at::Tensor>& cols, const std::vector<at::Tensor>& biases,
                 S lo, S hi, bool prune, int64_t max_n, bool* alive_out, KernelError& err) {
  const auto spmm = kernels<S, I>().spmm;
  int64_t w = width, ld = padded_ld<S>(w);
  std::vector<S> a(max_n * ld), b(max_n * ld);
  std::vector<int64_t> ids(w);
  for (int64_t j = 0; j < w; ++j) ids[j] = first + j;
  for (int64_t i = 0; i < n0; ++i) {  // transpose this chunk of inputs, zero padding
    S* row = a.data() + i * ld;
    for (int64_t j = 0; j < w; ++j) row[j] = y0[(first + j) * n0 + i];
    for (int64_t j = w; j < ld; ++j) row[j] = S(0);
  }
  int64_t n_in = n0;
  std::vector<char> keep;
  for (size_t l = 0; l < values.size() && w > 0; ++l) {
    const int64_t n_out = crows[l].numel() - 1;
    SpmmArgs<S, I> args{a.data(), w, ld, n_in, values[l].data_ptr<S>(), values[l].numel(),
                        crows[l].data_ptr<I>(), cols[l].data_ptr<I>(), nullptr,
                        biases[l].data_ptr<S>(), n_out, b.data(), true, lo, hi};
    spmm(args, 0, n_out, err);
    if (err.row >= 0 || err.pos >= 0) return;
    std::swap(a, b);
    n_in = n_out;
    if (!prune) continue;
    keep.assign(w, 0);
    int64_t n_keep = 0;
    for (int64_t i = 0; i < n_in && n_keep < w; ++i) {
      const S* row = a.data() + i * ld;
      for (int64_t j = 0; j < w; ++j) {
        if (!keep[j] && row[j] != S(0)) {
          keep[j] = 1;
          ++n_keep;
        }
      }
    }
    if (n_keep == w) continue;
    const int64_t ld_new = padded_ld<S>(n_keep);
    for (int64_t i = 0; i < n_in; ++i) {  // left-pack kept columns, rows to the new stride
      const S* src = a.data() + i * ld;
      S* dst = a.data() + i * ld_new;  // dst <= src: safe in increasing order
      int64_t k = 0;
      for (int64_t j = 0; j < w; ++j) {
        if (keep[j]) dst[k++] = src[j];
      }
      for (; k < ld_new; ++k) dst[k] = S(0);
    }
    int64_t k = 0;
    for (int64_t j = 0; j < w; ++j) {
      if (keep[j]) ids[k++] = ids[j];
    }
    w = n_keep;
    ld = ld_new;
  }
  for (int64_t j = 0; j < w; ++j) {
    bool any = false;
    for (int64_t i = 0; i < n_in && !any; ++i) any = a[i * ld + j] != S(0);
    alive_out[ids[j]] = any;
  }
}

at::Tensor sparse_chain_cpu(const at::Tensor& y0, at::TensorList values, at::TensorList crows,
                            at::TensorList cols, double bias, double lo, double hi,
                            int64_t chunk, bool prune) {
  const char* op = "torch_nerva.sparse_chain";
  TORCH_CHECK(y0.dim() == 2, op, ": y0 must be 2-D (inputs x neurons), got ", y0.sizes());
  TORCH_CHECK(values.size() == crows.size() && values.size() == cols.size(), op,
              ": values, crows and cols must have one entry per layer");
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  TORCH_CHECK(lo <= hi, op, ": lo must be <= hi");
  check_devices(op, at::kCPU, {{"y0", &y0}});
  for (size_t l = 0; l < values.size(); ++l) {
    check_devices(op, at::kCPU, {{"values", &values[l]}, {"crows", &crows[l]},
                                 {"cols", &cols[l]}});
  }
  TORCH_CHECK(!prune || (lo == 0 && bias <= 0), op,
              ": pruning dead inputs is exact only with lo = 0 and bias <= 0");
  const at::Tensor y = y0.contiguous();
  std::vector<at::Tensor> v, c, k, biases;
  int64_t n = y.size(1), max_n = n;
  for (size_t l = 0; l < values.size(); ++l) {
    check_index_pair(op, crows[l], cols[l]);
    check_values(op, values[l], y, "y0");
    TORCH_CHECK(crows[l].scalar_type() == crows[0].scalar_type(), op,
                ": every layer must use one index dtype");
    TORCH_CHECK(values[l].numel() == cols[l].numel(), op, ": layer ", l, " has ",
                values[l].numel(), " values for ", cols[l].numel(), " indices");
    v.push_back(values[l].contiguous());
    c.push_back(crows[l].contiguous());
    k.push_back(cols[l].contiguous());
    const int64_t n_out = crows[l].numel() - 1;
    AT_DISPATCH_INDEX_TYPES(crows[l].scalar_type(), "torch_nerva", [&] {
      check_row_pointer_ends(op, c.back().data_ptr<index_t>(), n_out, cols[l].numel());
    });
    biases.push_back(at::full({n_out}, bias, y.options()));
    max_n = std::max(max_n, n_out);
    n = n_out;
  }
  const int64_t batch = y.size(0);
  at::Tensor alive = at::zeros({batch}, y.options().dtype(at::kBool));
  if (batch == 0) return alive;
  if (values.empty()) return y.ne(0).any(1);
  const int64_t n_chunks = batch / chunk + (batch % chunk != 0);  // no overflow near INT64_MAX
  std::vector<KernelError> errors(n_chunks);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "torch_nerva", [&] {
    AT_DISPATCH_INDEX_TYPES(c[0].scalar_type(), "torch_nerva", [&] {
      at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t t = c0; t < c1; ++t) {
          const int64_t first = t * chunk, width = std::min(chunk, batch - first);
          chain_chunk<scalar_t, index_t>(y.data_ptr<scalar_t>(), y.size(1), first, width, v, c,
                                         k, biases, static_cast<scalar_t>(lo),
                                         static_cast<scalar_t>(hi), prune, max_n,
                                         alive.data_ptr<bool>(), errors[t]);
        }
      });
    });
  });
  for (const KernelError& e : errors) {
    TORCH_CHECK(e.row < 0, op, ": a layer has a malformed row pointer (row ", e.row, ")");
    TORCH_CHECK(e.pos < 0, op, ": a layer has a column index out of range (position ", e.pos,
                "; layers must chain: each one's in_features is the previous out_features)");
  }
  return alive;
}

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                         const at::Tensor& col) {
  const char* op = "torch_nerva.csr_sddmm";
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2, op,
              ": grad_out and x must be 2-D, got shapes ", grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out has batch ", grad_out.size(0),
              " but x has batch ", x.size(0));
  check_devices(op, at::kCPU, {{"grad_out", &grad_out}, {"x", &x}, {"crow", &crow},
                               {"col", &col}});
  check_index_pair(op, crow, col);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", x.scalar_type());
  TORCH_CHECK(grad_out.size(1) == crow.numel() - 1, op, ": grad_out has ", grad_out.size(1),
              " columns but the layout has ", crow.numel() - 1, " rows");
  return sddmm_transposed(op, transpose_padded(grad_out), transpose_padded(x), crow, col);
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_cpu(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm) {
  const char* op = "torch_nerva.sparse_linear";
  check_spmm_args(op, x, values, crow, col, c10::nullopt, bias);
  check_linear_layout(op, values, crow, col, crow_t, col_t, perm);
  TORCH_CHECK(x.size(1) == crow_t.numel() - 1, op, ": x has ", x.size(1),
              " features but the layer has in_features = ", crow_t.numel() - 1);
  bool nonfinite = false;
  at::Tensor xt = transpose_padded(x, &nonfinite);
  at::Tensor y = spmm_transposed(op, xt, x.size(0), values, crow, col, at::Tensor(),
                                 bias.value_or(at::Tensor()));
  if (nonfinite) {  // dense math's NaN/Inf semantics (csrc/nonfinite.h); rare
    apply_dense_nonfinite(y, x, [&](const at::Tensor& indicator) {
      return spmm_transposed(op, transpose_padded(indicator), indicator.size(0),
                             at::ones({col.numel()}, indicator.options()), crow, col,
                             at::Tensor(), at::Tensor());
    });
  }
  return {y, xt};
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& xt, const at::Tensor& values,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, bool input_grad, bool values_grad) {
  const char* op = "torch_nerva.sparse_linear_backward";
  check_linear_layout(op, values, crow, col, crow_t, col_t, perm);
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == crow.numel() - 1, op,
              ": grad must be (batch x out_features = ", crow.numel() - 1, "), got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == values.scalar_type(), op, ": grad has dtype ",
              grad.scalar_type(), " but values have dtype ", values.scalar_type());
  check_devices(op, at::kCPU, {{"grad", &grad}, {"xt", &xt}});
  const int64_t batch = grad.size(0);
  // Every check on xt comes before anything reads it; the kernels read it through its data
  // pointer as one dense (in_features x ld) array, so any other strides (expanded, transposed,
  // sliced) are made contiguous first.
  at::Tensor xt_c;
  if (values_grad) {
    const int64_t ld = [&] {
      int64_t out = 0;
      AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "torch_nerva",
                                 [&] { out = padded_ld<scalar_t>(batch); });
      return out;
    }();
    TORCH_CHECK(xt.dim() == 2 && xt.size(0) == crow_t.numel() - 1 && xt.size(1) == ld, op,
                ": saved input must be (in_features x ld) = (", crow_t.numel() - 1, " x ", ld,
                ") for a batch of ", batch, ", got ", xt.sizes());
    TORCH_CHECK(xt.scalar_type() == values.scalar_type(), op, ": saved input has dtype ",
                xt.scalar_type(), " but values have dtype ", values.scalar_type());
    xt_c = xt.contiguous();
  }
  bool nonfinite = false;
  at::Tensor gt = transpose_padded(grad, input_grad ? &nonfinite : nullptr);
  at::Tensor grad_x = input_grad
      ? spmm_transposed(op, gt, batch, values, crow_t, col_t, perm, at::Tensor())
      : at::empty({0}, grad.options());
  if (nonfinite) {  // dense math's NaN/Inf semantics for dX = dY W (csrc/nonfinite.h); rare
    apply_dense_nonfinite(grad_x, grad, [&](const at::Tensor& indicator) {
      return spmm_transposed(op, transpose_padded(indicator), indicator.size(0),
                             at::ones({col_t.numel()}, indicator.options()), crow_t, col_t,
                             at::Tensor(), at::Tensor());
    });
  }
  at::Tensor grad_values = values_grad ? sddmm_transposed(op, gt, xt_c, crow, col)
                                       : at::empty({0}, grad.options());
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("csr_sddmm", &csr_sddmm_cpu);
  m.impl("csr_spmm_fm", &csr_spmm_fm_cpu);
  m.impl("sparse_chain", &sparse_chain_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cpu);
}

TORCH_LIBRARY_IMPL(torch_nerva, CompositeExplicitAutograd, m) {
  m.impl("_kernel_isa", &kernel_isa);
  m.impl("_supported_isas", &supported_isas);
}

}  // namespace cpu
}  // namespace torch_nerva
