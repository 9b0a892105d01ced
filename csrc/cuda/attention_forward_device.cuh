// Fused multi-head attention forward (FlashAttention-2 style, tensor cores): torch-free device code built by nvcc
// and, against the SIMT emulation, by the host compiler (simt/simt.cuh). Contract: cuda/attention_launch.h.
//
// Tiling. A block of 4 warps owns 64 query rows of one (sequence, head), 16 rows per warp (one mma M); grid
// (ceil(max_seqlen / 64), batch * heads). The Q tile goes global -> shared (cp.async) -> registers (ldmatrix) once
// and stays in A fragments. The block then walks the sequence's keys in tiles of 64: K and V tiles are
// double-buffered in shared memory with cp.async (tile j + 1 is in flight while tile j is computed, one
// __syncthreads per tile). Per warp and key tile:
//   S (16x64, fp32 C fragments) = Q K^T          D/16 x 4 ldmatrix.x4 of K, D/16 x 8 mma
//   columns >= seqlen -> -inf (last tile only); online softmax per row in fp32: running max m, rescale
//   factor exp2((m_old - m_new) * scale * log2 e) on the accumulator and the running sum, P = exp2(S * c - m * c)
//   (scale and log2 e folded into one FFMA); the row sum takes P before dropout; Philox dropout zeroes entries
//   of P (1 / (1 - p) is applied once at the end)
//   O (16xD) += P V                               P's C fragments become A fragments in registers (no shared
//                                                 memory round trip), V by ldmatrix.x4.trans, D/8 x 4 mma
// The end: the quad (4 lanes of a row) reduces the row sums, O *= dropout_scale / l, lse = m * scale + ln l;
// each warp stages its O rows as T in its own (already consumed) rows of the Q tile and writes them with
// 16-byte coalesced stores; rows >= seqlen are never written.
//
// Napkin math (per head: 4 T^2 D FLOPs = QK^T and PV, 2 T^2 D each; bytes = q, k, v read + out written,
// 4 T D x 2 B; lse 4 T B):
//   ELECTRA-Small, B=128, T=128, H=4, D=64: 2.15 GFLOP, 33.6 MB. Arithmetic intensity T / 2 = 64 FLOP/B, far
//     under an H100's ridge (~990 TFLOP/s / 3.35 TB/s ~ 300): memory/latency bound, ~10 us at the copy rate.
//     1,024 blocks of 128 threads (2 per head): ~2.6 waves at 3 blocks/SM on 132 SMs.
//   ELECTRA-Base, B=32, T=512, H=12, D=64: 25.8 GFLOP, 101 MB (K, V are re-read by the 8 query blocks of a
//     head, 128 KB per head: L2 hits). Intensity 256 FLOP/B: compute bound. mma.sync peaks ~660 TFLOP/s dense
//     bf16 on an H100 (wgmma's 990 is out of reach of m16n8k16): ~40 us; at 300-400 TFLOP/s, 65-85 us.
//     3,072 blocks: ~8 waves at 3 blocks/SM.
//   exp2: one MUFU op per score, 16/clk/SM, against 4 D = 256 mma FLOPs per score at D = 64, 4,096 FLOP/clk/SM
//     of tensor cores: both 1/16 clk per score, so the softmax's exp2 co-limits at D = 64 (FA3 overlaps them
//     with wgmma; with mma.sync the warps of other resident blocks interleave them).
//   Dropout: the contract draws one 32-bit Philox word per entry, one Philox4x32-10 (~80 integer ops) per 4
//     entries, shared by lane pairs (attention_tiles.cuh): ~20 ALU issue slots per score against 128/clk/SM,
//     ~0.16 clk per score: with dropout the forward is bound by Philox integer math, ~2.5x the mma time.
//     (FlashAttention takes 8-bit draws, 16 per Philox call, for this reason.)
// Shared memory per block: (64 Q + 2 x 64 K + 2 x 64 V) rows x (D + 8) x 2 B = 25,600 B (D=32), 46,080 B
//   (D=64, under the 48 KB default: no opt-in), 87,040 B (D=128, opt-in; 2 blocks per H100 SM).
// Registers per lane: Q A fragments D/4, O accumulators D/2 fp32, S/P 32 fp32, m and l 4 (84 at D=64) plus
//   addresses and the loaded K/V fragments. ptxas (CUDA 13, sm_90, no spills): 128 / 168 / 252 registers at
//   D = 32 / 64 / 128 under the __launch_bounds__ below: 4 / 3 / 2 resident blocks per SM.
// Why this tiling: 16 query rows per warp with 64-key tiles keeps S and P (32 floats) in registers next to O;
//   64 rows per block shares each K/V tile's shared-memory load among 4 warps while giving T/64 blocks per head
//   (enough blocks for ELECTRA-Small's T=128). Its cost: each warp reads the whole K and V tile from shared
//   memory per 16 rows (32 ldmatrix.x4 = 16 KB per 64 mma at D=64, ~4 clk per ldmatrix.x4 at 128 B/clk/SM
//   against ~1.5 clk per mma.sync at H100 rates), so shared-memory bandwidth, not the tensor cores, bounds the
//   inner loop near ~75% of mma.sync peak; 32 rows per warp (kBlockM = 128, FlashAttention-2's choice) would
//   halve that at ~255 registers and half the blocks.
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
constexpr int kBlockM = 64;   // query rows per block, 16 per warp
constexpr int kBlockN = 64;   // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
// Resident blocks per SM that __launch_bounds__ asks registers for (65,536 / (128 threads x blocks)): unbounded,
// ptxas took 162 / 205 / 254 registers at D = 32 / 64 / 128 (sm_90, hoisting ldmatrix loads); bounded, D = 32 fits
// 128 and D = 64 fits 168 without spills (at 128 it spills), D = 128 needs its ~254.
template <int kHeadDim>
constexpr int kMinBlocks = kHeadDim <= 32 ? 4 : kHeadDim <= 64 ? 3 : 2;

