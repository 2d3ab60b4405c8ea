// The SpMM / SDDMM drivers (spmm.h) and the ops that are one driver call: csr_spmm,
// csr_spmm_fm and csr_sddmm on the CPU.
#include "spmm.h"

#include "common.h"
#include "isa.h"
#include "schedule.h"
#include "transpose.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

namespace torch_nerva {
namespace cpu {
at::Tensor spmm_feature_major(const char* op, const at::Tensor& xt, int64_t batch,
                              const at::Tensor& values, const at::Tensor& crow,
                              const at::Tensor& col, const at::Tensor& perm,
                              const at::Tensor& bias, bool clamp, double lo, double hi) {
  const int64_t n_out = crow.numel() - 1, n_in = xt.size(0), n_pos = col.numel();
  at::Tensor yt = at::empty({n_out, xt.size(1)}, xt.options());
  if (batch == 0 || n_out == 0) return yt;
  const at::Tensor vals = values.contiguous();
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor perm_c = perm.defined() ? perm.contiguous() : perm;
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  TORCH_NERVA_DISPATCH_VALUES(xt.scalar_type(), "torch_nerva", [&] {
    typedef kernel_t<scalar_t> S;
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      const index_t* crow_p = crow_c.data_ptr<index_t>();
      check_row_pointer_ends(op, crow_p, n_out, n_pos);
      SpmmArgs<S, index_t> args{
          kernel_data<scalar_t>(xt), batch, xt.size(1), n_in, kernel_data<scalar_t>(vals),
          vals.numel(), crow_p, col_c.data_ptr<index_t>(),
          perm_c.defined() ? perm_c.data_ptr<index_t>() : nullptr,
          bias_c.defined() ? kernel_data<scalar_t>(bias_c) : nullptr, n_out,
          kernel_data<scalar_t>(yt), clamp, static_cast<acc_t<S>>(lo),
          static_cast<acc_t<S>>(hi)};
      const auto fn = kernels<S, index_t>().spmm;
      KernelError err;
      parallel_rows(crow_p, n_out, batch, err,
                    [&](int64_t r0, int64_t r1, KernelError& e) { fn(args, r0, r1, e); });
      raise_if_any(op, err, crow_p, args.col, n_in, args.perm, vals.numel());
    });
  });
  return yt;
}

at::Tensor spmm_transposed(const char* op, const at::Tensor& xt, int64_t batch,
                           const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const at::Tensor& perm,
                           const at::Tensor& bias) {
  if (batch == 0 || crow.numel() == 1) return at::empty({batch, crow.numel() - 1}, xt.options());
  return untranspose(spmm_feature_major(op, xt, batch, values, crow, col, perm, bias), batch);
}

at::Tensor sddmm_transposed(const char* op, const at::Tensor& gt, const at::Tensor& xt,
                            const at::Tensor& crow, const at::Tensor& col) {
  const int64_t n_out = crow.numel() - 1, nnz = col.numel();
  at::Tensor out = at::empty({nnz}, xt.options());
  if (nnz == 0) return out;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  TORCH_NERVA_DISPATCH_VALUES(xt.scalar_type(), "torch_nerva", [&] {
    typedef kernel_t<scalar_t> S;
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "torch_nerva", [&] {
      const index_t* crow_p = crow_c.data_ptr<index_t>();
      check_row_pointer_ends(op, crow_p, n_out, nnz);
      SddmmArgs<S, index_t> args{kernel_data<scalar_t>(gt), kernel_data<scalar_t>(xt),
                                 xt.size(1), xt.size(0), crow_p, col_c.data_ptr<index_t>(),
                                 n_out, kernel_data<scalar_t>(out)};
      const auto fn = kernels<S, index_t>().sddmm;
      KernelError err;
      parallel_rows(crow_p, n_out, xt.size(1), err,
                    [&](int64_t r0, int64_t r1, KernelError& e) { fn(args, r0, r1, e); });
      raise_if_any<index_t>(op, err, crow_p, args.col, args.n_in, nullptr, 0);
    });
  });
  return out;
}

// ---- argument checks ---------------------------------------------------------------------------

