// CUDA forward of linear_token_logprobs without the [N, V] logits.
//
// A CuTe tensor-core GEMM of hidden [N, H] and weight [V, H] (both K-major,
// bf16/fp16, fp32 accumulation on SM80 mma.sync, which Hopper runs too; the
// main loop follows CUTLASS's examples/cute/tutorial/sgemm_sm80.cu) whose
// epilogue turns each kTileM x kTileN tile of scaled logits z = logit / T into
// one SoftmaxStats per row, plus the label's z for the one tile that holds the
// label. A finalize kernel then merges a row's tiles with softmax_stats_merge:
// the "GEMM + softmax" split of CUTLASS's examples, on the math the other
// kernels share (aligner/softmax_stats.h).
//
// Each logit is first rounded to the input dtype, as nn.Linear returns it, so
// the statistics describe the logits that the chunked backward recomputes with
// cuBLAS. Statistics of the unrounded fp32 logits would not sum the softmax
// there to 1: a gradient bias of ~2^-8 |z| on confident rows.
#include <algorithm>
#include <cute/tensor.hpp>
#include <stdexcept>
#include <string>

#include "aligner/softmax_stats.h"
#include "common.cuh"
#include "launch.h"

namespace aligner::cuda {
namespace {

constexpr int kTileM = 128;  // rows (tokens) per CTA
constexpr int kTileN = 128;  // vocabulary columns per CTA
constexpr int kTileK = 32;
constexpr int kStages = 3;  // cp.async pipeline depth in shared memory
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 2;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kFinalizeThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;
// One launch covers as many rows as keep its partial statistics (12 bytes per
// row and vocabulary tile: ~5% of the bf16 logits they stand for) under this.
constexpr int64_t kPartialsBytes = int64_t(64) << 20;
// gridDim.y counts vocabulary tiles.
constexpr int64_t kMaxVocabTiles = 65535;

using Stats = SoftmaxStats<float>;

template <typename T, typename MmaOp>
struct TileConfig {
  using Element = T;
  // 8 x 32 atoms, swizzled so that ldmatrix reads them without bank conflicts.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<2, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_32>, cute::Stride<cute::_32, cute::_1>>{}));
  using SmemLayoutA = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kTileM>, cute::Int<kTileK>, cute::Int<kStages>>{}));
  using SmemLayoutB = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kTileN>, cute::Int<kTileK>, cute::Int<kStages>>{}));
  // 16-byte cp.async per thread, 4 threads along K; a vector outside the
  // matrix is zero-filled (its address is never read).
  using GmemCopy =
      decltype(cute::make_tiled_copy(cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, T>{},
                                     cute::Layout<cute::Shape<cute::_32, cute::_4>, cute::Stride<cute::_4, cute::_1>>{},
                                     cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, T>;
  // 2 x 2 warps; each warp's 16 x 8 atom is repeated along N (Tile 32 x 32)
  // so one ldmatrix.x4 feeds B. make_tiled_mma orders the warps column-major:
  // warp = warp_m + kWarpsM * warp_n.
  using TiledMma =
      decltype(cute::make_tiled_mma(MmaOp{}, cute::Layout<cute::Shape<cute::Int<kWarpsM>, cute::Int<kWarpsN>>>{},
                                    cute::Tile<cute::_32, cute::_32, cute::_16>{}));

  struct SharedStorage {
    cute::ArrayEngine<T, cute::cosize_v<SmemLayoutA>> a;
    cute::ArrayEngine<T, cute::cosize_v<SmemLayoutB>> b;
    Stats row_stats[kWarpsN][kTileM];  // each warp column's share of a row, for the epilogue
  };
};

// One thread's share of a k-tile: cp.async of each 16-byte vector whose first
// element's (row, k) coordinate lies inside `bounds`, zeros for the others
// (rows past N or V, and k past H: H % 8 == 0 keeps a vector whole).
template <class TiledCopy, class Src, class Coords, class Bounds, class Dst>
__device__ __forceinline__ void copy_tile(const TiledCopy& tiled_copy, const Src& src, const Coords& coords,
                                          const Bounds& bounds, Dst&& dst) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < size<1>(dst); ++i) {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(dst); ++k) {
      copy(tiled_copy.with(elem_less(coords(0, i, k), bounds)), src(_, i, k), dst(_, i, k));
    }
  }
}

