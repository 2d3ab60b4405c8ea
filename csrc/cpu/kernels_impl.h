// The CSR kernels, compiled once per instruction set: included by kernels_<isa>.cpp inside
// `namespace torch_nerva::cpu::<isa>` under a `#pragma GCC target`. No includes here (see
// kernels.h). Vectorization comes from fixed-size inner loops over whole 64-byte vectors,
// which the compiler keeps in registers.
//
// Storage types S: float, double, bf16, fp16 (kernels.h). Every value read is widened to the
// accumulation type acc_t<S> (float for the 16-bit types) and every result is rounded to S
// once, when it is stored (narrow: round to nearest even, NaN stays NaN). The AVX2 and AVX-512
// builds have vector versions of the 16-bit inner loops (TORCH_NERVA_VECTOR16 below); the
// scalar loops are the reference, and the base build's only path.

template <typename T>
inline T tn_min(T a, T b) {
  return a < b ? a : b;
}

// ---- conversions between the storage and the accumulation type ---------------------------------

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }

// bf16 is the upper half of a float: widening is exact, a 16-bit shift.
inline float widen(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// fp16 (1 sign, 5 exponent, 10 mantissa bits) to float, exact. The portable version is
// branch-free (selects only), so that the loops calling it still vectorize.
inline float widen(fp16 h) {
#ifdef TORCH_NERVA_AVX2
  return _cvtsh_ss(h.bits);  // F16C
#else
  const uint32_t magnitude = h.bits & 0x7fffu;
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  // all-ones masks instead of branches or selects (GCC then vectorizes the callers' loops)
  const uint32_t special = 0u - static_cast<uint32_t>(magnitude >= 0x7c00u);  // Inf, NaN
  const uint32_t tiny = 0u - static_cast<uint32_t>(magnitude < 0x0400u);      // 0, subnormal
  // exponent rebiased 15 -> 127 (Inf/NaN: 31 -> 255), mantissa and NaN payload kept
  const uint32_t normal = (magnitude << 13) + 0x38000000u + (special & 0x38000000u);
  // zero and subnormals: magnitude x 2^-24, exact in float
  const float small = static_cast<float>(static_cast<int32_t>(magnitude)) * 5.9604644775390625e-08f;
  uint32_t small_bits;
  __builtin_memcpy(&small_bits, &small, sizeof small_bits);
  const uint32_t u = sign | (tiny & small_bits) | (~tiny & normal);
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
}

// float to bf16, round to nearest even; NaN becomes a quiet NaN of the same sign.
inline bf16 narrow_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u | 0x00400000u) >> 16)};
  return bf16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// float to fp16, round to nearest even (overflow to Inf, gradual underflow); NaN becomes a quiet
// NaN of the same sign with the upper payload bits (as vcvtps2ph). Portable version branch-free.
inline fp16 narrow_fp16(float f) {
#ifdef TORCH_NERVA_AVX2
  return fp16{static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
#else
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal: rebias the exponent (127 -> 15; + (15 - 127) << 23 modulo 2^32) and round the 13
  // dropped bits to nearest even
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14, a subnormal (or zero) of fp16, i.e. a multiple of 2^-24: adding 0.5 makes the
  // float unit round |f| at 2^-24 steps (to nearest even); the low bits are the result
  float magnitude;
  __builtin_memcpy(&magnitude, &a, sizeof magnitude);
  const uint32_t small = float_bits(magnitude + 0.5f) - 0x3f000000u;
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  // all-ones masks instead of branches (see widen)
  const uint32_t is_small = 0u - static_cast<uint32_t>(a < 0x38800000u);
  // from 65520 on (Inf included) the result is Inf
  const uint32_t is_inf = 0u - (static_cast<uint32_t>(a >= 0x477ff000u) &
                                static_cast<uint32_t>(a <= 0x7f800000u));
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a > 0x7f800000u);
  const uint32_t finite = ~(is_inf | is_nan);
  const uint32_t r = (finite & ((is_small & small) | (~is_small & normal))) |
                     (is_inf & 0x7c00u) | (is_nan & nan);
  return fp16{static_cast<uint16_t>(sign | r)};
#endif
}

