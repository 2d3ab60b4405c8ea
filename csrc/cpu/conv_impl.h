// The sparse 2-D convolution kernels, compiled once per instruction set: included by
// conv_cpu.cpp inside `namespace torch_nerva::cpu::<isa>` under a `#pragma GCC target`, like
// kernels_impl.h. No includes here (see kernels.h). Plain loops over contiguous pixel runs,
// vectorised by the compiler; the padding is handled by clipping each nonzero's pixel range
// (ConvTap, conv_cpu.cpp), never by a test per pixel.
//
// Layouts (ConvArgs in conv_cpu.cpp): x (n, c_in, h, w), y and grad (n, c_out, ho, wo), dx like
// x, all contiguous. W is a CSR of c_out rows over c_in / groups * kh * kw columns, column
// c = (ci_local * kh + ky) * kw + kx; output channel co reads input channels
// g * c_in / groups + ci_local of its group g = co / (c_out / groups).

// y[j] += v * x[j * s], j < len
template <typename S>
inline void conv_axpy(S* __restrict y, const S* __restrict x, S v, int64_t len, int64_t s) {
  if (s == 1) {
    for (int64_t j = 0; j < len; ++j) y[j] += v * x[j];
  } else {
    for (int64_t j = 0; j < len; ++j) y[j] += v * x[j * s];
  }
}

// y[j * s] += v * x[j], j < len (the transposed access of the input gradient)
template <typename S>
inline void conv_axpy_scatter(S* __restrict y, const S* __restrict x, S v, int64_t len,
                              int64_t s) {
  if (s == 1) {
    for (int64_t j = 0; j < len; ++j) y[j] += v * x[j];
  } else {
    for (int64_t j = 0; j < len; ++j) y[j * s] += v * x[j];
  }
}

// y[j] += v * x[j] where m[j] != 0, j < len (a select, not a branch: the flat path)
template <typename S>
inline void conv_axpy_masked(S* __restrict y, const S* __restrict x, const S* __restrict m, S v,
                             int64_t len) {
  for (int64_t j = 0; j < len; ++j) y[j] += m[j] != S(0) ? v * x[j] : S(0);
}

// sum over rows r < rows, j < len of gr[r * wo + j] * xr[r * row_x + j * s], in 64-byte lanes
// (a fixed order: the result does not depend on the thread count)
template <typename S>
inline S conv_dot(const S* __restrict gr, int64_t wo, const S* __restrict xr, int64_t row_x,
                  int64_t rows, int64_t len, int64_t s) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(S));
  S acc[L];
  for (int64_t l = 0; l < L; ++l) acc[l] = S(0);
  for (int64_t r = 0; r < rows; ++r, gr += wo, xr += row_x) {
    int64_t j = 0;
    if (s == 1) {
      for (; j + L <= len; j += L) {
        for (int64_t l = 0; l < L; ++l) acc[l] += gr[j + l] * xr[j + l];
      }
    } else {
      for (; j + L <= len; j += L) {
        for (int64_t l = 0; l < L; ++l) acc[l] += gr[j + l] * xr[(j + l) * s];
      }
    }
    for (int64_t l = 0; j + l < len; ++l) acc[l] += gr[j + l] * xr[(j + l) * s];
  }
  for (int64_t width = L / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

// sum over j < len of (m[j] != 0 ? g[j] * x[j] : 0), in 64-byte lanes (the flat path)
template <typename S>
inline S conv_dot_masked(const S* __restrict g, const S* __restrict x, const S* __restrict m,
                         int64_t len) {
  constexpr int64_t L = 64 / static_cast<int64_t>(sizeof(S));
  S acc[L];
  for (int64_t l = 0; l < L; ++l) acc[l] = S(0);
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    for (int64_t l = 0; l < L; ++l) acc[l] += m[j + l] != S(0) ? g[j + l] * x[j + l] : S(0);
  }
  for (int64_t l = 0; j + l < len; ++l) acc[l] += m[j + l] != S(0) ? g[j + l] * x[j + l] : S(0);
  for (int64_t width = L / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

#ifdef TORCH_NERVA_CONV_AVX512
// AVX-512 versions of the flat path's loops for float and double: whole vectors with the tail
// done under a lane mask (masked loads do not touch the lanes left out), so that the short runs
// of small planes (4x4: 16 pixels) are one or two vector operations instead of scalar epilogues.
inline __mmask16 conv_tail16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}
inline __mmask8 conv_tail8(int64_t left) {
  return left >= 8 ? static_cast<__mmask8>(0xff) : static_cast<__mmask8>((1u << left) - 1);
}

inline void conv_axpy_masked(float* __restrict y, const float* __restrict x,
                             const float* __restrict m, float v, int64_t len) {
  const __m512 vv = _mm512_set1_ps(v), zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 tail = conv_tail16(len - j);
    const __mmask16 k =
        _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, m + j), zero, _CMP_NEQ_UQ);
    const __m512 yv = _mm512_maskz_loadu_ps(tail, y + j);
    const __m512 r = _mm512_mask3_fmadd_ps(vv, _mm512_maskz_loadu_ps(k, x + j), yv, k);
    _mm512_mask_storeu_ps(y + j, tail, r);
  }
}

