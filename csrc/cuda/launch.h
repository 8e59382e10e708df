// Kernel launchers of the CUDA ops: an argument struct of raw pointers (those
// of aligner/kernel_args.h, which the CPU kernels take too, and the CUDA-only
// ones below) and a stream, so the .cu files include no ATen header and
// compile in seconds. ops_cuda.cpp and linear_ops_cuda.cpp fill the structs
// from tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "aligner/kernel_args.h"

namespace aligner::cuda {

void launch_logprob_forward(const LogprobForwardArgs& args, cudaStream_t stream);
void launch_logprob_backward(const LogprobBackwardArgs& args, cudaStream_t stream);

// The LM head's per-row log-softmax statistics from hidden and weight without
// the logits. A label outside [0, vocab) that is not ignore_index gives a NaN
// log-prob.
struct LinearLogprobForwardArgs {
  const void* hidden;  // [rows, hidden_size], elem_type kBFloat16 or kHalf, 16-byte aligned
  const void* weight;  // [vocab, hidden_size], elem_type, 16-byte aligned
  ElemType elem_type;
  int64_t rows;
  int64_t hidden_size;  // a multiple of 8
  int64_t vocab;
  const int64_t* labels;  // [rows]
  int64_t ignore_index;
  double inv_temperature;
  float* workspace;  // linear_logprob_workspace_floats(rows, vocab) floats
  float* logprobs;   // [rows]
  float* entropy;    // [rows] or nullptr
  float* lse;        // [rows]
};
int64_t linear_logprob_workspace_floats(int64_t rows, int64_t vocab);
void launch_linear_logprob_forward(const LinearLogprobForwardArgs& args, cudaStream_t stream);

void launch_kl_forward(const KLForwardArgs& args, cudaStream_t stream);
void launch_kl_backward(const KLBackwardArgs& args, cudaStream_t stream);

// The RL ops' data (everything but the masks) is of elem_type kFloat or
// kDouble.

struct MaskedMomentsArgs {
  const void* x;     // [rows, cols]
  const bool* mask;  // [rows, cols]
  ElemType elem_type;
  int64_t rows;
  int64_t cols;
  void* count;  // [rows]
  void* mean;   // [rows]
  void* m2;     // [rows]
};
void launch_masked_moments(const MaskedMomentsArgs& args, cudaStream_t stream);

// out = (x - mean) * rstd (+ mean unless shift_mean) where mask, else 0, with
// mean and rstd from the device scalars count/mean/m2 (no host sync); writes rstd.
struct MaskedWhitenArgs {
  const void* x;     // [n]
  const bool* mask;  // [n]
  ElemType elem_type;
  int64_t n;
  const void* count;
  const void* mean;
  const void* m2;
  bool shift_mean;
  double eps;
  void* out;   // [n]
  void* rstd;  // scalar
};
void launch_masked_whiten(const MaskedWhitenArgs& args, cudaStream_t stream);

struct GaeArgs {
  const void* rewards;  // [batch, time]
  const void* values;   // [batch, time]
  const bool* mask;     // [batch, time]
  ElemType elem_type;
  int64_t batch;
  int64_t time;
  double gamma;
  double lam;
  bool carry_forward;
  void* advantages;  // [batch, time]
  void* returns;     // [batch, time]
};
void launch_gae(const GaeArgs& args, cudaStream_t stream);

struct GroupAdvantagesArgs {
  const void* rewards;  // [groups, group_size]
  const bool* valid;    // [groups, group_size] or nullptr
  ElemType elem_type;
  int64_t groups;
  int64_t group_size;
  bool leave_one_out;
  bool scale_by_std;
  double eps;
  void* out;  // [groups, group_size]
};
void launch_group_advantages(const GroupAdvantagesArgs& args, cudaStream_t stream);

}  // namespace aligner::cuda
