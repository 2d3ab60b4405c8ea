// The cuSPARSE backend: sparse_linear, its backward, csr_spmm and csr_sddmm on CUDA tensors
// through cuSPARSE's generic API. Host code only (no kernels of ours), compiled by the C++
// compiler against the CUDA headers.
//
//   forward  Y^T (out x B) = W X^T    cusparseSpMM, W in CSR, X row-major read as X^T
//                                     column-major (ld = in), Y written as Y^T column-major
//   dX       dX^T (in x B) = W^T dY^T cusparseSpMM on the cached CSR of W^T (values[perm]),
//                                     non-transposed: cuSPARSE documents the transposed
//                                     operation as not reproducible run to run
//   dvalues  (dY^T X) at W's pattern  cusparseSDDMM, dY row-major with opA = transpose
//
// Handle from ATen's pool (bound to the current stream), workspace from the caching allocator,
// CUSPARSE_SPMM_ALG_DEFAULT and CUSPARSE_SDDMM_ALG_DEFAULT.
//
// Value types: float32 and float64 (computed in their own precision), bfloat16 and float16
// (CUDA_R_16BF / CUDA_R_16F data, CUDA_R_32F compute type: products accumulated in float32 and
// rounded once to the 16-bit output; the bias enters the same accumulation through beta = 1).
// Where cuSPARSE reports a 16-bit combination as not supported (CUSPARSE_STATUS_NOT_SUPPORTED:
// it depends on the GPU and the CUDA version), the product is computed on float32 copies and
// rounded once to the 16-bit type: the same result up to the summation order. Index tensors are validated on the
// device before cuSPARSE reads them (one synchronising check per call): a malformed layout
// raises instead of faulting the GPU.
#ifdef TORCH_NERVA_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparse.h>
#include <torch/library.h>

#include "../nonfinite.h"

#include <tuple>
#include <vector>

namespace torch_nerva {
namespace cuda {
namespace {

const char* cusparse_error(cusparseStatus_t s) { return cusparseGetErrorString(s); }

#define TN_CUSPARSE_CHECK(call)                                                         \
  do {                                                                                  \
    const cusparseStatus_t status_ = (call);                                            \
    TORCH_CHECK(status_ == CUSPARSE_STATUS_SUCCESS, "torch_nerva (cuSPARSE): ", #call, \
                " failed: ", cusparse_error(status_));                                  \
  } while (0)

cudaDataType value_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default:
      TORCH_CHECK(false, "torch_nerva (cuSPARSE): only float32, float64, bfloat16 and float16 "
                  "are supported, got ", t.scalar_type());
  }
}

// float64 computes in float64; float32, bfloat16 and float16 in float32.
cudaDataType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
}

bool low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

cusparseIndexType_t index_type(const at::Tensor& t) {
  return t.scalar_type() == at::kInt ? CUSPARSE_INDEX_32I : CUSPARSE_INDEX_64I;
}

void check_same_device(const char* op, const at::Tensor& ref, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", ref.device());
}

// Validates a CSR (n_rows x n_cols) on the device: row pointer from 0 to nnz, non-decreasing,
// columns in range. One host synchronisation.
void check_layout(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t n_cols) {
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && col.dim() == 1, op,
              ": crow must be 1-D with n_rows + 1 >= 1 entries and col 1-D");
  TORCH_CHECK((crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong) &&
                  col.scalar_type() == crow.scalar_type(),
              op, ": crow and col must share one index dtype, int32 or int64");
  const int64_t nnz = col.numel();
  std::vector<at::Tensor> bad;
  bad.push_back(crow.select(0, 0).ne(0));
  bad.push_back(crow.select(0, crow.numel() - 1).ne(nnz));
  if (crow.numel() > 1) bad.push_back(crow.diff().lt(0).any());
  if (nnz > 0) {
    bad.push_back(col.lt(0).any());
    bad.push_back(col.ge(n_cols).any());
  }
  const at::Tensor flags = at::stack(bad).cpu();
  const bool* f = flags.data_ptr<bool>();
  TORCH_CHECK(!f[0] && !f[1], op, ": the row pointer must run from 0 to nnz = ", nnz);
  TORCH_CHECK(crow.numel() <= 1 || !f[2], op, ": malformed row pointer (decreasing)");
  TORCH_CHECK(nnz == 0 || (!f[3] && !f[4]), op, ": column index out of range (not in [0, ",
              n_cols, "))");
}

