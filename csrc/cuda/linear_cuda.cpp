// The CUDA kernels of sparse_linear (backend "cusparse"; "native" has no CUDA kernel yet and
// raises), its backward, csr_spmm and csr_sddmm on CUDA tensors, through cuSPARSE's generic
// API. Host code only (no kernels of ours), compiled by the C++ compiler against the CUDA
// headers. Argument checks are those of the CPU kernels (csrc/checks.h); the index data are
// validated on the device. In a build without CUDA the same ops raise on CUDA tensors with the
// command that builds the backend (end of this file).
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
#include "../backend.h"
#include "../checks.h"

#include <torch/library.h>

#include <tuple>

#ifdef TORCH_NERVA_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusparse.h>

#include "../nonfinite.h"

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

// Validates a CSR (n_rows x n_cols) on the device: row pointer from 0 to nnz, non-decreasing,
// columns in range. One host synchronisation.
void check_layout(const char* op, const at::Tensor& crow, const at::Tensor& col, int64_t n_cols) {
  check_index_pair(op, crow, col);
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

// perm indexes values (n_values entries): checked on the device before index_select reads it
// (an out-of-range index would be a device-side assertion, fatal to the CUDA context).
void check_perm_range(const char* op, const at::Tensor& perm, int64_t n_values) {
  if (perm.numel() == 0) return;
  TORCH_CHECK(!(perm.lt(0) | perm.ge(n_values)).any().item<bool>(), op,
              ": perm index out of range (not in [0, ", n_values, "))");
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

// x (batch x n_cols) on a CUDA device, values (nnz) of its dtype, the layout on the same device.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& values,
                  const at::Tensor& crow, const at::Tensor& col) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got shape ", x.sizes());
  check_devices(op, x.device(), {{"values", &values}, {"crow", &crow}, {"col", &col}});
  check_index_pair(op, crow, col);
  check_values(op, values, x, "x", /*low_precision=*/true);
  TORCH_CHECK(values.numel() == col.numel(), op, ": values has ", values.numel(),
              " entries but the layout has nnz = ", col.numel());
}

at::Tensor csr_spmm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                         const at::Tensor& col, const c10::optional<at::Tensor>& perm,
                         const c10::optional<at::Tensor>& bias) {
  const char* op = "torch_nerva.csr_spmm";
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, op, ": x must be a 2-D CUDA tensor");
  const at::Tensor no_tensor;
  check_devices(op, x.device(), {{"values", &values}, {"crow", &crow}, {"col", &col},
                                 {"perm", perm.has_value() ? &*perm : &no_tensor},
                                 {"bias", bias.has_value() ? &*bias : &no_tensor}});
  check_layout(op, crow, col, x.size(1));
  at::Tensor v = values;
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 1 && perm->numel() == col.numel(), op,
                ": perm must be 1-D with nnz = ", col.numel(), " entries, got shape ",
                perm->sizes());
    TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
    check_perm_range(op, *perm, values.numel());
    v = values.index_select(0, *perm);
  }
  check_common(op, x, v, crow, col);
  check_bias(op, bias, crow.numel() - 1, x);
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
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
              grad.scalar_type(), " but x has dtype ", x.scalar_type());
  check_devices(op, x.device(), {{"grad_out", &grad}, {"crow", &crow}, {"col", &col}});
  check_layout(op, crow, col, x.size(1));
  value_type(x);
  return sddmm(op, grad, x, crow, col);
}

// The CUDA kernel's backend: cusparse ("native" has no CUDA kernel yet; "mkl" is CPU only).
void check_cuda_backend(const char* op, c10::string_view name, const at::Device& device) {
  const Backend b = parse_backend(op, name);
  if (b == Backend::native) {
    TORCH_CHECK(false, op, ": backend 'native' has no CUDA kernel: ", how_to_build("native_cuda"));
  }
  if (b == Backend::mkl) raise_wrong_device(op, b, device);
}