// grid (row tiles, vocabulary tiles): consecutive CTAs share a weight tile,
// so the weight streams from memory about once per launch.
// partials [vocab tiles, rows]; target [rows] is written only where the tile
// holds the row's label.
template <class Config>
__global__ void __launch_bounds__(kThreads)
    linear_logprob_tile_kernel(const typename Config::Element* __restrict__ hidden,
                               const typename Config::Element* __restrict__ weight, int rows, int hidden_size,
                               int vocab, const int64_t* __restrict__ labels, float inv_t, Stats* __restrict__ partials,
                               float* __restrict__ target) {
  using namespace cute;
  using T = typename Config::Element;
  extern __shared__ __align__(128) char smem_buf[];
  auto& smem = *reinterpret_cast<typename Config::SharedStorage*>(smem_buf);

  // int64 row strides: V * H can pass 2^31.
  Tensor mA = make_tensor(make_gmem_ptr(hidden), make_shape(rows, hidden_size),
                          make_stride(int64_t(hidden_size), Int<1>{}));  // (N, H)
  Tensor mB = make_tensor(make_gmem_ptr(weight), make_shape(vocab, hidden_size),
                          make_stride(int64_t(hidden_size), Int<1>{}));  // (V, H)
  const auto tiler = Shape<Int<kTileM>, Int<kTileN>, Int<kTileK>>{};
  const auto cta = make_coord(blockIdx.x, blockIdx.y, _);
  Tensor gA = local_tile(mA, tiler, cta, Step<_1, X, _1>{});  // (BM, BK, k)
  Tensor gB = local_tile(mB, tiler, cta, Step<X, _1, _1>{});  // (BN, BK, k)
  // The same tiles of (row, k) coordinates predicate the copies at the edges.
  Tensor cA = local_tile(make_identity_tensor(shape(mA)), tiler, cta, Step<_1, X, _1>{});
  Tensor cB = local_tile(make_identity_tensor(shape(mB)), tiler, cta, Step<X, _1, _1>{});
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename Config::SmemLayoutA{});  // (BM, BK, PIPE)
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), typename Config::SmemLayoutB{});  // (BN, BK, PIPE)

  typename Config::GmemCopy gmem_copy;
  ThrCopy thr_copy = gmem_copy.get_slice(threadIdx.x);
  Tensor tAgA = thr_copy.partition_S(gA);  // (CPY, CPY_M, CPY_K, k)
  Tensor tAcA = thr_copy.partition_S(cA);
  Tensor tAsA = thr_copy.partition_D(sA);  // (CPY, CPY_M, CPY_K, PIPE)
  Tensor tBgB = thr_copy.partition_S(gB);
  Tensor tBcB = thr_copy.partition_S(cB);
  Tensor tBsB = thr_copy.partition_D(sB);
  auto load_k_tile = [&](int k_tile, int pipe) {
    copy_tile(gmem_copy, tAgA(_, _, _, k_tile), tAcA(_, _, _, k_tile), shape(mA), tAsA(_, _, _, pipe));
    copy_tile(gmem_copy, tBgB(_, _, _, k_tile), tBcB(_, _, _, k_tile), shape(mB), tBsB(_, _, _, pipe));
    cp_async_fence();
  };

  // Prefetch kStages - 1 k-tiles. Once the k-tiles run out the loads repeat
  // the last one (in bounds, never consumed) so every iteration commits a group.
  int k_tile_count = size<3>(tAgA);
  int k_tile_next = 0;
  CUTE_UNROLL
  for (int pipe = 0; pipe < kStages - 1; ++pipe) {
    load_k_tile(k_tile_next, pipe);
    --k_tile_count;
    if (k_tile_count > 0) ++k_tile_next;
  }

  typename Config::TiledMma mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));                    // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));                    // (MMA, MMA_N, MMA_K)
  Tensor acc = partition_fragment_C(mma, Shape<Int<kTileM>, Int<kTileN>>{});  // (MMA, MMA_M, MMA_N) float
  clear(acc);

  auto s2r_copy_a = make_tiled_copy_A(typename Config::SmemCopyAtom{}, mma);
  auto s2r_thr_a = s2r_copy_a.get_slice(threadIdx.x);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, PIPE)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);   // (CPY, MMA_M, MMA_K)
  auto s2r_copy_b = make_tiled_copy_B(typename Config::SmemCopyAtom{}, mma);
  auto s2r_thr_b = s2r_copy_b.get_slice(threadIdx.x);
  Tensor tXsB = s2r_thr_b.partition_S(sB);  // (CPY, MMA_N, MMA_K, PIPE)
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);   // (CPY, MMA_N, MMA_K)

  // Main loop: k-tile (smem_pipe_read) feeds the tensor cores one k-block at
  // a time from registers while the next k-block comes from shared memory and
  // a later k-tile from global memory (into smem_pipe_write).
  constexpr int kBlocks = decltype(size<2>(tCrA))::value;
  static_assert(kBlocks > 1, "the register pipeline below needs two k-blocks per k-tile");
  int smem_pipe_read = 0;
  int smem_pipe_write = kStages - 1;
  Tensor tXsA_p = tXsA(_, _, _, smem_pipe_read);
  Tensor tXsB_p = tXsB(_, _, _, smem_pipe_read);
  cp_async_wait<kStages - 2>();
  __syncthreads();
  copy(s2r_copy_a, tXsA_p(_, _, Int<0>{}), tXrA(_, _, Int<0>{}));
  copy(s2r_copy_b, tXsB_p(_, _, Int<0>{}), tXrB(_, _, Int<0>{}));

  CUTE_NO_UNROLL
  while (k_tile_count > -(kStages - 1)) {
    CUTE_UNROLL
    for (int k_block = 0; k_block < kBlocks; ++k_block) {
      if (k_block == kBlocks - 1) {
        // The next k-tile must have landed, and every warp be done with the
        // stage that smem_pipe_write now names, before either is touched.
        tXsA_p = tXsA(_, _, _, smem_pipe_read);
        tXsB_p = tXsB(_, _, _, smem_pipe_read);
        cp_async_wait<kStages - 2>();
        __syncthreads();
      }
      const int k_block_next = (k_block + 1) % kBlocks;
      copy(s2r_copy_a, tXsA_p(_, _, k_block_next), tXrA(_, _, k_block_next));
      copy(s2r_copy_b, tXsB_p(_, _, k_block_next), tXrB(_, _, k_block_next));
      if (k_block == 0) {
        load_k_tile(k_tile_next, smem_pipe_write);
        --k_tile_count;
        if (k_tile_count > 0) ++k_tile_next;
        smem_pipe_write = smem_pipe_read;
        smem_pipe_read = smem_pipe_read == kStages - 1 ? 0 : smem_pipe_read + 1;
      }
      gemm(mma, tCrA(_, _, k_block), tCrB(_, _, k_block), acc);
    }
  }
  cp_async_wait<0>();  // no copy may still be writing shared memory when the CTA exits

  // Epilogue. tCcC gives each accumulator's (row, col) in the tile. In the
  // mma.sync C layout, mode (0,0) and mode 2 step columns, mode (0,1) and
  // mode 1 step rows: a thread's 16 values of one (h, m) share a row, and the
  // 4 lanes of a quad (lane / 4 equal) hold the same rows at other columns.
  Tensor tCcC = thr_mma.partition_C(make_identity_tensor(Shape<Int<kTileM>, Int<kTileN>>{}));
  // From here on acc holds z: each logit rounded to T (see the top), then scaled.
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) acc(i) = static_cast<float>(static_cast<T>(acc(i))) * inv_t;
  const int row0 = blockIdx.x * kTileM;
  const int col0 = blockIdx.y * kTileN;
  const int cols = min(vocab - col0, kTileN);  // columns >= cols lie past V
  const int warp_n = threadIdx.x / 32 / kWarpsM;
  const int lane = threadIdx.x % 32;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(acc); ++m) {
    CUTE_UNROLL
    for (int h = 0; h < size<0, 1>(acc); ++h) {
      const int row = get<0>(tCcC(make_coord(make_coord(0, h), m, 0)));
      // -1 - col0 matches no column: rows past N look for no label.
      const int64_t label_col = (row0 + row < rows ? labels[row0 + row] : int64_t(-1)) - col0;
      float z_max = neg_infinity<float>();
      CUTE_UNROLL
      for (int n = 0; n < size<2>(acc); ++n) {
        CUTE_UNROLL
        for (int c = 0; c < size<0, 0>(acc); ++c) {
          const auto at = make_coord(make_coord(c, h), m, n);
          if (get<1>(tCcC(at)) < cols) z_max = max_of(z_max, acc(at));
        }
      }
      // Starting at the max, softmax_stats_add never rescales.
      Stats stats{z_max, 0.f, 0.f};
      CUTE_UNROLL
      for (int n = 0; n < size<2>(acc); ++n) {
        CUTE_UNROLL
        for (int c = 0; c < size<0, 0>(acc); ++c) {
          const auto at = make_coord(make_coord(c, h), m, n);
          const int col = get<1>(tCcC(at));
          if (col < cols) {
            softmax_stats_add(stats, acc(at));
            if (col == label_col) target[row0 + row] = acc(at);
          }
        }
      }
      CUTE_UNROLL
      for (int offset = 1; offset < 4; offset *= 2) {
        const Stats other{__shfl_xor_sync(kFullMask, stats.max, offset),
                          __shfl_xor_sync(kFullMask, stats.sum_exp, offset),
                          __shfl_xor_sync(kFullMask, stats.sum_exz, offset)};
        stats = softmax_stats_merge(stats, other);
      }
      if (lane % 4 == 0) smem.row_stats[warp_n][row] = stats;
    }
  }
  __syncthreads();
  static_assert(kThreads == kTileM, "one thread per row merges the warp columns");
  const int row = threadIdx.x;
  if (row0 + row < rows) {
    Stats stats = smem.row_stats[0][row];
    CUTE_UNROLL
    for (int w = 1; w < kWarpsN; ++w) stats = softmax_stats_merge(stats, smem.row_stats[w][row]);
    partials[int64_t(blockIdx.y) * rows + row0 + row] = stats;
  }
}

