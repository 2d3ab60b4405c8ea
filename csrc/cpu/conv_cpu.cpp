// Sparse 2-D convolution on the CPU: sparse_conv2d and sparse_conv2d_backward (schemas in
// csrc/torch_nerva.cpp). Direct convolution with a CSR weight (c_out rows over
// c_in / groups * kh * kw columns, the order of nn.Conv2d.weight.reshape(c_out, -1)): every
// nonzero adds v times a shifted input plane to an output plane, over the pixel range its
// padding leaves (conv_impl.h). No dense weight, no im2col buffer: work ~ nnz x n x ho x wo.
//
// Three code paths in conv_impl.h, all over the same clipped pixel ranges (ConvTap):
// - rows: one contiguous loop per output row of a nonzero's range (any stride);
// - flat (stride 1 and wo == w, the "same" convolutions): one loop per nonzero over its whole
//   range as a flat run, the columns that wrap to the next row masked out by a select;
// - small (flat, float32, AVX-512, planes of <= 64 pixels): the plane lives in <= 4 registers
//   across a row's nonzeros (8 / V images at once), loads masked by the tap's pixel bits;
// - tiles (flat, float32, AVX-512, larger planes): the same over tiles of <= 8 vectors, the
//   masks from per-tap 16-bit lane tables (ConvArgs out_lanes / in_lanes).
//
// Parallel phases (schedule.h, pool.h): the forward's chunks own output planes (n, co), the
// input gradient's own input planes (n, ci), the values gradient's own rows of W (all their
// nonzeros, summed over the batch in order); no atomics, results independent of the thread
// count. The layout is validated up front (O(nnz + rows), small beside the convolution), so the
// kernels read no index out of range.
#include "common.h"
#include "isa.h"
#include "schedule.h"

#include <ATen/Dispatch.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <utility>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace torch_nerva {
namespace cpu {

// One kernel position (tap) q = ky * kw + kx: the output pixels it reaches (a rectangle of `rows`
// rows of `len` pixels from output pixel y0; none if either is 0), and the in-plane offset x0 of
// the input pixel that y0 reads. Output row r of the run reads input row r * stride_h after x0.
struct ConvTap {
  int64_t rows, len, y0, x0;
  int64_t flat_len;  // (rows - 1) * wo + len: the run as one flat range (flat path)
  int64_t mask0;     // kx * ho * wo + y0: where the run's column mask starts in colmask
  uint64_t lanes;     // ho * wo <= 64: bit j set when output pixel j is reached (else 0)
  uint64_t lanes_in;  // h * w <= 64: bit i set when input pixel i is read (else 0)
};

// Phases that take the flat path when it applies (ConvArgs::flat).
constexpr int kConvFlatForward = 1, kConvFlatInput = 2, kConvFlatValues = 4;

template <typename S, typename I>
struct ConvArgs {
  const S* x;
  int64_t n, c_in, h, w;
  const S* values;
  const I* crow;
  const I* col;
  const I* crow_t;
  const I* col_t;
  const I* perm;
  const S* bias;
  int64_t c_out, kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo;
  const S* grad;
  // kw x (ho * wo): 1 where output column ox reads an input column inside [0, w) for kx, else 0;
  // set only for stride 1 along rows and wo == w (the flat path of conv_impl.h), else null
  const S* colmask;
  int flat;
  const ConvTap* taps;     // kh * kw
  const int32_t* nz_tap;   // per nonzero of W: its tap c % (kh * kw)
  const int64_t* nz_xoff;  // per nonzero of W: c / (kh * kw) * h * w, its input plane's offset
  // flat path only (else null): per tap, the 16-pixel lane masks of the output pixels it
  // reaches (out_vecs = ceil(ho * wo / 16) per tap) and of the input pixels it reads (in_vecs =
  // ceil(h * w / 16) per tap): bit l of mask v is pixel 16 * v + l
  const uint16_t* out_lanes;
  const uint16_t* in_lanes;
  int64_t out_vecs, in_vecs;
  S* y;
  S* dx;
  S* dvalues;
};

template <typename S, typename I>
struct ConvTable {
  void (*forward)(const ConvArgs<S, I>&, int64_t i0, int64_t i1);      // planes n * c_out + co
  void (*input_grad)(const ConvArgs<S, I>&, int64_t i0, int64_t i1);   // planes n * c_in + ci
  void (*values_grad)(const ConvArgs<S, I>&, int64_t r0, int64_t r1);  // rows co of W
};

// The kernels once per instruction set (library headers are all included above, so nothing
// inline from them is compiled under these targets).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define TORCH_NERVA_CONV_AVX512 1
namespace avx512 {
#include "conv_impl.h"
}  // namespace avx512
#undef TORCH_NERVA_CONV_AVX512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "conv_impl.h"
}  // namespace avx2
#pragma GCC pop_options

