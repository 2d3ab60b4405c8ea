// Every op schema of torch_nerva in one place.
//
// Layout convention (see README "Design in brief"): a sparse weight W of shape
// (out x in) is stored in CSR by output row: crow (out + 1), col (nnz), values (nnz).
// The transpose W^T (in x out) is a second CSR (crow_t, col_t) whose values are
// values[perm]; it is computed once per topology by csr_transpose.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The extension is loaded as a Python module only so that `import torch_nerva._C`
// runs the static registrations below; it exports no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torch_nerva native ops (registered in torch.ops.torch_nerva)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torch_nerva, m) {
  // Y = X W^T (+ bias): x (B x in), W CSR (out x in). The value of nonzero k is
  // values[perm[k]] when perm is given (used for the transposed layout), else values[k].
  m.def("csr_spmm(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor? perm=None, "
        "Tensor? bias=None) -> Tensor");
  // dvalues[k] = sum_b grad_out[b, row(k)] * x[b, col[k]]: dY^T X sampled at W's pattern.
  m.def("csr_sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col) -> Tensor");
  // CSR of W^T and the permutation with values_t = values[perm]. Rows of the result are
  // sorted by column, so the transpose is itself a valid sorted CSR.
  m.def("csr_transpose(Tensor crow, Tensor col, SymInt n_cols) -> (Tensor, Tensor, Tensor)");
  // The differentiable layer: Y = X W^T + bias. Returns (Y, Xs): Xs is the input as the
  // backward's dvalues product reads it, a new tensor (never an alias of x): on the CPU x
  // transposed to (in x ld), ld the batch padded to whole vectors; on CUDA a contiguous copy of
  // x (batch x in). Autograd is attached in C++ (csrc/autograd.cpp) and calls
  // sparse_linear_backward with the same backend.
  //
  // `backend`, decided once per layer (torch_nerva/backends.py resolves "auto"), selects the
  // implementation inside the device's kernel: on the CPU "native" (our kernels) or "mkl" (MKL
  // computes Y and dX, the native SDDMM dvalues); on CUDA "cusparse" ("native" has no CUDA
  // kernel yet). A backend not built, or not running on the tensors' device, raises saying how
  // to build it or which backend to use. Last, with a default, so positional callers of the
  // native op keep working.
  m.def("sparse_linear(Tensor x, Tensor values, Tensor? bias, Tensor crow, Tensor col, "
        "Tensor crow_t, Tensor col_t, Tensor perm, str backend=\"native\") -> (Tensor, Tensor)");
  // (dX, dvalues) of sparse_linear from dY and the saved Xs; on the CPU dY is transposed once
  // for both. A gradient not asked for is returned as an empty tensor and not computed.
  m.def("sparse_linear_backward(Tensor grad, Tensor xt, Tensor values, Tensor crow, "
        "Tensor col, Tensor crow_t, Tensor col_t, Tensor perm, bool input_grad, "
        "bool values_grad, str backend=\"native\") -> (Tensor, Tensor)");
  // 2-D convolution with a sparse weight W (out_channels x in_channels / groups * kh * kw, CSR,
  // column c = (ci_local * kh + ky) * kw + kx as in nn.Conv2d.weight.reshape(out, -1)) on NCHW
  // input x: F.conv2d(x, W, bias, stride, padding, dilation, groups) with zero padding, direct
  // (no dense weight, no im2col). crow_t, col_t, perm: W^T from csr_transpose, used by the
  // backward (CPU; autograd in torch_nerva/ops.py).
  m.def("sparse_conv2d(Tensor x, Tensor values, Tensor? bias, Tensor crow, Tensor col, "
        "Tensor crow_t, Tensor col_t, Tensor perm, int[2] kernel, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // (dX, dvalues) of sparse_conv2d from dY; a gradient not asked for is an empty tensor and
  // not computed.
  m.def("sparse_conv2d_backward(Tensor grad, Tensor x, Tensor values, Tensor crow, Tensor col, "
        "Tensor crow_t, Tensor col_t, Tensor perm, int[2] kernel, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool input_grad, bool values_grad) "
        "-> (Tensor, Tensor)");
  // Full validation of a CSR topology (O(nnz)); raises a clear error on the first problem.
  m.def("csr_check(Tensor crow, Tensor col, SymInt n_rows, SymInt n_cols) -> ()");
  // yt = clamp(W xt + bias, lo, hi) on feature-major activations (n_in x ld): no transposes,
  // for inference pipelines such as the Graph Challenge's (CPU).
  m.def("csr_spmm_fm(Tensor xt, Tensor values, Tensor crow, Tensor col, Tensor? bias=None, "
        "float? lo=None, float? hi=None) -> Tensor");
  // For each input row of y0 (inputs x neurons): does it survive the chain of layers
  // Y <- clamp(Y W_l^T + bias, lo, hi)? Chunks of inputs run through all layers per thread, in
  // feature-major buffers; `prune` drops inputs that died (CPU; the Graph Challenge engine).
  m.def("sparse_chain(Tensor y0, Tensor[] values, Tensor[] crows, Tensor[] cols, float bias, "
        "float lo, float hi, int chunk, bool prune) -> Tensor");
  // A run of sparse layers (+ ReLU where relu[l] != 0) for small-batch inference: xt
  // (in_features x ld) in, (out_features of the last x ld) out, feature-major throughout, one
  // call for the run (CPU; nn.FusedSequential).
  m.def("csr_chain_fm(Tensor xt, Tensor[] values, Tensor[] crows, Tensor[] cols, "
        "Tensor?[] biases, int[] relu) -> Tensor");
  // Test helper: how many distinct threads at::parallel_for used for n work items.
  m.def("_parallel_probe(int n) -> Tensor");
  // Test helper: runs the kernels' chunk pool (csrc/cpu/pool.h) on n_chunks chunks of spin_us
  // microseconds each; returns (runs per chunk, id of the thread that ran it, 0 = caller).
  m.def("_schedule_probe(int n_chunks, int n_threads, int spin_us) -> (Tensor, Tensor)");
  // The CPU kernels' scheduler: "" reads it, "pool" or "openmp" sets it (csrc/cpu/pool.h).
  m.def("_scheduler(str name) -> str");
  // The openmp scheduler's stall guard: action "", "on", "off" or "reset", and a test delay of
  // the helper threads (-1 keeps it); returns (on, serial seconds left, backoff s, stalls).
  m.def("_stall_guard(str action=\"\", int helper_delay_us=-1) -> float[]");
  // Test and benchmark helpers: the kernels' instruction set ("" reads it, a name sets it),
  // and the instruction sets this CPU supports.
  m.def("_kernel_isa(str name) -> str");
  m.def("_supported_isas() -> str[]");
  // What this build holds (defined in every build: false when not built; csrc/backend.cpp),
  // and how to build a backend it lacks ("mkl", "cusparse"), the text of every such error.
  m.def("_mkl_available() -> bool");
  m.def("_cusparse_built() -> bool");
  m.def("_how_to_build(str backend) -> str");
}
