// Fused multi-head attention forward (FlashAttention-2 style, tensor cores): torch-free device code built by nvcc
// and, against the SIMT emulation, by the host compiler (simt/simt.cuh). Contract: cuda/attention_launch.h.
//
// Tiling. A block of 4 warps owns kBlockM = 64 kRowTiles query rows of one (sequence, head), 16 kRowTiles rows
// (kRowTiles m16 tiles) per warp; the launcher takes kRowTiles = 2 (32 rows per warp, 128 per block) at D = 32 and
// 64, 1 (64 per block) at D = 128; grid (ceil(max_seqlen / kBlockM), batch * heads). The Q tile goes global ->
// shared (cp.async); its A fragments are loaded once into registers by ldmatrix, except at D = 64 with 32 rows
// per warp, where they are re-read from shared memory per k-step (register budget, Layout::kQInRegisters).
// The block then walks the sequence's keys in tiles of 64: K and V tiles are double-buffered in shared memory
// with cp.async (tile j + 1 is in flight while tile j is computed, one __syncthreads per tile). Per warp and key
// tile (R = kRowTiles):
//   S (16R x 64, fp32 C fragments) = Q K^T        D/16 x 4 ldmatrix.x4 of K (+ D/16 x R of Q when not in
//                                                 registers), each K fragment used by R row tiles: D/16 x 8R mma
//   columns >= seqlen -> -inf (last tile only); online softmax per row in fp32: running max m, rescale
//   factor exp2((m_old - m_new) * scale * log2 e) on the accumulator and the running sum, P = exp2(S * c - m * c)
//   (scale and log2 e folded into one FFMA per score, then one MUFU.EX2); the row sum takes P before dropout;
//   Philox dropout zeroes entries of P (dropout_scale is applied once at the end)
//   O (16R x D) += P V                            P's C fragments become A fragments in registers (no shared
//                                                 memory round trip), V by D/4 ldmatrix.x4.trans, each used by
//                                                 R row tiles: D/2 x R mma
// The end: the quad (4 lanes of a row) reduces the row sums, O *= dropout_scale / l, lse = m * scale + ln l;
// each warp stages its O rows as T in its own (already consumed) rows of the Q tile and writes them with
// 16-byte coalesced stores. Rows past the sequence are not written, except in the padded layout (starts null),
// where the slot's padding rows are written as zeros (blocks of padding rows only write those zeros).
//
// Napkin math (per head: 4 T^2 D FLOPs = QK^T and PV, 2 T^2 D each; bytes = q, k, v read + out written,
// 4 T D x 2 B; lse 4 T B):
//   ELECTRA-Small, B=128, T=128, H=4, D=64: 2.15 GFLOP, 33.6 MB. Arithmetic intensity T / 2 = 64 FLOP/B, far
//     under an H100's ridge (~990 TFLOP/s / 3.35 TB/s ~ 300): memory/latency bound, ~10 us at the copy rate.
//     512 blocks of 128 threads (1 per head): ~1.9 waves at 2 blocks/SM on 132 SMs.
//   ELECTRA-Base, B=32, T=512, H=12, D=64: 25.8 GFLOP, 101 MB (K, V are re-read by the 4 query blocks of a
//     head, 128 KB per head: L2 hits). Intensity 256 FLOP/B: compute bound. mma.sync peaks ~660 TFLOP/s dense
//     bf16 on an H100 (wgmma's 990 is out of reach of m16n8k16): ~40 us; at 300-400 TFLOP/s, 65-85 us.
//     1,536 blocks: ~5.8 waves at 2 blocks/SM.
//   Shared memory vs tensor cores in the inner loop (per warp and 64-key tile; ldmatrix.x4 = 512 B, ~4 clk of an
//     SM's 128 B/clk; mma.sync m16n8k16 = 4,096 FLOP, ~1.5 clk at ~660 TFLOP/s over 132 SMs): with 16 rows per
//     warp, D = 64 takes 32 ldmatrix.x4 (128 clk) per 64 mma (96 clk), shared-memory bound at ~75% of mma peak;
//     with 32 rows per warp, 16 K + 8 Q + 16 V = 40 (160 clk) per 128 mma (192 clk), 0.31 instead of 0.5
//     ldmatrix per mma, so the tensor cores bound it (with Q in registers it would be 32 per 128). D = 32:
//     16 ldmatrix (64 clk) per 64 mma (96 clk). D = 128, 16 rows: 64 (256 clk) per 128 mma (192 clk), still
//     shared-memory bound (32 rows per warp does not fit the registers, below).
//   exp2: one MUFU op per score, 16/clk/SM, against 4 D = 256 mma FLOPs per score at D = 64, 4,096 FLOP/clk/SM
//     of tensor cores: both 1/16 clk per score, so the softmax's exp2 co-limits at D = 64 (FA3 overlaps them
//     with wgmma; with mma.sync the warps of the other resident block interleave them). Per score the FP32
//     pipe does 1 FFMA (scale and max folded), 1/2 FMNMX, 1 FADD (row sum) and 1/2 F2F pack: ~3 instructions,
//     1/43 clk at 128/clk/SM. The exp2 is exp2_ftz (MUFU.EX2 alone): exp2f's subnormal fix-up would add 3 FP32
//     instructions per score, doubling that for P entries below 2^-126 that no bf16/fp16 sum can see.
//   Dropout: the contract draws one byte per entry, one Philox4x32-10 (~60 integer ops) per 16 entries
//     (attention_tiles.cuh dropout_c_fragments): ~8 ALU issue slots per score with the byte compares and the
//     masking, against 128/clk/SM, ~0.06 clk per score, on par with the mma time. With the first contract's
//     32-bit word per entry it was ~20 slots, ~0.16 clk: the forward with dropout was bound by Philox integer
//     math at ~2.5x the mma time (FlashAttention takes 8-bit draws for the same reason).
// Shared memory per block: (kBlockM Q + 2 x 64 K + 2 x 64 V) rows x (D + 8) x 2 B = 30,720 B (D=32, 128 rows),
//   55,296 B (D=64, 128 rows), 87,040 B (D=128, 64 rows); above 48 KB the launcher opts in. 2 blocks per SM fit
//   all three (228 KB per H100 SM).
// Registers per lane: Q A fragments D R / 4 (when kept), O accumulators D R / 2 fp32, S/P 32 R fp32, m and l
//   4 R, plus addresses and the loaded K/V fragments ptxas hoists. ptxas (CUDA 13, sm_90, no spills): 229 / 244
//   / 254 registers at D = 32 / 64 / 128 under 2 resident blocks per SM (__launch_bounds__ below); with 16 rows
//   per warp at all three it was 128 / 168 / 252 under 4 / 3 / 2 blocks per SM.
// Why this tiling: 32 query rows per warp (FlashAttention-2's kBlockM = 128 with 4 warps) makes each K / V
//   fragment loaded from shared memory feed two mma's, which moves the D = 32 and D = 64 inner loops from the
//   shared-memory bound to the tensor-core bound (above); the price is ~250 registers, so 2 blocks (8 warps)
//   per SM instead of 3-4, which the other resident block's warps cover for the softmax and the barriers.
//   64-key tiles keep S and P (64 floats at 32 rows) in registers next to O. At D = 128, 32 rows per warp needs
//   32 Q + 128 O + 64 S/P registers before any K / V fragment: it would spill, so it keeps 16 rows per warp.
//   ELECTRA-Small's T = 128 gets one query block per (sequence, head), 512 blocks: enough for 132 SMs. Padded
//   batches waste more rows in a sequence's last block (up to 127 instead of 63); its warps whose rows all lie
//   past the sequence skip the math and keep only the loads and barriers.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention_launch.h"
#include "cuda/attention_tiles.cuh"
#include "simt/primitives.cuh"

