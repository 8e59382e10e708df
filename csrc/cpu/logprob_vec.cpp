// Vectorized CPU row kernels for token_logprobs / token_entropy and their
// backward. Compiled once per CPU capability (see CMakeLists.txt), with
// ALIGNER_CPU_NS naming the namespace and CPU_CAPABILITY_* selecting the
// at::vec implementation.
//
// Each row is streamed in L1-sized chunks: a max pass and an exp pass over
// the chunk (the second read hits L1), and the chunk's statistics are merged
// into the row's running state with the shared softmax_stats_* functions.
// One exp per logit, no [N, V] temporary.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

#include "aligner/softmax_stats.h"
#include "vec_kernels.h"

namespace aligner::cpu::ALIGNER_CPU_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
using c10::BFloat16;
using c10::Half;

// Elements per chunk: 16 KiB of fp32, comfortably inside L1 with the
// converted copy of a bf16/fp16 chunk.
constexpr int64_t kChunk = 4096;

float reduce_sum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

float reduce_max(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float m = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) m = max_of(m, lanes[i]);
  return m;
}

// Returns chunk [begin, begin + n) of the row as fp32 (the row itself for
// fp32 input, else `buf` filled by a vectorized conversion) and, through
// `chunk_max`, its largest value, found in the same pass.
template <typename scalar_t>
const float* load_chunk(const scalar_t* row, int64_t begin, int64_t n, float* buf, float* chunk_max) {
  Vec vmax(-std::numeric_limits<float>::infinity());
  const float* out;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    out = row + begin;
    for (; i + Vec::size() <= n; i += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(out + i));
  } else {
    const scalar_t* src = row + begin;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v;
      at::vec::load_to_float<scalar_t>(src + i, v);
      v.store(buf + i);
      vmax = at::vec::maximum(vmax, v);
    }
    for (int64_t j = i; j < n; ++j) buf[j] = static_cast<float>(src[j]);
    out = buf;
  }
  float m = reduce_max(vmax);
  for (; i < n; ++i) m = max_of(m, out[i]);
  *chunk_max = m;
  return out;
}

// load_chunk without the max, for the backward.
template <typename scalar_t>
const float* load_chunk_nomax(const scalar_t* row, int64_t begin, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row + begin;
  } else {
    const scalar_t* src = row + begin;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec v;
      at::vec::load_to_float<scalar_t>(src + i, v);
      v.store(buf + i);
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// Merges the statistics of x[0, n) * inv_t into `st`, given chunk_max = max x.
template <bool kEntropy>
SoftmaxStats<float> chunk_stats(const float* x, int64_t n, float chunk_max, float inv_t, SoftmaxStats<float> st) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // inv_t > 0, so max(x) * inv_t is the max of the scaled values.
  const float m = max_of(st.max, chunk_max * inv_t);  // NaN stays NaN (softmax_stats.h)
  if (m == neg_inf) return st;                        // every value so far is -inf
  st = softmax_stats_rescale(st, m);

  const Vec vscale(inv_t);
  const Vec vneg_m(-m);
  // (z - m) is -inf for a -inf logit; clamping it to the lowest finite value
  // keeps e * (z - m) at 0 instead of 0 * -inf = NaN.
  const Vec vlowest(std::numeric_limits<float>::lowest());
  Vec vsum(0.f), vsum_ez(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec shifted = at::vec::fmadd(Vec::loadu(x + i), vscale, vneg_m);
    const Vec e = shifted.exp_u20();
    vsum = vsum + e;
    if constexpr (kEntropy) vsum_ez = at::vec::fmadd(e, at::vec::maximum(shifted, vlowest), vsum_ez);
  }
  float sum = reduce_sum(vsum);
  float sum_ez = kEntropy ? reduce_sum(vsum_ez) : 0.f;
  for (; i < n; ++i) {
    const float shifted = std::fma(x[i], inv_t, -m);
    const float e = std::exp(shifted);
    sum += e;
    if (kEntropy) sum_ez += e * std::max(shifted, std::numeric_limits<float>::lowest());
  }
  st.sum_exp += sum;
  st.sum_exz += sum_ez;
  return st;
}

template <typename scalar_t, bool kEntropy>
void forward_rows_impl(const LogprobForwardArgs& a, int64_t row_begin, int64_t row_end) {
  alignas(64) float buf[kChunk];
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  auto* logprobs = static_cast<float*>(a.logprobs);
  auto* entropy = static_cast<float*>(a.entropy);
  auto* lse_out = static_cast<float*>(a.lse);
  const float inv_t = static_cast<float>(a.inv_temperature);
  const int64_t V = a.vocab;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + r * V;
    SoftmaxStats<float> st = softmax_stats_empty<float>();
    for (int64_t c = 0; c < V; c += kChunk) {
      const int64_t n = std::min(kChunk, V - c);
      float chunk_max;
      const float* x = load_chunk(row, c, n, buf, &chunk_max);
      st = chunk_stats<kEntropy>(x, n, chunk_max, inv_t, st);
    }
    const float lse = softmax_stats_lse(st);
    lse_out[r] = lse;
    if (kEntropy) entropy[r] = softmax_stats_entropy(st);
    if (logprobs != nullptr) {
      const int64_t label = a.labels[r];
      logprobs[r] = label == a.ignore_index ? 0.f : static_cast<float>(row[label]) * inv_t - lse;
    }
  }
}

