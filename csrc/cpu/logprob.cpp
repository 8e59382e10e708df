// CPU entry points of the fused log-prob / entropy ops: checks, output
// allocation, threading, and the choice of vectorized row kernels
// (logprob_vec.cpp) for this CPU. float64 input takes a scalar path over the
// same shared math, so gradcheck runs in double precision.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>

#include "aligner/softmax_stats.h"
#include "checks.h"
#include "ops.h"
#include "vec_kernels.h"

namespace aligner {
namespace cpu {

namespace {

// A fresh [N, V] gradient is hundreds of MB, and faulting it in 4 KiB pages
// costs more than computing it. Asking for transparent huge pages on the
// untouched buffer (a hint; harmless if THP is off) makes first touch cheap.
void advise_huge_pages(void* data, size_t nbytes) {
  constexpr uintptr_t kHuge = 2u << 20;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// Rows per task: enough logits per task that scheduling is noise.
int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

// float64: plain per-element loop over the shared math.
void forward_double(const LogprobForwardArgs& a) {
  const auto* logits = static_cast<const double*>(a.logits);
  auto* logprobs = static_cast<double*>(a.logprobs);
  auto* entropy = static_cast<double*>(a.entropy);
  auto* lse = static_cast<double*>(a.lse);
  const int64_t* labels = a.labels;
  const int64_t ignore_index = a.ignore_index;
  const double inv_t = a.inv_temperature;
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      SoftmaxStats<double> st = softmax_stats_empty<double>();
      for (int64_t j = 0; j < V; ++j) softmax_stats_add(st, logits[r * V + j] * inv_t);
      lse[r] = softmax_stats_lse(st);
      if (entropy != nullptr) entropy[r] = softmax_stats_entropy(st);
      if (logprobs != nullptr) {
        logprobs[r] = labels[r] == ignore_index ? 0.0 : logits[r * V + labels[r]] * inv_t - lse[r];
      }
    }
  });
}

void backward_double(const LogprobBackwardArgs& a) {
  const auto* logits = static_cast<const double*>(a.logits);
  const auto* lse = static_cast<const double*>(a.lse);
  const auto* entropy = static_cast<const double*>(a.entropy);
  const auto* grad_lp = static_cast<const double*>(a.grad_logprobs);
  const auto* grad_ent = static_cast<const double*>(a.grad_entropy);
  auto* grad = static_cast<double*>(a.grad_logits);
  const int64_t* labels = a.labels;
  const int64_t ignore_index = a.ignore_index;
  const double inv_t = a.inv_temperature;
  const int64_t V = a.vocab;
  at::parallel_for(0, a.rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels != nullptr ? labels[r] : ignore_index;
      const double g_lp = (grad_lp != nullptr && label != ignore_index) ? grad_lp[r] : 0.0;
      const double g_ent = grad_ent != nullptr ? grad_ent[r] : 0.0;
      const double h = entropy != nullptr ? entropy[r] : 0.0;
      for (int64_t j = 0; j < V; ++j) {
        grad[r * V + j] =
            softmax_grad(logits[r * V + j] * inv_t, j == label && label != ignore_index, lse[r], h, g_lp, g_ent) *
            inv_t;
      }
    }
  });
}

}  // namespace
}  // namespace cpu