struct SpMat {
  cusparseSpMatDescr_t d = nullptr;
  ~SpMat() {
    if (d) cusparseDestroySpMat(d);
  }
};
struct DnMat {
  cusparseDnMatDescr_t d = nullptr;
  ~DnMat() {
    if (d) cusparseDestroyDnMat(d);
  }
};

SpMat csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
          int64_t n_rows, int64_t n_cols) {
  SpMat m;
  TN_CUSPARSE_CHECK(cusparseCreateCsr(&m.d, n_rows, n_cols, col.numel(), crow.data_ptr(),
                                      col.data_ptr(), values.data_ptr(), index_type(crow),
                                      index_type(col), CUSPARSE_INDEX_BASE_ZERO,
                                      value_type(values)));
  return m;
}

DnMat dense(const at::Tensor& t, int64_t rows, int64_t cols, int64_t ld, cusparseOrder_t order) {
  DnMat m;
  TN_CUSPARSE_CHECK(cusparseCreateDnMat(&m.d, rows, cols, ld, t.data_ptr(), value_type(t),
                                        order));
  return m;
}

// alpha = 1 and beta = 0 or 1 in the compute type of x (host pointers, cuSPARSE's default
// mode).
struct Scalars {
  double one_d = 1.0, zero_d = 0.0;
  float one_f = 1.0f, zero_f = 0.0f;
  const void* one;
  const void* zero;
  explicit Scalars(const at::Tensor& x) {
    const bool f64 = x.scalar_type() == at::kDouble;
    one = f64 ? static_cast<const void*>(&one_d) : &one_f;
    zero = f64 ? static_cast<const void*>(&zero_d) : &zero_f;
  }
  Scalars(const Scalars&) = delete;  // the pointers point into this object
};

// y (batch x n_rows) = x (batch x n_cols) W^T for W (n_rows x n_cols) in CSR, + bias. The bias
// is the initial value of y (beta = 1), so it is summed in the compute type with the products.
at::Tensor spmm(const char* op, const at::Tensor& x, const at::Tensor& values,
                const at::Tensor& crow, const at::Tensor& col, const at::Tensor& bias) {
  const int64_t batch = x.size(0), n_cols = x.size(1), n_rows = crow.numel() - 1;
  at::Tensor y = at::empty({batch, n_rows}, x.options());
  if (batch == 0 || n_rows == 0) return y;
  if (col.numel() == 0 || n_cols == 0) {
    if (bias.defined()) return y.copy_(bias.expand({batch, n_rows}));
    return y.zero_();
  }
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  SpMat a = csr(crow, col, vc, n_rows, n_cols);
  DnMat b = dense(xc, n_cols, batch, n_cols, CUSPARSE_ORDER_COL);
  if (bias.defined()) y.copy_(bias.expand({batch, n_rows}));
  DnMat c = dense(y, n_rows, batch, n_rows, CUSPARSE_ORDER_COL);
  cusparseHandle_t handle = at::cuda::getCurrentCUDASparseHandle();
  const Scalars scalars(x);
  const void* alpha = scalars.one;
  const void* beta = bias.defined() ? scalars.one : scalars.zero;
  size_t bytes = 0;
  const cusparseStatus_t status = cusparseSpMM_bufferSize(
      handle, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_NON_TRANSPOSE, alpha, a.d,
      b.d, beta, c.d, compute_type(x), CUSPARSE_SPMM_ALG_DEFAULT, &bytes);
  if (status == CUSPARSE_STATUS_NOT_SUPPORTED && low_precision(x)) {  // see the file comment
    return spmm(op, xc.to(at::kFloat), vc.to(at::kFloat), crow, col,
                bias.defined() ? bias.to(at::kFloat) : bias)
        .to(x.scalar_type());
  }
  TORCH_CHECK(status == CUSPARSE_STATUS_SUCCESS, "torch_nerva (cuSPARSE): cusparseSpMM_bufferSize "
              "failed: ", cusparse_error(status));
  auto workspace = c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
  TN_CUSPARSE_CHECK(cusparseSpMM(handle, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                 CUSPARSE_OPERATION_NON_TRANSPOSE, alpha, a.d, b.d, beta, c.d,
                                 compute_type(x), CUSPARSE_SPMM_ALG_DEFAULT, workspace.get()));
  return y;
}