void check_spmm_args(const char* op, const at::Tensor& x, const at::Tensor& values,
                     const at::Tensor& crow, const at::Tensor& col,
                     const c10::optional<at::Tensor>& perm,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (batch x in_features), got shape ", x.sizes());
  const at::Tensor no_tensor;
  check_devices(op, at::kCPU, {{"x", &x}, {"values", &values}, {"crow", &crow}, {"col", &col},
                               {"perm", perm.has_value() ? &*perm : &no_tensor},
                               {"bias", bias.has_value() ? &*bias : &no_tensor}});
  check_index_pair(op, crow, col);
  check_values(op, values, x, "x", /*low_precision=*/true);
  const int64_t n_out = crow.numel() - 1, n_pos = col.numel();
  if (perm.has_value()) {
    TORCH_CHECK(perm->dim() == 1 && perm->numel() == n_pos, op,
                ": perm must be 1-D with nnz = ", n_pos, " entries, got shape ", perm->sizes());
    TORCH_CHECK(perm->scalar_type() == crow.scalar_type(), op,
                ": perm must have the index dtype ", crow.scalar_type(), ", got ",
                perm->scalar_type());
  } else {
    TORCH_CHECK(values.numel() == n_pos, op, ": values has ", values.numel(),
                " entries but the layout has nnz = ", n_pos);
  }
  check_bias(op, bias, n_out, x);
}

// ---- ops ----------------------------------------------------------------------------------------

namespace {

at::Tensor csr_spmm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                        const at::Tensor& col, const c10::optional<at::Tensor>& perm,
                        const c10::optional<at::Tensor>& bias) {
  const char* op = "torch_nerva.csr_spmm";
  check_spmm_args(op, x, values, crow, col, perm, bias);
  return spmm_transposed(op, transpose_padded(x), x.size(0), values, crow, col,
                         perm.value_or(at::Tensor()), bias.value_or(at::Tensor()));
}

// Feature-major SpMM for inference pipelines that keep activations transposed across layers:
// yt = clamp(W xt + bias, lo, hi), xt (n_in x ld) with ld padded as padded_ld (or < one
// vector); every column is computed.
at::Tensor csr_spmm_fm_cpu(const at::Tensor& xt, const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const c10::optional<at::Tensor>& bias,
                           c10::optional<double> lo, c10::optional<double> hi) {
  const char* op = "torch_nerva.csr_spmm_fm";
  check_spmm_args(op, xt, values, crow, col, c10::nullopt, bias);
  TORCH_CHECK(xt.is_contiguous(), op, ": xt must be contiguous (n_in x ld)");
  TORCH_CHECK(lo.has_value() == hi.has_value() && (!lo.has_value() || *lo <= *hi), op,
              ": give both lo and hi (lo <= hi) or neither");
  const int64_t ld = xt.size(1);
  // the padding unit of kernels.h: a 64-byte vector of the accumulation type
  const int64_t lanes = 64 / std::max<int64_t>(4, xt.element_size());
  TORCH_CHECK(ld < lanes || ld % lanes == 0, op, ": xt's columns must be fewer than ", lanes,
              " or a multiple of it (pad with zero columns), got ", ld);
  return spmm_feature_major(op, xt, ld, values, crow, col, at::Tensor(),
                            bias.value_or(at::Tensor()), lo.has_value(), lo.value_or(0),
                            hi.value_or(0));
}

at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                         const at::Tensor& col) {
  const char* op = "torch_nerva.csr_sddmm";
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2, op,
              ": grad_out and x must be 2-D, got shapes ", grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out has batch ", grad_out.size(0),
              " but x has batch ", x.size(0));
  check_devices(op, at::kCPU, {{"grad_out", &grad_out}, {"x", &x}, {"crow", &crow},
                               {"col", &col}});
  check_index_pair(op, crow, col);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(native_value_type(x.scalar_type()), op,
              ": only float32, float64, bfloat16 and float16 are supported, got ",
              x.scalar_type());
  TORCH_CHECK(grad_out.size(1) == crow.numel() - 1, op, ": grad_out has ", grad_out.size(1),
              " columns but the layout has ", crow.numel() - 1, " rows");
  return sddmm_transposed(op, transpose_padded(grad_out), transpose_padded(x), crow, col);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CPU, m) {
  m.impl("csr_spmm", &csr_spmm_cpu);
  m.impl("csr_sddmm", &csr_sddmm_cpu);
  m.impl("csr_spmm_fm", &csr_spmm_fm_cpu);
}

}  // namespace cpu
}  // namespace torch_nerva
