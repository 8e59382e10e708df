// Per-element and per-sequence math of the RL ops (KL estimators, masked
// moments, GAE, group baselines), shared by the CPU and CUDA kernels.
#pragma once

#include "aligner/macros.h"

namespace aligner {

// ---- KL estimators, d = logp - ref_logp ---------------------------------
enum class KLEstimator : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

template <typename acc_t>
ALIGNER_HOST_DEVICE acc_t kl_value(acc_t d, KLEstimator est) {
  switch (est) {
    case KLEstimator::kK1:
      return d;
    case KLEstimator::kAbs:
      return math_abs(d);
    case KLEstimator::kK2:
      return acc_t(0.5) * d * d;
    default:  // k3: exp(-d) + d - 1 >= 0
      return math_exp(-d) + d - acc_t(1);
  }
}

// d kl / d d; the gradient w.r.t. ref_logp is its negation.
template <typename acc_t>
ALIGNER_HOST_DEVICE acc_t kl_grad(acc_t d, KLEstimator est) {
  switch (est) {
    case KLEstimator::kK1:
      return acc_t(1);
    case KLEstimator::kAbs:
      return d > acc_t(0) ? acc_t(1) : (d < acc_t(0) ? acc_t(-1) : acc_t(0));
    case KLEstimator::kK2:
      return d;
    default:
      return acc_t(1) - math_exp(-d);
  }
}

// ---- masked moments (Chan et al. parallel mean/variance) -----------------
template <typename acc_t>
struct Moments {
  acc_t count;
  acc_t mean;
  acc_t m2;  // sum of squared deviations from the mean
};

template <typename acc_t>
ALIGNER_HOST_DEVICE void moments_add(Moments<acc_t>& s, acc_t x) {
  s.count += acc_t(1);
  const acc_t delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
}

template <typename acc_t>
ALIGNER_HOST_DEVICE Moments<acc_t> moments_merge(Moments<acc_t> a, Moments<acc_t> b) {
  const acc_t n = a.count + b.count;
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t delta = b.mean - a.mean;
  const acc_t wb = b.count / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// ---- GAE -----------------------------------------------------------------
// One sequence of length T (contiguous), reverse scan:
//   delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}
// with V and A after the end = 0.
// carry_forward == false (NeMo-Aligner): masked positions enter as r = V = 0.
// carry_forward == true (verl, NeMo-RL multi-turn): masked positions are
// skipped, the running (V_next, A_next) pass through them unchanged.
// Outputs (advantages, returns = A + V) are 0 at masked positions.
template <typename in_t, typename mask_t, typename acc_t, typename out_t>
ALIGNER_HOST_DEVICE void gae_sequence(const in_t* rewards, const in_t* values, const mask_t* mask, int64_t T,
                                      acc_t gamma, acc_t lam, bool carry_forward, out_t* advantages, out_t* returns) {
  acc_t next_value = acc_t(0);
  acc_t next_adv = acc_t(0);
  const acc_t decay = gamma * lam;
  for (int64_t t = T - 1; t >= 0; --t) {
    const bool valid = mask[t] != mask_t(0);
    if (!valid) {
      advantages[t] = out_t(0);
      returns[t] = out_t(0);
      if (carry_forward) continue;
    }
    const acc_t r = valid ? static_cast<acc_t>(rewards[t]) : acc_t(0);
    const acc_t v = valid ? static_cast<acc_t>(values[t]) : acc_t(0);
    const acc_t adv = r + gamma * next_value - v + decay * next_adv;
    if (valid) {
      advantages[t] = static_cast<out_t>(adv);
      returns[t] = static_cast<out_t>(adv + v);
    }
    next_value = v;
    next_adv = adv;
  }
}

// ---- group (GRPO / RLOO) advantages --------------------------------------
// One group of G samples. Over the valid samples: n, sum, mean and the
// unbiased std (0 when n <= 1). baseline: mean, or leave-one-out
// (sum - r_i) / (n - 1), where a group with n <= 1 gets zero advantage.
// Invalid samples get 0.
template <typename in_t, typename acc_t>
ALIGNER_HOST_DEVICE void group_advantages_one(const in_t* rewards, const bool* valid, int64_t G, bool leave_one_out,
                                              bool scale_by_std, acc_t eps, acc_t* out) {
  acc_t n = acc_t(0);
  acc_t sum = acc_t(0);
  for (int64_t i = 0; i < G; ++i) {
    if (valid == nullptr || valid[i]) {
      n += acc_t(1);
      sum += static_cast<acc_t>(rewards[i]);
    }
  }
  const acc_t mean = n > acc_t(0) ? sum / n : acc_t(0);
  acc_t sq = acc_t(0);
  for (int64_t i = 0; i < G; ++i) {
    if (valid == nullptr || valid[i]) {
      const acc_t d = static_cast<acc_t>(rewards[i]) - mean;
      sq += d * d;
    }
  }
  const acc_t std = n > acc_t(1) ? math_sqrt(sq / (n - acc_t(1))) : acc_t(0);
  for (int64_t i = 0; i < G; ++i) {
    if (!(valid == nullptr || valid[i]) || n <= acc_t(1)) {
      out[i] = acc_t(0);
      continue;
    }
    const acc_t r = static_cast<acc_t>(rewards[i]);
    const acc_t baseline = leave_one_out ? (sum - r) / (n - acc_t(1)) : mean;
    acc_t adv = r - baseline;
    if (scale_by_std) adv /= (std + eps);
    out[i] = adv;
  }
}

}  // namespace aligner
