// One NaN/Inf semantics on every backend: that of dense math, i.e. of F.linear(x, W) with the
// dense W (what nn.Linear, the masked twin and the dense backend compute).
//
// In dense math an absent weight is a zero that multiplies x[b, c], and 0 * inf and 0 * nan are
// nan. The sparse kernels skip absent weights, so on their own they would return a finite
// y[b, r] where dense math returns nan. The rule, applied after the sparse product:
//
//   y[b, r] = nan  when row b of x holds a non-finite entry in a column c with no weight (r, c)
//
// and otherwise the sparse result (the terms of present weights, non-finite ones included, are
// those of dense math). It is computed only when the input holds a non-finite value (the CPU
// kernels notice it while transposing, for free): one more SpMM counts, for every (b, r), the
// non-finite entries of row b that row r of W is connected to, and y[b, r] becomes nan where
// that count is below row b's total. The same applies to dX = dY W with the transposed layout.
// The weight gradient (dY^T X at W's nonzeros) is exactly dense math's already.
//
// The counts are exact integers: they are computed in float64 for float64 inputs and in
// float32 otherwise (exact up to 2^24 features), never in bfloat16 or float16, whose 8- and
// 11-bit mantissas would round counts above 256 or 2048 and misjudge "below the total".
#pragma once

#include <ATen/ATen.h>

#include <limits>

namespace torch_nerva {

// `count(indicator)` must return indicator W^T for W's pattern with all weights 1
// (batch x n_out) with the backend's own SpMM, in the indicator's dtype.
template <typename CountFn>
void apply_dense_nonfinite(at::Tensor& y, const at::Tensor& x, const CountFn& count) {
  const at::ScalarType count_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor indicator = at::isfinite(x).logical_not_().to(count_type);
  const at::Tensor total = indicator.sum(1, /*keepdim=*/true);
  const at::Tensor connected = count(indicator);
  y.masked_fill_(connected.lt(total), std::numeric_limits<double>::quiet_NaN());
}

}  // namespace torch_nerva