// The forward's second output is a copy of x (batch x in_features, contiguous), the input
// the backward's SDDMM reads: cuSPARSE reads row-major activations directly, so no transpose
// is needed on CUDA, but an op never returns an alias of its input (autograd and functionalization
// rely on it).
std::tuple<at::Tensor, at::Tensor> sparse_linear_cuda(
    const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& crow_t,
    const at::Tensor& col_t, const at::Tensor& perm, c10::string_view backend) {
  const char* op = "torch_nerva.sparse_linear";
  c10::cuda::CUDAGuard guard(x.device());
  check_cuda_backend(op, backend, x.device());
  check_common(op, x, values, crow, col);
  check_linear_layout(op, x.device(), values, crow, col, crow_t, col_t, perm);
  const at::Tensor no_tensor;
  check_devices(op, x.device(), {{"bias", bias.has_value() ? &*bias : &no_tensor}});
  check_bias(op, bias, crow.numel() - 1, x);
  TORCH_CHECK(x.size(1) == crow_t.numel() - 1, op, ": x has ", x.size(1),
              " features but the layer has in_features = ", crow_t.numel() - 1);
  check_layout(op, crow, col, x.size(1));
  const at::Tensor xc = x.is_contiguous() ? x.clone() : x.contiguous();  // never x itself
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
    const at::Tensor& col_t, const at::Tensor& perm, bool input_grad, bool values_grad,
    c10::string_view backend) {
  const char* op = "torch_nerva.sparse_linear_backward";
  c10::cuda::CUDAGuard guard(grad.device());
  check_cuda_backend(op, backend, grad.device());
  check_linear_layout(op, grad.device(), values, crow, col, crow_t, col_t, perm);
  check_linear_grad(op, grad, values, crow);
  const int64_t in_features = crow_t.numel() - 1;
  if (values_grad) check_devices(op, grad.device(), {{"xt", &xt}});
  at::Tensor grad_x = at::empty({0}, grad.options());
  at::Tensor grad_values = at::empty({0}, grad.options());
  if (input_grad) {
    check_layout(op, crow_t, col_t, crow.numel() - 1);
    check_perm_range(op, perm, values.numel());
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
    TORCH_CHECK(xt.scalar_type() == values.scalar_type(), op, ": saved input has dtype ",
                xt.scalar_type(), " but values have dtype ", values.scalar_type());
    check_layout(op, crow, col, in_features);
    grad_values = sddmm(op, grad, xt, crow, col);
  }
  return {grad_x, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_cuda);
  m.impl("csr_sddmm", &csr_sddmm_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_linear_backward", &sparse_linear_backward_cuda);
}

}  // namespace cuda
}  // namespace torch_nerva

#else  // built without CUDA: the ops raise on CUDA tensors with the command that builds them

namespace torch_nerva {
namespace cuda {
namespace {

[[noreturn]] void not_built(const char* op) {
  TORCH_CHECK(false, op, ": this torch_nerva build has no CUDA kernels (backend 'cusparse' is "
              "not available in this build): ", how_to_build("cusparse"));
}

at::Tensor csr_spmm_unbuilt(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const c10::optional<at::Tensor>&,
                            const c10::optional<at::Tensor>&) {
  not_built("torch_nerva.csr_spmm");
}

at::Tensor csr_sddmm_unbuilt(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&) {
  not_built("torch_nerva.csr_sddmm");
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_unbuilt(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view) {
  not_built("torch_nerva.sparse_linear");
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward_unbuilt(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, bool,
    c10::string_view) {
  not_built("torch_nerva.sparse_linear_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CUDA, m) {
  m.impl("csr_spmm", &csr_spmm_unbuilt);
  m.impl("csr_sddmm", &csr_sddmm_unbuilt);
  m.impl("sparse_linear", &sparse_linear_unbuilt);
  m.impl("sparse_linear_backward", &sparse_linear_backward_unbuilt);
}

}  // namespace cuda
}  // namespace torch_nerva

#endif  // TORCH_NERVA_WITH_CUDA
