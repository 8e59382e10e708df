// CPU kernels of the RL ops: KL penalty, masked moments, GAE and group
// advantages, over the shared math in aligner/rl_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "aligner/rl_math.h"
#include "checks.h"
#include "ops.h"
#include "vec_kernels.h"

namespace aligner {
namespace {

// Elementwise work per task before threading pays off.
constexpr int64_t kElementGrain = 32768;

Tensor as_compute(const Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// v where keep is 1 and +0.0 where it is 0, as a bitwise select: garbage
// (NaN, inf) under a zero mask never leaks, and unlike a ternary the compiler
// vectorizes it.
template <typename acc_t>
inline acc_t select_kept(acc_t v, uint8_t keep) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  return std::bit_cast<acc_t>(std::bit_cast<bits_t>(v) & (bits_t(0) - bits_t(keep)));
}

// Exact moments of x[begin, end) where mask (0/1 bytes) is set, in two
// vectorized passes (sum, then squared deviations); blocks combine with
// moments_merge.
template <typename scalar_t, typename acc_t>
Moments<acc_t> block_moments(const scalar_t* __restrict x, const uint8_t* __restrict mask, int64_t begin, int64_t end) {
  acc_t count = 0, sum = 0;
  // `omp simd reduction` lets the compiler reassociate the sums.
#pragma omp simd reduction(+ : count, sum)
  for (int64_t j = begin; j < end; ++j) {
    count += static_cast<acc_t>(mask[j]);
    sum += select_kept(static_cast<acc_t>(x[j]), mask[j]);
  }
  const acc_t mean = count > 0 ? sum / count : acc_t(0);
  acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t j = begin; j < end; ++j) {
    const acc_t d = select_kept(static_cast<acc_t>(x[j]) - mean, mask[j]);
    m2 += d * d;
  }
  return {count, mean, m2};
}

// out = x * rstd + offset where mask is set, else 0.
template <typename scalar_t, typename acc_t>
void whiten_block(const scalar_t* __restrict x, const uint8_t* __restrict mask, acc_t rstd, acc_t offset,
                  acc_t* __restrict out, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) out[j] = select_kept(static_cast<acc_t>(x[j]) * rstd + offset, mask[j]);
}

}  // namespace

Tensor kl_penalty_forward_cpu(const Tensor& logprobs, const Tensor& ref_logprobs, int64_t estimator) {
  check_floating(logprobs, "logprobs");
  check_floating(ref_logprobs, "ref_logprobs");
  check_same_shape(logprobs, "logprobs", ref_logprobs, "ref_logprobs");
  check_kl_estimator(estimator);
  const auto dtype = compute_dtype(logprobs, ref_logprobs);
  const Tensor lp = as_compute(logprobs, dtype);
  const Tensor ref = as_compute(ref_logprobs, dtype);
  Tensor out = at::empty(logprobs.sizes(), logprobs.options().dtype(dtype));
  const int64_t n = out.numel();
  if (dtype == at::kFloat) {
    const auto& kernels = cpu::active_kl_kernels();
    const KLForwardArgs args{.logprobs = lp.const_data_ptr<float>(),
                             .ref_logprobs = ref.const_data_ptr<float>(),
                             .elem_type = ElemType::kFloat,
                             .n = n,
                             .estimator = static_cast<KLEstimator>(estimator),
                             .out = out.data_ptr<float>()};
    at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) { kernels.forward(args, begin, end); });
  } else {
    const auto est = static_cast<KLEstimator>(estimator);
    const double* a = lp.const_data_ptr<double>();
    const double* b = ref.const_data_ptr<double>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = kl_value<double>(a[i] - b[i], est);
    });
  }
  return out;
}

std::tuple<Tensor, Tensor> kl_penalty_backward_cpu(const Tensor& grad, const Tensor& logprobs,
                                                   const Tensor& ref_logprobs, int64_t estimator) {
  check_kl_estimator(estimator);
  const auto dtype = compute_dtype(logprobs, ref_logprobs);
  const Tensor g = as_compute(grad, dtype);
  const Tensor lp = as_compute(logprobs, dtype);
  const Tensor ref = as_compute(ref_logprobs, dtype);
  Tensor grad_lp = at::empty(logprobs.sizes(), logprobs.options().dtype(dtype));
  const int64_t n = grad_lp.numel();
  if (dtype == at::kFloat) {
    const auto& kernels = cpu::active_kl_kernels();
    const KLBackwardArgs args{.grad = g.const_data_ptr<float>(),
                              .logprobs = lp.const_data_ptr<float>(),
                              .ref_logprobs = ref.const_data_ptr<float>(),
                              .elem_type = ElemType::kFloat,
                              .n = n,
                              .estimator = static_cast<KLEstimator>(estimator),
                              .grad_logprobs = grad_lp.data_ptr<float>()};
    at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) { kernels.backward(args, begin, end); });
  } else {
    const auto est = static_cast<KLEstimator>(estimator);
    const double* gp = g.const_data_ptr<double>();
    const double* a = lp.const_data_ptr<double>();
    const double* b = ref.const_data_ptr<double>();
    double* o = grad_lp.data_ptr<double>();
    at::parallel_for(0, n, kElementGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = gp[i] * kl_grad<double>(a[i] - b[i], est);
    });
  }
  // d kl / d ref = -(d kl / d logprobs)
  return {grad_lp.to(logprobs.scalar_type()), grad_lp.neg().to(ref_logprobs.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> masked_moments_cpu(const Tensor& x, const Tensor& mask) {
  check_floating(x, "x");
  check_same_shape(x, "x", mask, "mask");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension");
  const int64_t C = x.size(-1);
  const int64_t R = C == 0 ? 0 : x.numel() / C;
  const auto out_dtype = compute_dtype(x);
  const auto opts = x.options().dtype(out_dtype);
  std::vector<int64_t> shape = row_shape(x);
  Tensor count = at::zeros(shape, opts), mean = at::zeros(shape, opts), m2 = at::zeros(shape, opts);
  if (R == 0 || C == 0) return {count, mean, m2};
  const Tensor xs = x.reshape({R, C}).contiguous();
  const Tensor ms = as_bool_mask(mask.reshape({R, C}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "masked_moments_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using out_t = acc_t;
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    // bool tensors hold 0/1 bytes
    const auto* mp = reinterpret_cast<const uint8_t*>(ms.const_data_ptr<bool>());
    out_t* cp = count.data_ptr<out_t>();
    out_t* meanp = mean.data_ptr<out_t>();
    out_t* m2p = m2.data_ptr<out_t>();
    auto row_range = [&](int64_t r, int64_t begin, int64_t end) {
      return block_moments<scalar_t, acc_t>(xp + r * C, mp + r * C, begin, end);
    };
    auto write = [&](int64_t r, const Moments<acc_t>& s) {
      cp[r] = s.count;
      meanp[r] = s.mean;
      m2p[r] = s.m2;
    };
    if (R >= at::get_num_threads()) {
      at::parallel_for(0, R, std::max<int64_t>(1, kElementGrain / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) write(r, row_range(r, 0, C));
      });
    } else {
      // Few long rows (dim=None is one row): split each row into column
      // blocks and merge their moments.
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, C / kElementGrain));
      const int64_t width = (C + blocks - 1) / blocks;
      std::vector<Moments<acc_t>> parts(blocks);
      for (int64_t r = 0; r < R; ++r) {
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) parts[b] = row_range(r, b * width, std::min(C, (b + 1) * width));
        });
        Moments<acc_t> total{0, 0, 0};
        for (const auto& p : parts) total = moments_merge(total, p);
        write(r, total);
      }
    }
  });
  return {count, mean, m2};
}