inline void conv_axpy_masked(double* __restrict y, const double* __restrict x,
                             const double* __restrict m, double v, int64_t len) {
  const __m512d vv = _mm512_set1_pd(v), zero = _mm512_setzero_pd();
  for (int64_t j = 0; j < len; j += 8) {
    const __mmask8 tail = conv_tail8(len - j);
    const __mmask8 k =
        _mm512_mask_cmp_pd_mask(tail, _mm512_maskz_loadu_pd(tail, m + j), zero, _CMP_NEQ_UQ);
    const __m512d yv = _mm512_maskz_loadu_pd(tail, y + j);
    const __m512d r = _mm512_mask3_fmadd_pd(vv, _mm512_maskz_loadu_pd(k, x + j), yv, k);
    _mm512_mask_storeu_pd(y + j, tail, r);
  }
}

inline float conv_dot_masked(const float* __restrict g, const float* __restrict x,
                             const float* __restrict m, int64_t len) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 acc = zero;
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 tail = conv_tail16(len - j);
    const __mmask16 k =
        _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, m + j), zero, _CMP_NEQ_UQ);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, g + j), _mm512_maskz_loadu_ps(k, x + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline double conv_dot_masked(const double* __restrict g, const double* __restrict x,
                              const double* __restrict m, int64_t len) {
  const __m512d zero = _mm512_setzero_pd();
  __m512d acc = zero;
  for (int64_t j = 0; j < len; j += 8) {
    const __mmask8 tail = conv_tail8(len - j);
    const __mmask8 k =
        _mm512_mask_cmp_pd_mask(tail, _mm512_maskz_loadu_pd(tail, m + j), zero, _CMP_NEQ_UQ);
    acc = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(k, g + j), _mm512_maskz_loadu_pd(k, x + j), acc);
  }
  return _mm512_reduce_add_pd(acc);
}
#endif

#ifdef TORCH_NERVA_CONV_AVX512
// Small planes (flat path, float, ho * wo <= 16 * V, V <= 4): an output plane is V registers.
// The forward keeps the plane in registers over all nonzeros of its row (two accumulator sets,
// even and odd nonzeros, so consecutive FMAs do not wait on each other); each nonzero is V
// masked loads (tap lanes: the output pixels its tap reaches) and V FMAs. B images at once
// (planes (n..n+B-1, co), B = 8 / V: one nonzero's tap, offset, value and lanes serve B * V
// FMAs) wherever the chunk holds those B whole images, else one plane; the arithmetic of a
// plane is the same either way (bit-identical whatever the chunks, i.e. the thread count).
template <int V, int B, typename I>
inline void conv_forward_small_block(const ConvArgs<float, I>& a, int64_t n, int64_t co) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo, x_image = a.c_in * plane_in;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups, g = co / cout_g;
  const float* xg = a.x + (n * a.c_in + g * cin_g) * plane_in;
  __m512 acc0[B][V], acc1[B][V];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc0[b][v] = acc1[b][v] = _mm512_setzero_ps();
  }
  const int64_t k1 = a.crow[co + 1];
  int64_t k = a.crow[co];
  for (; k + 1 < k1; k += 2) {
    const ConvTap& ta = a.taps[a.nz_tap[k]];
    const ConvTap& tb = a.taps[a.nz_tap[k + 1]];
    const uint64_t la = ta.lanes, lb = tb.lanes;
    const __m512 va = _mm512_set1_ps(a.values[k]), vb = _mm512_set1_ps(a.values[k + 1]);
    // x of output pixel j is xa[j] (stride 1, wo == w); only lanes of the tap are read
    const float* xa = xg + a.nz_xoff[k] + (ta.x0 - ta.y0);
    const float* xb = xg + a.nz_xoff[k + 1] + (tb.x0 - tb.y0);
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 m = static_cast<__mmask16>(la >> (16 * v));
        acc0[b][v] = _mm512_mask3_fmadd_ps(
            va, _mm512_maskz_loadu_ps(m, xa + b * x_image + 16 * v), acc0[b][v], m);
      }
    }
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 m = static_cast<__mmask16>(lb >> (16 * v));
        acc1[b][v] = _mm512_mask3_fmadd_ps(
            vb, _mm512_maskz_loadu_ps(m, xb + b * x_image + 16 * v), acc1[b][v], m);
      }
    }
  }
  if (k < k1) {
    const ConvTap& ta = a.taps[a.nz_tap[k]];
    const uint64_t la = ta.lanes;
    const __m512 va = _mm512_set1_ps(a.values[k]);
    const float* xa = xg + a.nz_xoff[k] + (ta.x0 - ta.y0);
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 m = static_cast<__mmask16>(la >> (16 * v));
        acc0[b][v] = _mm512_mask3_fmadd_ps(
            va, _mm512_maskz_loadu_ps(m, xa + b * x_image + 16 * v), acc0[b][v], m);
      }
    }
  }
  const __m512 bias = _mm512_set1_ps(a.bias ? a.bias[co] : 0.0f);
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    float* yp = a.y + ((n + b) * a.c_out + co) * plane_out;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      _mm512_mask_storeu_ps(yp + 16 * v, conv_tail16(plane_out - 16 * v),
                            _mm512_add_ps(bias, _mm512_add_ps(acc0[b][v], acc1[b][v])));
    }
  }
}