namespace base {
#include "conv_impl.h"
}  // namespace base

namespace {

template <typename S, typename I>
ConvTable<S, I> conv_kernels() {
  switch (active_isa()) {
    case Isa::avx512: return avx512::conv_table<S, I>();
    case Isa::avx2: return avx2::conv_table<S, I>();
    default: return base::conv_table<S, I>();
  }
}

struct ConvGeometry {
  int64_t n, c_in, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw, groups, ho, wo;
  int64_t n_cols() const { return c_in / groups * kh * kw; }
};

// Checks of the parameters, the shapes and dtypes (no index data read); returns the geometry.
ConvGeometry check_conv_args(const char* op, const at::Tensor& x, const at::Tensor& values,
                             const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& crow_t, const at::Tensor& col_t,
                             const at::Tensor& perm, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (batch, in_channels, height, width), got shape ",
              x.sizes());
  check_devices(op, at::kCPU, {{"x", &x}, {"values", &values}, {"crow", &crow}, {"col", &col},
                               {"crow_t", &crow_t}, {"col_t", &col_t}, {"perm", &perm}});
  check_index_pair(op, crow, col);
  check_index_pair(op, crow_t, col_t);
  TORCH_CHECK(crow_t.scalar_type() == crow.scalar_type() &&
                  perm.scalar_type() == crow.scalar_type(),
              op, ": the layout and its transpose must share one index dtype, got crow ",
              crow.scalar_type(), ", crow_t ", crow_t.scalar_type(), ", perm ", perm.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": only float32 and float64 are supported, got ", x.scalar_type());
  check_values(op, values, x, "x");
  const int64_t nnz = col.numel();
  TORCH_CHECK(values.numel() == nnz, op, ": values has ", values.numel(),
              " entries but the layout has nnz = ", nnz);
  TORCH_CHECK(col_t.numel() == nnz && perm.dim() == 1 && perm.numel() == nnz, op,
              ": inconsistent layout: nnz is ", nnz, " in col, ", col_t.numel(), " in col_t and ",
              perm.numel(), " in perm");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              op, ": kernel, stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1, op, ": kernel size must be >= 1, got ", kernel);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  ConvGeometry g;
  g.n = x.size(0), g.c_in = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.c_out = crow.numel() - 1;
  g.kh = kernel[0], g.kw = kernel[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.groups = groups;
  TORCH_CHECK(g.c_in % groups == 0, op, ": groups = ", groups,
              " does not divide in_channels = ", g.c_in);
  TORCH_CHECK(g.c_out % groups == 0, op, ": groups = ", groups,
              " does not divide out_channels = ", g.c_out, " (the rows of W)");
  TORCH_CHECK(crow_t.numel() - 1 == g.n_cols(), op, ": W^T has ", crow_t.numel() - 1,
              " rows but W must have in_channels / groups * kh * kw = ", g.c_in / groups, " * ",
              g.kh, " * ", g.kw, " = ", g.n_cols(), " columns");
  const int64_t eff_h = g.dh * (g.kh - 1) + 1, eff_w = g.dw * (g.kw - 1) + 1;
  const int64_t pad_h = g.h + 2 * g.ph, pad_w = g.w + 2 * g.pw;
  TORCH_CHECK(pad_h >= eff_h && pad_w >= eff_w, op, ": calculated padded input size per channel (",
              pad_h, " x ", pad_w, ") is smaller than the dilated kernel size (", eff_h, " x ",
              eff_w, "): the output would be empty");
  g.ho = (pad_h - eff_h) / g.sh + 1;
  g.wo = (pad_w - eff_w) / g.sw + 1;
  return g;
}

// Row pointer of n_rows rows over nnz positions: ends and monotone; columns in [0, n_cols).
template <typename I>
void check_csr(const char* op, const char* what, const I* crow, const I* col, int64_t n_rows,
               int64_t nnz, int64_t n_cols) {
  TORCH_CHECK(crow[0] == 0, op, ": ", what, ": crow[0] must be 0, got ", (int64_t)crow[0]);
  TORCH_CHECK((int64_t)crow[n_rows] == nnz, op, ": ", what, ": crow[-1] must equal nnz = ", nnz,
              ", got ", (int64_t)crow[n_rows]);
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(crow[r] <= crow[r + 1], op, ": ", what, ": malformed row pointer: row ", r,
                " spans [", (int64_t)crow[r], ", ", (int64_t)crow[r + 1],
                ") which is not a non-decreasing range inside [0, nnz]");
  }
  for (int64_t k = 0; k < nnz; ++k) {
    TORCH_CHECK(col[k] >= 0 && (int64_t)col[k] < n_cols, op, ": ", what,
                ": column index out of range at position ", k, ": ", (int64_t)col[k],
                " not in [0, ", n_cols, ")");
  }
}

