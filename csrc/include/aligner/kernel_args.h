// Argument structs of the kernels that both devices run, and the one
// element-type enum. Raw pointers and sizes only, so that the vectorized CPU
// objects and the .cu files include no ATen header; the entry points fill
// them from tensors (elem_type_of in checks.h).
#pragma once

#include <cstdint>

#include "aligner/rl_math.h"

namespace aligner {

// The element type of a kernel's main input. Its other float data (results,
// saved statistics, incoming gradients) is double for kDouble, else float.
enum class ElemType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2, kDouble = 3 };

// Per-row log-softmax statistics of logits / temperature.
struct LogprobForwardArgs {
  const void* logits;  // [rows, vocab] contiguous, elem_type
  ElemType elem_type;
  int64_t rows;
  int64_t vocab;
  const int64_t* labels;  // [rows] or nullptr when no log-prob is wanted
  int64_t ignore_index;
  double inv_temperature;
  void* logprobs;  // [rows] or nullptr
  void* entropy;   // [rows] or nullptr
  void* lse;       // [rows], always written (saved for backward)
};

struct LogprobBackwardArgs {
  const void* logits;  // [rows, vocab] contiguous, elem_type
  ElemType elem_type;
  int64_t rows;
  int64_t vocab;
  const int64_t* labels;  // [rows] or nullptr
  int64_t ignore_index;
  double inv_temperature;
  const void* lse;            // [rows]
  const void* entropy;        // [rows] or nullptr (then grad_entropy is nullptr)
  const void* grad_logprobs;  // [rows] or nullptr
  const void* grad_entropy;   // [rows] or nullptr
  void* grad_logits;          // [rows, vocab] contiguous, elem_type
};

// Elementwise over n values of elem_type kFloat or kDouble, outputs included.
struct KLForwardArgs {
  const void* logprobs;
  const void* ref_logprobs;
  ElemType elem_type;
  int64_t n;
  KLEstimator estimator;
  void* out;
};

struct KLBackwardArgs {
  const void* grad;
  const void* logprobs;
  const void* ref_logprobs;
  ElemType elem_type;
  int64_t n;
  KLEstimator estimator;
  void* grad_logprobs;  // grad * d kl / d logprobs
};

// The LM head's greedy statistics over a range of weight rows (CPU, float32):
// per column c of packed_hidden, over logits l_v = weight[v] . hidden[c], the
// largest logit, its first index, and sum_v exp(l_v - max).
struct LinearArgmaxArgs {
  const float* packed_hidden;  // [hidden, cols]: hidden [rows, hidden] transposed, zero columns after rows
  int64_t cols;                // a multiple of the kernel's column_multiple (vec_kernels.h)
  int64_t hidden;
  const float* weight;  // [vocab, hidden], row v at weight + v * weight_stride
  int64_t weight_stride;
};

}  // namespace aligner