std::tuple<Tensor, Tensor, Tensor> logprobs_entropy_forward_cpu(const Tensor& logits, const OptTensor& labels,
                                                                double temperature, int64_t ignore_index,
                                                                bool with_logprobs, bool with_entropy) {
  const auto in = prepare_logprob_inputs(logits, labels, temperature, ignore_index, with_logprobs);
  const auto out_dtype = compute_dtype(logits);
  const auto opts = logits.options().dtype(out_dtype);
  const auto shape = row_shape(logits);
  Tensor lse = at::empty(shape, opts);
  Tensor logprobs = with_logprobs ? at::empty(shape, opts) : at::empty({0}, opts);
  Tensor entropy = with_entropy ? at::empty(shape, opts) : at::empty({0}, opts);
  if (in.rows == 0) return {logprobs, entropy, lse};

  const LogprobForwardArgs args{.logits = in.logits.const_data_ptr(),
                                .elem_type = elem_type_of(in.logits.scalar_type()),
                                .rows = in.rows,
                                .vocab = in.vocab,
                                .labels = with_logprobs ? in.labels.const_data_ptr<int64_t>() : nullptr,
                                .ignore_index = ignore_index,
                                .inv_temperature = 1.0 / temperature,
                                .logprobs = with_logprobs ? logprobs.data_ptr() : nullptr,
                                .entropy = with_entropy ? entropy.data_ptr() : nullptr,
                                .lse = lse.data_ptr()};
  if (args.elem_type == ElemType::kDouble) {
    cpu::forward_double(args);
  } else {
    const cpu::RowsFn fn = cpu::active_logprob_kernels().forward[static_cast<int>(args.elem_type)];
    at::parallel_for(0, in.rows, cpu::row_grain(in.vocab), [&](int64_t begin, int64_t end) { fn(&args, begin, end); });
  }
  return {logprobs, entropy, lse};
}

Tensor logprobs_entropy_backward_cpu(const OptTensor& grad_logprobs, const OptTensor& grad_entropy,
                                     const Tensor& logits, const OptTensor& labels, const Tensor& lse,
                                     const OptTensor& entropy, double temperature, int64_t ignore_index) {
  const bool with_lp = grad_logprobs.has_value();
  const bool with_ent = grad_entropy.has_value();
  TORCH_CHECK_VALUE(!with_ent || entropy.has_value(), "grad_entropy needs the saved entropy");
  // Labels were checked by the forward; only their presence matters here.
  const auto in = prepare_logprob_inputs(logits, with_lp ? labels : std::nullopt, temperature, ignore_index, false);
  LogprobInputs prepared = in;
  if (with_lp) prepared.labels = labels->reshape({in.rows}).to(at::kLong).contiguous();
  const auto acc = compute_dtype(logits);
  auto flat = [&](const OptTensor& t) -> Tensor {
    return t.has_value() ? t->reshape({in.rows}).to(acc).contiguous() : Tensor();
  };
  const Tensor g_lp = flat(grad_logprobs);
  const Tensor g_ent = flat(grad_entropy);
  const Tensor saved_lse = flat(lse);
  const Tensor saved_ent = with_ent ? flat(entropy) : Tensor();
  Tensor grad = at::empty_like(prepared.logits);
  cpu::advise_huge_pages(grad.data_ptr(), grad.nbytes());
  if (in.rows > 0) {
    const LogprobBackwardArgs args{.logits = prepared.logits.const_data_ptr(),
                                   .elem_type = elem_type_of(prepared.logits.scalar_type()),
                                   .rows = in.rows,
                                   .vocab = in.vocab,
                                   .labels = with_lp ? prepared.labels.const_data_ptr<int64_t>() : nullptr,
                                   .ignore_index = ignore_index,
                                   .inv_temperature = 1.0 / temperature,
                                   .lse = saved_lse.const_data_ptr(),
                                   .entropy = with_ent ? saved_ent.const_data_ptr() : nullptr,
                                   .grad_logprobs = with_lp ? g_lp.const_data_ptr() : nullptr,
                                   .grad_entropy = with_ent ? g_ent.const_data_ptr() : nullptr,
                                   .grad_logits = grad.data_ptr()};
    if (args.elem_type == ElemType::kDouble) {
      cpu::backward_double(args);
    } else {
      const cpu::RowsFn fn = cpu::active_logprob_kernels().backward[static_cast<int>(args.elem_type)];
      at::parallel_for(0, in.rows, cpu::row_grain(in.vocab),
                       [&](int64_t begin, int64_t end) { fn(&args, begin, end); });
    }
  }
  return grad.view(logits.sizes());
}

}  // namespace aligner