template <int kHeadDim>
struct Layout {
  using QTile = tiles::PaddedTile<kBlockM, kHeadDim>;
  using KVTile = tiles::PaddedTile<kBlockN, kHeadDim>;
  // Q, then K buffers 0 and 1, then V buffers 0 and 1 (elements of T).
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = QTile::kElements;
  static constexpr int kVOffset = kKOffset + 2 * KVTile::kElements;
  static constexpr int kElements = kVOffset + 2 * KVTile::kElements;
  static constexpr size_t kSharedBytes = size_t(kElements) * 2;
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kHeadDim>) forward_kernel(AttentionForwardArgs args) {
  using L = Layout<kHeadDim>;
  using QTile = typename L::QTile;
  using KVTile = typename L::KVTile;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps of S = Q K^T
  constexpr int kSTiles = kBlockN / 8;     // n-tiles of S
  constexpr int kOTiles = kHeadDim / 8;    // n-tiles of O

  const AttentionShape& shape = args.shape;
  const int bh = blockIdx.y + gridDim.y * blockIdx.z;
  if (bh >= shape.batch * shape.heads) return;
  const int b = bh / shape.heads, h = bh % shape.heads;
  const tiles::SequenceExtent seq =
      tiles::sequence_extent(shape.starts, shape.seqlens, b, shape.max_seqlen, shape.tokens);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.length) return;  // the whole block: no barrier is skipped by part of it

  ELECTRA_DYNAMIC_SHARED(uint4, shared_raw);
  T* const shared = reinterpret_cast<T*>(shared_raw);
  T* const q_tile = shared + L::kQOffset;
  T* const k_tiles = shared + L::kKOffset;
  T* const v_tiles = shared + L::kVOffset;

  const int thread = threadIdx.x, warp = thread / tiles::kWarpSize, lane = thread % tiles::kWarpSize;
  const int group = lane / 4, pair = lane % 4;

  const T* const q = static_cast<const T*>(args.q.data) + (seq.start + m0) * args.q.token_stride +
                     int64_t(h) * args.q.head_stride;
  const T* const k = static_cast<const T*>(args.k.data) + seq.start * args.k.token_stride +
                     int64_t(h) * args.k.head_stride;
  const T* const v = static_cast<const T*>(args.v.data) + seq.start * args.v.token_stride +
                     int64_t(h) * args.v.head_stride;
  const int n_tiles = (seq.length + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int j) {
    const int n0 = j * kBlockN, valid = seq.length - n0;
    tiles::load_tile_async<kBlockN, kHeadDim, kThreads>(k_tiles + (j % 2) * KVTile::kElements,
                                                        k + n0 * args.k.token_stride, args.k.token_stride, valid,
                                                        thread);
    tiles::load_tile_async<kBlockN, kHeadDim, kThreads>(v_tiles + (j % 2) * KVTile::kElements,
                                                        v + n0 * args.v.token_stride, args.v.token_stride, valid,
                                                        thread);
  };

  tiles::load_tile_async<kBlockM, kHeadDim, kThreads>(q_tile, q, args.q.token_stride, seq.length - m0, thread);
  load_kv(0);
  cp_async_commit();

  const bool dropout = shape.dropout_threshold > 0;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*shape.seed) : 0;
  const float scale_log2 = shape.softmax_scale * kLog2e;

  float o[kOTiles][4];
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[t][i] = 0.0f;
  }
  // Rows group and group + 8 of the warp: running max of the raw scores and this lane's part of the row sum.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  uint32_t q_frag[kKSteps][4];

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<0>();
    __syncthreads();  // tile j visible to all; every warp is done with tile j - 1's buffers
    if (j == 0) {
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        ldmatrix<4, false>(q_frag[ks], tiles::a_fragment_row<QTile>(q_tile, warp * 16, ks * 16, lane));
      }
    }
    if (j + 1 < n_tiles) {
      load_kv(j + 1);
      cp_async_commit();
    }
    const T* const k_tile = k_tiles + (j % 2) * KVTile::kElements;
    const T* const v_tile = v_tiles + (j % 2) * KVTile::kElements;

    // S = Q K^T
    float s[kSTiles][4];
