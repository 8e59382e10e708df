#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>

#include "aligner/rl_math.h"

namespace aligner {

at::Tensor as_bool_mask(const at::Tensor& mask) {
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor (float32, bfloat16, float16 or float64), got ", t.scalar_type());
}

void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the shape of ", a_name, " ", a.sizes(), ", got ",
                    b.sizes());
}

std::vector<int64_t> row_shape(const at::Tensor& logits) {
  auto sizes = logits.sizes().vec();
  sizes.pop_back();
  return sizes;
}

at::ScalarType compute_dtype(const at::Tensor& a) { return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ElemType::kFloat;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kHalf:
      return ElemType::kHalf;
    case at::kDouble:
      return ElemType::kDouble;
    default:
      TORCH_CHECK_TYPE(false, "logits dtype ", t, " is not supported (use float32, bfloat16, float16 or float64)");
  }
}

LogprobInputs prepare_logprob_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                                     double temperature, int64_t ignore_index, bool need_labels) {
  check_floating(logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1, "logits must have at least one dimension (the vocabulary), got a 0-d tensor");
  const int64_t V = logits.size(-1);
  TORCH_CHECK_VALUE(V >= 1, "logits must have a non-empty last (vocabulary) dimension, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a positive finite number, got ", temperature);
  LogprobInputs in;
  in.vocab = V;
  in.rows = logits.numel() / V;
  in.logits = logits.reshape({in.rows, V}).contiguous();
  if (need_labels) {
    TORCH_CHECK_VALUE(labels.has_value(), "labels are required");
    const at::Tensor& lab = *labels;
    TORCH_CHECK_TYPE(lab.scalar_type() == at::kLong || lab.scalar_type() == at::kInt,
                     "labels must be an int64 or int32 tensor, got ", lab.scalar_type());
    TORCH_CHECK_VALUE(lab.device() == logits.device(), "labels must be on the device of logits (", logits.device(),
                      "), got ", lab.device());
    TORCH_CHECK_VALUE(lab.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                      "labels must have shape logits.shape[:-1] = ", logits.sizes().slice(0, logits.dim() - 1),
                      ", got ", lab.sizes());
    in.labels = lab.reshape({in.rows}).to(at::kLong).contiguous();
    if (in.rows > 0 && !in.labels.is_cuda()) {
      // On the CPU one cheap reduction buys a clear error instead of an
      // out-of-bounds read inside the kernel. CUDA labels are not checked here:
      // the check would cost a device sync per call, aligner.ops checks them
      // once in Python, and the CUDA kernel turns an out-of-range label into NaN.
      const at::Tensor bad = in.labels.ne(ignore_index).logical_and(in.labels.lt(0).logical_or(in.labels.ge(V)));
      if (bad.any().item<bool>()) {
        const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
        const int64_t value = in.labels[pos].item<int64_t>();
        TORCH_CHECK_INDEX(false, "labels: value ", value, " at flat position ", pos, " is outside [0, ", V,
                          ") (the vocabulary size is logits.shape[-1]) and is not ignore_index=", ignore_index);
      }
    }
  }
  return in;
}

void check_kl_estimator(int64_t estimator) {
  TORCH_CHECK_VALUE(
      estimator >= static_cast<int64_t>(KLEstimator::kK1) && estimator <= static_cast<int64_t>(KLEstimator::kK3),
      "estimator must be one of k1 (0), abs (1), k2 (2), k3 (3), got ", estimator);
}

void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                    double lam) {
  check_floating(rewards, "rewards");
  check_floating(values, "values");
  TORCH_CHECK_VALUE(rewards.dim() == 2, "rewards must be 2-D [batch, time], got shape ", rewards.sizes());
  check_same_shape(rewards, "rewards", values, "values");
  check_same_shape(rewards, "rewards", mask, "mask");
  TORCH_CHECK_VALUE(values.device() == rewards.device() && mask.device() == rewards.device(),
                    "rewards, values and mask must be on one device");
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
}

void check_group_args(const at::Tensor& rewards, const std::optional<at::Tensor>& valid, int64_t group_size,
                      double eps) {
  check_floating(rewards, "rewards");
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(rewards.numel() % group_size == 0, "rewards.numel() (", rewards.numel(),
                    ") must be divisible by group_size (", group_size, ")");
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  if (valid.has_value()) {
    check_same_shape(rewards, "rewards", *valid, "valid");
    TORCH_CHECK_VALUE(valid->device() == rewards.device(), "valid must be on the device of rewards");
  }
}

}  // namespace aligner