template <typename S>
struct Narrow {
  static S from(acc_t<S> a) { return a; }
};
template <>
struct Narrow<bf16> {
  static bf16 from(float a) { return narrow_bf16(a); }
};
template <>
struct Narrow<fp16> {
  static fp16 from(float a) { return narrow_fp16(a); }
};

// The accumulated value rounded to the storage type.
template <typename S>
inline S narrow(acc_t<S> a) {
  return Narrow<S>::from(a);
}

// ---- vectors of floats for the 16-bit inner loops (AVX2: 8 lanes, AVX-512: 16) ---------------

#if defined(TORCH_NERVA_AVX512)
#define TORCH_NERVA_VECTOR16 1
typedef __m512 vf;
constexpr int64_t kVL = 16;
inline vf vf_zero() { return _mm512_setzero_ps(); }
inline vf vf_set1(float v) { return _mm512_set1_ps(v); }
inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vf_clamp(vf v, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}
inline vf vf_load(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf vf_load(const fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void vf_store(bf16* p, vf v) {  // as narrow_bf16, 16 lanes at once
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
inline void vf_store(fp16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Horizontal sum in a fixed order (halves added pairwise).
inline float vf_sum(vf v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
#elif defined(TORCH_NERVA_AVX2)
#define TORCH_NERVA_VECTOR16 1
typedef __m256 vf;
constexpr int64_t kVL = 8;
inline vf vf_zero() { return _mm256_setzero_ps(); }
inline vf vf_set1(float v) { return _mm256_set1_ps(v); }
inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vf_clamp(vf v, float lo, float hi) {
  return _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}
inline vf vf_load(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf vf_load(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void vf_store(bf16* p, vf v) {  // as narrow_bf16, 8 lanes at once
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
  const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), nan)), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void vf_store(fp16* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline float vf_sum(vf v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
}
#endif

// Whether the vector loops serve storage type S in this build.
template <typename S>
constexpr bool vector16() {
#ifdef TORCH_NERVA_VECTOR16
  return sizeof(S) == 2;
#else
  return false;
#endif
}

#ifdef TORCH_NERVA_VECTOR16
// Four consecutive 16-bit numbers, and four gathered ones (p[c0..c3]), as four floats. A bf16
// inserted into the upper half of a 32-bit lane is that float already.
inline __m128 load4(const bf16* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}
inline __m128 load4(const fp16* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m128 gather4(const bf16* p, int64_t c0, int64_t c1, int64_t c2, int64_t c3) {
  __m128i v = _mm_insert_epi16(_mm_setzero_si128(), p[c0].bits, 1);
  v = _mm_insert_epi16(v, p[c1].bits, 3);
  v = _mm_insert_epi16(v, p[c2].bits, 5);
  return _mm_castsi128_ps(_mm_insert_epi16(v, p[c3].bits, 7));
}
inline __m128 gather4(const fp16* p, int64_t c0, int64_t c1, int64_t c2, int64_t c3) {
  __m128i v = _mm_insert_epi16(_mm_setzero_si128(), p[c0].bits, 0);
  v = _mm_insert_epi16(v, p[c1].bits, 1);
  v = _mm_insert_epi16(v, p[c2].bits, 2);
  return _mm_cvtph_ps(_mm_insert_epi16(v, p[c3].bits, 3));
}
#endif

#ifdef TORCH_NERVA_VECTOR16
// Batch-1 sparse dot product of a float32 row with int32 indices, vectorised: sum of
// values[k] * x[col[k]] over [k, end) with gathers, two vector accumulators, a masked tail and
// a fixed-order horizontal sum. Stops at the first block holding an out-of-range index and
// leaves k there (the caller's checked loop records which); returns the partial sum.
inline float dot_gather(const float* values, const int32_t* col, const float* x, uint32_t n_in,
                        int64_t& k, int64_t end) {
#if defined(TORCH_NERVA_AVX512)
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(n_in));
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; k + 32 <= end; k += 32) {
    const __m512i c0 = _mm512_loadu_si512(col + k), c1 = _mm512_loadu_si512(col + k + 16);
    if (_mm512_cmpge_epu32_mask(c0, limit) | _mm512_cmpge_epu32_mask(c1, limit)) return vf_sum(_mm512_add_ps(acc0, acc1));
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k), _mm512_i32gather_ps(c0, x, 4), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k + 16), _mm512_i32gather_ps(c1, x, 4), acc1);
  }
  while (k < end) {
    const int64_t n = tn_min<int64_t>(16, end - k);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    const __m512i c = _mm512_maskz_loadu_epi32(m, col + k);
    if (_mm512_mask_cmpge_epu32_mask(m, c, limit)) break;
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, values + k),
                           _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, x, 4), acc0);
    k += n;
  }
  return vf_sum(_mm512_add_ps(acc0, acc1));