// Columns of each row strictly increasing (the output of csr_transpose; the input gradient reads
// one group's stretch of a W^T row by bisection).
template <typename I>
void check_sorted(const char* op, const char* what, const I* crow, const I* col, int64_t n_rows) {
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t t = (int64_t)crow[r] + 1; t < (int64_t)crow[r + 1]; ++t) {
      TORCH_CHECK(col[t - 1] < col[t], op, ": ", what, ": columns of row ", r,
                  " are not sorted and unique: ", (int64_t)col[t - 1], " then ",
                  (int64_t)col[t], " (use csr_transpose(crow, col, n_cols))");
    }
  }
}

// The transpose given with W is W's: perm in [0, nnz) and col[perm[t]] == the row of t.
template <typename I>
void check_transpose(const char* op, const I* crow_t, const I* perm, const I* col,
                     int64_t n_cols, int64_t nnz) {
  for (int64_t c = 0; c < n_cols; ++c) {
    for (int64_t t = crow_t[c]; t < (int64_t)crow_t[c + 1]; ++t) {
      TORCH_CHECK(perm[t] >= 0 && (int64_t)perm[t] < nnz, op,
                  ": perm index out of range at position ", t, ": ", (int64_t)perm[t],
                  " not in [0, ", nnz, ")");
      TORCH_CHECK((int64_t)col[perm[t]] == c, op, ": crow_t/col_t/perm is not the transpose of ",
                  "crow/col: position ", t, " of W^T row ", c, " points at nonzero ",
                  (int64_t)perm[t], " of column ", (int64_t)col[perm[t]],
                  " (use csr_transpose(crow, col, n_cols))");
    }
  }
}

