// CUDA entry point of the LM head's fused forward (linear_logprob.cu): checks
// once, outputs and workspace allocated here, a launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "checks.h"
#include "launch.h"
#include "ops.h"

namespace aligner {
namespace {

// cp.async reads 16-byte vectors: a contiguous copy, moved to a fresh
// (aligned) allocation in the rare case of a view starting mid-vector.
Tensor aligned_contiguous(const Tensor& t) {
  Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_forward_cuda(const Tensor& hidden, const Tensor& weight,
                                                                const Tensor& labels, double temperature,
                                                                int64_t ignore_index, bool with_entropy) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2,
                    "hidden must be 2-D [N, H] and weight 2-D [V, H], got shapes ", hidden.sizes(), " and ",
                    weight.sizes());
  TORCH_CHECK_TYPE(hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf,
                   "hidden must be bfloat16 or float16, got ", hidden.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight must have the dtype of hidden (",
                   hidden.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  const int64_t rows = hidden.size(0);
  const int64_t hidden_size = hidden.size(1);
  const int64_t vocab = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == hidden_size, "weight must have shape [V, ", hidden_size, "], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(hidden_size % 8 == 0, "hidden size must be a multiple of 8 (16-byte rows), got ", hidden_size);
  TORCH_CHECK_VALUE(vocab >= 1, "weight must have at least one vocabulary row");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == rows, "labels must have shape [", rows, "], got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(weight.device() == hidden.device() && labels.device() == hidden.device(),
                    "weight and labels must be on the device of hidden (", hidden.device(), "), got ", weight.device(),
                    " and ", labels.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a positive finite number, got ", temperature);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto opts = hidden.options().dtype(at::kFloat);
  Tensor logprobs = at::empty({rows}, opts);
  Tensor lse = at::empty({rows}, opts);
  Tensor entropy = at::empty({with_entropy ? rows : 0}, opts);
  if (rows == 0) return {logprobs, entropy, lse};
  const Tensor h = aligned_contiguous(hidden);
  const Tensor w = aligned_contiguous(weight);
  const Tensor y = labels.contiguous();
  Tensor workspace = at::empty({cuda::linear_logprob_workspace_floats(rows, vocab)}, opts);
  cuda::launch_linear_logprob_forward({.hidden = h.const_data_ptr(),
                                       .weight = w.const_data_ptr(),
                                       .elem_type = elem_type_of(h.scalar_type()),
                                       .rows = rows,
                                       .hidden_size = hidden_size,
                                       .vocab = vocab,
                                       .labels = y.const_data_ptr<int64_t>(),
                                       .ignore_index = ignore_index,
                                       .inv_temperature = 1.0 / temperature,
                                       .workspace = workspace.data_ptr<float>(),
                                       .logprobs = logprobs.data_ptr<float>(),
                                       .entropy = with_entropy ? entropy.data_ptr<float>() : nullptr,
                                       .lse = lse.data_ptr<float>()},
                                      at::cuda::getCurrentCUDAStream().stream());
  return {logprobs, entropy, lse};
}

}  // namespace aligner
