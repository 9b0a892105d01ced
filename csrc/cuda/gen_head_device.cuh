// Generator head on tensor cores (issue 7): torch-free device code built by nvcc and, against the SIMT emulation,
// by the host compiler (simt/simt.cuh). Contract: cuda/gen_head_launch.h.
//
// Logit tiles. Every kernel that needs logits runs for_each_logit_tile: a block of 4 warps owns 128 rows of h
// (32 per warp, two m16 tiles) and walks its split of the vocabulary in tiles of 64 columns; per tile the
// [128 x 64] float32 logits h weightᵀ come out of mma.sync m16n8k16 over hidden in chunks of 32, the h and
// weight chunks in a 3-stage cp.async pipeline in shared memory (it runs through the chunks of all the split's
// tiles, so there is no bubble between tiles). Per warp and chunk: 4 ldmatrix.x4 of h, 8 of weight,
// 32 mma. The logits never leave registers: an epilogue consumes each tile.
//   forward  epilogue: per row and lane a running max, sum of exp, first column of the max, best Gumbel-perturbed
//            score and its column, the target logit; Philox words come one call per 4 columns, traded between
//            lane pairs (mma_tiles::c_fragment_words). The 4 lanes of a row merge at the end of the split and
//            write partials per (split, row); merge_kernel combines the splits in order (deterministic).
//   backward epilogue: G = exp(logit - lse) - onehot, 0 on rows that do not count, stored as T in a chunk
//            workspace [chunk rows, V] (32-bit stores of column pairs), with float32 column sums per block for
//            the bias gradient. Two GEMMs (gemm_kernel, 64 x 64 output tiles, each owned by one block, k in
//            order: deterministic) then give grad_h = s G W and grad_weight += s Gᵀ h.
//
// Napkin math (ELECTRA-Base generator head: M = 0.15 * 256 * 512 = 19,660 rows, E = 768, V = 30,522; Small:
//   M = 2,458, E = 128):
//   FLOPs   each pass over the logits is 2 M V E = 0.92 TFLOP (Base), 19 GFLOP (Small); the forward takes one,
//           the backward three (recompute, G W, Gᵀ h). mma.sync peaks ~660 TFLOP/s on an H100: Base >= 1.4 ms
//           forward + 4.2 ms backward at peak, ~2x that at a realistic 50%.
//   epilogue per logit ~2 logf (Gumbel), 1 expf, a quarter Philox (~20 integer ops), ~6 compares: ~60 issue
//           slots, against 2 E / 4096 mma per logit (E = 768: 0.375 mma, ~0.6 clk of one SM partition): the
//           forward epilogue costs about as much as its GEMM at E = 768 and dominates at E = 128 (Small), where
//           the head is bound by the noise, not the tensor cores.
//   bytes   forward: h once per split (L2), weight once per row block (128 rows: V E 2 B = 47 MB per row block,
//           from L2 where it fits — 50 MB L2 on an H100); backward adds the G workspace, 2 bytes per logit
//           written once and read twice: 1.2 GB per Base batch, ~0.5 ms at 3 TB/s. The workspace holds
//           chunk_rows x V x 2 B = 64 MiB by default (1,024 rows at V = 30,522): 2.6% of the [M, V] float32
//           logits an eager head holds (2.4 GB).
// Shared memory: 3 stages x (128 + 64) rows x (32 + 8) x 2 B = 46,080 B per logit-tile block; gemm_kernel
//   2 x (64 x 40 or 32 x 72 + 32 x 72) x 2 B <= 19,456 B.
// Grids: a logit-tile kernel's (splits, row blocks) comes from gen_head_vocab_splits (cuda/gen_head_launch.h),
//   which sizes the splits so that the blocks the device holds at once (3 per SM: 168 registers) run in the
//   fewest waves of the fewest tiles; the measured H200 forward at d18a559 (19.6 ms at Base, 1.24 ms at Small)
//   ran 2 blocks per SM, 2 pipeline stages and a second wave under 20% full.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/philox.h"
#include "cuda/gen_head_launch.h"
#include "cuda/mma_tiles.cuh"
#include "simt/primitives.cuh"

