// CUDA kernels of the fused log-prob / entropy ops. One block per row; each
// thread streams 16-byte packs, keeps an online SoftmaxStats (one exp per
// logit; a rescale only when its max grows), and the block merges the
// per-thread states with the same softmax_stats_merge the CPU uses.
#include <limits>

#include "aligner/softmax_stats.h"
#include "common.cuh"
#include "launch.h"

namespace aligner::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> warp_merge(SoftmaxStats<acc_t> s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const SoftmaxStats<acc_t> other{__shfl_xor_sync(kFullMask, s.max, offset),
                                    __shfl_xor_sync(kFullMask, s.sum_exp, offset),
                                    __shfl_xor_sync(kFullMask, s.sum_exz, offset)};
    s = softmax_stats_merge(s, other);
  }
  return s;
}

// The merged state of the whole block, valid in thread 0.
template <int THREADS, typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> block_merge(SoftmaxStats<acc_t> s) {
  __shared__ acc_t smax[THREADS / 32], ssum[THREADS / 32], sexz[THREADS / 32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  s = warp_merge(s);
  if (lane == 0) {
    smax[warp] = s.max;
    ssum[warp] = s.sum_exp;
    sexz[warp] = s.sum_exz;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < THREADS / 32 ? SoftmaxStats<acc_t>{smax[lane], ssum[lane], sexz[lane]} : softmax_stats_empty<acc_t>();
    s = warp_merge(s);
  }
  return s;
}

template <typename T, typename acc_t, int VEC, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    logprob_forward_kernel(const T* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
                           int64_t ignore_index, acc_t inv_t, acc_t* __restrict__ logprobs, acc_t* __restrict__ entropy,
                           acc_t* __restrict__ lse_out) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * vocab;
  SoftmaxStats<acc_t> st = softmax_stats_empty<acc_t>();
  const int64_t packs = vocab / VEC;
  const auto* xp = reinterpret_cast<const Pack<T, VEC>*>(x);
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const Pack<T, VEC> p = xp[i];
    acc_t z[VEC];
    acc_t pack_max = neg_infinity<acc_t>();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      z[k] = to_acc(p.v[k]) * inv_t;
      pack_max = max_of(pack_max, z[k]);
    }
    if (pack_max > st.max || pack_max != pack_max) st = softmax_stats_rescale(st, pack_max);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (z[k] != neg_infinity<acc_t>()) {
        const acc_t shifted = z[k] - st.max;
        const acc_t e = math_exp(shifted);
        st.sum_exp += e;
        if (kEntropy) st.sum_exz += e * shifted;
      }
    }
  }
  for (int64_t i = packs * VEC + threadIdx.x; i < vocab; i += kThreads) {
    softmax_stats_add(st, static_cast<acc_t>(to_acc(x[i])) * inv_t);
  }
  st = block_merge<kThreads>(st);
  if (threadIdx.x == 0) {
    const acc_t lse = softmax_stats_lse(st);
    lse_out[row] = lse;
    if (kEntropy) entropy[row] = softmax_stats_entropy(st);
    if (logprobs != nullptr) {
      // The CUDA entry point does not range-check labels (that would cost a
      // device sync; aligner.ops checks once in Python): a label outside
      // [0, vocab) gives NaN here, never an out-of-bounds read.
      const int64_t label = labels[row];
      if (label == ignore_index) {
        logprobs[row] = acc_t(0);
      } else if (label < 0 || label >= vocab) {
        logprobs[row] = std::numeric_limits<acc_t>::quiet_NaN();
      } else {
        logprobs[row] = static_cast<acc_t>(to_acc(x[label])) * inv_t - lse;
      }
    }
  }
}

template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    logprob_backward_kernel(const T* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ labels,
                            int64_t ignore_index, acc_t inv_t, const acc_t* __restrict__ lse,
                            const acc_t* __restrict__ entropy, const acc_t* __restrict__ grad_logprobs,
                            const acc_t* __restrict__ grad_entropy, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const int64_t label = labels != nullptr ? labels[row] : ignore_index;
  const bool has_label = grad_logprobs != nullptr && label != ignore_index;
  const acc_t g_lp = has_label ? grad_logprobs[row] : acc_t(0);
  const acc_t g_ent = grad_entropy != nullptr ? grad_entropy[row] : acc_t(0);
  const acc_t h = entropy != nullptr ? entropy[row] : acc_t(0);
  const acc_t row_lse = lse[row];
  const T* x = logits + row * vocab;
  T* g = grad + row * vocab;
  const int64_t packs = vocab / VEC;
  const auto* xp = reinterpret_cast<const Pack<T, VEC>*>(x);
  auto* gp = reinterpret_cast<Pack<T, VEC>*>(g);
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const Pack<T, VEC> p = xp[i];
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = i * VEC + k;
      const acc_t z = static_cast<acc_t>(to_acc(p.v[k])) * inv_t;
      out.v[k] = from_acc<T>(softmax_grad(z, has_label && j == label, row_lse, h, g_lp, g_ent) * inv_t);
    }
    gp[i] = out;
  }
  for (int64_t j = packs * VEC + threadIdx.x; j < vocab; j += kThreads) {
    const acc_t z = static_cast<acc_t>(to_acc(x[j])) * inv_t;
    g[j] = from_acc<T>(softmax_grad(z, has_label && j == label, row_lse, h, g_lp, g_ent) * inv_t);
  }
}

