// The vectorized CPU kernels (log-prob / entropy rows, KL penalty).
//
// Each *_vec.cpp file is compiled once per CPU capability (DEFAULT, AVX2,
// AVX512), each copy in its own namespace; active_*_kernels() picks one at
// run time. The interface is the argument structs of aligner/kernel_args.h,
// so that the capability-specific objects include nothing but the vector
// headers.
#pragma once

#include <cstdint>

#include "aligner/kernel_args.h"

namespace aligner::cpu {

using RowsFn = void (*)(const void* args, int64_t row_begin, int64_t row_end);

// Indexed by ElemType; float64 takes a scalar path (logprob.cpp).
struct LogprobKernels {
  RowsFn forward[3];   // args: LogprobForwardArgs
  RowsFn backward[3];  // args: LogprobBackwardArgs
  const char* capability;
};

// Elements [begin, end) of float32 args; float64 takes a scalar path (rl.cpp).
struct KLKernels {
  void (*forward)(const KLForwardArgs& args, int64_t begin, int64_t end);
  void (*backward)(const KLBackwardArgs& args, int64_t begin, int64_t end);
};

// Over weight rows [begin, end) of a LinearArgmaxArgs head (args.cols a
// multiple of column_multiple, a tile's width): per-column partial results
// (cols each): max logit, its first index, sum of exp(logit - max).
struct LinearArgmaxKernel {
  void (*argmax)(const LinearArgmaxArgs& args, int64_t begin, int64_t end, float* max, int64_t* index, float* sum_exp);
  int64_t column_multiple;
};

#define ALIGNER_DECLARE_CAPABILITY(ns)         \
  namespace ns {                               \
  LogprobKernels logprob_kernels();            \
  KLKernels kl_kernels();                      \
  LinearArgmaxKernel linear_argmax_kernel(); \
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
const LinearArgmaxKernel& active_linear_argmax_kernel();

}  // namespace aligner::cpu