namespace electra_ext::ELECTRA_BACKEND::attention_forward_device {

namespace tiles = attention_tiles;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * tiles::kWarpSize;
constexpr int kBlockN = 64;   // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
// Resident blocks per SM that __launch_bounds__ asks registers for: 2, i.e. up to 255 per lane (65,536 /
// (128 threads x 2)). ptxas (CUDA 13, sm_90) takes 229 / 244 / 254 at D = 32 / 64 / 128 as launched; at 3 blocks
// (168 registers) D = 32 with 32 rows per warp spills 184 bytes.
constexpr int kMinBlocks = 2;

// kRowTiles m16 tiles of query rows per warp (1 or 2): each K / V fragment a warp loads with ldmatrix feeds
// kRowTiles mma's. The launcher picks it per head dim (attention_forward.cu).
template <int kHeadDim, int kRowTiles>
struct Layout {
  static_assert(kRowTiles == 1 || kRowTiles == 2, "16 or 32 query rows per warp");
  static constexpr int kWarpRows = 16 * kRowTiles;
  static constexpr int kBlockM = kWarps * kWarpRows;  // query rows per block
  using QTile = tiles::PaddedTile<kBlockM, kHeadDim>;
  using KVTile = tiles::PaddedTile<kBlockN, kHeadDim>;
  // Q, then K buffers 0 and 1, then V buffers 0 and 1 (elements of T).
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = QTile::kElements;
  static constexpr int kVOffset = kKOffset + 2 * KVTile::kElements;
  static constexpr int kElements = kVOffset + 2 * KVTile::kElements;
  static constexpr size_t kSharedBytes = size_t(kElements) * 2;
  // Q's A fragments stay in registers (loaded once) unless the register budget says no. Q, O and S/P fragments
  // take kRowTiles x (3 D / 4 + 32) registers per lane: 112 at D = 32 (32 rows per warp) and 128 at D = 128
  // (16 rows) leave ptxas room for the hoisted K / V fragments and addresses; 160 at D = 64 with 32 rows spilled
  // (52 bytes at 255 registers), so there Q is re-read from shared memory per k-step (8 ldmatrix.x4 per tile and
  // warp next to 32 of K and V; FlashAttention-2's default as well): 252 registers, no spills.
  static constexpr bool kQInRegisters = kRowTiles * (3 * kHeadDim / 4 + 32) <= 128;
};

// ---- Pieces shared with the Hopper (wgmma) kernel of attention_forward_hopper_device.cuh. ----

// What a block of grid (query blocks, batch x heads) owns: query rows m0 .. m0 + block_m - 1 of sequence b, head
// h, and where that head's rows start in q (at row m0), k, v, out and lse (at the sequence's first token).
template <typename T>
struct BlockRows {
  bool in_grid;  // false for the grid's slots past batch x heads
  int b, h, m0;
  tiles::SequenceExtent seq;
  const T *q, *k, *v;
  T* out;
  float* lse;
};

template <typename T, int kHeadDim>
__device__ __forceinline__ BlockRows<T> block_rows(const AttentionForwardArgs& args, int block_m) {
  const AttentionShape& shape = args.shape;
  const int bh = blockIdx.y + gridDim.y * blockIdx.z;
  if (bh >= shape.batch * shape.heads) return BlockRows<T>{false};
  BlockRows<T> r;
  r.in_grid = true;
  r.b = bh / shape.heads;
  r.h = bh % shape.heads;
  r.m0 = blockIdx.x * block_m;
  r.seq = tiles::sequence_extent(shape.starts, shape.seqlens, r.b, shape.max_seqlen, shape.tokens);
  r.q = static_cast<const T*>(args.q.data) + (r.seq.start + r.m0) * args.q.token_stride +
        int64_t(r.h) * args.q.head_stride;
  r.k = static_cast<const T*>(args.k.data) + r.seq.start * args.k.token_stride + int64_t(r.h) * args.k.head_stride;
  r.v = static_cast<const T*>(args.v.data) + r.seq.start * args.v.token_stride + int64_t(r.h) * args.v.head_stride;
  r.out = static_cast<T*>(args.out) + r.seq.start * shape.heads * kHeadDim + int64_t(r.h) * kHeadDim;
  r.lse = args.lse + int64_t(r.h) * shape.tokens + r.seq.start;
  return r;
}

// A block whose first row lies past the sequence: padding rows at most, written as zeros (out and lse) in the
// padded layout. Returns whether the block is such a one (then it is done; no barrier is skipped by part of it).
template <int kHeadDim, int kThreads, typename T>
__device__ __forceinline__ bool write_padding_block(const BlockRows<T>& rows, int block_m, int heads, int thread) {
  const int m0 = rows.m0;
  if (m0 < rows.seq.length) return false;
  const int last = m0 + block_m < rows.seq.rows ? m0 + block_m : rows.seq.rows;
  tiles::zero_rows<kHeadDim, kThreads>(rows.out, int64_t(heads) * kHeadDim, m0, last, thread);
  for (int row = m0 + thread; row < last; row += kThreads) rows.lse[row] = 0.0f;
  return true;
}

// Keys n0 + column at or past the sequence's end get no weight (the last, partial key tile).
template <int kSTiles>
__device__ __forceinline__ void mask_keys_past_sequence(float (&s)[kSTiles][4], int n0, int length, int pair) {
#pragma unroll
  for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (n0 + 8 * t + 2 * pair + i % 2 >= length) s[t][i] = -INFINITY;
    }
  }
}