// Items it = n * c_out + co in [i0, i1): whole images in blocks of B, the rest plane by plane.
template <int V, typename I>
void conv_forward_small(const ConvArgs<float, I>& a, int64_t i0, int64_t i1) {
  constexpr int B = 8 / V;
  for (int64_t it = i0; it < i1;) {
    const int64_t n = it / a.c_out, co = it % a.c_out;
    if (B > 1 && co == 0 && it + B * a.c_out <= i1) {
      for (int64_t c = 0; c < a.c_out; ++c) conv_forward_small_block<V, B, I>(a, n, c);
      it += B * a.c_out;
    } else {
      conv_forward_small_block<V, 1, I>(a, n, co);
      ++it;
    }
  }
}

// The values gradient on small planes, register-blocked: images in blocks whose input planes
// take about 256 KiB (they stay in cache while every row of the chunk reads them; with the
// images inner, each row streamed the whole batch from memory), per row groups of NZ = 8 / V
// nonzeros (the rest one by one) with NZ * V accumulators in registers, summed lane-wise over the
// block's images in order, reduced and added to dvalues block after block (a fixed order: the
// block size depends on the shape only, a nonzero's arithmetic is the same in a group or alone).
template <int V, int NZ, typename I>
inline void conv_values_grad_small_group(const ConvArgs<float, I>& a, int64_t co, int64_t k,
                                         int64_t n0, int64_t n1) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups, g = co / cout_g;
  const int64_t x_image = a.c_in * plane_in, g_image = a.c_out * plane_out;
  const float* gc = a.grad + co * plane_out;
  const float* xc = a.x + g * cin_g * plane_in;
  const float* xk[NZ];
  uint64_t lanes[NZ];
#pragma GCC unroll 8
  for (int j = 0; j < NZ; ++j) {
    const ConvTap& tp = a.taps[a.nz_tap[k + j]];
    xk[j] = xc + a.nz_xoff[k + j] + (tp.x0 - tp.y0);
    lanes[j] = tp.lanes;
  }
  __m512 acc[NZ][V];
#pragma GCC unroll 8
  for (int j = 0; j < NZ; ++j) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  }
  for (int64_t n = n0; n < n1; ++n) {
    __m512 gv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      gv[v] = _mm512_maskz_loadu_ps(conv_tail16(plane_out - 16 * v), gc + n * g_image + 16 * v);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NZ; ++j) {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 m = static_cast<__mmask16>(lanes[j] >> (16 * v));
        acc[j][v] = _mm512_mask3_fmadd_ps(
            gv[v], _mm512_maskz_loadu_ps(m, xk[j] + n * x_image + 16 * v), acc[j][v], m);
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NZ; ++j) {
    __m512 sum = acc[j][0];
#pragma GCC unroll 8
    for (int v = 1; v < V; ++v) sum = _mm512_add_ps(sum, acc[j][v]);
    const float r = _mm512_reduce_add_ps(sum);
    a.dvalues[k + j] = n0 == 0 ? r : a.dvalues[k + j] + r;
  }
}

template <int V, typename I>
void conv_values_grad_small_groups(const ConvArgs<float, I>& a, int64_t r0, int64_t r1) {
  constexpr int NZ = V == 1 ? 8 : V == 2 ? 4 : 2;
  if (a.n == 0) {  // an empty batch: the sums are 0
    for (int64_t k = a.crow[r0]; k < (int64_t)a.crow[r1]; ++k) a.dvalues[k] = 0.0f;
    return;
  }
  const int64_t x_image = a.c_in * a.h * a.w * static_cast<int64_t>(sizeof(float));
  const int64_t block = std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(1, x_image));
  for (int64_t n0 = 0; n0 < a.n; n0 += block) {
    const int64_t n1 = std::min(a.n, n0 + block);
    for (int64_t co = r0; co < r1; ++co) {
      const int64_t k1 = a.crow[co + 1];
      int64_t k = a.crow[co];
      for (; k + NZ <= k1; k += NZ) conv_values_grad_small_group<V, NZ, I>(a, co, k, n0, n1);
      for (; k < k1; ++k) conv_values_grad_small_group<V, 1, I>(a, co, k, n0, n1);
    }
  }
}