namespace electra_ext::ELECTRA_BACKEND::gen_head_device {

namespace tiles = mma_tiles;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * tiles::kWarpSize;
constexpr int kRowTiles = 2;  // m16 tiles per warp: each weight fragment feeds two mma's
constexpr int kWarpRows = 16 * kRowTiles;
constexpr int kBlockRows = kGenHeadBlockRows;
static_assert(kWarps * kWarpRows == kBlockRows, "4 warps of 32 rows");
constexpr int kTileColumns = kGenHeadTileColumns;
constexpr int kColumnFragments = kTileColumns / 8;  // n8 fragments per tile
constexpr int kChunk = 32;                          // hidden elements per pipeline stage
using HTile = tiles::PaddedTile<kBlockRows, kChunk>;
using WTile = tiles::PaddedTile<kTileColumns, kChunk>;
constexpr int kStageElements = HTile::kElements + WTile::kElements;
// Stages in shared memory: loads run 2 stages (64 elements of hidden) ahead of the products, so a stage's L2
// latency (~600-800 cycles) hides behind two stages of mma (3 warps a scheduler x 32 mma ~ 600 cycles each) and
// the epilogue runs with the next tile's first two stages in flight. 3 x 15,360 B = 45 KiB: under the 48 KiB a
// launch gets without opting in, and 3 blocks (135 KiB) fit an SM's 228.
constexpr int kStages = 3;
constexpr size_t kLogitTileSharedBytes = kStages * size_t(kStageElements) * 2;
static_assert(kLogitTileSharedBytes + sizeof(float[kWarps][kTileColumns]) <= 48 * 1024,
              "the launchers do not raise the shared-memory limit (the grad-logits kernel's column sums included)");
// Logit-tile blocks per SM the kernels are built for: 3 x 128 threads leave 170 registers a thread (168 as
// allocated), which the forward and the grad-logits kernel fit without spills (ptxas -v, sm_90); at 2 (the
// forward took 195 registers before its rows and columns became 32-bit) an SM has 8 warps to hide the epilogue's
// latency, at 3 it has 12. Shared memory allows 4 (45 KiB each).
constexpr int kLogitTileBlocksPerMultiprocessor = 3;

using LogitTile = float[kRowTiles][kColumnFragments][4];

// The row (of h) and column (of the vocabulary) of element i of C fragment (rt, t) of this lane.
__device__ __forceinline__ int fragment_row(int warp, int lane, int rt, int i) {
  return warp * kWarpRows + rt * 16 + lane / 4 + 8 * (i / 2);
}
__device__ __forceinline__ int fragment_column(int lane, int t, int i) { return 8 * t + 2 * (lane % 4) + i % 2; }

// x * y rounded, then + z rounded: never contracted into one FMA, so the Gumbel score rounds as on the CPU.
__device__ __forceinline__ float multiply_then_add(float x, float y, float z) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(x, y), z);
#else
  return x * y + z;  // host compilers do not contract in ISO C++ mode
#endif
}

// Column tiles [first, end) of split blockIdx.x.
struct SplitTiles {
  int first, end;
};
__device__ __forceinline__ SplitTiles split_tiles(const GenHeadInputs& in, GenHeadSplits splits) {
  const int tiles = static_cast<int>((in.vocab + kTileColumns - 1) / kTileColumns);
  const int first = blockIdx.x * splits.tiles_per_split;
  const int end = first + splits.tiles_per_split;
  return {first, end < tiles ? end : tiles};
}