#pragma unroll
    for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[t][i] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t kb[4];
        ldmatrix<4, false>(kb, tiles::b_fragment_row_nk<KVTile>(k_tile, np * 16, ks * 16, lane));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_m16n8k16<T>(s[2 * np], q_frag[ks], b0, s[2 * np]);
        mma_m16n8k16<T>(s[2 * np + 1], q_frag[ks], b1, s[2 * np + 1]);
      }
    }

    const int n0 = j * kBlockN;
    if (n0 + kBlockN > seq.length) {  // the last, partial tile: keys past the sequence get no weight
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (n0 + 8 * t + 2 * pair + i % 2 >= seq.length) s[t][i] = -INFINITY;
        }
      }
    }

    // Online softmax. Every tile has a valid key, so the new maxima are finite.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[r];
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) tile_max = fmaxf(tile_max, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float max_scaled = tile_max * scale_log2;
      const float rescale = tiles::fast_exp2(row_max[r] * scale_log2 - max_scaled);  // 0 on the first tile
      row_max[r] = tile_max;
      float sum = 0.0f;
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = tiles::fast_exp2(s[t][2 * r + e] * scale_log2 - max_scaled);
          s[t][2 * r + e] = p;
          sum += p;
        }
      }
      row_sum[r] = row_sum[r] * rescale + sum;
#pragma unroll
      for (int t = 0; t < kOTiles; ++t) {
        o[t][2 * r] *= rescale;
        o[t][2 * r + 1] *= rescale;
      }
    }

    if (dropout) {
#pragma unroll
      for (int t = 0; t < kSTiles; ++t) {
        tiles::dropout_c_fragment(s[t], seed, static_cast<uint32_t>(b), static_cast<uint32_t>(h), m0 + warp * 16,
                                  n0 + 8 * t, shape.dropout_threshold, lane);
      }
    }

    // O += P V, P's C fragments reused as A fragments.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t p_frag[4];
      tiles::c_fragments_to_a<T>(p_frag, s[2 * ks], s[2 * ks + 1]);
#pragma unroll
      for (int dp = 0; dp < kOTiles / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix<4, true>(vb, tiles::b_fragment_row_kn<KVTile>(v_tile, ks * 16, dp * 16, lane));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_m16n8k16<T>(o[2 * dp], p_frag, b0, o[2 * dp]);
        mma_m16n8k16<T>(o[2 * dp + 1], p_frag, b1, o[2 * dp + 1]);
      }
    }
  }

  // Epilogue: normalise, lse, stage O in this warp's rows of the Q tile, write the sequence's rows.
  T* const o_stage = q_tile + warp * 16 * QTile::kRowStride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float factor = sum > 0.0f ? shape.dropout_scale / sum : 0.0f;
    const int row = group + 8 * r;
    if (pair == 0 && m0 + warp * 16 + row < seq.length) {
      args.lse[int64_t(h) * shape.tokens + seq.start + m0 + warp * 16 + row] =
          row_max[r] * shape.softmax_scale + logf(sum);
    }
    row_sum[r] = factor;
  }
  __syncwarp();  // this warp's ldmatrix reads of its Q rows are long done; make it explicit
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t packed = tiles::float2_to_pair<T>(o[t][2 * r] * row_sum[r], o[t][2 * r + 1] * row_sum[r]);
      *reinterpret_cast<uint32_t*>(QTile::at(o_stage, group + 8 * r, 8 * t + 2 * pair)) = packed;
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = kHeadDim / tiles::kChunkElements;
  T* const out = static_cast<T*>(args.out);
#pragma unroll
  for (int i = 0; i < 16 * kChunksPerRow / tiles::kWarpSize; ++i) {
    const int chunk = lane + i * tiles::kWarpSize;
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * tiles::kChunkElements;
    const int position = m0 + warp * 16 + row;
    if (position < seq.length) {
      const int64_t token = seq.start + position;
      *reinterpret_cast<uint4*>(out + (token * shape.heads + h) * kHeadDim + col) =
          *reinterpret_cast<const uint4*>(QTile::at(o_stage, row, col));
    }
  }
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_forward_device
