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
  cuda::launch_logprob_forward({.logits = in.logits.const_data_ptr(),
                                .elem_type = elem_type_of(in.logits.scalar_type()),
                                .rows = in.rows,
                                .vocab = in.vocab,
                                .labels = with_logprobs ? in.labels.const_data_ptr<int64_t>() : nullptr,
                                .ignore_index = ignore_index,
                                .inv_temperature = 1.0 / temperature,
                                .logprobs = with_logprobs ? logprobs.data_ptr() : nullptr,
                                .entropy = with_entropy ? entropy.data_ptr() : nullptr,
                                .lse = lse.data_ptr()},
                               stream());
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
  cuda::launch_logprob_backward({.logits = in.logits.const_data_ptr(),
                                 .elem_type = elem_type_of(in.logits.scalar_type()),
                                 .rows = in.rows,
                                 .vocab = in.vocab,
                                 .labels = with_lp ? flat_labels.const_data_ptr<int64_t>() : nullptr,
                                 .ignore_index = ignore_index,
                                 .inv_temperature = 1.0 / temperature,
                                 .lse = saved_lse.const_data_ptr(),
                                 .entropy = ptr_or_null(saved_ent),
                                 .grad_logprobs = ptr_or_null(g_lp),
                                 .grad_entropy = ptr_or_null(g_ent),
                                 .grad_logits = grad.data_ptr()},
                                stream());
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
  cuda::launch_kl_forward({.logprobs = a.const_data_ptr(),
                           .ref_logprobs = b.const_data_ptr(),
                           .elem_type = elem_type_of(dtype),
                           .n = out.numel(),
                           .estimator = static_cast<KLEstimator>(estimator),
                           .out = out.data_ptr()},
                          stream());
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
  cuda::launch_kl_backward({.grad = g.const_data_ptr(),
                            .logprobs = a.const_data_ptr(),
                            .ref_logprobs = b.const_data_ptr(),
                            .elem_type = elem_type_of(dtype),
                            .n = grad_lp.numel(),
                            .estimator = static_cast<KLEstimator>(estimator),
                            .grad_logprobs = grad_lp.data_ptr()},
                           stream());
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
  cuda::launch_masked_moments({.x = xs.const_data_ptr(),
                               .mask = ms.const_data_ptr<bool>(),
                               .elem_type = elem_type_of(dtype),
                               .rows = R,
                               .cols = C,
                               .count = count.data_ptr(),
                               .mean = mean.data_ptr(),
                               .m2 = m2.data_ptr()},
                              stream());
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
    cuda::launch_masked_whiten({.x = xs.const_data_ptr(),
                                .mask = ms.const_data_ptr<bool>(),
                                .elem_type = elem_type_of(dtype),
                                .n = xs.numel(),
                                .count = count.const_data_ptr(),
                                .mean = mean.const_data_ptr(),
                                .m2 = m2.const_data_ptr(),
                                .shift_mean = shift_mean,
                                .eps = eps,
                                .out = out.data_ptr(),
                                .rstd = rstd.data_ptr()},
                               stream());
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
  cuda::launch_gae({.rewards = r.const_data_ptr(),
                    .values = v.const_data_ptr(),
                    .mask = m.const_data_ptr<bool>(),
                    .elem_type = elem_type_of(dtype),
                    .batch = rewards.size(0),
                    .time = rewards.size(1),
                    .gamma = gamma,
                    .lam = lam,
                    .carry_forward = carry_forward,
                    .advantages = adv.data_ptr(),
                    .returns = ret.data_ptr()},
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
  cuda::launch_group_advantages({.rewards = r.const_data_ptr(),
                                 .valid = v.defined() ? v.const_data_ptr<bool>() : nullptr,
                                 .elem_type = elem_type_of(dtype),
                                 .groups = rewards.numel() / group_size,
                                 .group_size = group_size,
                                 .leave_one_out = leave_one_out,
                                 .scale_by_std = scale_by_std,
                                 .eps = eps,
                                 .out = out.data_ptr()},
                                stream());
  return out;
}

}  // namespace aligner