// One key tile of the online softmax for a warp's 16-row tile (rows group and group + 8): the running maxima of the
// raw scores, P = exp2(S scale log2 e - max scale log2 e) in place of S, the lane's part of the row sums (P before
// dropout), and in `rescale` the factors exp2((max_old - max_new) scale log2 e) by which O must be multiplied (by
// rescale_rows) before P V is added. Every tile has a valid key, so the new maxima are finite.
template <int kSTiles>
__device__ __forceinline__ void softmax_tile(float (&s)[kSTiles][4], float (&row_max)[2], float (&row_sum)[2],
                                             float scale_log2, float (&rescale)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tile_max = row_max[r];
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) tile_max = fmaxf(tile_max, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float max_scaled = tile_max * scale_log2;
    // exp2f, not exp2_ftz: once per row and tile, and with exp2_ftz here ptxas spilled 28 bytes at D = 128 with
    // dropout. 0 on the first tile.
    rescale[r] = tiles::fast_exp2(row_max[r] * scale_log2 - max_scaled);
    row_max[r] = tile_max;
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2_ftz(s[t][2 * r + e] * scale_log2 - max_scaled);
        s[t][2 * r + e] = p;
        sum += p;
      }
    }
    row_sum[r] = row_sum[r] * rescale[r] + sum;
  }
}

