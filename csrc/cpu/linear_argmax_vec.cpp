// The LM head's greedy step without the logits in memory (float32), compiled
// once per CPU capability like logprob_vec.cpp.
//
// The product is register-tiled: kTileRows weight rows x kTileVectors vectors
// of columns, each weight value broadcast once per tile, the hidden values read
// from the packed [hidden, cols] copy, the next tile's weight rows prefetched.
// The weight is read once from memory, without the packing copy a BLAS makes of
// it (for a few columns that copy is a large share of the work); each output is
// one dot product summed in order of the hidden index.
//
// For weight rows [begin, end) and every packed column the kernel keeps the
// largest logit l_v = weight[v] . hidden[c], its first index and
// sum exp(l_v - max). The rows go by blocks of kBlockRows: the product writes
// the block's logits to a small buffer that stays in L1/L2, then one pass over
// the buffer moves the per-column max / argmax / sum forward.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "vec_kernels.h"

namespace aligner::cpu::ALIGNER_CPU_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Registers: kTileRows x kTileVectors accumulators, kTileVectors hidden vectors and one broadcast
// weight value: 15 of AVX2's 16 (6 x 2), 19 of AVX-512's 32 (8 x 2).
constexpr int kTileRows = kW >= 16 ? 8 : 6;
constexpr int kTileVectors = 2;
constexpr int64_t kBlockRows = 64;  // logits per column in the buffer: 64 x cols floats (8 KiB at 32 columns)

// out[r, c0 + j * kW ...] = sum_k w[r * ws + k] * xt[k * cols + c0 + j * kW ...] for r < kRows, j < kVectors.
template <int kRows, int kVectors>
inline void tile(const float* w, int64_t ws, const float* xt, int64_t cols, int64_t hidden, float* out) {
  Vec acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kVectors; ++j) acc[r][j] = Vec(0.f);
  }
  for (int64_t k = 0; k < hidden; ++k) {
    if ((k & 15) == 0) {
      // the next tile's weight rows, a cache line of each per 16 steps: the hardware prefetcher alone
      // leaves the product waiting on memory (63 -> ~115 GFLOP/s for 32 columns on 2 Zen cores)
      for (int r = 0; r < kRows; ++r) __builtin_prefetch(w + (kRows + r) * ws + k);
    }
    Vec x[kVectors];
    for (int j = 0; j < kVectors; ++j) x[j] = Vec::loadu(xt + k * cols + j * kW);
    for (int r = 0; r < kRows; ++r) {
      const Vec wv(w[r * ws + k]);
      for (int j = 0; j < kVectors; ++j) acc[r][j] = at::vec::fmadd(wv, x[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kVectors; ++j) acc[r][j].store(out + r * cols + j * kW);
  }
}

template <int kVectors, int kMaxRows>
void tile_rows(int rows, const float* w, int64_t ws, const float* xt, int64_t cols, int64_t hidden, float* out) {
  if constexpr (kMaxRows > 1) {
    if (rows < kMaxRows) return tile_rows<kVectors, kMaxRows - 1>(rows, w, ws, xt, cols, hidden, out);
  }
  tile<kMaxRows, kVectors>(w, ws, xt, cols, hidden, out);
}

// logits[r, c] for the weight rows [v0, v0 + rows) and every packed column (whole tiles of columns).
void block_logits(const LinearArgmaxArgs& a, int64_t v0, int64_t rows, float* logits) {
  for (int64_t r = 0; r < rows; r += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, rows - r));
    const float* w = a.weight + (v0 + r) * a.weight_stride;
    for (int64_t c = 0; c < a.cols; c += kTileVectors * kW) {
      tile_rows<kTileVectors, kTileRows>(n, w, a.weight_stride, a.packed_hidden + c, a.cols, a.hidden,
                                         logits + r * a.cols + c);
    }
  }
}

// Lanes where `a` beats `b` as a maximum: greater, or NaN where b is not (a NaN logit wins and stays,
// as torch.argmax reports the first NaN). Ties keep b, the earlier index.
inline Vec beats(const Vec& a, const Vec& b) { return (a > b) | ((a != a) & (b == b)); }

void argmax_rows(const LinearArgmaxArgs& a, int64_t begin, int64_t end, float* max, int64_t* index,
                        float* sum_exp) {
  const int64_t cols = a.cols;
  alignas(64) float logits[kBlockRows * 64];
  float* buffer = logits;
  std::vector<float> heap;
  if (kBlockRows * cols > kBlockRows * 64) {
    heap.resize(kBlockRows * cols);
    buffer = heap.data();
  }
  // Per-column state, indices as floats: exact below 2^24 (the entry point checks the vocabulary).
  std::vector<float> best_index(cols);
  for (int64_t c = 0; c < cols; ++c) {
    max[c] = -std::numeric_limits<float>::infinity();
    sum_exp[c] = 0.f;
    best_index[c] = static_cast<float>(begin);
  }
  for (int64_t v0 = begin; v0 < end; v0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, end - v0);
    block_logits(a, v0, rows, buffer);
    for (int64_t c = 0; c < cols; c += kW) {
      // the block's max and its first row
      Vec block_max = Vec::loadu(buffer + c);
      Vec block_index(static_cast<float>(v0));
      for (int64_t r = 1; r < rows; ++r) {
        const Vec l = Vec::loadu(buffer + r * cols + c);
        const Vec take = beats(l, block_max);
        block_max = Vec::blendv(block_max, l, take);
        block_index = Vec::blendv(block_index, Vec(static_cast<float>(v0 + r)), take);
      }
      const Vec old_max = Vec::loadu(max + c);
      const Vec take = beats(block_max, old_max);
      const Vec new_max = Vec::blendv(old_max, block_max, take);
      Vec::blendv(Vec::loadu(best_index.data() + c), block_index, take).store(best_index.data() + c);
      // sum exp(l - new_max): the old sum rescaled (0 while it is empty: exp(-inf) = 0), plus the block's
      Vec sum = Vec::loadu(sum_exp + c) * (old_max - new_max).exp();
      sum = Vec::blendv(sum, Vec(0.f), Vec::loadu(sum_exp + c) == Vec(0.f));
      for (int64_t r = 0; r < rows; ++r) sum = sum + (Vec::loadu(buffer + r * cols + c) - new_max).exp();
      new_max.store(max + c);
      sum.store(sum_exp + c);
    }
  }
  for (int64_t c = 0; c < cols; ++c) index[c] = static_cast<int64_t>(best_index[c]);
}

}  // namespace

// Columns in whole tiles: a narrower tile (one vector) streams more weight rows at once per flop and
// measured slower from memory than computing a full tile's padding columns.
LinearArgmaxKernel linear_argmax_kernel() { return {argmax_rows, kTileVectors * kW}; }

}  // namespace aligner::cpu::ALIGNER_CPU_NS