// Computes the [128 x 64] logit tiles (without bias) of rows first_row .. first_row + 127 and column tiles
// [split.first, split.end), calling epilogue(logits, first_column, working) for each, in order, from every
// thread of the block (so the epilogue may hold barriers). `working`: this warp has rows below in.rows (the
// others only keep the loads and barriers going; their logits are zero).
template <typename T, typename Epilogue>
__device__ __forceinline__ void for_each_logit_tile(const GenHeadInputs& in, int64_t first_row, SplitTiles split,
                                                    Epilogue& epilogue) {
  ELECTRA_DYNAMIC_SHARED(uint4, shared_raw);
  T* const shared = reinterpret_cast<T*>(shared_raw);
  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const int chunks = (in.hidden + kChunk - 1) / kChunk;
  const int stages = (split.end - split.first) * chunks;
  const int64_t rows_left = in.rows - first_row;
  const int valid_rows = rows_left < kBlockRows ? static_cast<int>(rows_left) : kBlockRows;
  const T* const h = static_cast<const T*>(in.h) + first_row * in.h_row_stride;
  const T* const weight = static_cast<const T*>(in.weight);

  auto load_stage = [&](int stage) {
    const int64_t first_column = int64_t(split.first + stage / chunks) * kTileColumns;
    const int k0 = (stage % chunks) * kChunk;
    const int64_t columns_left = in.vocab - first_column;
    T* const buffer = shared + (stage % kStages) * kStageElements;
    tiles::load_tile_async<kBlockRows, kChunk, kThreads>(buffer, h + k0, in.h_row_stride, valid_rows, thread,
                                                         in.hidden - k0);
    tiles::load_tile_async<kTileColumns, kChunk, kThreads>(
        buffer + HTile::kElements, weight + first_column * in.hidden + k0, in.hidden,
        columns_left < kTileColumns ? static_cast<int>(columns_left) : kTileColumns, thread, in.hidden - k0);
  };

  const bool working = warp * kWarpRows < valid_rows;
  float logits[kRowTiles][kColumnFragments][4];
  auto compute_stage = [&](int stage) {
    const int chunk = stage % chunks;
    if (chunk == 0) {
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
        for (int t = 0; t < kColumnFragments; ++t) {
#pragma unroll
          for (int i = 0; i < 4; ++i) logits[rt][t][i] = 0.0f;
        }
      }
    }
    if (working) {
      const T* const h_tile = shared + (stage % kStages) * kStageElements;
      const T* const w_tile = h_tile + HTile::kElements;
#pragma unroll
      for (int ks = 0; ks < kChunk / 16; ++ks) {
        uint32_t a[kRowTiles][4];
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          ldmatrix<4, false>(a[rt], tiles::a_fragment_row<HTile>(h_tile, warp * kWarpRows + rt * 16, ks * 16, lane));
        }
#pragma unroll
        for (int np = 0; np < kColumnFragments / 2; ++np) {
          uint32_t b[4];
          ldmatrix<4, false>(b, tiles::b_fragment_row_nk<WTile>(w_tile, np * 16, ks * 16, lane));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            mma_m16n8k16<T>(logits[rt][2 * np], a[rt], b0, logits[rt][2 * np]);
            mma_m16n8k16<T>(logits[rt][2 * np + 1], a[rt], b1, logits[rt][2 * np + 1]);
          }
        }
      }
    }
    if (chunk == chunks - 1) {
      epilogue(logits, (split.first + stage / chunks) * kTileColumns, working);
    }
  };
  tiles::cp_async_pipeline<kStages>(stages, load_stage, compute_stage);
}

// What the forward carries per row: running max and sum of exp(logit - max), the first column of the max, the
// best perturbed score and its first column.
struct RowState {
  float max, sum;
  int32_t top;
  float best_score;
  int32_t best;
};

__device__ __forceinline__ RowState empty_row_state() { return RowState{-INFINITY, 0.0f, 0, -INFINITY, 0}; }

// a <- the state of a's columns and b's; symmetric in a and b (float addition commutes), so two lanes merging
// each other's states get the same bits. Ties go to the lower column, as torch.argmax does.
__device__ __forceinline__ void merge_row_state(RowState& a, const RowState& b) {
  const float max = fmaxf(a.max, b.max);
  const float sum = max == -INFINITY ? 0.0f : a.sum * expf(a.max - max) + b.sum * expf(b.max - max);
  if (b.max > a.max || (b.max == a.max && b.top < a.top)) a.top = b.top;
  if (b.best_score > a.best_score || (b.best_score == a.best_score && b.best < a.best)) {
    a.best_score = b.best_score;
    a.best = b.best;
  }
  a.max = max;
  a.sum = sum;
}

__device__ __forceinline__ RowState shuffle_row_state(const RowState& s, int lane_mask) {
  return RowState{__shfl_xor_sync(0xffffffffu, s.max, lane_mask), __shfl_xor_sync(0xffffffffu, s.sum, lane_mask),
                  __shfl_xor_sync(0xffffffffu, s.top, lane_mask),
                  __shfl_xor_sync(0xffffffffu, s.best_score, lane_mask),
                  __shfl_xor_sync(0xffffffffu, s.best, lane_mask)};
}