// O's rows group and group + 8 times rescale[0] and rescale[1].
template <int kOTiles>
__device__ __forceinline__ void rescale_rows(float (&o)[kOTiles][4], const float (&rescale)[2]) {
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[t][i] *= rescale[i / 2];
  }
}

// softmax_tile with O rescaled at once (O is not being written by a product meanwhile).
template <int kSTiles, int kOTiles>
__device__ __forceinline__ void online_softmax_tile(float (&s)[kSTiles][4], float (&o)[kOTiles][4],
                                                    float (&row_max)[2], float (&row_sum)[2], float scale_log2) {
  float rescale[2];
  softmax_tile(s, row_max, row_sum, scale_log2, rescale);
  rescale_rows(o, rescale);
}

// The end of a warp's kRowTiles x 16 rows, first row warp_m0 of the sequence: the quad (4 lanes of a row) reduces
// the row sums, O *= dropout_scale / l, lse = max scale + ln l; O is staged as T in rows stage_row0 .. of `stage`
// (this warp's own, already consumed, rows of the Q tile: `Tile` layout) and written with 16-byte coalesced
// stores. Rows past the sequence are not written, except in the padded layout, where the slot's padding rows are
// written as zeros.
template <typename Tile, int kHeadDim, int kRowTiles, typename T>
__device__ __forceinline__ void write_rows(float (&o)[kRowTiles][kHeadDim / 8][4], const float (&row_max)[kRowTiles][2],
                                           float (&row_sum)[kRowTiles][2], T* stage, int stage_row0, T* out,
                                           float* lse, const tiles::SequenceExtent& seq, int warp_m0,
                                           const AttentionShape& shape, int lane) {
  const int group = lane / 4, pair = lane % 4;
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[rt][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const float factor = sum > 0.0f ? shape.dropout_scale / sum : 0.0f;
      const int position = warp_m0 + rt * 16 + group + 8 * r;
      if (pair == 0 && position < seq.rows) {
        lse[position] = position < seq.length ? row_max[rt][r] * shape.softmax_scale + logf(sum) : 0.0f;
      }
      row_sum[rt][r] = factor;
    }
  }
  __syncwarp();  // this warp's reads of its Q rows are long done; make it explicit
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int t = 0; t < kHeadDim / 8; ++t) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint32_t packed = tiles::float2_to_pair<T>(o[rt][t][2 * r] * row_sum[rt][r],
                                                         o[rt][t][2 * r + 1] * row_sum[rt][r]);
        *reinterpret_cast<uint32_t*>(Tile::at(stage, stage_row0 + rt * 16 + group + 8 * r, 8 * t + 2 * pair)) =
            packed;
      }
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = kHeadDim / tiles::kChunkElements;
  const uint4 zero = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 16 * kRowTiles * kChunksPerRow / tiles::kWarpSize; ++i) {
    const int chunk = lane + i * tiles::kWarpSize;
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * tiles::kChunkElements;
    const int position = warp_m0 + row;
    if (position < seq.rows) {  // the padded layout's padding rows as zeros
      *reinterpret_cast<uint4*>(out + int64_t(position) * shape.heads * kHeadDim + col) =
          position < seq.length ? *reinterpret_cast<const uint4*>(Tile::at(stage, stage_row0 + row, col)) : zero;
    }
  }
}

