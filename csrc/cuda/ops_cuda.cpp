// CUDA entry points: the same checks and output layout as the CPU entry
// points (checks.h), then a launch on the current stream of the inputs'
// device (launch.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "checks.h"
#include "launch.h"
#include "ops.h"

namespace aligner {
namespace {

cuda::ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::ElemType::kFloat;
    case at::kBFloat16:
      return cuda::ElemType::kBFloat16;
    case at::kHalf:
      return cuda::ElemType::kHalf;
    case at::kDouble:
      return cuda::ElemType::kDouble;
    default:
      TORCH_CHECK_TYPE(false, "logits dtype ", t, " is not supported (use float32, bfloat16, float16 or float64)");
  }
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> logprobs_entropy_forward_cuda(const Tensor& logits, const OptTensor& labels,
                                                                 double temperature, int64_t ignore_index,
                                                                 bool with_logprobs, bool with_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto in = prepare_logprob_inputs(logits, labels, temperature, ignore_index, with_logprobs);
  const auto opts = logits.options().dtype(compute_dtype(logits));
  const auto shape = row_shape(logits);
  Tensor lse = at::empty(shape, opts);
  Tensor logprobs = with_logprobs ? at::empty(shape, opts) : at::empty({0}, opts);
  Tensor entropy = with_entropy ? at::empty(shape, opts) : at::empty({0}, opts);
  cuda::launch_logprob_forward(in.logits.const_data_ptr(), elem_type_of(in.logits.scalar_type()), in.rows, in.vocab,
                               with_logprobs ? in.labels.const_data_ptr<int64_t>() : nullptr, ignore_index,
                               1.0 / temperature, with_logprobs ? logprobs.data_ptr() : nullptr,
                               with_entropy ? entropy.data_ptr() : nullptr, lse.data_ptr(), stream());
  return {logprobs, entropy, lse};
}

Tensor logprobs_entropy_backward_cuda(const OptTensor& grad_logprobs, const OptTensor& grad_entropy,
                                      const Tensor& logits, const OptTensor& labels, const Tensor& lse,
                                      const OptTensor& entropy, double temperature, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool with_lp = grad_logprobs.has_value();
  const bool with_ent = grad_entropy.has_value();
  TORCH_CHECK_VALUE(!with_ent || entropy.has_value(), "grad_entropy needs the saved entropy");
  const auto in = prepare_logprob_inputs(logits, std::nullopt, temperature, ignore_index, false);
  const auto acc = compute_dtype(logits);
  auto flat = [&](const OptTensor& t) -> Tensor {
    return t.has_value() ? t->reshape({in.rows}).to(acc).contiguous() : Tensor();
  };
  const Tensor flat_labels = with_lp ? labels->reshape({in.rows}).to(at::kLong).contiguous() : Tensor();
  const Tensor g_lp = flat(grad_logprobs);
  const Tensor g_ent = flat(grad_entropy);
  const Tensor saved_lse = flat(lse);
  const Tensor saved_ent = with_ent ? flat(entropy) : Tensor();
  Tensor grad = at::empty_like(in.logits);
  cuda::launch_logprob_backward(in.logits.const_data_ptr(), elem_type_of(in.logits.scalar_type()), in.rows, in.vocab,
                                with_lp ? flat_labels.const_data_ptr<int64_t>() : nullptr, ignore_index,
                                1.0 / temperature, saved_lse.const_data_ptr(), ptr_or_null(saved_ent),
                                ptr_or_null(g_lp), ptr_or_null(g_ent), grad.data_ptr(), stream());
  return grad.view(logits.sizes());
}

Tensor kl_penalty_forward_cuda(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  const c10::cuda::CUDAGuard guard(logprobs.device());
  check_floating(logprobs, "logprobs");
  check_floating(ref_logprobs, "ref_logprobs");
  check_same_shape(logprobs, "logprobs", ref_logprobs, "ref_logprobs");
  check_kl_estimator(estimator);
  const auto dtype = compute_dtype(logprobs, ref_logprobs);
  const Tensor a = logprobs.to(dtype).contiguous();
  const Tensor b = ref_logprobs.to(dtype).contiguous();
  Tensor out = at::empty(logprobs.sizes(), logprobs.options().dtype(dtype));
  cuda::launch_kl_forward(a.const_data_ptr(), b.const_data_ptr(), out.numel(), static_cast<int>(estimator),
                          dtype == at::kDouble, out.data_ptr(), stream());
  return out;
}

std::tuple<Tensor, Tensor> kl_penalty_backward_cuda(const Tensor& grad, const Tensor& logprobs,
                                                    const Tensor& ref_logprobs, int64_t estimator) {
  const c10::cuda::CUDAGuard guard(logprobs.device());
  check_kl_estimator(estimator);
  const auto dtype = compute_dtype(logprobs, ref_logprobs);
  const Tensor g = grad.to(dtype).contiguous();
  const Tensor a = logprobs.to(dtype).contiguous();
  const Tensor b = ref_logprobs.to(dtype).contiguous();
  Tensor grad_lp = at::empty(logprobs.sizes(), logprobs.options().dtype(dtype));
  cuda::launch_kl_backward(g.const_data_ptr(), a.const_data_ptr(), b.const_data_ptr(), grad_lp.numel(),
                           static_cast<int>(estimator), dtype == at::kDouble, grad_lp.data_ptr(), stream());
  return {grad_lp.to(logprobs.scalar_type()), grad_lp.neg().to(ref_logprobs.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> masked_moments_cuda(const Tensor& x, const Tensor& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_floating(x, "x");
  check_same_shape(x, "x", mask, "mask");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  const int64_t C = x.size(-1);
  const int64_t R = C == 0 ? 0 : x.numel() / C;
  const auto dtype = compute_dtype(x);
  const auto shape = row_shape(x);
  const auto opts = x.options().dtype(dtype);
  Tensor count = at::zeros(shape, opts), mean = at::zeros(shape, opts), m2 = at::zeros(shape, opts);
  if (R == 0) return {count, mean, m2};
  const Tensor xs = x.reshape({R, C}).to(dtype).contiguous();
  const Tensor ms = as_bool_mask(mask.reshape({R, C}));
  cuda::launch_masked_moments(xs.const_data_ptr(), ms.const_data_ptr<bool>(), R, C, dtype == at::kDouble,
                              count.data_ptr(), mean.data_ptr(), m2.data_ptr(), stream());
  return {count, mean, m2};
}

std::tuple<Tensor, Tensor, Tensor> masked_whiten_cuda(const Tensor& x, const Tensor& mask, bool shift_mean,
                                                      double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_floating(x, "x");
  check_same_shape(x, "x", mask, "mask");
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  const auto [count, mean, m2] = masked_moments_cuda(x.reshape({1, -1}), mask.reshape({1, -1}));
  const auto dtype = compute_dtype(x);
  const Tensor xs = x.to(dtype).contiguous();
  const Tensor ms = as_bool_mask(mask);
  Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  Tensor rstd = at::empty({}, x.options().dtype(dtype));
  if (xs.numel() > 0) {
    cuda::launch_masked_whiten(xs.const_data_ptr(), ms.const_data_ptr<bool>(), xs.numel(), count.const_data_ptr(),
                               mean.const_data_ptr(), m2.const_data_ptr(), shift_mean, eps, dtype == at::kDouble,
                               out.data_ptr(), rstd.data_ptr(), stream());
  } else {
    rstd.fill_(1.0 / std::sqrt(eps));
  }
  return {out, mean.reshape({}), rstd};
}

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                    double lam, bool carry_forward) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  check_gae_args(rewards, values, mask, gamma, lam);
  const auto dtype = compute_dtype(rewards, values);
  const Tensor r = rewards.to(dtype).contiguous();
  const Tensor v = values.to(dtype).contiguous();
  const Tensor m = as_bool_mask(mask);
  Tensor adv = at::empty(rewards.sizes(), rewards.options().dtype(dtype));
  Tensor ret = at::empty(rewards.sizes(), rewards.options().dtype(dtype));
  cuda::launch_gae(r.const_data_ptr(), v.const_data_ptr(), m.const_data_ptr<bool>(), rewards.size(0),
                   rewards.size(1), gamma, lam, carry_forward, dtype == at::kDouble, adv.data_ptr(), ret.data_ptr(),
                   stream());
  return {adv, ret};
}

Tensor group_advantages_cuda(const Tensor& rewards, const OptTensor& valid, int64_t group_size, bool leave_one_out,
                             bool scale_by_std, double eps) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  check_group_args(rewards, valid, group_size, eps);
  const auto dtype = compute_dtype(rewards);
  const Tensor r = rewards.to(dtype).contiguous();
  const Tensor v = valid.has_value() ? as_bool_mask(*valid) : Tensor();
  Tensor out = at::empty(rewards.sizes(), rewards.options().dtype(dtype));
  cuda::launch_group_advantages(r.const_data_ptr(), v.defined() ? v.const_data_ptr<bool>() : nullptr,
                                rewards.numel() / group_size, group_size, leave_one_out, scale_by_std, eps,
                                dtype == at::kDouble, out.data_ptr(), stream());
  return out;
}

}  // namespace aligner