std::tuple<Tensor, Tensor, Tensor> masked_whiten_cpu(const Tensor& x, const Tensor& mask, bool shift_mean, double eps) {
  check_floating(x, "x");
  check_same_shape(x, "x", mask, "mask");
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  const auto [count, mean, m2] = masked_moments_cpu(x.reshape({1, -1}), mask.reshape({1, -1}));
  const auto dtype = compute_dtype(x);
  Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
  Tensor rstd = at::empty({}, x.options().dtype(dtype));
  const Tensor xs = x.contiguous();
  const Tensor ms = as_bool_mask(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "masked_whiten_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t n = count.numel() ? count.const_data_ptr<acc_t>()[0] : acc_t(0);
    const acc_t mu = mean.numel() ? mean.const_data_ptr<acc_t>()[0] : acc_t(0);
    const acc_t var = n > 0 ? m2.const_data_ptr<acc_t>()[0] / n : acc_t(0);
    const acc_t r = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
    const acc_t offset = shift_mean ? -mu * r : mu - mu * r;
    rstd.fill_(r);
    const scalar_t* xp = xs.const_data_ptr<scalar_t>();
    const auto* mp = reinterpret_cast<const uint8_t*>(ms.const_data_ptr<bool>());
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, xs.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      whiten_block<scalar_t, acc_t>(xp, mp, r, offset, op, begin, end);
    });
  });
  return {out, mean.reshape({}), rstd};
}

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                   double lam, bool carry_forward) {
  check_gae_args(rewards, values, mask, gamma, lam);
  const auto dtype = compute_dtype(rewards, values);
  const Tensor r = as_compute(rewards, dtype);
  const Tensor v = as_compute(values, dtype);
  const Tensor m = as_bool_mask(mask);
  Tensor adv = at::empty(rewards.sizes(), rewards.options().dtype(dtype));
  Tensor ret = at::empty(rewards.sizes(), rewards.options().dtype(dtype));
  const int64_t B = rewards.size(0), T = rewards.size(1);
  if (B == 0 || T == 0) return {adv, ret};
  AT_DISPATCH_FLOATING_TYPES(dtype, "gae_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const bool* mp = m.const_data_ptr<bool>();
    scalar_t* ap = adv.data_ptr<scalar_t>();
    scalar_t* op = ret.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, kElementGrain / T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        gae_sequence<scalar_t, bool, scalar_t, scalar_t>(rp + b * T, vp + b * T, mp + b * T, T,
                                                         static_cast<scalar_t>(gamma), static_cast<scalar_t>(lam),
                                                         carry_forward, ap + b * T, op + b * T);
      }
    });
  });
  return {adv, ret};
}

Tensor group_advantages_cpu(const Tensor& rewards, const OptTensor& valid, int64_t group_size, bool leave_one_out,
                            bool scale_by_std, double eps) {
  check_group_args(rewards, valid, group_size, eps);
  const auto dtype = compute_dtype(rewards);
  const Tensor r = as_compute(rewards, dtype);
  const Tensor v = valid.has_value() ? as_bool_mask(*valid) : Tensor();
  Tensor out = at::empty(rewards.sizes(), rewards.options().dtype(dtype));
  const int64_t groups = rewards.numel() / group_size;
  AT_DISPATCH_FLOATING_TYPES(dtype, "group_advantages_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const bool* vp = v.defined() ? v.const_data_ptr<bool>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, groups, std::max<int64_t>(1, kElementGrain / group_size), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        group_advantages_one<scalar_t, scalar_t>(rp + g * group_size, vp ? vp + g * group_size : nullptr, group_size,
                                                 leave_one_out, scale_by_std, static_cast<scalar_t>(eps),
                                                 op + g * group_size);
      }
    });
  });
  return out;
}

}  // namespace aligner