// The input gradient on small planes (h * w <= 16 * V): the plane dx (n, ci) in registers over
// all nonzeros of its W^T rows in ci's group (a contiguous stretch of each row: col_t is sorted,
// checked by the driver), even and odd ones into separate accumulators; B = 8 / V images at
// once where the chunk holds them whole (same arithmetic per plane as one at a time).
template <int V, int B, typename I>
inline void conv_input_grad_small_block(const ConvArgs<float, I>& a, int64_t n, int64_t ci) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t khw = a.kh * a.kw, g_image = a.c_out * plane_out;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  const int64_t g = ci / cin_g, cl = ci % cin_g;
  const int64_t co_lo = g * cout_g, co_hi = co_lo + cout_g;
  const float* gn = a.grad + n * g_image;
  __m512 acc0[B][V], acc1[B][V];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc0[b][v] = acc1[b][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < khw; ++q) {
    const ConvTap& tp = a.taps[q];
    if (tp.lanes_in == 0) continue;
    const int64_t c = cl * khw + q;
    int64_t t0 = a.crow_t[c], t1 = a.crow_t[c + 1];
    if (a.groups > 1) {  // the stretch of co in [co_lo, co_hi)
      int64_t lo = t0, hi = t1;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (a.col_t[mid] < co_lo) lo = mid + 1; else hi = mid;
      }
      t0 = lo, hi = t1;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (a.col_t[mid] < co_hi) lo = mid + 1; else hi = mid;
      }
      t1 = lo;
    }
    // dx pixel i takes grad pixel i - (x0 - y0); only the tap's lanes are read
    const float* gb = gn - (tp.x0 - tp.y0);
    const uint64_t lanes = tp.lanes_in;
    int64_t t = t0;
    for (; t + 1 < t1; t += 2) {
      const __m512 va = _mm512_set1_ps(a.values[a.perm[t]]);
      const __m512 vb = _mm512_set1_ps(a.values[a.perm[t + 1]]);
      const float* ga = gb + a.col_t[t] * plane_out;
      const float* gc = gb + a.col_t[t + 1] * plane_out;
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
          const __mmask16 m = static_cast<__mmask16>(lanes >> (16 * v));
          acc0[b][v] = _mm512_mask3_fmadd_ps(
              va, _mm512_maskz_loadu_ps(m, ga + b * g_image + 16 * v), acc0[b][v], m);
        }
      }
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
          const __mmask16 m = static_cast<__mmask16>(lanes >> (16 * v));
          acc1[b][v] = _mm512_mask3_fmadd_ps(
              vb, _mm512_maskz_loadu_ps(m, gc + b * g_image + 16 * v), acc1[b][v], m);
        }
      }
    }
    if (t < t1) {
      const __m512 va = _mm512_set1_ps(a.values[a.perm[t]]);
      const float* ga = gb + a.col_t[t] * plane_out;
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) {
          const __mmask16 m = static_cast<__mmask16>(lanes >> (16 * v));
          acc0[b][v] = _mm512_mask3_fmadd_ps(
              va, _mm512_maskz_loadu_ps(m, ga + b * g_image + 16 * v), acc0[b][v], m);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    float* dp = a.dx + ((n + b) * a.c_in + ci) * plane_in;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      _mm512_mask_storeu_ps(dp + 16 * v, conv_tail16(plane_in - 16 * v),
                            _mm512_add_ps(acc0[b][v], acc1[b][v]));
    }
  }
}

template <int V, typename I>
void conv_input_grad_small(const ConvArgs<float, I>& a, int64_t i0, int64_t i1) {
  constexpr int B = 8 / V;
  for (int64_t it = i0; it < i1;) {
    const int64_t n = it / a.c_in, ci = it % a.c_in;
    if (B > 1 && ci == 0 && it + B * a.c_in <= i1) {
      for (int64_t c = 0; c < a.c_in; ++c) conv_input_grad_small_block<V, B, I>(a, n, c);
      it += B * a.c_in;
    } else {
      conv_input_grad_small_block<V, 1, I>(a, n, ci);
      ++it;
    }
  }
}