// Splits items [0, n_items) into `chunks` ranges of about equal cost (prefix(i) = cost of the
// items before i, non-decreasing; forced monotone otherwise) and runs body(i0, i1) on each.
template <typename P, typename F>
void run_split(int64_t n_items, int64_t work, const P& prefix, const F& body) {
  const int64_t threads = phase_threads();
  const int64_t chunks = phase_chunks(work, threads, n_items);
  if (chunks <= 1) {
    body(0, n_items);
    return;
  }
  const int64_t total = prefix(n_items);
  std::vector<int64_t> split(chunks + 1, n_items);
  split[0] = 0;
  for (int64_t t = 1; t < chunks; ++t) {
    const int64_t target = total / chunks * t + total % chunks * t / chunks;
    int64_t lo = 0, hi = n_items;  // first i with prefix(i) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (prefix(mid) < target) lo = mid + 1; else hi = mid;
    }
    split[t] = std::max(lo, split[t - 1]);
  }
  parallel_chunks(chunks, threads, [&](int64_t t) {
    if (split[t] < split[t + 1]) body(split[t], split[t + 1]);
  });
}

template <typename S, typename I>
ConvArgs<S, I> conv_args(const ConvGeometry& g) {
  ConvArgs<S, I> a{};
  a.n = g.n, a.c_in = g.c_in, a.h = g.h, a.w = g.w, a.c_out = g.c_out, a.kh = g.kh, a.kw = g.kw;
  a.sh = g.sh, a.sw = g.sw, a.ph = g.ph, a.pw = g.pw, a.dh = g.dh, a.dw = g.dw;
  a.groups = g.groups, a.ho = g.ho, a.wo = g.wo;
  return a;
}

// Output positions o in [lo, hi) of [0, n_out) whose input position o * s + off lies in
// [0, n_in) (off = k * dilation - padding).
std::pair<int64_t, int64_t> conv_range(int64_t n_in, int64_t n_out, int64_t s, int64_t off) {
  int64_t lo = off >= 0 ? 0 : (-off + s - 1) / s;
  const int64_t top = n_in - 1 - off;  // o * s <= top
  int64_t hi = top < 0 ? 0 : std::min(top / s + 1, n_out);
  return {std::min(lo, hi), hi};
}

std::vector<ConvTap> conv_taps(const ConvGeometry& g) {
  std::vector<ConvTap> taps(g.kh * g.kw);
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t offy = ky * g.dh - g.ph;
    const auto ry = conv_range(g.h, g.ho, g.sh, offy);
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t offx = kx * g.dw - g.pw;
      const auto rx = conv_range(g.w, g.wo, g.sw, offx);
      ConvTap& t = taps[ky * g.kw + kx];
      t.rows = ry.second - ry.first;
      t.len = rx.second - rx.first;
      t.y0 = ry.first * g.wo + rx.first;
      t.x0 = (ry.first * g.sh + offy) * g.w + rx.first * g.sw + offx;
      t.flat_len = t.rows > 0 && t.len > 0 ? (t.rows - 1) * g.wo + t.len : 0;
      t.mask0 = kx * g.ho * g.wo + t.y0;
      t.lanes = t.lanes_in = 0;
      for (int64_t oy = ry.first; oy < ry.second; ++oy) {
        for (int64_t ox = rx.first; ox < rx.second; ++ox) {
          if (g.ho * g.wo <= 64) t.lanes |= uint64_t{1} << (oy * g.wo + ox);
          if (g.h * g.w <= 64) {
            t.lanes_in |= uint64_t{1} << ((oy * g.sh + offy) * g.w + ox * g.sw + offx);
          }
        }
      }
    }
  }
  return taps;
}

// The flat path's per-tap lane masks (ConvArgs::out_lanes, in_lanes): for each tap, bit l of
// mask v set when output pixel 16 * v + l is reached, resp. input pixel 16 * v + l is read.
struct ConvTapLanes {
  std::vector<uint16_t> out, in;
  int64_t out_vecs = 0, in_vecs = 0;
};