#else  // AVX2: 8 lanes, signed compares (n_in < 2^31)
  const __m256i last = _mm256_set1_epi32(static_cast<int32_t>(n_in) - 1);
  const __m256i zero = _mm256_setzero_si256();
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= end; k += 16) {
    const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k));
    const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + k + 8));
    const __m256i bad = _mm256_or_si256(
        _mm256_or_si256(_mm256_cmpgt_epi32(c0, last), _mm256_cmpgt_epi32(zero, c0)),
        _mm256_or_si256(_mm256_cmpgt_epi32(c1, last), _mm256_cmpgt_epi32(zero, c1)));
    if (!_mm256_testz_si256(bad, bad)) return vf_sum(_mm256_add_ps(acc0, acc1));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k), _mm256_i32gather_ps(x, c0, 4), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k + 8), _mm256_i32gather_ps(x, c1, 4), acc1);
  }
  alignas(32) static const int32_t kFirst[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                 0, 0, 0, 0, 0, 0, 0, 0};
  while (k < end) {
    const int64_t n = tn_min<int64_t>(8, end - k);
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kFirst + 8 - n));
    const __m256i c = _mm256_maskload_epi32(col + k, m);
    const __m256i bad = _mm256_and_si256(
        m, _mm256_or_si256(_mm256_cmpgt_epi32(c, last), _mm256_cmpgt_epi32(zero, c)));
    if (!_mm256_testz_si256(bad, bad)) break;
    acc0 = _mm256_fmadd_ps(
        _mm256_maskload_ps(values + k, m),
        _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, c, _mm256_castsi256_ps(m), 4), acc0);
    k += n;
  }
  return vf_sum(_mm256_add_ps(acc0, acc1));
#endif
}
#endif

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
  typedef acc_t<S> A;
  constexpr int64_t L = lanes<S>();
  constexpr int64_t W = NV * L;
  A acc[W];
  const A init = a.bias ? widen(a.bias[r]) : A(0);
  for (int64_t j = 0; j < W; ++j) acc[j] = init;
  for (int64_t k = start; k < end; ++k) {
    int64_t c;
    S v;
    if (!nonzero<S, I>(a, k, c, v, err)) continue;
    const A va = widen(v);
    const S* __restrict__ xr = a.xt + c * a.ld + b0;
    for (int64_t j = 0; j < W; ++j) acc[j] += va * widen(xr[j]);
  }
  S* __restrict__ yt = a.yt + r * a.ld + b0;
  if (a.clamp) {
    for (int64_t j = 0; j < W; ++j) {
      yt[j] = narrow<S>(acc[j] < a.lo ? a.lo : acc[j] > a.hi ? a.hi : acc[j]);
    }
  } else {
    for (int64_t j = 0; j < W; ++j) yt[j] = narrow<S>(acc[j]);
  }
}