// Large planes (flat path, float, ho * wo > 64): the register kernels above over TILES of the
// plane, kConvTile = 8 vectors (128 pixels) each, the last one V = the vectors left. Per tap,
// ConvArgs::out_lanes / in_lanes hold the 16-bit lane mask of every vector of the output pixels
// it reaches / the input pixels it reads. Per nonzero, a tile is V masked loads and V FMAs into
// registers (two accumulator sets, even and odd nonzeros); the plane is written once per tile.
// Replaces the per-nonzero masked AXPY over the whole plane (mask load, compare, load y, load x,
// FMA, store y per vector). The loops over v are unrolled so that the accumulators stay in
// registers (a lambda taking them by pointer made GCC keep them on the stack).
constexpr int kConvTile = 8;

// Calls f(std::integral_constant<int, V>{}, p0) for the tiles of a plane of `pixels` pixels.
template <typename F>
inline void conv_for_tiles(int64_t pixels, const F& f) {
  for (int64_t p0 = 0; p0 < pixels; p0 += 16 * kConvTile) {
    const int64_t left = (pixels - p0 + 15) / 16;
    switch (left >= kConvTile ? kConvTile : left) {
      case 8: f(std::integral_constant<int, 8>{}, p0); break;
      case 7: f(std::integral_constant<int, 7>{}, p0); break;
      case 6: f(std::integral_constant<int, 6>{}, p0); break;
      case 5: f(std::integral_constant<int, 5>{}, p0); break;
      case 4: f(std::integral_constant<int, 4>{}, p0); break;
      case 3: f(std::integral_constant<int, 3>{}, p0); break;
      case 2: f(std::integral_constant<int, 2>{}, p0); break;
      default: f(std::integral_constant<int, 1>{}, p0); break;
    }
  }
}

// Forward on tiles: item it = n * c_out + co, its tiles one after the other, each over all
// nonzeros of row co (x of output pixel j of nonzero k is xg[nz_xoff[k] + x0 - y0 + j]; only
// the tap's lanes are read).
template <int V, typename I>
inline void conv_forward_tile(const ConvArgs<float, I>& a, const float* xg, int64_t k0,
                              int64_t k1, int64_t p0, float b, float* yp) {
  const int64_t plane_out = a.ho * a.wo, nv = a.out_vecs;
  const uint16_t* lanes = a.out_lanes + p0 / 16;
  const float* xt = xg + p0;
  __m512 acc0[V], acc1[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) acc0[v] = acc1[v] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 1 < k1; k += 2) {
    const int64_t qa = a.nz_tap[k], qb = a.nz_tap[k + 1];
    const uint16_t* ma = lanes + qa * nv;
    const uint16_t* mb = lanes + qb * nv;
    const float* xa = xt + a.nz_xoff[k] + (a.taps[qa].x0 - a.taps[qa].y0);
    const float* xb = xt + a.nz_xoff[k + 1] + (a.taps[qb].x0 - a.taps[qb].y0);
    const __m512 va = _mm512_set1_ps(a.values[k]), vb = _mm512_set1_ps(a.values[k + 1]);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = ma[v];
      acc0[v] = _mm512_mask3_fmadd_ps(va, _mm512_maskz_loadu_ps(m, xa + 16 * v), acc0[v], m);
    }
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = mb[v];
      acc1[v] = _mm512_mask3_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, xb + 16 * v), acc1[v], m);
    }
  }
  if (k < k1) {
    const int64_t qa = a.nz_tap[k];
    const uint16_t* ma = lanes + qa * nv;
    const float* xa = xt + a.nz_xoff[k] + (a.taps[qa].x0 - a.taps[qa].y0);
    const __m512 va = _mm512_set1_ps(a.values[k]);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = ma[v];
      acc0[v] = _mm512_mask3_fmadd_ps(va, _mm512_maskz_loadu_ps(m, xa + 16 * v), acc0[v], m);
    }
  }
  const __m512 bv = _mm512_set1_ps(b);
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    _mm512_mask_storeu_ps(yp + p0 + 16 * v, conv_tail16(plane_out - p0 - 16 * v),
                          _mm512_add_ps(bv, _mm512_add_ps(acc0[v], acc1[v])));
  }
}

template <typename I>
void conv_forward_tiles(const ConvArgs<float, I>& a, int64_t i0, int64_t i1) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = it / a.c_out, co = it % a.c_out, g = co / cout_g;
    const float* xg = a.x + (n * a.c_in + g * cin_g) * plane_in;
    const int64_t k0 = a.crow[co], k1 = a.crow[co + 1];
    const float b = a.bias ? a.bias[co] : 0.0f;
    float* yp = a.y + it * plane_out;
    conv_for_tiles(plane_out, [&](auto vc, int64_t p0) {
      conv_forward_tile<decltype(vc)::value>(a, xg, k0, k1, p0, b, yp);
    });
  }
}

