// The MKL backend: SpMM through MKL's inspector-executor sparse BLAS, using the MKL that pip
// torch already contains. Called by the CPU kernels of sparse_linear when backend == "mkl"
// (csrc/cpu/linear_cpu.cpp: forward and dX here, dvalues by the native SDDMM: torch's MKL has
// no sampled product).
//
// pip torch links MKL statically into libtorch_cpu.so with GNU threading (torch's libgomp) and
// exports the sparse BLAS entry points it uses: mkl_sparse_?_create_csr, mkl_sparse_?_mm,
// mkl_sparse_destroy (not mkl_sparse_optimize or the hint calls). Calling those keeps the
// process at exactly one OpenMP runtime; a separately installed MKL (mkl_rt, libiomp5) would
// bring a second one. The functions are looked up at run time in the already loaded
// libtorch_cpu.so, so a torch build without them leaves the backend unavailable with a clear
// message instead of breaking the import. Only mkl_spblas.h (PyPI mkl-include) is needed to
// build, for the types.
//
// MKL works on PyTorch's row-major tensors as they are: X (B x in) row-major is X^T (in x B)
// column-major, so Y^T = W X^T is one mkl_sparse_?_mm in column-major layout with no transposes
// of ours, and dX^T = W^T dY^T is the same call with SPARSE_OPERATION_TRANSPOSE.
#include "spmm_mkl.h"

#include "../backend.h"
#include "../checks.h"

#ifdef TORCH_NERVA_WITH_MKL

#include <dlfcn.h>
#include <mkl_spblas.h>

#include <climits>
#include <string>

