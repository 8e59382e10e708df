// Host/device portability macros shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define ALIGNER_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ALIGNER_HOST_DEVICE inline
#endif

#include <cmath>
#include <cstdint>
#include <limits>

namespace aligner {

// exp/log/sqrt that resolve to the precise CUDA intrinsics on the device and
// to <cmath> on the host, for float and double alike.
ALIGNER_HOST_DEVICE float math_exp(float x) { return ::expf(x); }
ALIGNER_HOST_DEVICE double math_exp(double x) { return ::exp(x); }
ALIGNER_HOST_DEVICE float math_log(float x) { return ::logf(x); }
ALIGNER_HOST_DEVICE double math_log(double x) { return ::log(x); }
ALIGNER_HOST_DEVICE float math_sqrt(float x) { return ::sqrtf(x); }
ALIGNER_HOST_DEVICE double math_sqrt(double x) { return ::sqrt(x); }
ALIGNER_HOST_DEVICE float math_abs(float x) { return ::fabsf(x); }
ALIGNER_HOST_DEVICE double math_abs(double x) { return ::fabs(x); }

template <typename T>
ALIGNER_HOST_DEVICE T neg_infinity() {
  return -std::numeric_limits<T>::infinity();
}

// The larger of a and b; NaN if either is NaN (a NaN logit makes its whole row NaN).
template <typename T>
ALIGNER_HOST_DEVICE T max_of(T a, T b) {
  return a != a ? a : (a > b ? a : b);
}

}  // namespace aligner