// Input gradient on tiles: item it = n * c_in + ci; per tile, every tap's stretch of W^T (the
// nonzeros of ci's group, found once per item); dx pixel i takes grad pixel i - (x0 - y0), only
// the tap's lanes are read.
template <int V, typename I>
inline void conv_input_grad_tile(const ConvArgs<float, I>& a, const float* gn,
                                 const int64_t* stretch, int64_t p0, float* dp) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo, nv = a.in_vecs;
  const int64_t khw = a.kh * a.kw;
  __m512 acc0[V], acc1[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) acc0[v] = acc1[v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < khw; ++q) {
    const int64_t t0 = stretch[2 * q], t1 = stretch[2 * q + 1];
    if (t0 >= t1) continue;
    const ConvTap& tp = a.taps[q];
    const uint16_t* m = a.in_lanes + q * nv + p0 / 16;
    const float* gb = gn - (tp.x0 - tp.y0) + p0;
    int64_t t = t0;
    for (; t + 1 < t1; t += 2) {
      const __m512 va = _mm512_set1_ps(a.values[a.perm[t]]);
      const __m512 vb = _mm512_set1_ps(a.values[a.perm[t + 1]]);
      const float* ga = gb + a.col_t[t] * plane_out;
      const float* gc = gb + a.col_t[t + 1] * plane_out;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 mv = m[v];
        acc0[v] = _mm512_mask3_fmadd_ps(va, _mm512_maskz_loadu_ps(mv, ga + 16 * v), acc0[v], mv);
      }
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 mv = m[v];
        acc1[v] = _mm512_mask3_fmadd_ps(vb, _mm512_maskz_loadu_ps(mv, gc + 16 * v), acc1[v], mv);
      }
    }
    if (t < t1) {
      const __m512 va = _mm512_set1_ps(a.values[a.perm[t]]);
      const float* ga = gb + a.col_t[t] * plane_out;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __mmask16 mv = m[v];
        acc0[v] = _mm512_mask3_fmadd_ps(va, _mm512_maskz_loadu_ps(mv, ga + 16 * v), acc0[v], mv);
      }
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    _mm512_mask_storeu_ps(dp + p0 + 16 * v, conv_tail16(plane_in - p0 - 16 * v),
                          _mm512_add_ps(acc0[v], acc1[v]));
  }
}

template <typename I>
void conv_input_grad_tiles(const ConvArgs<float, I>& a, int64_t i0, int64_t i1) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t khw = a.kh * a.kw;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  std::vector<int64_t> stretch(2 * khw);
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = it / a.c_in, ci = it % a.c_in, g = ci / cin_g, cl = ci % cin_g;
    const int64_t co_lo = g * cout_g, co_hi = co_lo + cout_g;
    for (int64_t q = 0; q < khw; ++q) {
      const int64_t c = cl * khw + q;
      int64_t t0 = a.crow_t[c], t1 = a.crow_t[c + 1];
      if (a.groups > 1) {  // the stretch of co in [co_lo, co_hi) (col_t sorted)
        int64_t lo = t0, hi = t1;
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          if (a.col_t[mid] < co_lo) lo = mid + 1; else hi = mid;
        }
        t0 = lo, hi = t1;
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          if (a.col_t[mid] < co_hi) lo = mid + 1; else hi = mid;
        }
        t1 = lo;
      }
      stretch[2 * q] = t0, stretch[2 * q + 1] = t1;
    }
    const float* gn = a.grad + n * a.c_out * plane_out;
    float* dp = a.dx + it * plane_in;
    conv_for_tiles(plane_in, [&](auto vc, int64_t p0) {
      conv_input_grad_tile<decltype(vc)::value>(a, gn, stretch.data(), p0, dp);
    });
  }
}

// Values gradient on tiles: rows [r0, r1) of W, images outer (the chunk's rows read image n's
// planes while they are in cache), one vector accumulator per nonzero (acc, in memory) summed
// lane-wise over (image, tile, vector) in that fixed order, reduced once at the end. Per tile,
// the output-gradient tile (n, co) is V registers reused by every nonzero of row co.
template <int V, typename I>
inline void conv_values_grad_tile(const ConvArgs<float, I>& a, const float* gp, const float* xn,
                                  int64_t k0, int64_t k1, int64_t p0, float* acc) {
  const int64_t plane_out = a.ho * a.wo, nv = a.out_vecs;
  const uint16_t* lanes = a.out_lanes + p0 / 16;
  const float* xt = xn + p0;
  __m512 gv[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    gv[v] = _mm512_maskz_loadu_ps(conv_tail16(plane_out - p0 - 16 * v), gp + p0 + 16 * v);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t q = a.nz_tap[k];
    const uint16_t* m = lanes + q * nv;
    const float* xb = xt + a.nz_xoff[k] + (a.taps[q].x0 - a.taps[q].y0);
    float* ak = acc + 16 * (k - k0);
    __m512 s0 = _mm512_load_ps(ak), s1 = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 mv = m[v];
      const __m512 xv = _mm512_maskz_loadu_ps(mv, xb + 16 * v);
      if (v & 1) {
        s1 = _mm512_mask3_fmadd_ps(gv[v], xv, s1, mv);
      } else {
        s0 = _mm512_mask3_fmadd_ps(gv[v], xv, s0, mv);
      }
    }
    _mm512_store_ps(ak, _mm512_add_ps(s0, s1));
  }
}

