// The CSR kernels, compiled once per instruction set: included by kernels_<isa>.cpp inside
// `namespace torch_nerva::cpu::<isa>` under a `#pragma GCC target`. No includes here (see
// kernels.h). Vectorization comes from fixed-size inner loops over whole 64-byte vectors,
// which the compiler keeps in registers.

template <typename T>
inline T tn_min(T a, T b) {
  return a < b ? a : b;
}

template <typename S, typename I>
inline bool row_range(const I* crow, int64_t r, int64_t nnz, int64_t& start, int64_t& end,
                      KernelError& err) {
  start = crow[r];
  end = crow[r + 1];
  if (start < 0 || end < start || end > nnz) {
    if (err.row < 0) err.row = r;
    return false;
  }
  return true;
}

// Column and value of nonzero k, checking both indices as they are read; false (and the
// position recorded) for a malformed one, which is then skipped.
template <typename S, typename I>
inline bool nonzero(const SpmmArgs<S, I>& a, int64_t k, int64_t& c, S& v, KernelError& err) {
  c = a.col[k];
  if (c < 0 || c >= a.n_in) {
    if (err.pos < 0) err.pos = k;
    return false;
  }
  int64_t p = k;
  if (a.perm) {
    p = a.perm[k];
    if (p < 0 || p >= a.n_values) {
      if (err.perm < 0) err.perm = k;
      return false;
    }
  }
  v = a.values[p];
  return true;
}

// One output row, batch columns [b0, b0 + NV * L) held in registers.
template <int NV, typename S, typename I>
inline void spmm_row_block(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                           int64_t b0, KernelError& err) {
  constexpr int64_t L = lanes<S>();
  constexpr int64_t W = NV * L;
  S acc[W];
  const S init = a.bias ? a.bias[r] : S(0);
  for (int64_t j = 0; j < W; ++j) acc[j] = init;
  for (int64_t k = start; k < end; ++k) {
    int64_t c;
    S v;
    if (!nonzero<S, I>(a, k, c, v, err)) continue;
    const S* __restrict__ xr = a.xt + c * a.ld + b0;
    for (int64_t j = 0; j < W; ++j) acc[j] += v * xr[j];
  }
  S* __restrict__ yt = a.yt + r * a.ld + b0;
  if (a.clamp) {
    for (int64_t j = 0; j < W; ++j) yt[j] = acc[j] < a.lo ? a.lo : acc[j] > a.hi ? a.hi : acc[j];
  } else {
    for (int64_t j = 0; j < W; ++j) yt[j] = acc[j];
  }
}

// Narrow batches (ld == batch < L): runtime-length accumulator, no padding.
template <typename S, typename I>
inline void spmm_row_narrow(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                            KernelError& err) {
  constexpr int64_t L = lanes<S>();
  S acc[L];
  const S init = a.bias ? a.bias[r] : S(0);
  for (int64_t j = 0; j < a.batch; ++j) acc[j] = init;
  for (int64_t k = start; k < end; ++k) {
    int64_t c;
    S v;
    if (!nonzero<S, I>(a, k, c, v, err)) continue;
    const S* __restrict__ xr = a.xt + c * a.ld;
    for (int64_t j = 0; j < a.batch; ++j) acc[j] += v * xr[j];
  }
  for (int64_t j = 0; j < a.batch; ++j) {
    a.yt[r * a.ld + j] = !a.clamp ? acc[j] : acc[j] < a.lo ? a.lo : acc[j] > a.hi ? a.hi : acc[j];
  }
}

// Batch 1 (inference): a sparse dot product per row, four independent partial sums.
template <typename S, typename I>
inline void spmm_row_single(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                            KernelError& err) {
  S acc[4] = {S(0), S(0), S(0), S(0)};
  const uint64_t n_in = (uint64_t)a.n_in;
  int64_t k = start;
  if (!a.perm) {
    for (; k + 4 <= end; k += 4) {
      const int64_t c0 = a.col[k], c1 = a.col[k + 1], c2 = a.col[k + 2], c3 = a.col[k + 3];
      if ((uint64_t)c0 >= n_in || (uint64_t)c1 >= n_in || (uint64_t)c2 >= n_in ||
          (uint64_t)c3 >= n_in) {
        break;  // the checked loop below records which
      }
      acc[0] += a.values[k] * a.xt[c0];
      acc[1] += a.values[k + 1] * a.xt[c1];
      acc[2] += a.values[k + 2] * a.xt[c2];
      acc[3] += a.values[k + 3] * a.xt[c3];
    }
  }
  for (; k < end; ++k) {
    int64_t c;
    S v;
    if (nonzero<S, I>(a, k, c, v, err)) acc[0] += v * a.xt[c];
  }
  const S y = (a.bias ? a.bias[r] : S(0)) + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
  a.yt[r] = !a.clamp ? y : y < a.lo ? a.lo : y > a.hi ? a.hi : y;
}

