// CUDA kernels of the RL ops over the shared math in aligner/rl_math.h:
// KL penalty (elementwise), masked moments (one block per row, merged with
// moments_merge), GAE (one thread per sequence, the CPU's gae_sequence) and
// group advantages (one thread per group).
#include "aligner/rl_math.h"
#include "common.cuh"
#include "launch.h"

namespace aligner::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__global__ void kl_forward_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n,
                                  KLEstimator est, acc_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = kl_value<acc_t>(a[i] - b[i], est);
  }
}

template <typename acc_t>
__global__ void kl_backward_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ a,
                                   const acc_t* __restrict__ b, int64_t n, KLEstimator est, acc_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = grad[i] * kl_grad<acc_t>(a[i] - b[i], est);
  }
}

template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> warp_merge(Moments<acc_t> s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Moments<acc_t> other{__shfl_xor_sync(kFullMask, s.count, offset),
                               __shfl_xor_sync(kFullMask, s.mean, offset),
                               __shfl_xor_sync(kFullMask, s.m2, offset)};
    s = moments_merge(s, other);
  }
  return s;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_moments_kernel(const acc_t* __restrict__ x, const bool* __restrict__ mask, int64_t cols,
                          acc_t* __restrict__ count, acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  __shared__ acc_t scount[kThreads / 32], smean[kThreads / 32], sm2[kThreads / 32];
  const int64_t row = blockIdx.x;
  Moments<acc_t> s{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    if (mask[row * cols + j]) moments_add(s, x[row * cols + j]);
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  s = warp_merge(s);
  if (lane == 0) {
    scount[warp] = s.count;
    smean[warp] = s.mean;
    sm2[warp] = s.m2;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / 32 ? Moments<acc_t>{scount[lane], smean[lane], sm2[lane]}
                             : Moments<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
    s = warp_merge(s);
    if (lane == 0) {
      count[row] = s.count;
      mean[row] = s.mean;
      m2[row] = s.m2;
    }
  }
}

template <typename acc_t>
__global__ void masked_whiten_kernel(const acc_t* __restrict x, const bool* __restrict mask, int64_t n,
                                     const acc_t* __restrict count, const acc_t* __restrict mean,
                                     const acc_t* __restrict m2, bool shift_mean, acc_t eps, acc_t* __restrict out,
                                     acc_t* __restrict rstd_out) {
  const acc_t c = *count;
  const acc_t mu = *mean;
  const acc_t var = c > acc_t(0) ? *m2 / c : acc_t(0);
  const acc_t r = acc_t(1) / math_sqrt(var + eps);
  const acc_t offset = shift_mean ? -mu * r : mu - mu * r;
  if (blockIdx.x == 0 && threadIdx.x == 0) *rstd_out = r;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = mask[i] ? x[i] * r + offset : acc_t(0);
  }
}

template <typename acc_t>
__global__ void gae_kernel(const acc_t* __restrict__ rewards, const acc_t* __restrict__ values,
                           const bool* __restrict__ mask, int64_t batch, int64_t time, acc_t gamma, acc_t lam,
                           bool carry_forward, acc_t* __restrict__ advantages, acc_t* __restrict__ returns) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int64_t off = b * time;
  gae_sequence<acc_t, bool, acc_t, acc_t>(rewards + off, values + off, mask + off, time, gamma, lam, carry_forward,
                                          advantages + off, returns + off);
}

template <typename acc_t>
__global__ void group_advantages_kernel(const acc_t* __restrict__ rewards, const bool* __restrict__ valid,
                                        int64_t groups, int64_t group_size, bool leave_one_out, bool scale_by_std,
                                        acc_t eps, acc_t* __restrict__ out) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= groups) return;
  const int64_t off = g * group_size;
  group_advantages_one<acc_t, acc_t>(rewards + off, valid != nullptr ? valid + off : nullptr, group_size,
                                     leave_one_out, scale_by_std, eps, out + off);
}

}  // namespace

void launch_kl_forward(const void* logprobs, const void* ref_logprobs, int64_t n, int estimator, bool is_double,
                       void* out, cudaStream_t stream) {
  if (n == 0) return;
  const auto est = static_cast<KLEstimator>(estimator);
  if (is_double) {
    kl_forward_kernel<double><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const double*>(logprobs), static_cast<const double*>(ref_logprobs), n, est,
        static_cast<double*>(out));
  } else {
    kl_forward_kernel<float><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const float*>(logprobs), static_cast<const float*>(ref_logprobs), n, est,
        static_cast<float*>(out));
  }
  check_launch("kl_forward_kernel");
}