template <typename I>
void conv_values_grad_tiles(const ConvArgs<float, I>& a, int64_t r0, int64_t r1) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  const int64_t base = a.crow[r0], nnz = (int64_t)a.crow[r1] - base;
  std::vector<float> buf(16 * nnz + 16, 0.0f);  // nnz vectors, 64-byte aligned
  float* acc = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) / 4 % 16) % 16;
  for (int64_t n = 0; n < a.n; ++n) {
    for (int64_t co = r0; co < r1; ++co) {
      const int64_t g = co / cout_g, k0 = a.crow[co], k1 = a.crow[co + 1];
      if (k0 == k1) continue;
      const float* gp = a.grad + (n * a.c_out + co) * plane_out;
      const float* xn = a.x + (n * a.c_in + g * cin_g) * plane_in;
      float* ak = acc + 16 * (k0 - base);
      conv_for_tiles(plane_out, [&](auto vc, int64_t p0) {
        conv_values_grad_tile<decltype(vc)::value>(a, gp, xn, k0, k1, p0, ak);
      });
    }
  }
  for (int64_t k = 0; k < nnz; ++k) {
    a.dvalues[base + k] = _mm512_reduce_add_ps(_mm512_load_ps(acc + 16 * k));
  }
}

template <typename I>
void (*conv_input_grad_small_for(const ConvArgs<float, I>& a))(const ConvArgs<float, I>&,
                                                               int64_t, int64_t) {
  if (!a.colmask || !(a.flat & kConvFlatInput)) return nullptr;
  const int64_t p = a.h * a.w;
  return p <= 16 ? &conv_input_grad_small<1, I> : p <= 32 ? &conv_input_grad_small<2, I>
       : p <= 48 ? &conv_input_grad_small<3, I> : p <= 64 ? &conv_input_grad_small<4, I>
       : &conv_input_grad_tiles<I>;
}

// The register kernel for this geometry (small plane or tiles), or null (the general kernels
// then run).
template <typename I>
void (*conv_forward_small_for(const ConvArgs<float, I>& a))(const ConvArgs<float, I>&, int64_t,
                                                            int64_t) {
  if (!a.colmask || !(a.flat & kConvFlatForward)) return nullptr;
  const int64_t p = a.ho * a.wo;
  return p <= 16 ? &conv_forward_small<1, I> : p <= 32 ? &conv_forward_small<2, I>
       : p <= 48 ? &conv_forward_small<3, I> : p <= 64 ? &conv_forward_small<4, I>
       : &conv_forward_tiles<I>;
}
template <typename I>
void (*conv_values_grad_small_for(const ConvArgs<float, I>& a))(const ConvArgs<float, I>&,
                                                                int64_t, int64_t) {
  if (!a.colmask || !(a.flat & kConvFlatValues)) return nullptr;
  const int64_t p = a.ho * a.wo;
  // register-blocked groups of nonzeros over the images (1 thread, batch 64, density 0.05, CPU
  // time vs the blocked stack accumulators / per nonzero kernels before: see docs/benchmarks.md)
  return p <= 16   ? &conv_values_grad_small_groups<1, I>
         : p <= 32 ? &conv_values_grad_small_groups<2, I>
         : p <= 48 ? &conv_values_grad_small_groups<3, I>
         : p <= 64 ? &conv_values_grad_small_groups<4, I>
                   : &conv_values_grad_tiles<I>;
}
#endif

// Forward: items it = n * c_out + co in [i0, i1), each the whole output plane (n, co).
template <typename S, typename I>
void conv_forward(const ConvArgs<S, I>& a, int64_t i0, int64_t i1) {
#ifdef TORCH_NERVA_CONV_AVX512
  if constexpr (sizeof(S) == 4) {
    if (const auto small = conv_forward_small_for(a)) return small(a, i0, i1);
  }
#endif
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo, row_x = a.sh * a.w;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  const bool flat = a.colmask && (a.flat & kConvFlatForward);
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = it / a.c_out, co = it % a.c_out, g = co / cout_g;
    S* yp = a.y + it * plane_out;
    const S b = a.bias ? a.bias[co] : S(0);
    for (int64_t j = 0; j < plane_out; ++j) yp[j] = b;
    const S* xg = a.x + (n * a.c_in + g * cin_g) * plane_in;
    const int64_t k1 = a.crow[co + 1];
    for (int64_t k = a.crow[co]; k < k1; ++k) {
      const ConvTap& tp = a.taps[a.nz_tap[k]];
      if (tp.rows <= 0 || tp.len <= 0) continue;
      const S v = a.values[k];
      const S* xp = xg + a.nz_xoff[k] + tp.x0;
      S* yr = yp + tp.y0;
      if (flat) {
        conv_axpy_masked(yr, xp, a.colmask + tp.mask0, v, tp.flat_len);
      } else {
        for (int64_t r = 0; r < tp.rows; ++r, yr += a.wo, xp += row_x) {
          conv_axpy(yr, xp, v, tp.len, a.sw);
        }
      }
    }
  }
}