#ifdef TORCH_NERVA_VECTOR16
// spmm_row_block for the 16-bit types: float accumulators in vector registers, each row of xt
// widened as it is loaded, the results rounded once when stored.
template <int NV, typename S, typename I>
inline void spmm_row_block16(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                             int64_t b0, KernelError& err) {
  constexpr int64_t NR = NV * lanes<S>() / kVL;
  vf acc[NR];
  const vf init = vf_set1(a.bias ? widen(a.bias[r]) : 0.0f);
  for (int64_t i = 0; i < NR; ++i) acc[i] = init;
  for (int64_t k = start; k < end; ++k) {
    int64_t c;
    S v;
    if (!nonzero<S, I>(a, k, c, v, err)) continue;
    const vf va = vf_set1(widen(v));
    const S* xr = a.xt + c * a.ld + b0;
    for (int64_t i = 0; i < NR; ++i) acc[i] = vf_fma(va, vf_load(xr + i * kVL), acc[i]);
  }
  S* yt = a.yt + r * a.ld + b0;
  for (int64_t i = 0; i < NR; ++i) {
    vf_store(yt + i * kVL, a.clamp ? vf_clamp(acc[i], a.lo, a.hi) : acc[i]);
  }
}
#endif

// Narrow batches (ld == batch < L): runtime-length accumulator, no padding.
template <typename S, typename I>
inline void spmm_row_narrow(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                            KernelError& err) {
  typedef acc_t<S> A;
  constexpr int64_t L = lanes<S>();
  A acc[L];
  const A init = a.bias ? widen(a.bias[r]) : A(0);
  for (int64_t j = 0; j < a.batch; ++j) acc[j] = init;
  for (int64_t k = start; k < end; ++k) {
    int64_t c;
    S v;
    if (!nonzero<S, I>(a, k, c, v, err)) continue;
    const A va = widen(v);
    const S* __restrict__ xr = a.xt + c * a.ld;
    for (int64_t j = 0; j < a.batch; ++j) acc[j] += va * widen(xr[j]);
  }
  for (int64_t j = 0; j < a.batch; ++j) {
    a.yt[r * a.ld + j] =
        narrow<S>(!a.clamp ? acc[j] : acc[j] < a.lo ? a.lo : acc[j] > a.hi ? a.hi : acc[j]);
  }
}

// Batch 1 (inference): a sparse dot product per row, four independent partial sums.
template <typename S, typename I>
inline void spmm_row_single(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                            KernelError& err) {
  typedef acc_t<S> A;
  A acc[4] = {A(0), A(0), A(0), A(0)};
  const uint64_t n_in = (uint64_t)a.n_in;
  int64_t k = start;
#ifdef TORCH_NERVA_VECTOR16
  if constexpr (sizeof(S) == 4 && sizeof(I) == 4) {  // float32 values, int32 indices
    // measured on AVX-512 (Zen 4) and AVX2: the gathers pay off from about 32 nonzeros a row;
    // shorter rows keep the scalar loop below
    if (!a.perm && n_in < (1ull << 31) && end - start >= 32) {
      acc[0] = dot_gather(reinterpret_cast<const float*>(a.values),
                          reinterpret_cast<const int32_t*>(a.col),
                          reinterpret_cast<const float*>(a.xt), (uint32_t)n_in, k, end);
    }
  }
  if constexpr (vector16<S>()) {
    // the four partial sums as one float vector: the same sums, without a scalar conversion
    // (and a move between register files) per element
    __m128 acc4 = _mm_setzero_ps();
    if (!a.perm) {
      for (; k + 4 <= end; k += 4) {
        const int64_t c0 = a.col[k], c1 = a.col[k + 1], c2 = a.col[k + 2], c3 = a.col[k + 3];
        if ((uint64_t)c0 >= n_in || (uint64_t)c1 >= n_in || (uint64_t)c2 >= n_in ||
            (uint64_t)c3 >= n_in) {
          break;  // the checked loop below records which
        }
        acc4 = _mm_fmadd_ps(load4(a.values + k), gather4(a.xt, c0, c1, c2, c3), acc4);
      }
    }
    _mm_storeu_ps(acc, acc4);
  } else
#endif
  if (!a.perm) {
    for (; k + 4 <= end; k += 4) {
      const int64_t c0 = a.col[k], c1 = a.col[k + 1], c2 = a.col[k + 2], c3 = a.col[k + 3];
      if ((uint64_t)c0 >= n_in || (uint64_t)c1 >= n_in || (uint64_t)c2 >= n_in ||
          (uint64_t)c3 >= n_in) {
        break;  // the checked loop below records which
      }
      acc[0] += widen(a.values[k]) * widen(a.xt[c0]);
      acc[1] += widen(a.values[k + 1]) * widen(a.xt[c1]);
      acc[2] += widen(a.values[k + 2]) * widen(a.xt[c2]);
      acc[3] += widen(a.values[k + 3]) * widen(a.xt[c3]);
    }
  }
  for (; k < end; ++k) {
    int64_t c;
    S v;
    if (nonzero<S, I>(a, k, c, v, err)) acc[0] += widen(v) * widen(a.xt[c]);
  }
  const A y = (a.bias ? widen(a.bias[r]) : A(0)) + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
  a.yt[r] = narrow<S>(!a.clamp ? y : y < a.lo ? a.lo : y > a.hi ? a.hi : y);
}

