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
    const int64_t c = a.col[k];
    if (c < 0 || c >= a.n_in) {
      if (err.pos < 0) err.pos = k;
      continue;
    }
    int64_t p = k;
    if (a.perm) {
      p = a.perm[k];
      if (p < 0 || p >= a.n_values) {
        if (err.perm < 0) err.perm = k;
        continue;
      }
    }
    const S v = a.values[p];
    const S* __restrict__ xr = a.xt + c * a.ld + b0;
    for (int64_t j = 0; j < W; ++j) acc[j] += v * xr[j];
  }
  S* __restrict__ yt = a.yt + r * a.ld + b0;
  for (int64_t j = 0; j < W; ++j) yt[j] = acc[j];
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
    const int64_t c = a.col[k];
    if (c < 0 || c >= a.n_in) {
      if (err.pos < 0) err.pos = k;
      continue;
    }
    int64_t p = k;
    if (a.perm) {
      p = a.perm[k];
      if (p < 0 || p >= a.n_values) {
        if (err.perm < 0) err.perm = k;
        continue;
      }
    }
    const S v = a.values[p];
    const S* __restrict__ xr = a.xt + c * a.ld;
    for (int64_t j = 0; j < a.batch; ++j) acc[j] += v * xr[j];
  }
  for (int64_t j = 0; j < a.batch; ++j) a.yt[r * a.ld + j] = acc[j];
}

template <typename S, typename I>
void spmm_rows(const SpmmArgs<S, I>& a, int64_t r0, int64_t r1, KernelError& err) {
  constexpr int64_t L = lanes<S>();
  const int64_t nnz = a.crow[a.n_out];
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, end;
    if (!row_range<S, I>(a.crow, r, nnz, start, end, err)) continue;
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

template <typename S, typename I>
void sddmm_rows(const SddmmArgs<S, I>& a, int64_t r0, int64_t r1, KernelError& err) {
  constexpr int64_t L = lanes<S>();
  const int64_t nnz = a.crow[a.n_out];
  const int64_t whole = a.ld / L * L;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t start, end;
    if (!row_range<S, I>(a.crow, r, nnz, start, end, err)) continue;
    const S* __restrict__ g = a.gt + r * a.ld;
    for (int64_t k = start; k < end; ++k) {
      const int64_t c = a.col[k];
      if (c < 0 || c >= a.n_in) {
        if (err.pos < 0) err.pos = k;
        a.out[k] = S(0);
        continue;
      }
      const S* __restrict__ xr = a.xt + c * a.ld;
      S acc[L];
      for (int64_t j = 0; j < L; ++j) acc[j] = S(0);
      for (int64_t b = 0; b < whole; b += L) {
        for (int64_t j = 0; j < L; ++j) acc[j] += g[b + j] * xr[b + j];
      }
      S tail = S(0);
      for (int64_t b = whole; b < a.ld; ++b) tail += g[b] * xr[b];
      // Pairwise lane sum: fixed order, so results do not depend on threads.
      for (int64_t w = L / 2; w > 0; w /= 2) {
        for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
      }
      a.out[k] = acc[0] + tail;
    }
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i in [i0, i1), j in [j0, j1), in TI x TJ tiles. Keep
// TI <= 8 when lds is a large power-of-two multiple (those rows share L1 sets), TJ likewise.
template <int TI, int TJ, typename S>
inline void transpose_tiles(const S* src, int64_t lds, S* dst, int64_t ldd, int64_t i0,
                            int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t ib = i0; ib < i1; ib += TI) {
    const int64_t ie = tn_min<int64_t>(ib + TI, i1);
    for (int64_t jb = j0; jb < j1; jb += TJ) {
      const int64_t je = tn_min<int64_t>(jb + TJ, j1);
      if (ie - ib == TI && je - jb == TJ) {
        for (int64_t j = 0; j < TJ; ++j) {
          for (int64_t i = 0; i < TI; ++i) dst[(jb + j) * ldd + ib + i] = src[(ib + i) * lds + jb + j];
        }
      } else {
        for (int64_t j = jb; j < je; ++j) {
          for (int64_t i = ib; i < ie; ++i) dst[j * ldd + i] = src[i * lds + j];
        }
      }
    }
  }
}

template <typename S>
void transpose_pad(const S* x, int64_t batch, int64_t n, int64_t ld, S* xt, int64_t i0,
                   int64_t i1) {
  // x is (batch x n): its rows are the strided side, 8 at a time.
  transpose_tiles<8, 16, S>(x, n, xt, ld, 0, batch, i0, i1);
  if (ld > batch) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t b = batch; b < ld; ++b) xt[i * ld + b] = S(0);
    }
  }
}

template <typename S>
void untranspose(const S* yt, int64_t batch, int64_t n, int64_t ld, S* y, int64_t i0,
                 int64_t i1) {
  // y is (batch x n): its rows are the strided side, 8 at a time.
  transpose_tiles<16, 8, S>(yt, ld, y, n, i0, i1, 0, batch);
}

template <typename S, typename I>
KernelTable<S, I> kernel_table() {
  return {&spmm_rows<S, I>, &sddmm_rows<S, I>};
}

template <typename S>
TransposeTable<S> transpose_table() {
  return {&transpose_pad<S>, &untranspose<S>};
}

template KernelTable<float, int32_t> kernel_table<float, int32_t>();
template KernelTable<float, int64_t> kernel_table<float, int64_t>();
template KernelTable<double, int32_t> kernel_table<double, int32_t>();
template KernelTable<double, int64_t> kernel_table<double, int64_t>();
template TransposeTable<float> transpose_table<float>();
template TransposeTable<double> transpose_table<double>();
