// The vectorized CPU kernels (log-prob / entropy rows, KL penalty).
//
// Each *_vec.cpp file is compiled once per CPU capability (DEFAULT, AVX2,
// AVX512), each copy in its own namespace; active_*_kernels() picks one at
// run time. The interface is plain pointers so that the capability-specific
// objects include nothing but the vector headers.
#pragma once

#include <cstdint>

namespace aligner::cpu {

enum class ElemType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

struct ForwardArgs {
  const void* logits;    // [N, V] contiguous, elem_type
  ElemType elem_type;
  int64_t vocab;
  const int64_t* labels;  // [N] or nullptr when no log-prob is wanted
  int64_t ignore_index;
  float inv_temperature;
  float* logprobs;  // [N] or nullptr
  float* entropy;   // [N] or nullptr
  float* lse;       // [N], always written (saved for backward)
};

struct BackwardArgs {
  const void* logits;  // [N, V] contiguous, elem_type
  ElemType elem_type;
  int64_t vocab;
  const int64_t* labels;  // [N] or nullptr
  int64_t ignore_index;
  float inv_temperature;
  const float* lse;            // [N]
  const float* entropy;        // [N] or nullptr (then grad_entropy is nullptr)
  const float* grad_logprobs;  // [N] or nullptr
  const float* grad_entropy;   // [N] or nullptr
  void* grad_logits;           // [N, V] contiguous, elem_type
};

using RowsFn = void (*)(const void* args, int64_t row_begin, int64_t row_end);

// Indexed by ElemType.
struct LogprobKernels {
  RowsFn forward[3];   // args: ForwardArgs
  RowsFn backward[3];  // args: BackwardArgs
  const char* capability;
};

// Elementwise over n floats; estimator as in aligner::KLEstimator.
struct KLKernels {
  void (*forward)(const float* logprobs, const float* ref_logprobs, float* out, int64_t n, int estimator);
  // grad_logprobs = grad * d kl / d logprobs
  void (*backward)(const float* grad, const float* logprobs, const float* ref_logprobs, float* grad_logprobs,
                   int64_t n, int estimator);
};

#define ALIGNER_DECLARE_CAPABILITY(ns) \
  namespace ns {                       \
  LogprobKernels logprob_kernels();    \
  KLKernels kl_kernels();              \
  }
ALIGNER_DECLARE_CAPABILITY(cap_default)
ALIGNER_DECLARE_CAPABILITY(cap_avx2)
ALIGNER_DECLARE_CAPABILITY(cap_avx512)
#undef ALIGNER_DECLARE_CAPABILITY

// The variants for this CPU (ALIGNER_CPU_CAPABILITY=default|avx2|avx512
// forces one, to test each on a machine that supports them all).
const char* active_capability();
const LogprobKernels& active_logprob_kernels();
const KLKernels& active_kl_kernels();

}  // namespace aligner::cpu