// out[k] = sum_b grad[b, row(k)] x[b, col(k)].
at::Tensor sddmm(const char* op, const at::Tensor& grad, const at::Tensor& x,
                 const at::Tensor& crow, const at::Tensor& col) {
  const int64_t batch = x.size(0), n_cols = x.size(1), n_rows = crow.numel() - 1;
  at::Tensor out = at::zeros({col.numel()}, x.options());
  if (col.numel() == 0 || batch == 0) return out;
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous();
  SpMat c = csr(crow, col, out, n_rows, n_cols);
  DnMat a = dense(gc, batch, n_rows, n_rows, CUSPARSE_ORDER_ROW);  // dY, used transposed
  DnMat b = dense(xc, batch, n_cols, n_cols, CUSPARSE_ORDER_ROW);
  cusparseHandle_t handle = at::cuda::getCurrentCUDASparseHandle();
  const Scalars scalars(x);
  const void* alpha = scalars.one;
  const void* beta = scalars.zero;
  size_t bytes = 0;
  const cusparseStatus_t status = cusparseSDDMM_bufferSize(
      handle, CUSPARSE_OPERATION_TRANSPOSE, CUSPARSE_OPERATION_NON_TRANSPOSE, alpha, a.d, b.d,
      beta, c.d, compute_type(x), CUSPARSE_SDDMM_ALG_DEFAULT, &bytes);
  if (status == CUSPARSE_STATUS_NOT_SUPPORTED && low_precision(x)) {  // see the file comment
    return sddmm(op, gc.to(at::kFloat), xc.to(at::kFloat), crow, col).to(x.scalar_type());
  }
  TORCH_CHECK(status == CUSPARSE_STATUS_SUCCESS, "torch_nerva (cuSPARSE): cusparseSDDMM_bufferSize "
              "failed: ", cusparse_error(status));
  auto workspace = c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
  TN_CUSPARSE_CHECK(cusparseSDDMM(handle, CUSPARSE_OPERATION_TRANSPOSE,
                                  CUSPARSE_OPERATION_NON_TRANSPOSE, alpha, a.d, b.d, beta, c.d,
                                  compute_type(x), CUSPARSE_SDDMM_ALG_DEFAULT, workspace.get()));
  return out;
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& values,
                  const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got shape ", x.sizes());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), op, ": values must be 1-D "
              "with nnz = ", col.numel(), " entries, got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": x has dtype ", x.scalar_type(),
              " but values have dtype ", values.scalar_type());
  check_same_device(op, x, values, "values");
  check_same_device(op, x, crow, "crow");
  check_same_device(op, x, col, "col");
}

at::Tensor csr_spmm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                         const at::Tensor& col, const c10::optional<at::Tensor>& perm,
                         const c10::optional<at::Tensor>& bias) {
  const char* op = "torch_nerva.csr_spmm";
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, op, ": x must be a 2-D CUDA tensor");
  check_layout(op, crow, col, x.size(1));
  at::Tensor v = values;
  if (perm.has_value()) {
    TORCH_CHECK(perm->numel() == col.numel(), op, ": perm must have nnz entries");
    v = values.index_select(0, *perm);
  }
  check_common(op, x, v, crow, col);
  return spmm(op, x, v, crow, col, bias.value_or(at::Tensor()));
}

at::Tensor csr_sddmm_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col) {
  const char* op = "torch_nerva.csr_sddmm";
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0), op,
              ": grad_out and x must be 2-D with one batch size");
  TORCH_CHECK(grad.size(1) == crow.numel() - 1, op, ": grad_out has ", grad.size(1),
              " columns but the layout has ", crow.numel() - 1, " rows");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad_out and x dtypes differ");
  check_same_device(op, x, grad, "grad_out");
  check_layout(op, crow, col, x.size(1));
  value_type(x);
  return sddmm(op, grad, x, crow, col);
}