// The rows a lane holds in C fragments: [rt][r] = row warp * 32 + rt * 16 + group + 8 r of the block. 32-bit,
// which the launchers' limits allow (rows <= 65,535 x 128, vocab <= kGenHeadMaxVocab): 64-bit rows and targets
// took 8 of the forward's registers.
struct LaneRows {
  int32_t row[kRowTiles][2];
  int32_t target[kRowTiles][2];  // the target column, or -1 when the row does not count or its target is no column
  bool counted[kRowTiles][2];    // the row exists and its target is not ignore_index
};
__device__ __forceinline__ LaneRows lane_rows(const GenHeadInputs& in, int64_t first_row, int warp, int lane) {
  LaneRows rows;
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = first_row + fragment_row(warp, lane, rt, 2 * r);
      const int64_t target = row < in.rows ? in.targets[row] : in.ignore_index;
      rows.row[rt][r] = static_cast<int32_t>(row);
      rows.counted[rt][r] = row < in.rows && target != in.ignore_index;
      rows.target[rt][r] = rows.counted[rt][r] && target >= 0 && target < in.vocab ? static_cast<int32_t>(target) : -1;
    }
  }
  return rows;
}

// Grid (splits, row blocks); block kThreads; dynamic shared memory kLogitTileSharedBytes.
template <typename T>
__global__ void __launch_bounds__(kThreads, kLogitTileBlocksPerMultiprocessor)
    forward_kernel(GenHeadForwardArgs args) {
  const GenHeadInputs& in = args.in;
  const int64_t first_row = int64_t(blockIdx.y) * kBlockRows;
  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const uint64_t seed = static_cast<uint64_t>(*args.seed);
  const LaneRows rows = lane_rows(in, first_row, warp, lane);
  RowState state[kRowTiles][2];
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) state[rt][r] = empty_row_state();
  }

  const int vocab = static_cast<int>(in.vocab);
  auto epilogue = [&](LogitTile& logits, int first_column, bool working) {
    if (!working) return;
    // Pass 1: bias, target logit, tile max and its first column, best perturbed score.
    float tile_max[kRowTiles][2];
    int32_t tile_top[kRowTiles][2];
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[rt][r] = -INFINITY;
        tile_top[rt][r] = 0;
      }
    }
#pragma unroll
    for (int t = 0; t < kColumnFragments; ++t) {
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        uint32_t words[4];
        tiles::c_fragment_words(words, lane, [&](int r) {
          // A select, not rows.row[rt][r / 8]: indexing by the lane's r puts LaneRows in local memory.
          const int32_t row = r < 8 ? rows.row[rt][0] : rows.row[rt][1];
          return philox::gen_head_gumbel_words(seed, static_cast<uint32_t>(row),
                                               static_cast<uint32_t>(first_column / 4 + 2 * t + (lane % 4) / 2));
        });
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i / 2;
          const int column = first_column + fragment_column(lane, t, i);
          if (column >= vocab) continue;
          const float logit = logits[rt][t][i] + in.bias[column];
          logits[rt][t][i] = logit;
          if (logit > tile_max[rt][r]) {  // columns ascend within a lane: strict keeps the first
            tile_max[rt][r] = logit;
            tile_top[rt][r] = column;
          }
          const bool is_target = column == rows.target[rt][r];
          if (is_target) args.target_logit[rows.row[rt][r]] = logit;
          const float gumbel = -logf(-logf(philox::gen_head_uniform(words[i])));
          const float score = multiply_then_add(logit, args.inverse_temperature, gumbel);
          if (score > state[rt][r].best_score && !(args.disallow_correct && is_target)) {
            state[rt][r].best_score = score;
            state[rt][r].best = column;
          }
        }
      }
    }
    // Pass 2: the running sum against the new max.
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        RowState& s = state[rt][r];
        const float max = fmaxf(s.max, tile_max[rt][r]);
        if (max == -INFINITY) continue;  // no valid column for this lane yet
        float sum = s.sum * expf(s.max - max);