// Input gradient: items it = n * c_in + ci in [i0, i1), each the whole plane dx (n, ci), from
// the rows ci_local * kh * kw + tap of W^T (crow_t, col_t, values[perm]) restricted to ci's
// group.
template <typename S, typename I>
void conv_input_grad(const ConvArgs<S, I>& a, int64_t i0, int64_t i1) {
#ifdef TORCH_NERVA_CONV_AVX512
  if constexpr (sizeof(S) == 4) {
    if (const auto small = conv_input_grad_small_for(a)) return small(a, i0, i1);
  }
#endif
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo, row_x = a.sh * a.w;
  const int64_t khw = a.kh * a.kw;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  const bool flat = a.colmask && (a.flat & kConvFlatInput);
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = it / a.c_in, ci = it % a.c_in, g = ci / cin_g, cl = ci % cin_g;
    const int64_t co_lo = g * cout_g, co_hi = co_lo + cout_g;
    S* dp = a.dx + it * plane_in;
    for (int64_t j = 0; j < plane_in; ++j) dp[j] = S(0);
    const S* gn = a.grad + n * a.c_out * plane_out;
    for (int64_t q = 0; q < khw; ++q) {
      const ConvTap& tp = a.taps[q];
      if (tp.rows <= 0 || tp.len <= 0) continue;
      const int64_t c = cl * khw + q, t1 = a.crow_t[c + 1];
      for (int64_t t = a.crow_t[c]; t < t1; ++t) {
        const int64_t co = a.col_t[t];
        if (co < co_lo || co >= co_hi) continue;  // another group's output channel
        const S v = a.values[a.perm[t]];
        const S* gp = gn + co * plane_out + tp.y0;
        S* dxp = dp + tp.x0;
        if (flat) {
          conv_axpy_masked(dxp, gp, a.colmask + tp.mask0, v, tp.flat_len);
        } else {
          for (int64_t r = 0; r < tp.rows; ++r, gp += a.wo, dxp += row_x) {
            conv_axpy_scatter(dxp, gp, v, tp.len, a.sw);
          }
        }
      }
    }
  }
}

// Values gradient: rows co in [r0, r1) of W; dvalues[k] = sum over n (in order) of one dot
// product of the output-gradient plane (n, co) with the shifted input plane of nonzero k.
template <typename S, typename I>
void conv_values_grad(const ConvArgs<S, I>& a, int64_t r0, int64_t r1) {
#ifdef TORCH_NERVA_CONV_AVX512
  if constexpr (sizeof(S) == 4) {
    if (const auto small = conv_values_grad_small_for(a)) return small(a, r0, r1);
  }
#endif
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo, row_x = a.sh * a.w;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  const bool flat = a.colmask && (a.flat & kConvFlatValues);
  for (int64_t co = r0; co < r1; ++co) {
    const int64_t g = co / cout_g, k0 = a.crow[co], k1 = a.crow[co + 1];
    for (int64_t k = k0; k < k1; ++k) a.dvalues[k] = S(0);
    for (int64_t n = 0; n < a.n; ++n) {
      const S* gp = a.grad + (n * a.c_out + co) * plane_out;
      const S* xg = a.x + (n * a.c_in + g * cin_g) * plane_in;
      for (int64_t k = k0; k < k1; ++k) {
        const ConvTap& tp = a.taps[a.nz_tap[k]];
        if (tp.rows <= 0 || tp.len <= 0) continue;
        const S* xp = xg + a.nz_xoff[k] + tp.x0;
        a.dvalues[k] += flat ? conv_dot_masked(gp + tp.y0, xp, a.colmask + tp.mask0, tp.flat_len)
                             : conv_dot(gp + tp.y0, a.wo, xp, row_x, tp.rows, tp.len, a.sw);
      }
    }
  }
}

template <typename S, typename I>
ConvTable<S, I> conv_table() {
  return {&conv_forward<S, I>, &conv_input_grad<S, I>, &conv_values_grad<S, I>};
}

template ConvTable<float, int32_t> conv_table<float, int32_t>();
template ConvTable<float, int64_t> conv_table<float, int64_t>();
template ConvTable<double, int32_t> conv_table<double, int32_t>();
template ConvTable<double, int64_t> conv_table<double, int64_t>();