template <typename scalar_t>
void forward_rows(const void* args, int64_t row_begin, int64_t row_end) {
  const auto& a = *static_cast<const LogprobForwardArgs*>(args);
  if (a.entropy != nullptr) {
    forward_rows_impl<scalar_t, true>(a, row_begin, row_end);
  } else {
    forward_rows_impl<scalar_t, false>(a, row_begin, row_end);
  }
}

// out[j] = d(g_lp * logprob + g_ent * entropy) / d logit_j for x[0, n),
// without the label's +g_lp (the caller adds it before rounding):
//   -p_j * (g_lp + g_ent * (log p_j + H)) / T
void chunk_grad(const float* x, int64_t n, float inv_t, float lse, float entropy, float g_lp, float g_ent, float* out) {
  const Vec vscale(inv_t);
  const Vec vneg_lse(-lse);
  const Vec vg_ent(g_ent);
  const Vec vbase(g_lp + g_ent * entropy);
  const Vec vneg_inv_t(-inv_t);
  const Vec vzero(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec logp = at::vec::fmadd(Vec::loadu(x + i), vscale, vneg_lse);
    const Vec p = logp.exp_u20();
    // A zero-probability entry contributes 0 (the limit of p log p), as in
    // softmax_grad: select it explicitly, since logp * g_ent may be -inf there.
    const Vec coef = at::vec::fmadd(logp, vg_ent, vbase);
    Vec::blendv(p * coef * vneg_inv_t, vzero, p == vzero).store(out + i);
  }
  for (; i < n; ++i) {
    const float logp = std::fma(x[i], inv_t, -lse);
    const float p = std::exp(logp);
    out[i] = p > 0.f ? -p * (g_lp + g_ent * (logp + entropy)) * inv_t : 0.f;
  }
}

template <typename scalar_t>
void store_chunk(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (void)src, (void)dst, (void)n;  // written in place
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
void backward_rows(const void* args, int64_t row_begin, int64_t row_end) {
  const auto& a = *static_cast<const LogprobBackwardArgs*>(args);
  alignas(64) float in_buf[kChunk];
  alignas(64) float out_buf[kChunk];
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  const auto* lse = static_cast<const float*>(a.lse);
  const auto* saved_entropy = static_cast<const float*>(a.entropy);
  const auto* grad_logprobs = static_cast<const float*>(a.grad_logprobs);
  const auto* grad_entropy = static_cast<const float*>(a.grad_entropy);
  auto* grad = static_cast<scalar_t*>(a.grad_logits);
  const float inv_t = static_cast<float>(a.inv_temperature);
  const int64_t V = a.vocab;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + r * V;
    scalar_t* grad_row = grad + r * V;
    const int64_t label = a.labels != nullptr ? a.labels[r] : a.ignore_index;
    const bool has_label = grad_logprobs != nullptr && label != a.ignore_index;
    const float g_lp = has_label ? grad_logprobs[r] : 0.f;
    const float g_ent = grad_entropy != nullptr ? grad_entropy[r] : 0.f;
    const float entropy = saved_entropy != nullptr ? saved_entropy[r] : 0.f;
    if (lse[r] != lse[r]) {  // a NaN row: NaN gradient, as the scalar and CUDA paths give
      std::fill(grad_row, grad_row + V, scalar_t(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    if (g_lp == 0.f && g_ent == 0.f) {
      std::fill(grad_row, grad_row + V, scalar_t(0));
      continue;
    }
    for (int64_t c = 0; c < V; c += kChunk) {
      const int64_t n = std::min(kChunk, V - c);
      float* out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(grad_row) + c : out_buf;
      chunk_grad(load_chunk_nomax(row, c, n, in_buf), n, inv_t, lse[r], entropy, g_lp, g_ent, out);
      if (has_label && label >= c && label < c + n) out[label - c] += g_lp * inv_t;
      store_chunk(out, grad_row + c, n);
    }
  }
}

}  // namespace

LogprobKernels logprob_kernels() {
  return LogprobKernels{
      {forward_rows<float>, forward_rows<BFloat16>, forward_rows<Half>},
      {backward_rows<float>, backward_rows<BFloat16>, backward_rows<Half>},
      ALIGNER_CPU_CAPABILITY_NAME,
  };
}

}  // namespace aligner::cpu::ALIGNER_CPU_NS