template <int NV, typename S, typename I>
inline void spmm_block(const SpmmArgs<S, I>& a, int64_t r, int64_t start, int64_t end,
                       int64_t b0, KernelError& err) {
#ifdef TORCH_NERVA_VECTOR16
  if constexpr (vector16<S>()) {
    spmm_row_block16<NV, S, I>(a, r, start, end, b0, err);
    return;
  }
#endif
  spmm_row_block<NV, S, I>(a, r, start, end, b0, err);
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
        case 4: spmm_block<4, S, I>(a, r, start, end, b0, err); break;
        case 3: spmm_block<3, S, I>(a, r, start, end, b0, err); break;
        case 2: spmm_block<2, S, I>(a, r, start, end, b0, err); break;
        default: spmm_block<1, S, I>(a, r, start, end, b0, err); break;
      }
    }
  }
}

// sum_b g[b] * x[b] over ld entries: whole vectors in lane order, then a pairwise lane sum
// (a fixed order, so results do not depend on threads), then the tail (narrow batches only).
template <int64_t L, typename A>
inline A reduce_lanes(A* acc) {
  for (int64_t w = L / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0];
}

template <typename S>
inline acc_t<S> dot_padded(const S* __restrict__ g, const S* __restrict__ x, int64_t ld) {
  typedef acc_t<S> A;
  constexpr int64_t L = lanes<S>();
  const int64_t whole = ld / L * L;
  A acc[L];
  for (int64_t j = 0; j < L; ++j) acc[j] = A(0);
  for (int64_t b = 0; b < whole; b += L) {
    for (int64_t j = 0; j < L; ++j) acc[j] += widen(g[b + j]) * widen(x[b + j]);
  }
  A tail = A(0);
  for (int64_t b = whole; b < ld; ++b) tail += widen(g[b]) * widen(x[b]);
  return reduce_lanes<L, A>(acc) + tail;
}

// Four dot products against one g: g is loaded once and the four accumulation chains are
// independent, so the FMA latency is hidden. Same per-product order as dot_padded.
template <typename S>
inline void dot4_padded(const S* __restrict__ g, const S* __restrict__ x0,
                        const S* __restrict__ x1, const S* __restrict__ x2,
                        const S* __restrict__ x3, int64_t ld, acc_t<S>* out) {
  typedef acc_t<S> A;
  constexpr int64_t L = lanes<S>();
  const int64_t whole = ld / L * L;
  A a0[L], a1[L], a2[L], a3[L];
  for (int64_t j = 0; j < L; ++j) a0[j] = a1[j] = a2[j] = a3[j] = A(0);
  for (int64_t b = 0; b < whole; b += L) {
    for (int64_t j = 0; j < L; ++j) {
      const A gv = widen(g[b + j]);
      a0[j] += gv * widen(x0[b + j]);
      a1[j] += gv * widen(x1[b + j]);
      a2[j] += gv * widen(x2[b + j]);
      a3[j] += gv * widen(x3[b + j]);
    }
  }
  A t0 = A(0), t1 = A(0), t2 = A(0), t3 = A(0);
  for (int64_t b = whole; b < ld; ++b) {
    const A gv = widen(g[b]);
    t0 += gv * widen(x0[b]);
    t1 += gv * widen(x1[b]);
    t2 += gv * widen(x2[b]);
    t3 += gv * widen(x3[b]);
  }
  out[0] = reduce_lanes<L, A>(a0) + t0;
  out[1] = reduce_lanes<L, A>(a1) + t1;
  out[2] = reduce_lanes<L, A>(a2) + t2;
  out[3] = reduce_lanes<L, A>(a3) + t3;
}