template <typename S, typename I>
void spmm_rows(const SpmmArgs<S, I>& a, int64_t r0, int64_t r1, KernelError& err) {
  constexpr int64_t L = lanes<S>();
  const int64_t nnz = a.crow[a.n_out];
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, end;
    if (!row_range<S, I>(a.crow, r, nnz, start, end, err)) continue;
    if (a.batch == 1) {
      spmm_row_single<S, I>(a, r, start, end, err);
      continue;
    }
    if (a.ld < L) {
      spmm_row_narrow<S, I>(a, r, start, end, err);
      continue;
    }
    for (int64_t b0 = 0; b0 < a.ld; b0 += 4 * L) {
      switch (tn_min<int64_t>(4 * L, a.ld - b0) / L) {
        case 4: spmm_row_block<4, S, I>(a, r, start, end, b0, err); break;
        case 3: spmm_row_block<3, S, I>(a, r, start, end, b0, err); break;
        case 2: spmm_row_block<2, S, I>(a, r, start, end, b0, err); break;
        default: spmm_row_block<1, S, I>(a, r, start, end, b0, err); break;
      }
    }
  }
}

// sum_b g[b] * x[b] over ld entries: whole vectors in lane order, then a pairwise lane sum
// (a fixed order, so results do not depend on threads), then the tail (narrow batches only).
template <typename S>
inline S reduce_lanes(S* acc) {
  constexpr int64_t L = lanes<S>();
  for (int64_t w = L / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

template <typename S>
inline S dot_padded(const S* __restrict__ g, const S* __restrict__ x, int64_t ld) {
  constexpr int64_t L = lanes<S>();
  const int64_t whole = ld / L * L;
  S acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = S(0);
  for (int64_t b = 0; b < whole; b += L) {
    for (int64_t j = 0; j < L; ++j) acc[j] += g[b + j] * x[b + j];
  }
  S tail = S(0);
  for (int64_t b = whole; b < ld; ++b) tail += g[b] * x[b];
  return reduce_lanes<S>(acc) + tail;
}

// Four dot products against one g: g is loaded once and the four accumulation chains are
// independent, so the FMA latency is hidden. Same per-product order as dot_padded.
template <typename S>
inline void dot4_padded(const S* __restrict__ g, const S* __restrict__ x0,
                        const S* __restrict__ x1, const S* __restrict__ x2,
                        const S* __restrict__ x3, int64_t ld, S* out) {
  constexpr int64_t L = lanes<S>();
  const int64_t whole = ld / L * L;
  S a0[L], a1[L], a2[L], a3[L];
  for (int64_t j = 0; j < L; ++j) a0[j] = a1[j] = a2[j] = a3[j] = S(0);
  for (int64_t b = 0; b < whole; b += L) {
    for (int64_t j = 0; j < L; ++j) {
      const S gv = g[b + j];
      a0[j] += gv * x0[b + j];
      a1[j] += gv * x1[b + j];
      a2[j] += gv * x2[b + j];
      a3[j] += gv * x3[b + j];
    }
  }
  S t0 = S(0), t1 = S(0), t2 = S(0), t3 = S(0);
  for (int64_t b = whole; b < ld; ++b) {
    t0 += g[b] * x0[b];
    t1 += g[b] * x1[b];
    t2 += g[b] * x2[b];
    t3 += g[b] * x3[b];
  }
  out[0] = reduce_lanes<S>(a0) + t0;
  out[1] = reduce_lanes<S>(a1) + t1;
  out[2] = reduce_lanes<S>(a2) + t2;
  out[3] = reduce_lanes<S>(a3) + t3;
}

template <typename S, typename I>
void sddmm_rows(const SddmmArgs<S, I>& a, int64_t r0, int64_t r1, KernelError& err) {
  const int64_t nnz = a.crow[a.n_out];
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, end;
    if (!row_range<S, I>(a.crow, r, nnz, start, end, err)) continue;
    const S* __restrict__ g = a.gt + r * a.ld;
    int64_t k = start;
    for (; k + 4 <= end; k += 4) {
      const int64_t c0 = a.col[k], c1 = a.col[k + 1], c2 = a.col[k + 2], c3 = a.col[k + 3];
      if ((uint64_t)c0 >= (uint64_t)a.n_in || (uint64_t)c1 >= (uint64_t)a.n_in ||
          (uint64_t)c2 >= (uint64_t)a.n_in || (uint64_t)c3 >= (uint64_t)a.n_in) {
        break;  // the one-by-one loop below records which
      }
      dot4_padded<S>(g, a.xt + c0 * a.ld, a.xt + c1 * a.ld, a.xt + c2 * a.ld,
                     a.xt + c3 * a.ld, a.ld, a.out + k);
    }
    for (; k < end; ++k) {
      const int64_t c = a.col[k];
      if (c < 0 || c >= a.n_in) {
        if (err.pos < 0) err.pos = k;
        a.out[k] = S(0);
        continue;
      }
      a.out[k] = dot_padded<S>(g, a.xt + c * a.ld, a.ld);
    }
  }
}

// One full micro-tile: dst[j * ldd + i] = src[i * lds + j] for i, j < M (M x M elements).
#ifdef TORCH_NERVA_AVX2
constexpr int64_t kMicro = 8;  // elements of a float micro-tile side; doubles use 4
// Partial tiles: source rows >= src_rows read as zeros (the padding of a transposed batch) and
// only the first dst_rows destination rows are stored (the last rows of an untransposed batch).
inline void micro_transpose(const float* src, int64_t lds, float* dst, int64_t ldd,
                            int64_t src_rows = 8, int64_t dst_rows = 8) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = i < src_rows ? _mm256_loadu_ps(src + i * lds) : _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // t0 = a0 b0 a1 b1 | a4 b4 a5 b5 (a, b = rows 0, 1), t2 likewise for rows 2, 3, ...
  __m256 s[8];
  s[0] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(1, 0, 1, 0));
  s[1] = _mm256_shuffle_ps(t[0], t[2], _MM_SHUFFLE(3, 2, 3, 2));
  s[2] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(1, 0, 1, 0));
  s[3] = _mm256_shuffle_ps(t[1], t[3], _MM_SHUFFLE(3, 2, 3, 2));
  s[4] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(1, 0, 1, 0));
  s[5] = _mm256_shuffle_ps(t[4], t[6], _MM_SHUFFLE(3, 2, 3, 2));
  s[6] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(1, 0, 1, 0));
  s[7] = _mm256_shuffle_ps(t[5], t[7], _MM_SHUFFLE(3, 2, 3, 2));
  for (int j = 0; j < 4; ++j) {
    if (j < dst_rows) _mm256_storeu_ps(dst + j * ldd, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
    if (j + 4 < dst_rows) {
      _mm256_storeu_ps(dst + (j + 4) * ldd, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
    }
  }
}
inline void micro_transpose(const double* src, int64_t lds, double* dst, int64_t ldd,
                            int64_t src_rows = 4, int64_t dst_rows = 4) {
  const __m256d z = _mm256_setzero_pd();
  const __m256d r0 = src_rows > 0 ? _mm256_loadu_pd(src) : z;
  const __m256d r1 = src_rows > 1 ? _mm256_loadu_pd(src + lds) : z;
  const __m256d r2 = src_rows > 2 ? _mm256_loadu_pd(src + 2 * lds) : z;
  const __m256d r3 = src_rows > 3 ? _mm256_loadu_pd(src + 3 * lds) : z;
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  if (dst_rows > 0) _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  if (dst_rows > 1) _mm256_storeu_pd(dst + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
  if (dst_rows > 2) _mm256_storeu_pd(dst + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
  if (dst_rows > 3) _mm256_storeu_pd(dst + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}
template <typename S>
constexpr int64_t micro_side() {
  return 32 / static_cast<int64_t>(sizeof(S));
}
#else
template <typename S>
inline void micro_transpose(const S* src, int64_t lds, S* dst, int64_t ldd, int64_t src_rows = 4,
                            int64_t dst_rows = 4) {
  for (int64_t j = 0; j < dst_rows; ++j) {
    for (int64_t i = 0; i < 4; ++i) dst[j * ldd + i] = i < src_rows ? src[i * lds + j] : S(0);
  }
}
template <typename S>
constexpr int64_t micro_side() {
  return 4;
}
#endif

// dst[j * ldd + i] = src[i * lds + j] over the block [ib, ie) x [jb, je) (at most one
// micro-tile): the vector kernel when it is full, element by element at the edges.
template <typename S>
inline void transpose_block(const S* src, int64_t lds, S* dst, int64_t ldd, int64_t ib,
                            int64_t ie, int64_t jb, int64_t je) {
  constexpr int64_t M = micro_side<S>();
  if (ie - ib == M && je - jb == M) {
    micro_transpose(src + ib * lds + jb, lds, dst + jb * ldd + ib, ldd);
    return;
  }
  for (int64_t j = jb; j < je; ++j) {
    for (int64_t i = ib; i < ie; ++i) dst[j * ldd + i] = src[i * lds + j];
  }
}

// Features are transposed in panels of kPanel: within a panel every cache line of the strided
// side (rows of x, or of y) is read or written whole while it is hot, and the panel of the
// other side stays in L1. Without this, rows a multiple of 4 KiB apart evict each other.
constexpr int64_t kPanel = 64;

// The exponent bits of a float type: all ones exactly for NaN and +-Inf.
template <typename S>
struct FloatBits;
template <>
struct FloatBits<float> {
  typedef uint32_t U;
  static constexpr U exponent = 0x7f800000u;
};
template <>
struct FloatBits<double> {
  typedef uint64_t U;
  static constexpr U exponent = 0x7ff0000000000000ull;
};

// Whether any of p[0, n) is NaN or +-Inf: integer tests on the bits, branch-free so that the
// loop vectorizes (a floating-point test could be folded away or would need ordered compares).
template <typename S>
bool any_nonfinite(const S* p, int64_t n) {
  typedef typename FloatBits<S>::U U;
  constexpr U E = FloatBits<S>::exponent;
  U found = 0;
  for (int64_t i = 0; i < n; ++i) {
    U bits;
    __builtin_memcpy(&bits, p + i, sizeof(U));
    found |= static_cast<U>((bits & E) == E);
  }
  return found != 0;
}

template <typename S>
bool transpose_pad(const S* x, int64_t batch, int64_t n, int64_t ld, S* xt, int64_t i0,
                   int64_t i1) {
  constexpr int64_t M = micro_side<S>();
  bool nonfinite = false;
  for (int64_t p = i0; p < i1; p += kPanel) {
    const int64_t pe = tn_min<int64_t>(p + kPanel, i1);
    int64_t b = 0;
    for (; b < batch; b += M) {
      const int64_t be = tn_min<int64_t>(b + M, batch);
      for (int64_t i = p; i < pe; i += M) {
        const int64_t ie = tn_min<int64_t>(i + M, pe);
        if (be < b + M && b + M <= ld && ie == i + M) {
          // the last batch rows and the first padding zeros in one vector tile
          micro_transpose(x + b * n + i, n, xt + i * ld + b, ld, be - b, M);
        } else {
          transpose_block(x, n, xt, ld, b, be, i, ie);
        }
      }
    }
    for (int64_t i = p; i < pe; ++i) {  // padding the tiles above did not cover
      const int64_t from = (b <= ld && (pe - p) % M == 0) ? b : batch;
      for (int64_t c = from; c < ld; ++c) xt[i * ld + c] = S(0);
    }
    // the panel's rows of xt are in L1 now: the non-finite test costs no memory traffic
    for (int64_t i = p; i < pe && !nonfinite; ++i) nonfinite = any_nonfinite<S>(xt + i * ld, batch);
  }
  return nonfinite;
}

template <typename S>
void untranspose(const S* yt, int64_t batch, int64_t n, int64_t ld, S* y, int64_t i0,
                 int64_t i1) {
  constexpr int64_t M = micro_side<S>();
  for (int64_t p = i0; p < i1; p += kPanel) {
    const int64_t pe = tn_min<int64_t>(p + kPanel, i1);
    for (int64_t b = 0; b < batch; b += M) {
      const int64_t be = tn_min<int64_t>(b + M, batch);
      for (int64_t i = p; i < pe; i += M) {
        const int64_t ie = tn_min<int64_t>(i + M, pe);
        if (be < b + M && b + M <= ld && ie == i + M) {
          // a full tile read from yt (its padding columns exist), the last batch rows stored
          micro_transpose(yt + i * ld + b, ld, y + b * n + i, n, M, be - b);
        } else {
          transpose_block(yt, ld, y, n, i, ie, b, be);
        }
      }
    }
  }
}

template <typename S, typename I>
KernelTable<S, I> kernel_table() {
  return {&spmm_rows<S, I>, &sddmm_rows<S, I>};
}

template <typename S>
TransposeTable<S> transpose_table() {
  return {&transpose_pad<S>, &any_nonfinite<S>, &untranspose<S>};
}

template KernelTable<float, int32_t> kernel_table<float, int32_t>();
template KernelTable<float, int64_t> kernel_table<float, int64_t>();
template KernelTable<double, int32_t> kernel_table<double, int32_t>();
template KernelTable<double, int64_t> kernel_table<double, int64_t>();
template TransposeTable<float> transpose_table<float>();
template TransposeTable<double> transpose_table<double>();