template <typename T, int kHeadDim, int kRowTiles>
__global__ void __launch_bounds__(kThreads, kMinBlocks) forward_kernel(AttentionForwardArgs args) {
  using L = Layout<kHeadDim, kRowTiles>;
  using QTile = typename L::QTile;
  using KVTile = typename L::KVTile;
  constexpr int kBlockM = L::kBlockM, kWarpRows = L::kWarpRows;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps of S = Q K^T
  constexpr int kSTiles = kBlockN / 8;     // n-tiles of S
  constexpr int kOTiles = kHeadDim / 8;    // n-tiles of O

  const AttentionShape& shape = args.shape;
  const BlockRows<T> rows = block_rows<T, kHeadDim>(args, kBlockM);
  if (!rows.in_grid || write_padding_block<kHeadDim, kThreads>(rows, kBlockM, shape.heads, threadIdx.x)) return;
  const tiles::SequenceExtent seq = rows.seq;
  const int m0 = rows.m0;

  ELECTRA_DYNAMIC_SHARED(uint4, shared_raw);
  T* const shared = reinterpret_cast<T*>(shared_raw);
  T* const q_tile = shared + L::kQOffset;
  T* const k_tiles = shared + L::kKOffset;
  T* const v_tiles = shared + L::kVOffset;

  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const int pair = lane % 4;
  const int warp_m0 = m0 + warp * kWarpRows;  // this warp's first query row (position in the sequence)

  const int n_tiles = (seq.length + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int j) {
    const int n0 = j * kBlockN, valid = seq.length - n0;
    tiles::load_tile_async<kBlockN, kHeadDim, kThreads>(k_tiles + (j % 2) * KVTile::kElements,
                                                        rows.k + n0 * args.k.token_stride, args.k.token_stride,
                                                        valid, thread);
    tiles::load_tile_async<kBlockN, kHeadDim, kThreads>(v_tiles + (j % 2) * KVTile::kElements,
                                                        rows.v + n0 * args.v.token_stride, args.v.token_stride,
                                                        valid, thread);
  };

  tiles::load_tile_async<kBlockM, kHeadDim, kThreads>(q_tile, rows.q, args.q.token_stride, seq.length - m0, thread);
  load_kv(0);
  cp_async_commit();

  const bool dropout = shape.dropout_threshold > 0;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*shape.seed) : 0;
  const float scale_log2 = shape.softmax_scale * kLog2e;

  float o[kRowTiles][kOTiles][4];
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[rt][t][i] = 0.0f;
    }
  }
  // Rows group and group + 8 of each of the warp's row tiles: running max of the raw scores and this lane's part
  // of the row sum.
  float row_max[kRowTiles][2], row_sum[kRowTiles][2];
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[rt][r] = -INFINITY;
      row_sum[rt][r] = 0.0f;
    }
  }
  uint32_t q_frag[kRowTiles][L::kQInRegisters ? kKSteps : 1][4];

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();
    __syncthreads();  // tile j visible to all; every warp is done with tile j - 1's buffers
    if (L::kQInRegisters && j == 0) {
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          ldmatrix<4, false>(q_frag[rt][ks],
                             tiles::a_fragment_row<QTile>(q_tile, warp * kWarpRows + rt * 16, ks * 16, lane));
        }
      }
    }
    if (j + 1 < n_tiles) {
      load_kv(j + 1);
      cp_async_commit();
    }
    // A warp whose rows all lie past the sequence (the last query block of a sequence: up to 3 of 4 warps) only
    // keeps the loads and barriers going; its issue slots go to the working warps.
    if (warp_m0 >= seq.length) continue;
    const T* const k_tile = k_tiles + (j % 2) * KVTile::kElements;
    const T* const v_tile = v_tiles + (j % 2) * KVTile::kElements;

    // S = Q K^T: each K fragment serves the warp's kRowTiles row tiles.
    float s[kRowTiles][kSTiles][4];
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[rt][t][i] = 0.0f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      if constexpr (!L::kQInRegisters) {
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          ldmatrix<4, false>(q_frag[rt][0],
                             tiles::a_fragment_row<QTile>(q_tile, warp * kWarpRows + rt * 16, ks * 16, lane));
        }
      }
      const int qs = L::kQInRegisters ? ks : 0;
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t kb[4];
        ldmatrix<4, false>(kb, tiles::b_fragment_row_nk<KVTile>(k_tile, np * 16, ks * 16, lane));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          mma_m16n8k16<T>(s[rt][2 * np], q_frag[rt][qs], b0, s[rt][2 * np]);
          mma_m16n8k16<T>(s[rt][2 * np + 1], q_frag[rt][qs], b1, s[rt][2 * np + 1]);
        }
      }
    }

    const int n0 = j * kBlockN;
    if (n0 + kBlockN > seq.length) {
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) mask_keys_past_sequence(s[rt], n0, seq.length, pair);
    }
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) online_softmax_tile(s[rt], o[rt], row_max[rt], row_sum[rt], scale_log2);

    if (dropout) {
      static_assert(kSTiles == 8, "dropout_c_fragments takes a 16 x 64 block");
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        tiles::dropout_c_fragments(s[rt], seed, static_cast<uint32_t>(rows.b), static_cast<uint32_t>(rows.h),
                                   warp_m0 + rt * 16, n0, shape.dropout_threshold, lane);
      }
    }

    // O += P V, P's C fragments reused as A fragments; each V fragment serves the kRowTiles row tiles.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t p_frag[kRowTiles][4];
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) tiles::c_fragments_to_a<T>(p_frag[rt], s[rt][2 * ks], s[rt][2 * ks + 1]);
#pragma unroll
      for (int dp = 0; dp < kOTiles / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix<4, true>(vb, tiles::b_fragment_row_kn<KVTile>(v_tile, ks * 16, dp * 16, lane));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt) {
          mma_m16n8k16<T>(o[rt][2 * dp], p_frag[rt], b0, o[rt][2 * dp]);
          mma_m16n8k16<T>(o[rt][2 * dp + 1], p_frag[rt], b1, o[rt][2 * dp + 1]);
        }
      }
    }
  }

  write_rows<QTile, kHeadDim, kRowTiles>(o, row_max, row_sum, q_tile, warp * kWarpRows, rows.out, rows.lse, seq,
                                         warp_m0, shape, lane);
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_forward_device