void launch_kl_backward(const void* grad, const void* logprobs, const void* ref_logprobs, int64_t n, int estimator,
                        bool is_double, void* grad_logprobs, cudaStream_t stream) {
  if (n == 0) return;
  const auto est = static_cast<KLEstimator>(estimator);
  if (is_double) {
    kl_backward_kernel<double><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const double*>(grad), static_cast<const double*>(logprobs),
        static_cast<const double*>(ref_logprobs), n, est, static_cast<double*>(grad_logprobs));
  } else {
    kl_backward_kernel<float><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const float*>(grad), static_cast<const float*>(logprobs), static_cast<const float*>(ref_logprobs),
        n, est, static_cast<float*>(grad_logprobs));
  }
  check_launch("kl_backward_kernel");
}

void launch_masked_moments(const void* x, const bool* mask, int64_t rows, int64_t cols, bool is_double, void* count,
                           void* mean, void* m2, cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>(rows));
  if (is_double) {
    masked_moments_kernel<double><<<grid, kThreads, 0, stream>>>(static_cast<const double*>(x), mask, cols,
                                                                 static_cast<double*>(count),
                                                                 static_cast<double*>(mean), static_cast<double*>(m2));
  } else {
    masked_moments_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), mask, cols,
                                                                static_cast<float*>(count), static_cast<float*>(mean),
                                                                static_cast<float*>(m2));
  }
  check_launch("masked_moments_kernel");
}

void launch_masked_whiten(const void* x, const bool* mask, int64_t n, const void* count, const void* mean,
                          const void* m2, bool shift_mean, double eps, bool is_double, void* out, void* rstd,
                          cudaStream_t stream) {
  const unsigned blocks = blocks_for(n, kThreads);
  if (is_double) {
    masked_whiten_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(x), mask, n, static_cast<const double*>(count), static_cast<const double*>(mean),
        static_cast<const double*>(m2), shift_mean, eps, static_cast<double*>(out), static_cast<double*>(rstd));
  } else {
    masked_whiten_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(x), mask, n, static_cast<const float*>(count), static_cast<const float*>(mean),
        static_cast<const float*>(m2), shift_mean, static_cast<float>(eps), static_cast<float*>(out),
        static_cast<float*>(rstd));
  }
  check_launch("masked_whiten_kernel");
}

void launch_gae(const void* rewards, const void* values, const bool* mask, int64_t batch, int64_t time,
                double gamma, double lam, bool carry_forward, bool is_double, void* advantages, void* returns,
                cudaStream_t stream) {
  if (batch == 0 || time == 0) return;
  constexpr int kGaeThreads = 128;
  const unsigned blocks = static_cast<unsigned>((batch + kGaeThreads - 1) / kGaeThreads);
  if (is_double) {
    gae_kernel<double><<<blocks, kGaeThreads, 0, stream>>>(
        static_cast<const double*>(rewards), static_cast<const double*>(values), mask, batch, time, gamma, lam,
        carry_forward, static_cast<double*>(advantages), static_cast<double*>(returns));
  } else {
    gae_kernel<float><<<blocks, kGaeThreads, 0, stream>>>(
        static_cast<const float*>(rewards), static_cast<const float*>(values), mask, batch, time,
        static_cast<float>(gamma), static_cast<float>(lam), carry_forward, static_cast<float*>(advantages),
        static_cast<float*>(returns));
  }
  check_launch("gae_kernel");
}

void launch_group_advantages(const void* rewards, const bool* valid, int64_t groups, int64_t group_size,
                             bool leave_one_out, bool scale_by_std, double eps, bool is_double, void* out,
                             cudaStream_t stream) {
  if (groups == 0) return;
  constexpr int kGroupThreads = 128;
  const unsigned blocks = static_cast<unsigned>((groups + kGroupThreads - 1) / kGroupThreads);
  if (is_double) {
    group_advantages_kernel<double><<<blocks, kGroupThreads, 0, stream>>>(
        static_cast<const double*>(rewards), valid, groups, group_size, leave_one_out, scale_by_std, eps,
        static_cast<double*>(out));
  } else {
    group_advantages_kernel<float><<<blocks, kGroupThreads, 0, stream>>>(
        static_cast<const float*>(rewards), valid, groups, group_size, leave_one_out, scale_by_std,
        static_cast<float>(eps), static_cast<float*>(out));
  }
  check_launch("group_advantages_kernel");
}

}  // namespace aligner::cuda