#ifdef TORCH_NERVA_VECTOR16
// dot_padded / dot4_padded for the 16-bit types: float vectors, lanes widened as loaded.
template <typename S>
inline float dot_padded16(const S* g, const S* x, int64_t ld) {
  constexpr int64_t NL = lanes<S>() / kVL;
  const int64_t whole = ld / lanes<S>() * lanes<S>();
  vf acc[NL];
  for (int64_t i = 0; i < NL; ++i) acc[i] = vf_zero();
  for (int64_t b = 0; b < whole; b += lanes<S>()) {
    for (int64_t i = 0; i < NL; ++i) {
      acc[i] = vf_fma(vf_load(g + b + i * kVL), vf_load(x + b + i * kVL), acc[i]);
    }
  }
  for (int64_t i = 1; i < NL; ++i) acc[0] = vf_add(acc[0], acc[i]);
  float tail = 0.0f;
  for (int64_t b = whole; b < ld; ++b) tail += widen(g[b]) * widen(x[b]);
  return vf_sum(acc[0]) + tail;
}

template <typename S>
inline void dot4_padded16(const S* g, const S* x0, const S* x1, const S* x2, const S* x3,
                          int64_t ld, float* out) {
  constexpr int64_t NL = lanes<S>() / kVL;
  const int64_t whole = ld / lanes<S>() * lanes<S>();
  vf a0[NL], a1[NL], a2[NL], a3[NL];
  for (int64_t i = 0; i < NL; ++i) a0[i] = a1[i] = a2[i] = a3[i] = vf_zero();
  for (int64_t b = 0; b < whole; b += lanes<S>()) {
    for (int64_t i = 0; i < NL; ++i) {
      const int64_t o = b + i * kVL;
      const vf gv = vf_load(g + o);
      a0[i] = vf_fma(gv, vf_load(x0 + o), a0[i]);
      a1[i] = vf_fma(gv, vf_load(x1 + o), a1[i]);
      a2[i] = vf_fma(gv, vf_load(x2 + o), a2[i]);
      a3[i] = vf_fma(gv, vf_load(x3 + o), a3[i]);
    }
  }
  for (int64_t i = 1; i < NL; ++i) {
    a0[0] = vf_add(a0[0], a0[i]);
    a1[0] = vf_add(a1[0], a1[i]);
    a2[0] = vf_add(a2[0], a2[i]);
    a3[0] = vf_add(a3[0], a3[i]);
  }
  float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
  for (int64_t b = whole; b < ld; ++b) {
    const float gv = widen(g[b]);
    t0 += gv * widen(x0[b]);
    t1 += gv * widen(x1[b]);
    t2 += gv * widen(x2[b]);
    t3 += gv * widen(x3[b]);
  }
  out[0] = vf_sum(a0[0]) + t0;
  out[1] = vf_sum(a1[0]) + t1;
  out[2] = vf_sum(a2[0]) + t2;
  out[3] = vf_sum(a3[0]) + t3;
}
#endif

template <typename S>
inline acc_t<S> dot(const S* g, const S* x, int64_t ld) {
#ifdef TORCH_NERVA_VECTOR16
  if constexpr (vector16<S>()) return dot_padded16<S>(g, x, ld);
#endif
  return dot_padded<S>(g, x, ld);
}

