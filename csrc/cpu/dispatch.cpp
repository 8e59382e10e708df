// Picks the vectorized CPU kernels (vec_kernels.h) for this CPU, once.
#include <cstdlib>
#include <cstring>

#include "vec_kernels.h"

namespace aligner::cpu {
namespace {

enum class Capability { kDefault, kAvx2, kAvx512 };

Capability detect() {
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* forced = std::getenv("ALIGNER_CPU_CAPABILITY");
  if (forced != nullptr) {
    // A forced variant the CPU lacks falls back to the portable one.
    if (std::strcmp(forced, "avx512") == 0 && avx512) return Capability::kAvx512;
    if (std::strcmp(forced, "avx2") == 0 && avx2) return Capability::kAvx2;
    return Capability::kDefault;
  }
  if (avx512) return Capability::kAvx512;
  if (avx2) return Capability::kAvx2;
  return Capability::kDefault;
}

Capability capability() {
  static const Capability cap = detect();
  return cap;
}

}  // namespace

const char* active_capability() {
  switch (capability()) {
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

const LogprobKernels& active_logprob_kernels() {
  static const LogprobKernels kernels = capability() == Capability::kAvx512 ? cap_avx512::logprob_kernels()
                                        : capability() == Capability::kAvx2 ? cap_avx2::logprob_kernels()
                                                                            : cap_default::logprob_kernels();
  return kernels;
}

const KLKernels& active_kl_kernels() {
  static const KLKernels kernels = capability() == Capability::kAvx512 ? cap_avx512::kl_kernels()
                                   : capability() == Capability::kAvx2 ? cap_avx2::kl_kernels()
                                                                       : cap_default::kl_kernels();
  return kernels;
}

const LinearArgmaxKernel& active_linear_argmax_kernel() {
  static const LinearArgmaxKernel kernels = capability() == Capability::kAvx512
                                                 ? cap_avx512::linear_argmax_kernel()
                                             : capability() == Capability::kAvx2 ? cap_avx2::linear_argmax_kernel()
                                                                                 : cap_default::linear_argmax_kernel();
  return kernels;
}

}  // namespace aligner::cpu
