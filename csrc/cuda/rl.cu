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
__global__ void kl_forward_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n, KLEstimator est,
                                  acc_t* __restrict__ out) {
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
    const Moments<acc_t> other{__shfl_xor_sync(kFullMask, s.count, offset), __shfl_xor_sync(kFullMask, s.mean, offset),
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
  group_advantages_one<acc_t, acc_t>(rewards + off, valid != nullptr ? valid + off : nullptr, group_size, leave_one_out,
                                     scale_by_std, eps, out + off);
}

// Calls f(acc_t()) with acc_t the type of the RL ops' data: double for
// ElemType::kDouble, else float.
template <typename F>
void with_acc_type(ElemType type, F&& f) {
  if (type == ElemType::kDouble) {
    f(double());
  } else {
    f(float());
  }
}

}  // namespace

void launch_kl_forward(const KLForwardArgs& args, cudaStream_t stream) {
  if (args.n == 0) return;
  with_acc_type(args.elem_type, [&](auto zero) {
    using acc_t = decltype(zero);
    kl_forward_kernel<acc_t><<<blocks_for(args.n, kThreads), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(args.logprobs), static_cast<const acc_t*>(args.ref_logprobs), args.n, args.estimator,
        static_cast<acc_t*>(args.out));
  });
  check_launch("kl_forward_kernel");
}

void launch_kl_backward(const KLBackwardArgs& args, cudaStream_t stream) {
  if (args.n == 0) return;
  with_acc_type(args.elem_type, [&](auto zero) {
    using acc_t = decltype(zero);
    kl_backward_kernel<acc_t><<<blocks_for(args.n, kThreads), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(args.grad), static_cast<const acc_t*>(args.logprobs),
        static_cast<const acc_t*>(args.ref_logprobs), args.n, args.estimator, static_cast<acc_t*>(args.grad_logprobs));
  });
  check_launch("kl_backward_kernel");
}

void launch_masked_moments(const MaskedMomentsArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  const dim3 grid(static_cast<unsigned>(args.rows));
  with_acc_type(args.elem_type, [&](auto zero) {
    using acc_t = decltype(zero);
    masked_moments_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const acc_t*>(args.x), args.mask, args.cols, static_cast<acc_t*>(args.count),
        static_cast<acc_t*>(args.mean), static_cast<acc_t*>(args.m2));
  });
  check_launch("masked_moments_kernel");
}

void launch_masked_whiten(const MaskedWhitenArgs& args, cudaStream_t stream) {
  const unsigned blocks = blocks_for(args.n, kThreads);
  with_acc_type(args.elem_type, [&](auto zero) {
    using acc_t = decltype(zero);
    masked_whiten_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const acc_t*>(args.x), args.mask, args.n, static_cast<const acc_t*>(args.count),
        static_cast<const acc_t*>(args.mean), static_cast<const acc_t*>(args.m2), args.shift_mean,
        static_cast<acc_t>(args.eps), static_cast<acc_t*>(args.out), static_cast<acc_t*>(args.rstd));
  });
  check_launch("masked_whiten_kernel");
}

void launch_gae(const GaeArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.time == 0) return;
  constexpr int kGaeThreads = 128;
  const unsigned blocks = static_cast<unsigned>((args.batch + kGaeThreads - 1) / kGaeThreads);
  with_acc_type(args.elem_type, [&](auto zero) {
    using acc_t = decltype(zero);
    gae_kernel<acc_t><<<blocks, kGaeThreads, 0, stream>>>(
        static_cast<const acc_t*>(args.rewards), static_cast<const acc_t*>(args.values), args.mask, args.batch,
        args.time, static_cast<acc_t>(args.gamma), static_cast<acc_t>(args.lam), args.carry_forward,
        static_cast<acc_t*>(args.advantages), static_cast<acc_t*>(args.returns));
  });
  check_launch("gae_kernel");
}

void launch_group_advantages(const GroupAdvantagesArgs& args, cudaStream_t stream) {
  if (args.groups == 0) return;
  constexpr int kGroupThreads = 128;
  const unsigned blocks = static_cast<unsigned>((args.groups + kGroupThreads - 1) / kGroupThreads);
  with_acc_type(args.elem_type, [&](auto zero) {
    using acc_t = decltype(zero);
    group_advantages_kernel<acc_t><<<blocks, kGroupThreads, 0, stream>>>(
        static_cast<const acc_t*>(args.rewards), args.valid, args.groups, args.group_size, args.leave_one_out,
        args.scale_by_std, static_cast<acc_t>(args.eps), static_cast<acc_t*>(args.out));
  });
  check_launch("group_advantages_kernel");
}

}  // namespace aligner::cuda
