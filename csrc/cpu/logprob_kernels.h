// Row kernels of the fused log-prob / entropy ops on the CPU.
//
// logprob_vec.cpp is compiled once per CPU capability (DEFAULT, AVX2,
// AVX512), each copy in its own namespace; logprob.cpp picks one at run time.
// The interface is plain pointers so that the capability-specific objects
// include nothing but the vector headers.
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

namespace cap_default {
LogprobKernels logprob_kernels();
}
namespace cap_avx2 {
LogprobKernels logprob_kernels();
}
namespace cap_avx512 {
LogprobKernels logprob_kernels();
}

}  // namespace aligner::cpu
