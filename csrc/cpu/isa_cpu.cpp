// Instruction-set dispatch: what the CPU supports, the active instruction set (TORCH_NERVA_ISA
// or the best supported), and the _kernel_isa / _supported_isas ops.
#include "isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace torch_nerva {
namespace cpu {
namespace {

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::avx2:
      // f16c: the fp16 conversions (vcvtph2ps / vcvtps2ph) of the 16-bit kernels
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default:
      return true;
  }
}

const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "base";
}

Isa parse_isa(const std::string& name) {
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return Isa::avx2;
  if (name == "base") return Isa::base;
  TORCH_CHECK(false, "torch_nerva: unknown instruction set '", name,
              "' (expected avx512, avx2 or base)");
}

Isa best_isa() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::base;
}

}  // namespace

Isa& active_isa() {
  static Isa isa = [] {
    const char* env = std::getenv("TORCH_NERVA_ISA");
    if (env == nullptr || *env == '\0') return best_isa();
    const Isa wanted = parse_isa(env);
    TORCH_CHECK(cpu_supports(wanted), "TORCH_NERVA_ISA=", env, ": this CPU does not support it");
    return wanted;
  }();
  return isa;
}

namespace {

// Test and benchmark hook: "" reports the active instruction set, a name selects it.
std::string kernel_isa(const std::string& name) {
  if (!name.empty()) {
    const Isa wanted = parse_isa(name);
    TORCH_CHECK(cpu_supports(wanted), "torch_nerva: this CPU does not support ", name);
    active_isa() = wanted;
  }
  return isa_name(active_isa());
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::base}) {
    if (cpu_supports(isa)) out.push_back(isa_name(isa));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_nerva, CompositeExplicitAutograd, m) {
  m.impl("_kernel_isa", &kernel_isa);
  m.impl("_supported_isas", &supported_isas);
}

}  // namespace cpu
}  // namespace torch_nerva