#pragma unroll
        for (int t = 0; t < kColumnFragments; ++t) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (first_column + fragment_column(lane, t, e) < vocab) sum += expf(logits[rt][t][2 * r + e] - max);
          }
        }
        if (tile_max[rt][r] > s.max) s.top = tile_top[rt][r];
        s.max = max;
        s.sum = sum;
      }
    }
  };
  for_each_logit_tile<T>(in, first_row, split_tiles(in, args.splits), epilogue);

  // The 4 lanes of a row merge (fixed pattern), lane 0 of the quad writes the split's partial.
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      RowState& s = state[rt][r];
      merge_row_state(s, shuffle_row_state(s, 1));
      merge_row_state(s, shuffle_row_state(s, 2));
      const int64_t row = rows.row[rt][r];
      if (lane % 4 == 0 && row < in.rows) {
        const int64_t at = int64_t(blockIdx.x) * in.rows + row;
        args.partial_max[at] = s.max;
        args.partial_sum[at] = s.sum;
        args.partial_top[at] = s.top;
        args.partial_best_score[at] = s.best_score;
        args.partial_best[at] = s.best;
      }
    }
  }
}

// One thread per row: the splits' partials merged in order, then lse, sample, loss and correctness.
constexpr int kMergeThreads = 256;
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(GenHeadForwardArgs args) {
  const GenHeadInputs& in = args.in;
  const int64_t row = int64_t(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (row >= in.rows) return;
  RowState s = empty_row_state();
  for (int split = 0; split < args.splits.splits; ++split) {
    const int64_t at = int64_t(split) * in.rows + row;
    merge_row_state(s, RowState{args.partial_max[at], args.partial_sum[at], args.partial_top[at],
                                args.partial_best_score[at], args.partial_best[at]});
  }
  const float lse = s.max + logf(s.sum);
  const int64_t target = in.targets[row];
  const bool counted = target != in.ignore_index;
  const bool valid = target >= 0 && target < in.vocab;
  args.lse[row] = lse;
  args.samples[row] = s.best;
  args.row_loss[row] = !counted ? 0.0f : valid ? lse - args.target_logit[row] : NAN;
  args.row_correct[row] = counted && s.top == target ? 1 : 0;
}

// Grid (splits.splits, row blocks of the chunk); block kThreads; dynamic shared memory kLogitTileSharedBytes.
// Writes G for rows chunk_first_row .. + chunk rows of the chunk, columns < vocab_padded (0 past vocab), and
// the blocks' column sums of G.
template <typename T>
__global__ void __launch_bounds__(kThreads, kLogitTileBlocksPerMultiprocessor)
    grad_logits_kernel(GenHeadBackwardArgs args, int64_t chunk_first_row, GenHeadSplits splits) {
  const GenHeadInputs& in = args.in;
  const int64_t first_row = chunk_first_row + int64_t(blockIdx.y) * kBlockRows;
  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const int64_t vocab_padded = gen_head_vocab_padded(in.vocab);
  const LaneRows rows = lane_rows(in, first_row, warp, lane);
  float lse[kRowTiles][2];
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) lse[rt][r] = rows.counted[rt][r] ? args.lse[rows.row[rt][r]] : 0.0f;
  }
  __shared__ float column_sums[kWarps][kTileColumns];
  T* const grad_logits = static_cast<T*>(args.grad_logits);

  const int vocab = static_cast<int>(in.vocab);
  auto epilogue = [&](LogitTile& logits, int first_column, bool working) {
#pragma unroll
    for (int t = 0; t < kColumnFragments; ++t) {
      float column_sum[2] = {0.0f, 0.0f};
      if (working) {
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          float g[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = i / 2;
            const int column = first_column + fragment_column(lane, t, i);
            g[i] = 0.0f;
            if (column < vocab && rows.counted[rt][r]) {
              g[i] = expf(logits[rt][t][i] + in.bias[column] - lse[rt][r]) -
                     (column == rows.target[rt][r] ? 1.0f : 0.0f);
            }
            column_sum[i % 2] += g[i];
          }
          const int column = first_column + fragment_column(lane, t, 0);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int64_t row = rows.row[rt][r];
            if (row < in.rows && column < vocab_padded) {
              *reinterpret_cast<uint32_t*>(grad_logits + (row - chunk_first_row) * vocab_padded + column) =
                  tiles::float2_to_pair<T>(g[2 * r], g[2 * r + 1]);
            }
          }
        }
      }
      // The warp's 32 rows: lanes of one column pair (same lane % 4) sum over their 8 row groups.
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float sum = column_sum[e];
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        sum += __shfl_xor_sync(0xffffffffu, sum, 8);
        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
        if (lane < 4) column_sums[warp][fragment_column(lane, t, e)] = sum;
      }
    }
    __syncthreads();
    if (thread < kTileColumns && first_column + thread < vocab) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += column_sums[w][thread];
      args.grad_bias_partials[(first_row / kBlockRows) * in.vocab + first_column + thread] = sum;
    }
    // The next write of column_sums comes after the next stage's __syncthreads.
  };
  for_each_logit_tile<T>(in, first_row, split_tiles(in, splits), epilogue);
}

