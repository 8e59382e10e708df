// The ATen-level entry points of every aligner op, one per device. Schemas
// and registrations live in torch_bindings.cpp; argument checks shared by the
// devices live in checks.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace aligner {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define ALIGNER_DECLARE_OPS(dev)                                                                                       \
  std::tuple<Tensor, Tensor, Tensor> logprobs_entropy_forward_##dev(const Tensor& logits, const OptTensor& labels,     \
                                                                    double temperature, int64_t ignore_index,          \
                                                                    bool with_logprobs, bool with_entropy);            \
  Tensor logprobs_entropy_backward_##dev(const OptTensor& grad_logprobs, const OptTensor& grad_entropy,                \
                                         const Tensor& logits, const OptTensor& labels, const Tensor& lse,             \
                                         const OptTensor& entropy, double temperature, int64_t ignore_index);          \
  Tensor kl_penalty_forward_##dev(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator);              \
  std::tuple<Tensor, Tensor> kl_penalty_backward_##dev(const Tensor& grad, const Tensor& logprobs,                     \
                                                       const Tensor& ref_logprobs, int64_t estimator);                 \
  std::tuple<Tensor, Tensor, Tensor> masked_moments_##dev(const Tensor& x, const Tensor& mask);                        \
  std::tuple<Tensor, Tensor, Tensor> masked_whiten_##dev(const Tensor& x, const Tensor& mask, bool shift_mean,         \
                                                         double eps);                                                  \
  std::tuple<Tensor, Tensor> gae_##dev(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,  \
                                       double lam, bool carry_forward);                                                \
  Tensor group_advantages_##dev(const Tensor& rewards, const OptTensor& valid, int64_t group_size, bool leave_one_out, \
                                bool scale_by_std, double eps);

ALIGNER_DECLARE_OPS(cpu)
// CPU only (csrc/cpu/linear_argmax.cpp): elsewhere aligner.ops.linear_argmax composes torch ops.
std::tuple<Tensor, Tensor, Tensor> linear_argmax_cpu(const Tensor& hidden, const Tensor& weight);
#ifdef ALIGNER_WITH_CUDA
ALIGNER_DECLARE_OPS(cuda)
// CUDA only (csrc/cuda/linear_ops_cuda.cpp): the CPU runs the chunked path in Python.
std::tuple<Tensor, Tensor, Tensor> linear_logprobs_forward_cuda(const Tensor& hidden, const Tensor& weight,
                                                                const Tensor& labels, double temperature,
                                                                int64_t ignore_index, bool with_entropy);
#endif

#undef ALIGNER_DECLARE_OPS

}  // namespace aligner
