// CPU entry point of linear_argmax: the greedy decoding step of an LM head
// (argmax, max logit and log-sum-exp of hidden @ weight.T per row) without the
// [rows, vocab] logits. Checks, the packed (transposed) copy of hidden, the
// split of the vocabulary into fixed chunks (so the result does not depend on
// the thread count) and the merge of the chunks' partial states with the
// shared softmax-statistics math. The product and the per-block reduction are
// the vectorized kernels of linear_argmax_vec.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "aligner/softmax_stats.h"
#include "ops.h"
#include "vec_kernels.h"

namespace aligner {

namespace {

// Weight rows per task: 4096 x hidden floats (4 MiB at hidden 256) read once per task.
constexpr int64_t kChunkRows = 4096;
// Indices travel as floats inside the kernel.
constexpr int64_t kMaxVocab = int64_t(1) << 24;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

void check_args(const Tensor& hidden, const Tensor& weight) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "linear_argmax: hidden must be [rows, hidden], got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "linear_argmax: weight must be [vocab, hidden], got shape ", weight.sizes());
  TORCH_CHECK_TYPE(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                   "linear_argmax runs on float32 hidden and weight, got ", hidden.scalar_type(), " and ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "linear_argmax: weight [vocab, hidden] must have hidden size ",
                    hidden.size(1), ", got shape ", weight.sizes());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> linear_argmax_cpu(const Tensor& hidden, const Tensor& weight) {
  check_args(hidden, weight);
  const int64_t rows = hidden.size(0);
  const int64_t V = weight.size(0);
  TORCH_CHECK_VALUE(V >= 1, "linear_argmax: weight must have at least one row (the vocabulary), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(V < kMaxVocab, "linear_argmax takes a vocabulary below 2^24, got ", V);

  Tensor index = at::empty({rows}, hidden.options().dtype(at::kLong));
  Tensor max = at::empty({rows}, hidden.options());
  Tensor lse = at::empty({rows}, hidden.options());
  if (rows == 0) return {index, max, lse};

  // Rows of the weight contiguous (a row-sliced weight, e.g. weight[:vocab], keeps its stride).
  const Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const cpu::LinearArgmaxKernel& kernels = cpu::active_linear_argmax_kernel();
  // hidden transposed, [H, cols], zero columns after the rows
  const int64_t H = hidden.size(1);
  const int64_t cols = round_up(rows, kernels.column_multiple);
  Tensor packed = at::zeros({H, cols}, hidden.options());
  packed.narrow(1, 0, rows).copy_(hidden.t());
  const LinearArgmaxArgs args{.packed_hidden = packed.const_data_ptr<float>(),
                              .cols = cols,
                              .hidden = H,
                              .weight = w.const_data_ptr<float>(),
                              .weight_stride = H == 0 ? 1 : w.stride(0)};

  const int64_t chunks = (V + kChunkRows - 1) / kChunkRows;
  std::vector<float> part_max(chunks * cols), part_sum(chunks * cols);
  std::vector<int64_t> part_index(chunks * cols);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      kernels.argmax(args, c * kChunkRows, std::min(V, (c + 1) * kChunkRows), part_max.data() + c * cols,
                     part_index.data() + c * cols, part_sum.data() + c * cols);
    }
  });

  // The chunks in vocabulary order: a later chunk takes the argmax only with a strictly larger max
  // (or the first NaN), so ties keep the first index, as torch.argmax does.
  auto* index_out = index.data_ptr<int64_t>();
  auto* max_out = max.data_ptr<float>();
  auto* lse_out = lse.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    SoftmaxStats<float> state{part_max[r], part_sum[r], 0.f};
    int64_t best = part_index[r];
    for (int64_t c = 1; c < chunks; ++c) {
      const float m = part_max[c * cols + r];
      if (m > state.max || (m != m && state.max == state.max)) best = part_index[c * cols + r];
      state = softmax_stats_merge(state, SoftmaxStats<float>{m, part_sum[c * cols + r], 0.f});
    }
    index_out[r] = best;
    max_out[r] = state.max;
    lse_out[r] = softmax_stats_lse(state);
  }
  return {index, max, lse};
}

}  // namespace aligner