template <typename S>
inline void dot4(const S* g, const S* x0, const S* x1, const S* x2, const S* x3, int64_t ld,
                 acc_t<S>* out) {
#ifdef TORCH_NERVA_VECTOR16
  if constexpr (vector16<S>()) {
    dot4_padded16<S>(g, x0, x1, x2, x3, ld, out);
    return;
  }
#endif
  dot4_padded<S>(g, x0, x1, x2, x3, ld, out);
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
      acc_t<S> out[4];
      dot4<S>(g, a.xt + c0 * a.ld, a.xt + c1 * a.ld, a.xt + c2 * a.ld, a.xt + c3 * a.ld, a.ld,
              out);
      for (int64_t i = 0; i < 4; ++i) a.out[k + i] = narrow<S>(out[i]);
    }
    for (; k < end; ++k) {
      const int64_t c = a.col[k];
      if (c < 0 || c >= a.n_in) {
        if (err.pos < 0) err.pos = k;
        a.out[k] = S{};
        continue;
      }
      a.out[k] = narrow<S>(dot<S>(g, a.xt + c * a.ld, a.ld));
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
// 16-bit elements: an 8 x 8 tile of 16-byte rows (SSE2 unpacks; partial tiles as above).
inline void micro_transpose16(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd,
                              int64_t src_rows, int64_t dst_rows) {
  __m128i r[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = i < src_rows ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * lds))
                        : _mm_setzero_si128();
  }
  __m128i t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // t[2i] = a0 b0 a1 b1 a2 b2 a3 b3 for rows a, b = 2i, 2i + 1
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[4h + ...]: rows 4h .. 4h + 3, columns in pairs
    u[4 * h] = _mm_unpacklo_epi32(t[4 * h], t[4 * h + 2]);      // columns 0, 1
    u[4 * h + 1] = _mm_unpackhi_epi32(t[4 * h], t[4 * h + 2]);  // columns 2, 3
    u[4 * h + 2] = _mm_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);  // columns 4, 5
    u[4 * h + 3] = _mm_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);  // columns 6, 7
  }
  for (int j = 0; j < 4; ++j) {  // column 2j from the low halves, 2j + 1 from the high ones
    if (2 * j < dst_rows) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * j * ldd),
                       _mm_unpacklo_epi64(u[j], u[4 + j]));
    }
    if (2 * j + 1 < dst_rows) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j + 1) * ldd),
                       _mm_unpackhi_epi64(u[j], u[4 + j]));
    }
  }
}
inline void micro_transpose(const bf16* src, int64_t lds, bf16* dst, int64_t ldd,
                            int64_t src_rows = 8, int64_t dst_rows = 8) {
  micro_transpose16(reinterpret_cast<const uint16_t*>(src), lds,
                    reinterpret_cast<uint16_t*>(dst), ldd, src_rows, dst_rows);
}
inline void micro_transpose(const fp16* src, int64_t lds, fp16* dst, int64_t ldd,
                            int64_t src_rows = 8, int64_t dst_rows = 8) {
  micro_transpose16(reinterpret_cast<const uint16_t*>(src), lds,
                    reinterpret_cast<uint16_t*>(dst), ldd, src_rows, dst_rows);
}
template <typename S>
constexpr int64_t micro_side() {
  return sizeof(S) == 2 ? 8 : 32 / static_cast<int64_t>(sizeof(S));
}
#else
template <typename S>
inline void micro_transpose(const S* src, int64_t lds, S* dst, int64_t ldd, int64_t src_rows = 4,
                            int64_t dst_rows = 4) {
  for (int64_t j = 0; j < dst_rows; ++j) {
    for (int64_t i = 0; i < 4; ++i) dst[j * ldd + i] = i < src_rows ? src[i * lds + j] : S{};
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
template <>
struct FloatBits<bf16> {
  typedef uint16_t U;
  static constexpr U exponent = 0x7f80u;
};
template <>
struct FloatBits<fp16> {
  typedef uint16_t U;
  static constexpr U exponent = 0x7c00u;
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
      for (int64_t c = from; c < ld; ++c) xt[i * ld + c] = S{};
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
template KernelTable<bf16, int32_t> kernel_table<bf16, int32_t>();
template KernelTable<bf16, int64_t> kernel_table<bf16, int64_t>();
template KernelTable<fp16, int32_t> kernel_table<fp16, int32_t>();
template KernelTable<fp16, int64_t> kernel_table<fp16, int64_t>();
template TransposeTable<float> transpose_table<float>();
template TransposeTable<double> transpose_table<double>();
template TransposeTable<bf16> transpose_table<bf16>();
template TransposeTable<fp16> transpose_table<fp16>();
