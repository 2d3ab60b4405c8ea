// The sparse 2-D convolution kernels, compiled once per instruction set: included by
// conv_cpu.cpp inside `namespace torch_nerva::cpu::<isa>` under a `#pragma GCC target`, like
// kernels_impl.h. No includes here (see kernels.h). Plain loops over contiguous pixel runs,
// vectorised by the compiler; the padding is handled by clipping each nonzero's pixel range
// (conv_range), never by a test per pixel.
//
// Layouts (ConvArgs in conv_cpu.cpp): x (n, c_in, h, w), y and grad (n, c_out, ho, wo), dx like
// x, all contiguous. W is a CSR of c_out rows over c_in / groups * kh * kw columns, column
// c = (ci_local * kh + ky) * kw + kx; output channel co reads input channels
// g * c_in / groups + ci_local of its group g = co / (c_out / groups).

// Output positions o in [lo, hi) of [0, n_out) whose input position o * s + off lies in
// [0, n_in) (off = k * dilation - padding).
struct ConvRange {
  int64_t lo, hi;
};
inline ConvRange conv_range(int64_t n_in, int64_t n_out, int64_t s, int64_t off) {
  int64_t lo = off >= 0 ? 0 : (-off + s - 1) / s;
  const int64_t top = n_in - 1 - off;  // o * s <= top
  int64_t hi = top < 0 ? 0 : top / s + 1;
  if (hi > n_out) hi = n_out;
  if (lo > hi) lo = hi;
  return {lo, hi};
}

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

// Forward: items it = n * c_out + co in [i0, i1), each the whole output plane (n, co).
template <typename S, typename I>
void conv_forward(const ConvArgs<S, I>& a, int64_t i0, int64_t i1) {
  const int64_t khw = a.kh * a.kw, plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = it / a.c_out, co = it % a.c_out, g = co / cout_g;
    S* yp = a.y + it * plane_out;
    const S b = a.bias ? a.bias[co] : S(0);
    for (int64_t j = 0; j < plane_out; ++j) yp[j] = b;
    const S* xg = a.x + (n * a.c_in + g * cin_g) * plane_in;
    const int64_t k1 = a.crow[co + 1];
    for (int64_t k = a.crow[co]; k < k1; ++k) {
      const int64_t c = a.col[k];
      const int64_t ci = c / khw, ky = (c % khw) / a.kw, kx = c % a.kw;
      const int64_t offy = ky * a.dh - a.ph, offx = kx * a.dw - a.pw;
      const ConvRange ry = conv_range(a.h, a.ho, a.sh, offy);
      const ConvRange rx = conv_range(a.w, a.wo, a.sw, offx);
      const int64_t len = rx.hi - rx.lo;
      if (len <= 0) continue;
      const S v = a.values[k];
      const S* xp = xg + ci * plane_in + (rx.lo * a.sw + offx);
      for (int64_t oy = ry.lo; oy < ry.hi; ++oy) {
        conv_axpy(yp + oy * a.wo + rx.lo, xp + (oy * a.sh + offy) * a.w, v, len, a.sw);
      }
    }
  }
}

// Input gradient: items it = n * c_in + ci in [i0, i1), each the whole plane dx (n, ci), from
// the rows ci_local * kh * kw ... of W^T (crow_t, col_t, values[perm]) restricted to ci's group.
template <typename S, typename I>
void conv_input_grad(const ConvArgs<S, I>& a, int64_t i0, int64_t i1) {
  const int64_t plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t n = it / a.c_in, ci = it % a.c_in, g = ci / cin_g, cl = ci % cin_g;
    const int64_t co_lo = g * cout_g, co_hi = co_lo + cout_g;
    S* dp = a.dx + it * plane_in;
    for (int64_t j = 0; j < plane_in; ++j) dp[j] = S(0);
    const S* gn = a.grad + n * a.c_out * plane_out;
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t offy = ky * a.dh - a.ph;
      const ConvRange ry = conv_range(a.h, a.ho, a.sh, offy);
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t offx = kx * a.dw - a.pw;
        const ConvRange rx = conv_range(a.w, a.wo, a.sw, offx);
        const int64_t len = rx.hi - rx.lo;
        if (len <= 0 || ry.hi <= ry.lo) continue;
        const int64_t c = (cl * a.kh + ky) * a.kw + kx;
        const int64_t t1 = a.crow_t[c + 1];
        S* dxp = dp + (rx.lo * a.sw + offx);
        for (int64_t t = a.crow_t[c]; t < t1; ++t) {
          const int64_t co = a.col_t[t];
          if (co < co_lo || co >= co_hi) continue;  // another group's output channel
          const S v = a.values[a.perm[t]];
          const S* gp = gn + co * plane_out + rx.lo;
          for (int64_t oy = ry.lo; oy < ry.hi; ++oy) {
            conv_axpy_scatter(dxp + (oy * a.sh + offy) * a.w, gp + oy * a.wo, v, len, a.sw);
          }
        }
      }
    }
  }
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

// Values gradient: rows co in [r0, r1) of W; dvalues[k] = sum over n (in order) of one dot
// product of the output-gradient plane (n, co) with the shifted input plane of nonzero k.
template <typename S, typename I>
void conv_values_grad(const ConvArgs<S, I>& a, int64_t r0, int64_t r1) {
  const int64_t khw = a.kh * a.kw, plane_in = a.h * a.w, plane_out = a.ho * a.wo;
  const int64_t cin_g = a.c_in / a.groups, cout_g = a.c_out / a.groups;
  for (int64_t co = r0; co < r1; ++co) {
    const int64_t g = co / cout_g, k0 = a.crow[co], k1 = a.crow[co + 1];
    for (int64_t k = k0; k < k1; ++k) a.dvalues[k] = S(0);
    for (int64_t n = 0; n < a.n; ++n) {
      const S* gp = a.grad + (n * a.c_out + co) * plane_out;
      const S* xg = a.x + (n * a.c_in + g * cin_g) * plane_in;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c = a.col[k];
        const int64_t ci = c / khw, ky = (c % khw) / a.kw, kx = c % a.kw;
        const int64_t offy = ky * a.dh - a.ph, offx = kx * a.dw - a.pw;
        const ConvRange ry = conv_range(a.h, a.ho, a.sh, offy);
        const ConvRange rx = conv_range(a.w, a.wo, a.sw, offx);
        const int64_t len = rx.hi - rx.lo;
        if (len <= 0 || ry.hi <= ry.lo) continue;
        a.dvalues[k] += conv_dot(gp + ry.lo * a.wo + rx.lo, a.wo,
                                 xg + ci * plane_in + (ry.lo * a.sh + offy) * a.w +
                                     (rx.lo * a.sw + offx),
                                 a.sh * a.w, ry.hi - ry.lo, len, a.sw);
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
