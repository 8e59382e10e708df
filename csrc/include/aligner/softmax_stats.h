// Online softmax statistics: the one piece of math behind token_logprobs,
// token_entropy and their fused and vocab-parallel variants.
//
// For a set of scaled logits z (z = logit / temperature) the state holds
//   max      m = max z
//   sum_exp  s = sum exp(z - m)
//   sum_exz  t = sum exp(z - m) * (z - m)
// from which
//   lse      = m + log s                  (log-sum-exp)
//   entropy  = log s - t / s              (= lse - E_p[z])
// States over disjoint sets merge exactly (rescale both to the larger max and
// add), so the CPU chunks, CUDA threads, warps and tensor-parallel ranks all
// reduce with the same merge.
//
// NaN: a NaN logit makes the state's max NaN, and a NaN max stays NaN through every
// add and merge (max_of propagates it), so log-prob, entropy and gradient of that
// row are NaN on every device and in every CPU variant, however the row is split.
#pragma once

#include "aligner/macros.h"

namespace aligner {

template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum_exp;
  acc_t sum_exz;
};

template <typename acc_t>
ALIGNER_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_empty() {
  return {neg_infinity<acc_t>(), acc_t(0), acc_t(0)};
}

// Re-expresses `s` relative to `new_max` (new_max >= s.max).
// exp(z - M) = exp(z - m) * f and (z - M) = (z - m) + d with d = m - M,
// f = exp(d), so s' = s f and t' = (t + d s) f.
template <typename acc_t>
ALIGNER_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_rescale(SoftmaxStats<acc_t> s, acc_t new_max) {
  if (s.sum_exp == acc_t(0)) {
    // Nothing accumulated (or every value was -inf): no -inf * 0 terms.
    return {new_max, acc_t(0), acc_t(0)};
  }
  if (s.max == new_max) {
    return s;
  }
  const acc_t d = s.max - new_max;
  const acc_t f = math_exp(d);
  return {new_max, s.sum_exp * f, (s.sum_exz + d * s.sum_exp) * f};
}

template <typename acc_t>
ALIGNER_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b) {
  const acc_t m = max_of(a.max, b.max);
  if (m == neg_infinity<acc_t>()) {
    return a;
  }
  a = softmax_stats_rescale(a, m);
  b = softmax_stats_rescale(b, m);
  return {m, a.sum_exp + b.sum_exp, a.sum_exz + b.sum_exz};
}

// Adds one value. The max moves rarely, so the common path is one exp.
template <typename acc_t>
ALIGNER_HOST_DEVICE void softmax_stats_add(SoftmaxStats<acc_t>& s, acc_t z) {
  if (z > s.max || z != z) {
    s = softmax_stats_rescale(s, z);
  }
  if (z == neg_infinity<acc_t>()) {
    return;  // exp(-inf) = 0, and 0 * (z - m) is 0 in the limit, not NaN
  }
  const acc_t shifted = z - s.max;
  const acc_t e = math_exp(shifted);
  s.sum_exp += e;
  s.sum_exz += e * shifted;
}

template <typename acc_t>
ALIGNER_HOST_DEVICE acc_t softmax_stats_lse(const SoftmaxStats<acc_t>& s) {
  return s.max + math_log(s.sum_exp);
}

template <typename acc_t>
ALIGNER_HOST_DEVICE acc_t softmax_stats_entropy(const SoftmaxStats<acc_t>& s) {
  if (s.max != s.max) {
    return s.max;  // a NaN row: NaN, whatever vectorized exp made of the sums
  }
  return math_log(s.sum_exp) - s.sum_exz / s.sum_exp;
}

// Gradient of  g_lp * logprob[label] + g_ent * entropy  with respect to one
// scaled logit z (multiply by 1/temperature for the raw logit):
//   d logprob / dz_j = [j == label] - p_j
//   d entropy / dz_j = -p_j (log p_j + H)
// with log p_j = z_j - lse. A zero-probability entry contributes 0 (the limit
// of p log p), never NaN.
template <typename acc_t>
ALIGNER_HOST_DEVICE acc_t softmax_grad(acc_t z, bool is_label, acc_t lse, acc_t entropy, acc_t g_lp, acc_t g_ent) {
  const acc_t logp = z - lse;
  const acc_t p = math_exp(logp);
  acc_t grad = -g_lp * p;
  if (p > acc_t(0)) {
    grad -= g_ent * p * (logp + entropy);
  }
  if (is_label) {
    grad += g_lp;
  }
  return grad;
}

}  // namespace aligner