// 16-byte packs when the rows start 16-byte aligned, else one element.
template <typename T>
int pack_width(const void* base, int64_t vocab) {
  constexpr int kVec = 16 / sizeof(T);
  return (reinterpret_cast<uintptr_t>(base) % 16 == 0 && vocab % kVec == 0) ? kVec : 1;
}

template <typename T, typename acc_t>
void forward_typed(const LogprobForwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto* x = static_cast<const T*>(a.logits);
  const auto inv_t = static_cast<acc_t>(a.inv_temperature);
  auto* logprobs = static_cast<acc_t*>(a.logprobs);
  auto* entropy = static_cast<acc_t*>(a.entropy);
  auto* lse = static_cast<acc_t*>(a.lse);
  const dim3 grid(static_cast<unsigned>(a.rows));
  const bool packed = pack_width<T>(a.logits, a.vocab) == kVec;
#define ALIGNER_LAUNCH_FWD(VEC, ENT)         \
  logprob_forward_kernel<T, acc_t, VEC, ENT> \
      <<<grid, kThreads, 0, stream>>>(x, a.vocab, a.labels, a.ignore_index, inv_t, logprobs, entropy, lse)
  if (packed && entropy != nullptr) {
    ALIGNER_LAUNCH_FWD(kVec, true);
  } else if (packed) {
    ALIGNER_LAUNCH_FWD(kVec, false);
  } else if (entropy != nullptr) {
    ALIGNER_LAUNCH_FWD(1, true);
  } else {
    ALIGNER_LAUNCH_FWD(1, false);
  }
#undef ALIGNER_LAUNCH_FWD
  check_launch("logprob_forward_kernel");
}

template <typename T, typename acc_t>
void backward_typed(const LogprobBackwardArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const auto* x = static_cast<const T*>(a.logits);
  const auto inv_t = static_cast<acc_t>(a.inv_temperature);
  const auto* lse = static_cast<const acc_t*>(a.lse);
  const auto* entropy = static_cast<const acc_t*>(a.entropy);
  const auto* grad_logprobs = static_cast<const acc_t*>(a.grad_logprobs);
  const auto* grad_entropy = static_cast<const acc_t*>(a.grad_entropy);
  auto* g = static_cast<T*>(a.grad_logits);
  const dim3 grid(static_cast<unsigned>(a.rows));
  // grad is freshly allocated (aligned); the logits decide.
  if (pack_width<T>(a.logits, a.vocab) == kVec && pack_width<T>(a.grad_logits, a.vocab) == kVec) {
    logprob_backward_kernel<T, acc_t, kVec><<<grid, kThreads, 0, stream>>>(
        x, a.vocab, a.labels, a.ignore_index, inv_t, lse, entropy, grad_logprobs, grad_entropy, g);
  } else {
    logprob_backward_kernel<T, acc_t, 1><<<grid, kThreads, 0, stream>>>(x, a.vocab, a.labels, a.ignore_index, inv_t,
                                                                        lse, entropy, grad_logprobs, grad_entropy, g);
  }
  check_launch("logprob_backward_kernel");
}

}  // namespace

void launch_logprob_forward(const LogprobForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  switch (args.elem_type) {
    case ElemType::kFloat:
      return forward_typed<float, float>(args, stream);
    case ElemType::kBFloat16:
      return forward_typed<__nv_bfloat16, float>(args, stream);
    case ElemType::kHalf:
      return forward_typed<__half, float>(args, stream);
    case ElemType::kDouble:
      return forward_typed<double, double>(args, stream);
  }
}

void launch_logprob_backward(const LogprobBackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  switch (args.elem_type) {
    case ElemType::kFloat:
      return backward_typed<float, float>(args, stream);
    case ElemType::kBFloat16:
      return backward_typed<__nv_bfloat16, float>(args, stream);
    case ElemType::kHalf:
      return backward_typed<__half, float>(args, stream);
    case ElemType::kDouble:
      return backward_typed<double, double>(args, stream);
  }
}

}  // namespace aligner::cuda