ConvTapLanes conv_tap_lanes(const ConvGeometry& g) {
  ConvTapLanes b;
  if (g.sh != 1 || g.sw != 1 || g.wo != g.w) return b;
  const int64_t khw = g.kh * g.kw;
  b.out_vecs = (g.ho * g.wo + 15) / 16;
  b.in_vecs = (g.h * g.w + 15) / 16;
  b.out.assign(khw * b.out_vecs, 0);
  b.in.assign(khw * b.in_vecs, 0);
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t offy = ky * g.dh - g.ph;
    const auto ry = conv_range(g.h, g.ho, 1, offy);
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t offx = kx * g.dw - g.pw, q = ky * g.kw + kx;
      const auto rx = conv_range(g.w, g.wo, 1, offx);
      uint16_t* out = b.out.data() + q * b.out_vecs;
      uint16_t* in = b.in.data() + q * b.in_vecs;
      for (int64_t oy = ry.first; oy < ry.second; ++oy) {
        for (int64_t ox = rx.first; ox < rx.second; ++ox) {
          const int64_t j = oy * g.wo + ox, i = (oy + offy) * g.w + ox + offx;
          out[j / 16] |= static_cast<uint16_t>(1u << (j % 16));
          in[i / 16] |= static_cast<uint16_t>(1u << (i % 16));
        }
      }
    }
  }
  return b;
}

template <typename S, typename I>
void set_tap_lanes(ConvArgs<S, I>& a, const ConvTapLanes& b) {
  a.out_lanes = b.out.empty() ? nullptr : b.out.data();
  a.in_lanes = b.in.empty() ? nullptr : b.in.data();
  a.out_vecs = b.out_vecs, a.in_vecs = b.in_vecs;
}

// Per nonzero of a validated W: its tap and its input plane's offset.
template <typename I>
void nonzero_taps(const ConvGeometry& g, const I* col, int64_t nnz, std::vector<int32_t>& tap,
                  std::vector<int64_t>& xoff) {
  const int64_t khw = g.kh * g.kw, plane = g.h * g.w;
  tap.resize(nnz);
  xoff.resize(nnz);
  for (int64_t k = 0; k < nnz; ++k) {
    tap[k] = static_cast<int32_t>(col[k] % khw);
    xoff[k] = col[k] / khw * plane;
  }
}

// Which phases take the flat path where it applies: all (measured 1.5x to 10x faster than one
// loop per output row on the ResNet-18 CIFAR layers of benchmarks/conv.py); TORCH_NERVA_CONV_FLAT
// (bits: 1 forward, 2 input gradient, 4 values gradient; 0 = none) overrides it, for tests and
// measurements of the row path on the same shapes.
int conv_flat_phases() {
  const char* env = std::getenv("TORCH_NERVA_CONV_FLAT");
  return env ? std::atoi(env) : 7;
}

