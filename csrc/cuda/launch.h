// Kernel launchers of the CUDA ops: raw pointers and a stream, so the .cu
// files include no ATen header and compile in seconds. ops_cuda.cpp turns
// tensors into these calls.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace aligner::cuda {

enum class ElemType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2, kDouble = 3 };

// Per-row forward over logits [rows, vocab]; out pointers may be null except
// lse. Outputs are float (double for kDouble).
void launch_logprob_forward(const void* logits, ElemType type, int64_t rows, int64_t vocab, const int64_t* labels,
                            int64_t ignore_index, double inv_temperature, void* logprobs, void* entropy, void* lse,
                            cudaStream_t stream);

// grad_logits [rows, vocab] in the logits' type; per-row inputs are float
// (double for kDouble); grad_logprobs/grad_entropy/entropy/labels may be null.
void launch_logprob_backward(const void* logits, ElemType type, int64_t rows, int64_t vocab, const int64_t* labels,
                             int64_t ignore_index, double inv_temperature, const void* lse, const void* entropy,
                             const void* grad_logprobs, const void* grad_entropy, void* grad_logits,
                             cudaStream_t stream);

// The LM head's per-row log-softmax statistics from hidden [rows, hidden_size]
// and weight [vocab, hidden_size] (both bf16 or fp16, hidden_size % 8 == 0,
// 16-byte aligned) without the logits: outputs float [rows]; entropy may be
// null. A label outside [0, vocab) that is not ignore_index gives a NaN
// log-prob. workspace holds linear_logprob_workspace_floats(rows, vocab) floats.
int64_t linear_logprob_workspace_floats(int64_t rows, int64_t vocab);
void launch_linear_logprob_forward(const void* hidden, const void* weight, ElemType type, int64_t rows,
                                   int64_t hidden_size, int64_t vocab, const int64_t* labels, int64_t ignore_index,
                                   double inv_temperature, float* workspace, float* logprobs, float* entropy,
                                   float* lse, cudaStream_t stream);

// Elementwise over n values of float (or double when is_double).
void launch_kl_forward(const void* logprobs, const void* ref_logprobs, int64_t n, int estimator, bool is_double,
                       void* out, cudaStream_t stream);
void launch_kl_backward(const void* grad, const void* logprobs, const void* ref_logprobs, int64_t n, int estimator,
                        bool is_double, void* grad_logprobs, cudaStream_t stream);

// x [rows, cols] float/double, mask [rows, cols] bool; outputs [rows].
void launch_masked_moments(const void* x, const bool* mask, int64_t rows, int64_t cols, bool is_double, void* count,
                           void* mean, void* m2, cudaStream_t stream);

// out = (x - mean) * rstd (+ mean unless shift_mean) where mask, else 0, with
// mean and rstd from the device scalars count/mean/m2 (no host sync); writes rstd.
void launch_masked_whiten(const void* x, const bool* mask, int64_t n, const void* count, const void* mean,
                          const void* m2, bool shift_mean, double eps, bool is_double, void* out, void* rstd,
                          cudaStream_t stream);

void launch_gae(const void* rewards, const void* values, const bool* mask, int64_t batch, int64_t time,
                double gamma, double lam, bool carry_forward, bool is_double, void* advantages, void* returns,
                cudaStream_t stream);

void launch_group_advantages(const void* rewards, const bool* valid, int64_t groups, int64_t group_size,
                             bool leave_one_out, bool scale_by_std, double eps, bool is_double, void* out,
                             cudaStream_t stream);

}  // namespace aligner::cuda