namespace torch_nerva {
namespace mkl {
namespace {

struct MklApi {
  decltype(&mkl_sparse_s_create_csr) s_create_csr = nullptr;
  decltype(&mkl_sparse_d_create_csr) d_create_csr = nullptr;
  decltype(&mkl_sparse_s_mm) s_mm = nullptr;
  decltype(&mkl_sparse_d_mm) d_mm = nullptr;
  decltype(&mkl_sparse_destroy) destroy = nullptr;
  std::string missing;  // empty when every function was found
};

const MklApi& mkl_api() {
  static const MklApi api = [] {
    MklApi a;
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    auto find = [&](const char* name) -> void* {
      void* f = lib ? dlsym(lib, name) : nullptr;
      if (!f) f = dlsym(RTLD_DEFAULT, name);
      if (!f) a.missing += std::string(a.missing.empty() ? "" : ", ") + name;
      return f;
    };
    a.s_create_csr = reinterpret_cast<decltype(a.s_create_csr)>(find("mkl_sparse_s_create_csr"));
    a.d_create_csr = reinterpret_cast<decltype(a.d_create_csr)>(find("mkl_sparse_d_create_csr"));
    a.s_mm = reinterpret_cast<decltype(a.s_mm)>(find("mkl_sparse_s_mm"));
    a.d_mm = reinterpret_cast<decltype(a.d_mm)>(find("mkl_sparse_d_mm"));
    a.destroy = reinterpret_cast<decltype(a.destroy)>(find("mkl_sparse_destroy"));
    return a;
  }();
  return api;
}

const char* status_name(sparse_status_t s) {
  switch (s) {
    case SPARSE_STATUS_NOT_INITIALIZED: return "not initialized";
    case SPARSE_STATUS_ALLOC_FAILED: return "allocation failed";
    case SPARSE_STATUS_INVALID_VALUE: return "invalid value";
    case SPARSE_STATUS_EXECUTION_FAILED: return "execution failed";
    case SPARSE_STATUS_INTERNAL_ERROR: return "internal error";
    case SPARSE_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "unknown status";
  }
}

#define TN_MKL_CHECK(op, call, what)                                                        \
  do {                                                                                      \
    const sparse_status_t status_ = (call);                                                 \
    TORCH_CHECK(status_ == SPARSE_STATUS_SUCCESS, op, ": MKL ", what, " failed: ",          \
                status_name(status_));                                                      \
  } while (0)

// A CSR handle over the caller's arrays (MKL does not copy them), destroyed on scope exit.
struct Handle {
  sparse_matrix_t m = nullptr;
  ~Handle() {
    if (m) mkl_api().destroy(m);
  }
};

// MKL reads what it is given: check every index first (O(rows + nnz), a small fraction of the
// product's nnz x batch work), in the layout's own index type (before any conversion to int32
// could wrap an out-of-range value into range), so that a malformed layout raises instead of
// being read out of bounds. Sortedness and duplicates do not matter to the product.
template <typename index_t>
void check_indices(const char* op, const at::Tensor& crow, const at::Tensor& col,
                   int64_t n_rows, int64_t n_cols) {
  const index_t* rows = crow.data_ptr<index_t>();
  check_row_pointer_ends(op, rows, n_rows, col.numel());
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(rows[r] <= rows[r + 1], op, ": malformed row pointer: row ", r, " spans [",
                (int64_t)rows[r], ", ", (int64_t)rows[r + 1], ")");
  }
  const index_t* cols = col.data_ptr<index_t>();
  for (int64_t k = 0; k < col.numel(); ++k) {
    TORCH_CHECK(cols[k] >= 0 && cols[k] < n_cols, op, ": column index out of range at position ",
                k, ": ", (int64_t)cols[k], " not in [0, ", n_cols, ")");
  }
}

}  // namespace

bool available() { return mkl_api().missing.empty(); }

at::Tensor spmm(const char* op, const at::Tensor& x, const at::Tensor& values,
                const at::Tensor& crow, const at::Tensor& col, int64_t n_cols, bool transpose) {
  const MklApi& api = mkl_api();
  TORCH_CHECK(api.missing.empty(), op, ": the MKL inside this torch build does not export ",
              api.missing, "; use backend='native'");
  check_devices(op, at::kCPU, {{"x", &x}, {"values", &values}, {"crow", &crow}, {"col", &col}});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got shape ", x.sizes());
  check_index_pair(op, crow, col);
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == x.scalar_type(), op,
              ": values must be 1-D of x's dtype ", x.scalar_type(), ", got ",
              values.scalar_type(), " of shape ", values.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": backend 'mkl' cannot compute in ", x.scalar_type(), ": MKL's sparse BLAS has "
              "no ", x.scalar_type(), " kernels. Use backend='native' (bfloat16/float16 storage, "
              "float32 accumulation) or backend='dense'");
  const int64_t n_rows = crow.numel() - 1;
  TORCH_CHECK(values.numel() == col.numel(), op, ": values has ", values.numel(),
              " entries but the layout has nnz = ", col.numel());
  TORCH_CHECK(n_cols >= 0, op, ": n_cols must be >= 0, got ", n_cols);
  const int64_t k_in = transpose ? n_rows : n_cols, k_out = transpose ? n_cols : n_rows;
  TORCH_CHECK(x.size(1) == k_in, op, ": x has ", x.size(1), " columns, expected ", k_in);
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, k_out}, x.options());
  if (batch == 0 || k_out == 0) return y;
  TORCH_CHECK(k_in < INT32_MAX && k_out < INT32_MAX && batch < INT32_MAX &&
                  col.numel() < INT32_MAX,
              op, ": dimensions or nnz beyond int32 are not supported by MKL's LP64 interface; "
              "use backend='native'");
  at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva_mkl",
                          [&] { check_indices<index_t>(op, crow_c, col_c, n_rows, n_cols); });
  if (col.numel() == 0 || k_in == 0) return y.zero_();
  if (crow_c.scalar_type() != at::kInt) {  // validated above: the values fit
    crow_c = crow_c.to(at::kInt);
    col_c = col_c.to(at::kInt);
  }
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  int32_t* rows = crow_c.data_ptr<int32_t>();
  int32_t* cols = col_c.data_ptr<int32_t>();
  matrix_descr descr;
  descr.type = SPARSE_MATRIX_TYPE_GENERAL;
  descr.mode = SPARSE_FILL_MODE_LOWER;
  descr.diag = SPARSE_DIAG_NON_UNIT;
  const sparse_operation_t operation =
      transpose ? SPARSE_OPERATION_TRANSPOSE : SPARSE_OPERATION_NON_TRANSPOSE;
  Handle h;
  // Column-major views: x is (k_in x batch) with ld k_in, y is (k_out x batch) with ld k_out.
  if (x.scalar_type() == at::kFloat) {
    TN_MKL_CHECK(op, api.s_create_csr(&h.m, SPARSE_INDEX_BASE_ZERO, (MKL_INT)n_rows,
                                      (MKL_INT)n_cols, rows, rows + 1, cols,
                                      const_cast<float*>(vc.data_ptr<float>())),
                 "create_csr");
    TN_MKL_CHECK(op, api.s_mm(operation, 1.0f, h.m, descr, SPARSE_LAYOUT_COLUMN_MAJOR,
                              xc.data_ptr<float>(), (MKL_INT)batch, (MKL_INT)k_in, 0.0f,
                              y.data_ptr<float>(), (MKL_INT)k_out),
                 "mm");
  } else {
    TN_MKL_CHECK(op, api.d_create_csr(&h.m, SPARSE_INDEX_BASE_ZERO, (MKL_INT)n_rows,
                                      (MKL_INT)n_cols, rows, rows + 1, cols,
                                      const_cast<double*>(vc.data_ptr<double>())),
                 "create_csr");
    TN_MKL_CHECK(op, api.d_mm(operation, 1.0, h.m, descr, SPARSE_LAYOUT_COLUMN_MAJOR,
                              xc.data_ptr<double>(), (MKL_INT)batch, (MKL_INT)k_in, 0.0,
                              y.data_ptr<double>(), (MKL_INT)k_out),
                 "mm");
  }
  return y;
}

}  // namespace mkl
}  // namespace torch_nerva

#else  // built without MKL: the backend raises with the command that builds it

namespace torch_nerva {
namespace mkl {

bool available() { return false; }

at::Tensor spmm(const char* op, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, int64_t, bool) {
  TORCH_CHECK(false, op, ": backend 'mkl' is not available in this build: ",
              how_to_build("mkl"));
}

}  // namespace mkl
}  // namespace torch_nerva

#endif  // TORCH_NERVA_WITH_MKL