// The column masks of the flat path (ConvArgs::colmask), or an undefined tensor when it does not
// apply (a stride > 1, or an output row narrower or wider than the input's).
at::Tensor column_masks(const ConvGeometry& g, const at::TensorOptions& options) {
  if (g.sh != 1 || g.sw != 1 || g.wo != g.w) return at::Tensor();
  at::Tensor ox = at::arange(g.wo, options.dtype(at::kLong));
  at::Tensor ix = ox.unsqueeze(0) + (at::arange(g.kw, options.dtype(at::kLong)) * g.dw - g.pw)
                                        .unsqueeze(1);  // (kw, wo)
  at::Tensor inside = ((ix >= 0) & (ix < g.w)).to(options.dtype());
  return inside.unsqueeze(1).expand({g.kw, g.ho, g.wo}).contiguous();
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& values_in,
                             const c10::optional<at::Tensor>& bias, const at::Tensor& crow_in,
                             const at::Tensor& col_in, const at::Tensor& crow_t,
                             const at::Tensor& col_t, const at::Tensor& perm,
                             at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "torch_nerva.sparse_conv2d";
  const ConvGeometry g = check_conv_args(op, x_in, values_in, crow_in, col_in, crow_t, col_t,
                                         perm, kernel, stride, padding, dilation, groups);
  if (bias.has_value()) {
    check_devices(op, at::kCPU, {{"bias", &*bias}});
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.c_out, op, ": bias must have shape (",
                g.c_out, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x_in.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but x has dtype ", x_in.scalar_type());
  }
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous();
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({g.n, g.c_out, g.ho, g.wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "sparse_conv2d", [&] {
      const index_t* crow_p = crow.data_ptr<index_t>();
      const index_t* col_p = col.data_ptr<index_t>();
      const int64_t nnz = col.numel();
      check_csr(op, "W", crow_p, col_p, g.c_out, nnz, g.n_cols());
      if (y.numel() == 0) return;
      ConvArgs<scalar_t, index_t> a = conv_args<scalar_t, index_t>(g);
      a.x = x.data_ptr<scalar_t>();
      a.values = values.data_ptr<scalar_t>();
      a.crow = crow_p;
      a.col = col_p;
      a.bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
      a.y = y.data_ptr<scalar_t>();
      const at::Tensor masks = column_masks(g, x.options());
      a.colmask = masks.defined() ? masks.data_ptr<scalar_t>() : nullptr;
      a.flat = conv_flat_phases();
      const std::vector<ConvTap> taps = conv_taps(g);
      std::vector<int32_t> nz_tap;
      std::vector<int64_t> nz_xoff;
      nonzero_taps(g, col_p, nnz, nz_tap, nz_xoff);
      a.taps = taps.data();
      a.nz_tap = nz_tap.data();
      a.nz_xoff = nz_xoff.data();
      const ConvTapLanes lanes = conv_tap_lanes(g);
      set_tap_lanes(a, lanes);
      const auto fn = conv_kernels<scalar_t, index_t>().forward;
      const int64_t pixels = g.ho * g.wo, per_image = nnz + g.c_out;
      run_split(
          g.n * g.c_out, g.n * per_image * pixels,
          [&](int64_t i) {
            const int64_t n = i / g.c_out, co = i % g.c_out;
            return n * per_image + (int64_t)crow_p[co] + co;
          },
          [&](int64_t i0, int64_t i1) { fn(a, i0, i1); });
    });
  });
  // Dense math's NaN/Inf semantics (as csrc/nonfinite.h for the linear ops): an absent weight
  // is a zero times the input, and 0 x Inf or 0 x NaN is NaN, so y is NaN wherever the
  // receptive field holds a non-finite input at a tap with no stored weight, i.e. where the
  // count of non-finite inputs over all taps (a dense all-ones convolution of the indicator)
  // exceeds the count over the stored taps. One reduction detects it (an overflowing sum only
  // costs the check below); the rest runs only for non-finite inputs.
  if (y.numel() > 0 && !std::isfinite(x.sum().item<double>())) {
    const at::ScalarType count_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor indicator = at::isfinite(x).logical_not_().to(count_type);
    if (indicator.any().item<bool>()) {
      const at::Tensor total = at::conv2d(
          indicator, at::ones({g.c_out, g.c_in / g.groups, g.kh, g.kw}, indicator.options()),
          {}, stride, padding, dilation, groups);
      const at::Tensor connected = sparse_conv2d_cpu(
          indicator, at::ones({col.numel()}, indicator.options()), c10::nullopt, crow_in, col_in,
          crow_t, col_t, perm, kernel, stride, padding, dilation, groups);
      y.masked_fill_(connected.lt(total), std::numeric_limits<double>::quiet_NaN());
    }
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& values_in,
    const at::Tensor& crow_in, const at::Tensor& col_in, const at::Tensor& crow_t_in,
    const at::Tensor& col_t_in, const at::Tensor& perm_in, at::IntArrayRef kernel,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool input_grad, bool values_grad) {
  const char* op = "torch_nerva.sparse_conv2d_backward";
  const ConvGeometry g = check_conv_args(op, x_in, values_in, crow_in, col_in, crow_t_in,
                                         col_t_in, perm_in, kernel, stride, padding, dilation,
                                         groups);
  check_devices(op, at::kCPU, {{"grad", &grad_in}});
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == g.n && grad_in.size(1) == g.c_out &&
                  grad_in.size(2) == g.ho && grad_in.size(3) == g.wo,
              op, ": grad must have the output's shape (", g.n, ", ", g.c_out, ", ", g.ho, ", ",
              g.wo, "), got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), op, ": grad has dtype ",
              grad_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const at::Tensor crow_t = crow_t_in.contiguous(), col_t = col_t_in.contiguous();
  const at::Tensor perm = perm_in.contiguous();
  at::Tensor dx = input_grad ? at::empty({g.n, g.c_in, g.h, g.w}, x.options())
                             : at::empty({0}, x.options());
  at::Tensor dv = values_grad ? at::empty({col.numel()}, x.options())
                              : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_backward", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "sparse_conv2d_backward", [&] {
      const int64_t nnz = col.numel();
      ConvArgs<scalar_t, index_t> a = conv_args<scalar_t, index_t>(g);
      a.x = x.data_ptr<scalar_t>();
      a.values = values.data_ptr<scalar_t>();
      a.crow = crow.data_ptr<index_t>();
      a.col = col.data_ptr<index_t>();
      a.crow_t = crow_t.data_ptr<index_t>();
      a.col_t = col_t.data_ptr<index_t>();
      a.perm = perm.data_ptr<index_t>();
      a.grad = grad.data_ptr<scalar_t>();
      const at::Tensor masks = column_masks(g, x.options());
      a.colmask = masks.defined() ? masks.data_ptr<scalar_t>() : nullptr;
      a.flat = conv_flat_phases();
      const std::vector<ConvTap> taps = conv_taps(g);
      a.taps = taps.data();
      const ConvTapLanes lanes = conv_tap_lanes(g);
      set_tap_lanes(a, lanes);
      std::vector<int32_t> nz_tap;
      std::vector<int64_t> nz_xoff;
      const ConvTable<scalar_t, index_t> table = conv_kernels<scalar_t, index_t>();
      const int64_t pixels = g.ho * g.wo;
      // W is read by both gradients (dX: through col[perm] in check_transpose)
      if (input_grad || values_grad) check_csr(op, "W", a.crow, a.col, g.c_out, nnz, g.n_cols());
      if (input_grad) {
        check_csr(op, "W^T", a.crow_t, a.col_t, g.n_cols(), nnz, g.c_out);
        check_sorted(op, "W^T", a.crow_t, a.col_t, g.n_cols());
        check_transpose(op, a.crow_t, a.perm, a.col, g.n_cols(), nnz);
        a.dx = dx.data_ptr<scalar_t>();
        const int64_t khw = g.kh * g.kw, cin_g = g.c_in / g.groups;
        // cost of plane (n, ci): the W^T entries it scans (all groups') + 1
        const int64_t per_image = g.groups * nnz + g.c_in;
        if (dx.numel() > 0) {
          run_split(
              g.n * g.c_in, g.n * (nnz + g.c_in) * pixels,
              [&](int64_t i) {
                const int64_t n = i / g.c_in, ci = i % g.c_in;
                const int64_t grp = cin_g ? ci / cin_g : 0, cl = cin_g ? ci % cin_g : 0;
                return n * per_image + grp * nnz + (int64_t)a.crow_t[cl * khw] + ci;
              },
              [&](int64_t i0, int64_t i1) { table.input_grad(a, i0, i1); });
        }
      }
      if (values_grad && nnz > 0) {
        nonzero_taps(g, a.col, nnz, nz_tap, nz_xoff);
        a.nz_tap = nz_tap.data();
        a.nz_xoff = nz_xoff.data();
        a.dvalues = dv.data_ptr<scalar_t>();
        run_split(
            g.c_out, (nnz + g.c_out) * g.n * pixels,
            [&](int64_t r) { return (int64_t)a.crow[r] + r; },
            [&](int64_t r0, int64_t r1) { table.values_grad(a, r0, r1); });
      }
    });
  });
  return {dx, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace torch_nerva