// out (+)= alpha A B on tensor cores, A [m x k], B [k x n], fp32 accumulation; one block per 64 x 64 output tile
// and k split, k in order within a split (deterministic). Operands are 16-bit matrices in memory with 16-byte
// aligned rows; A is stored [m][k] or, kATransposed, [k][m]; B is stored [k][n]. Loads zero-fill outside the
// operands' valid rows and columns (multiples of 8 for columns).
struct GemmOperand {
  const void* data;
  int64_t row_stride;  // elements, a multiple of 8
  int64_t rows, columns;
};
template <typename Out>
struct GemmArgs {
  int64_t m, n, k;
  GemmOperand a, b;
  Out* out;  // [m, n] with row stride n
  const float* alpha;  // [1] on the device
  bool accumulate;     // out += alpha A B (float32 out only) instead of out = alpha A B
  // With gridDim.z > 1, k is split into parts of k_per_split (a multiple of kGemmChunk): part z writes its
  // unscaled float32 product to partials[z][m][n], and reduce_k_splits_kernel writes out = alpha sum over z, in
  // z order. With gridDim.z == 1, k_per_split >= k and partials is unused.
  int64_t k_per_split;
  float* partials;
};

constexpr int kGemmTile = 64;   // output rows and columns per block; warps 2 x 2 of 32 x 32
constexpr int kGemmChunk = 32;  // k per pipeline stage
// Per stage a warp issues only 16 mma (~100 cycles) against ~600-800 cycles of L2 latency: 3 stages, like the
// logit tiles, and k splits so that enough blocks share each SM.
constexpr int kGemmStages = 3;

template <bool kATransposed>
using GemmATile = std::conditional_t<kATransposed, tiles::PaddedTile<kGemmChunk, kGemmTile>,
                                     tiles::PaddedTile<kGemmTile, kGemmChunk>>;
using GemmBTile = tiles::PaddedTile<kGemmChunk, kGemmTile>;
template <bool kATransposed>
constexpr int kGemmStageElements = GemmATile<kATransposed>::kElements + GemmBTile::kElements;
template <bool kATransposed>
constexpr size_t kGemmSharedBytes = kGemmStages * size_t(kGemmStageElements<kATransposed>) * 2;
static_assert(kGemmSharedBytes<false> <= 48 * 1024 && kGemmSharedBytes<true> <= 48 * 1024,
              "the launchers do not raise the shared-memory limit");

__device__ __forceinline__ int clamp_extent(int64_t left, int tile) {
  return left < 0 ? 0 : (left < tile ? static_cast<int>(left) : tile);
}

