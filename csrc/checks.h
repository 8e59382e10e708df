// Argument checks and input preparation shared by the CPU and CUDA entry
// points, so both devices reject bad input with the same messages. Messages
// name the offending argument; TORCH_CHECK_{VALUE,TYPE,INDEX} surface in
// Python as ValueError / TypeError / IndexError.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "aligner/kernel_args.h"

namespace aligner {

// Inputs of the fused log-prob/entropy kernels, flattened to rows.
struct LogprobInputs {
  at::Tensor logits;  // [N, V] contiguous
  at::Tensor labels;  // [N] int64 contiguous, undefined when not needed
  int64_t rows;
  int64_t vocab;
};

LogprobInputs prepare_logprob_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                                     double temperature, int64_t ignore_index, bool need_labels);

// Output shape of a per-row result: logits.shape[:-1].
std::vector<int64_t> row_shape(const at::Tensor& logits);

// Float dtype the per-token ops compute and return in: float64 if any input
// is float64, else float32.
at::ScalarType compute_dtype(const at::Tensor& a);
at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b);

// The kernels' element type of a float32, bfloat16, float16 or float64 tensor.
ElemType elem_type_of(at::ScalarType t);

// mask != 0 as a contiguous bool tensor (no copy when it already is one).
at::Tensor as_bool_mask(const at::Tensor& mask);

void check_floating(const at::Tensor& t, const char* name);
void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name);
void check_kl_estimator(int64_t estimator);
void check_gae_args(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                    double lam);
void check_group_args(const at::Tensor& rewards, const std::optional<at::Tensor>& valid, int64_t group_size,
                      double eps);

}  // namespace aligner
