// Chains of sparse layers for inference on the CPU: the Graph Challenge's sparse_chain (a whole
// sequence of sparse layers, each chunk of inputs carried through every layer by one thread)
// and csr_chain_fm (a run of SparseLinear (+ ReLU) layers of a model, for small batches: one
// op call for the run, activations feature-major throughout).
#include "common.h"
#include "isa.h"
#include "pool.h"
#include "schedule.h"
#include "spmm.h"
#include "../nonfinite.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace torch_nerva {
namespace cpu {
namespace {

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
      // chunks of inputs claimed from the pool (pool.h): a descheduled thread holds up at
      // most the chunk it is running
      parallel_chunks(n_chunks, phase_threads(), [&](int64_t t) {
        const int64_t first = t * chunk, width = std::min(chunk, batch - first);
        chain_chunk<scalar_t, index_t>(y.data_ptr<scalar_t>(), y.size(1), first, width, v, c, k,
                                       biases, static_cast<scalar_t>(lo),
                                       static_cast<scalar_t>(hi), prune, max_n,
                                       alive.data_ptr<bool>(), errors[t]);
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

// xt (n_in x ld) through every layer: xt <- W_l xt + b_l, clamped at 0 (ReLU) where relu[l];
// the values of a layer may be 1-D or (1, nnz). Dense math's NaN/Inf rule (nonfinite.h) is
// applied to every layer whose input holds a non-finite value (checked per layer: one pass
// over the activations, which batch-1 inference keeps in L1). Returns a new tensor, also for
// an empty run.
at::Tensor csr_chain_fm_cpu(const at::Tensor& xt0, at::TensorList values, at::TensorList crows,
                            at::TensorList cols,
                            const c10::List<c10::optional<at::Tensor>>& biases,
                            at::IntArrayRef relu) {
  const char* op = "torch_nerva.csr_chain_fm";
  const size_t n = values.size();
  TORCH_CHECK(crows.size() == n && cols.size() == n && biases.size() == n && relu.size() == n,
              op, ": values, crows, cols, biases and relu must have one entry per layer, got ",
              n, ", ", crows.size(), ", ", cols.size(), ", ", biases.size(), " and ",
              relu.size());
  TORCH_CHECK(xt0.dim() == 2 && xt0.is_contiguous(), op,
              ": xt must be a contiguous 2-D tensor (in_features x ld), got shape ", xt0.sizes());
  check_devices(op, at::kCPU, {{"xt", &xt0}});
  const int64_t ld = xt0.size(1);
  const int64_t lanes = 64 / std::max<int64_t>(4, xt0.element_size());
  TORCH_CHECK(ld < lanes || ld % lanes == 0, op, ": xt's columns must be fewer than ", lanes,
              " or a multiple of it (pad with zero columns), got ", ld);
  if (n == 0) return xt0.clone();
  at::Tensor xt = xt0;
  for (size_t l = 0; l < n; ++l) {
    const at::Tensor v =
        values[l].dim() == 2 && values[l].size(0) == 1 ? values[l].view({-1}) : values[l];
    const c10::optional<at::Tensor> bias = biases.get(l);
    check_spmm_args(op, xt, v, crows[l], cols[l], c10::nullopt, bias);
    bool nonfinite = false;
    TORCH_NERVA_DISPATCH_VALUES(xt.scalar_type(), "torch_nerva", [&] {
      typedef kernel_t<scalar_t> S;
      nonfinite = transposes<S>().any_nonfinite(kernel_data<scalar_t>(xt), xt.numel());
    });
    at::Tensor yt = spmm_feature_major(op, xt, ld, v, crows[l], cols[l], at::Tensor(),
                                       bias.has_value() ? *bias : at::Tensor(), relu[l] != 0,
                                       0.0, std::numeric_limits<double>::infinity());
    if (nonfinite && ld > 0) {  // dense math's NaN/Inf semantics; rare
      at::Tensor y = yt.t();
      apply_dense_nonfinite(y, xt.t(), [&](const at::Tensor& indicator) {
        return spmm_feature_major(op, indicator.t().contiguous(), ld,
                                  at::ones({cols[l].numel()}, indicator.options()), crows[l],
                                  cols[l], at::Tensor(), at::Tensor())
            .t();
      });
    }
    xt = yt;
  }
  return xt;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("sparse_chain", &sparse_chain_cpu);
  m.impl("csr_chain_fm", &csr_chain_fm_cpu);
}

}  // namespace cpu
}  // namespace torch_nerva