// The forward returns x itself (contiguous) as the saved tensor: cuSPARSE reads row-major
// activations directly, so there is no transposed copy on CUDA.
std::tuple<at::Tensor, at::Tensor> sparse_linear_cuda(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm) {
  const char* op = "torch_nerva.sparse_linear";
  c10::cuda::CUDAGuard guard(x.device());
  check_common(op, x, values, crow, col);
  TORCH_CHECK(x.size(1) == crow_t.numel() - 1, op, ": x has ", x.size(1),
              " features but the layer has in_features = ", crow_t.numel() - 1);
  check_layout(op, crow, col, x.size(1));
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == crow.numel() - 1 && bias->scalar_type() == x.scalar_type(),
                op, ": bias must have out_features entries of x's dtype");
    check_same_device(op, x, *bias, "bias");
  }
  check_same_device(op, x, crow_t, "crow_t");
  check_same_device(op, x, col_t, "col_t");
  check_same_device(op, x, perm, "perm");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = spmm(op, xc, values, crow, col, bias.value_or(at::Tensor()));
  // dense math's NaN/Inf semantics (csrc/nonfinite.h); the test costs one more host
  // synchronisation beside check_layout's
  if (at::isfinite(xc).logical_not().any().item<bool>()) {
    apply_dense_nonfinite(y, xc, [&](const at::Tensor& indicator) {
      return spmm(op, indicator, at::ones({col.numel()}, indicator.options()), crow, col,
                  at::Tensor());
    });
  }
  return {y, xc};
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward_cuda(
    const at::Tensor& grad, const at::Tensor& xt, const at::Tensor& values,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, bool input_grad, bool values_grad) {
  const char* op = "torch_nerva.sparse_linear_backward";
  c10::cuda::CUDAGuard guard(grad.device());
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == crow.numel() - 1, op,
              ": grad must be (batch x out_features = ", crow.numel() - 1, "), got ",
              grad.sizes());
  const int64_t in_features = crow_t.numel() - 1;
  check_same_device(op, grad, values, "values");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"crow", &crow},
                                {"col", &col}, {"crow_t", &crow_t}, {"col_t", &col_t},
                                {"perm", &perm}}) {
    check_same_device(op, grad, *t, name);
  }
  if (values_grad) check_same_device(op, grad, xt, "xt");
  at::Tensor grad_x = at::empty({0}, grad.options());
  at::Tensor grad_values = at::empty({0}, grad.options());
  if (input_grad) {
    check_layout(op, crow_t, col_t, crow.numel() - 1);
    TORCH_CHECK(perm.numel() == col.numel(), op, ": perm must have nnz entries");
    const at::Tensor values_t = values.index_select(0, perm);
    const at::Tensor gc = grad.contiguous();
    grad_x = spmm(op, gc, values_t, crow_t, col_t, at::Tensor());
    TORCH_CHECK(grad_x.size(1) == in_features, op, ": inconsistent transposed layout");
    if (at::isfinite(gc).logical_not().any().item<bool>()) {  // as in the forward
      apply_dense_nonfinite(grad_x, gc, [&](const at::Tensor& indicator) {
        return spmm(op, indicator, at::ones({col_t.numel()}, indicator.options()), crow_t,
                    col_t, at::Tensor());
      });
    }
  }
  if (values_grad) {
    TORCH_CHECK(xt.dim() == 2 && xt.size(0) == grad.size(0) && xt.size(1) == in_features, op,
                ": saved input must be (batch x in_features), got ", xt.sizes());
    check_layout(op, crow, col, in_features);
    grad_values = sddmm(op, grad, xt, crow, col);
  }
  return {grad_x, grad_values};
}

bool cuda_built() { return true; }

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_sddmm", &csr_sddmm_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cuda);
}

TORCH_LIBRARY_IMPL(torch_nerva, CompositeExplicitAutograd, m) {
  m.impl("_cusparse_built", &cuda_built);
}

}  // namespace cuda
}  // namespace torch_nerva

#endif  // TORCH_NERVA_WITH_CUDA
