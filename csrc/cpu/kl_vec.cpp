// Vectorized CPU KL-penalty kernels (float32); compiled once per CPU
// capability like logprob_vec.cpp. The tails and float64 use the scalar
// kl_value / kl_grad of aligner/rl_math.h, which these loops mirror.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "aligner/rl_math.h"
#include "vec_kernels.h"

namespace aligner::cpu::ALIGNER_CPU_NS {
namespace {

using Vec = at::vec::Vectorized<float>;

// kl(d) for a vector of d, per estimator (see kl_value).
template <KLEstimator kEst>
Vec kl_value_vec(const Vec& d) {
  if constexpr (kEst == KLEstimator::kK1) {
    return d;
  } else if constexpr (kEst == KLEstimator::kAbs) {
    return d.abs();
  } else if constexpr (kEst == KLEstimator::kK2) {
    return d * d * Vec(0.5f);
  } else {
    return d.neg().exp() + d - Vec(1.f);
  }
}

// d kl / d d for a vector of d, per estimator (see kl_grad).
template <KLEstimator kEst>
Vec kl_grad_vec(const Vec& d) {
  if constexpr (kEst == KLEstimator::kK1) {
    return Vec(1.f);
  } else if constexpr (kEst == KLEstimator::kAbs) {
    const Vec zero(0.f);
    return Vec::blendv(zero, Vec(1.f), d > zero) - Vec::blendv(zero, Vec(1.f), d < zero);
  } else if constexpr (kEst == KLEstimator::kK2) {
    return d;
  } else {
    return Vec(1.f) - d.neg().exp();
  }
}

template <KLEstimator kEst>
void forward_impl(const float* a, const float* b, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    kl_value_vec<kEst>(Vec::loadu(a + i) - Vec::loadu(b + i)).store(out + i);
  }
  for (; i < n; ++i) out[i] = kl_value<float>(a[i] - b[i], kEst);
}

template <KLEstimator kEst>
void backward_impl(const float* g, const float* a, const float* b, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(g + i) * kl_grad_vec<kEst>(Vec::loadu(a + i) - Vec::loadu(b + i))).store(out + i);
  }
  for (; i < n; ++i) out[i] = g[i] * kl_grad<float>(a[i] - b[i], kEst);
}

void forward(const KLForwardArgs& args, int64_t begin, int64_t end) {
  const float* a = static_cast<const float*>(args.logprobs) + begin;
  const float* b = static_cast<const float*>(args.ref_logprobs) + begin;
  float* out = static_cast<float*>(args.out) + begin;
  const int64_t n = end - begin;
  switch (args.estimator) {
    case KLEstimator::kK1:
      return forward_impl<KLEstimator::kK1>(a, b, out, n);
    case KLEstimator::kAbs:
      return forward_impl<KLEstimator::kAbs>(a, b, out, n);
    case KLEstimator::kK2:
      return forward_impl<KLEstimator::kK2>(a, b, out, n);
    default:
      return forward_impl<KLEstimator::kK3>(a, b, out, n);
  }
}

void backward(const KLBackwardArgs& args, int64_t begin, int64_t end) {
  const float* g = static_cast<const float*>(args.grad) + begin;
  const float* a = static_cast<const float*>(args.logprobs) + begin;
  const float* b = static_cast<const float*>(args.ref_logprobs) + begin;
  float* out = static_cast<float*>(args.grad_logprobs) + begin;
  const int64_t n = end - begin;
  switch (args.estimator) {
    case KLEstimator::kK1:
      return backward_impl<KLEstimator::kK1>(g, a, b, out, n);
    case KLEstimator::kAbs:
      return backward_impl<KLEstimator::kAbs>(g, a, b, out, n);
    case KLEstimator::kK2:
      return backward_impl<KLEstimator::kK2>(g, a, b, out, n);
    default:
      return backward_impl<KLEstimator::kK3>(g, a, b, out, n);
  }
}

}  // namespace

KLKernels kl_kernels() { return KLKernels{forward, backward}; }

}  // namespace aligner::cpu::ALIGNER_CPU_NS