template <typename T, bool kATransposed, typename Out>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmArgs<Out> args) {
  using ATile = GemmATile<kATransposed>;
  constexpr int kStage = kGemmStageElements<kATransposed>;
  ELECTRA_DYNAMIC_SHARED(uint4, shared_raw);
  T* const shared = reinterpret_cast<T*>(shared_raw);
  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const int64_t m0 = int64_t(blockIdx.y) * kGemmTile, n0 = int64_t(blockIdx.x) * kGemmTile;
  const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
  const T* const a = static_cast<const T*>(args.a.data);
  const T* const b = static_cast<const T*>(args.b.data);
  const int64_t k_first = int64_t(blockIdx.z) * args.k_per_split;
  const int64_t k_left = args.k - k_first;
  const int64_t k_extent = k_left < args.k_per_split ? k_left : args.k_per_split;
  const int stages = static_cast<int>((k_extent + kGemmChunk - 1) / kGemmChunk);

  auto load_stage = [&](int stage) {
    const int64_t k0 = k_first + int64_t(stage) * kGemmChunk;
    T* const buffer = shared + (stage % kGemmStages) * kStage;
    if constexpr (kATransposed) {
      tiles::load_tile_async<kGemmChunk, kGemmTile, kThreads>(
          buffer, a + k0 * args.a.row_stride + m0, args.a.row_stride, clamp_extent(args.a.rows - k0, kGemmChunk),
          thread, clamp_extent(args.a.columns - m0, kGemmTile));
    } else {
      tiles::load_tile_async<kGemmTile, kGemmChunk, kThreads>(
          buffer, a + m0 * args.a.row_stride + k0, args.a.row_stride, clamp_extent(args.a.rows - m0, kGemmTile),
          thread, clamp_extent(args.a.columns - k0, kGemmChunk));
    }
    tiles::load_tile_async<kGemmChunk, kGemmTile, kThreads>(
        buffer + ATile::kElements, b + k0 * args.b.row_stride + n0, args.b.row_stride,
        clamp_extent(args.b.rows - k0, kGemmChunk), thread, clamp_extent(args.b.columns - n0, kGemmTile));
  };

  float acc[2][4][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    }
  }
  auto compute_stage = [&](int stage) {
    const T* const a_tile = shared + (stage % kGemmStages) * kStage;
    const T* const b_tile = a_tile + ATile::kElements;
#pragma unroll
    for (int ks = 0; ks < kGemmChunk / 16; ++ks) {
      uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        if constexpr (kATransposed) {
          ldmatrix<4, true>(af[mt], tiles::a_fragment_row_km<ATile>(a_tile, ks * 16, warp_m + mt * 16, lane));
        } else {
          ldmatrix<4, false>(af[mt], tiles::a_fragment_row<ATile>(a_tile, warp_m + mt * 16, ks * 16, lane));
        }
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t bf[4];
        ldmatrix<4, true>(bf, tiles::b_fragment_row_kn<GemmBTile>(b_tile, ks * 16, warp_n + np * 16, lane));
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_m16n8k16<T>(acc[mt][2 * np], af[mt], b0, acc[mt][2 * np]);
          mma_m16n8k16<T>(acc[mt][2 * np + 1], af[mt], b1, acc[mt][2 * np + 1]);
        }
      }
    }
  };
  tiles::cp_async_pipeline<kGemmStages>(stages, load_stage, compute_stage);

  const bool split = gridDim.z > 1;
  const float alpha = split ? 1.0f : *args.alpha;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int64_t column = n0 + warp_n + nt * 8 + 2 * (lane % 4);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = m0 + warp_m + mt * 16 + lane / 4 + 8 * r;
        if (row >= args.m || column >= args.n) continue;  // n is a multiple of 8: column + 1 < n too
        const float x = alpha * acc[mt][nt][2 * r], y = alpha * acc[mt][nt][2 * r + 1];
        if (split) {
          float* const partial = args.partials + (int64_t(blockIdx.z) * args.m + row) * args.n + column;
          partial[0] = x;
          partial[1] = y;
          continue;
        }
        Out* const out = args.out + row * args.n + column;
        if constexpr (std::is_same<Out, float>::value) {
          out[0] = args.accumulate ? out[0] + x : x;
          out[1] = args.accumulate ? out[1] + y : y;
        } else {
          *reinterpret_cast<uint32_t*>(out) = tiles::float2_to_pair<T>(x, y);
        }
      }
    }
  }
}

// out = alpha sum over z < splits of partials[z] (gemm_kernel's k splits), in z order; one thread per pair of
// columns (n is a multiple of 8).
constexpr int kReduceThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) reduce_k_splits_kernel(GemmArgs<T> args, int splits) {
  const int64_t pair = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  const int64_t size = args.m * args.n;
  if (2 * pair >= size) return;
  float x = 0.0f, y = 0.0f;
  for (int z = 0; z < splits; ++z) {
    const float* const partial = args.partials + z * size + 2 * pair;
    x += partial[0];
    y += partial[1];
  }
  const float alpha = *args.alpha;
  *reinterpret_cast<uint32_t*>(args.out + 2 * pair) = tiles::float2_to_pair<T>(alpha * x, alpha * y);
}

}  // namespace electra_ext::ELECTRA_BACKEND::gen_head_device