// One thread per row: merge the row's vocab_tiles partials in order.
__global__ void __launch_bounds__(kFinalizeThreads)
    linear_logprob_finalize_kernel(const Stats* __restrict__ partials, int vocab_tiles, int rows,
                                   const float* __restrict__ target, const int64_t* __restrict__ labels,
                                   int64_t ignore_index, float* __restrict__ logprobs, float* __restrict__ entropy,
                                   float* __restrict__ lse) {
  const int row = blockIdx.x * kFinalizeThreads + threadIdx.x;
  if (row >= rows) return;
  Stats stats = softmax_stats_empty<float>();
  for (int tile = 0; tile < vocab_tiles; ++tile) {
    stats = softmax_stats_merge(stats, partials[int64_t(tile) * rows + row]);
  }
  const float row_lse = softmax_stats_lse(stats);
  lse[row] = row_lse;
  if (entropy != nullptr) entropy[row] = softmax_stats_entropy(stats);
  logprobs[row] = labels[row] == ignore_index ? 0.f : target[row] - row_lse;
}

int64_t vocab_tiles(int64_t vocab) { return (vocab + kTileN - 1) / kTileN; }

// Rows per launch: a whole number of row tiles under kPartialsBytes, at least one.
int64_t chunk_rows(int64_t rows, int64_t vocab) {
  const int64_t budget = kPartialsBytes / (vocab_tiles(vocab) * int64_t(sizeof(Stats))) / kTileM * kTileM;
  return std::min(rows, std::max<int64_t>(kTileM, budget));
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("aligner: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

template <typename T, typename MmaOp>
void forward_typed(const LinearLogprobForwardArgs& a, cudaStream_t stream) {
  using Config = TileConfig<T, MmaOp>;
  const auto tile_kernel = linear_logprob_tile_kernel<Config>;
  constexpr int kSmemBytes = sizeof(typename Config::SharedStorage);
  check_cuda(cudaFuncSetAttribute(tile_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
             "cudaFuncSetAttribute(linear_logprob_tile_kernel)");
  const int64_t tiles = vocab_tiles(a.vocab);
  const int64_t chunk = chunk_rows(a.rows, a.vocab);
  float* target = a.workspace;                                      // [rows]
  auto* partials = reinterpret_cast<Stats*>(a.workspace + a.rows);  // [tiles, chunk]
  // All bits set is a NaN: what a row keeps if no tile holds its label.
  check_cuda(cudaMemsetAsync(target, 0xFF, a.rows * sizeof(float), stream), "cudaMemsetAsync(target)");
  const auto* h = static_cast<const T*>(a.hidden);
  const auto* w = static_cast<const T*>(a.weight);
  const float inv_t = static_cast<float>(a.inv_temperature);
  for (int64_t start = 0; start < a.rows; start += chunk) {
    const int n = static_cast<int>(std::min(chunk, a.rows - start));
    const dim3 grid(static_cast<unsigned>((n + kTileM - 1) / kTileM), static_cast<unsigned>(tiles));
    tile_kernel<<<grid, kThreads, kSmemBytes, stream>>>(h + start * a.hidden_size, w, n,
                                                        static_cast<int>(a.hidden_size), static_cast<int>(a.vocab),
                                                        a.labels + start, inv_t, partials, target + start);
    check_launch("linear_logprob_tile_kernel");
    linear_logprob_finalize_kernel<<<(n + kFinalizeThreads - 1) / kFinalizeThreads, kFinalizeThreads, 0, stream>>>(
        partials, static_cast<int>(tiles), n, target + start, a.labels + start, a.ignore_index, a.logprobs + start,
        a.entropy != nullptr ? a.entropy + start : nullptr, a.lse + start);
    check_launch("linear_logprob_finalize_kernel");
  }
}

}  // namespace

int64_t linear_logprob_workspace_floats(int64_t rows, int64_t vocab) {
  return rows + chunk_rows(rows, vocab) * vocab_tiles(vocab) * int64_t(sizeof(Stats) / sizeof(float));
}

void launch_linear_logprob_forward(const LinearLogprobForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return;
  if (args.hidden_size > INT32_MAX || vocab_tiles(args.vocab) > kMaxVocabTiles) {
    throw std::invalid_argument("aligner: linear_logprob_forward supports hidden_size < 2^31 and vocab <= " +
                                std::to_string(kMaxVocabTiles * kTileN));
  }
  switch (args.elem_type) {
    case ElemType::kBFloat16:
      return forward_typed<cute::bfloat16_t, cute::SM80_16x8x16_F32BF16BF16F32_TN>(args, stream);
    case ElemType::kHalf:
      return forward_typed<cute::half_t, cute::SM80_16x8x16_F32F16F16F32_TN>(args, stream);
    default:
      throw std::invalid_argument("aligner: linear_logprob_forward supports bfloat16 and float16 only");
  }
}

}  // namespace aligner::cuda
