// Device code of the fused attention backward (FlashAttention-2 recomputation on tensor cores): torch-free, built
// by nvcc and, against the SIMT emulation, by the host compiler (simt/simt.cuh). Contract: cuda/attention_launch.h.
//
// Math, per (sequence, head), with Z~ = keep / (1 - p) the dropout factor and s = softmax_scale:
//   P = exp(s Q K^T - lse)             recomputed from the forward's lse, never stored
//   dV = (P o Z~)^T dO                 dP = (dO V^T) o Z~
//   dS = P o (dP - delta)              delta = rowsum(dO o out), by delta_kernel
//   dK = s dS^T Q                      dQ = s dS K
// Three kernels:
//   delta_kernel: delta = rowsum(dO o out) in fp32, [heads, tokens] (D / 8 lanes per row, shuffle sum); with a
//                 dQ workspace it also zeroes the workspace's sequence rows.
//   dkdv_kernel:  a block owns 64 keys (32 per warp at D <= 64, 16 at D=128; see Dkdv) and loops over query
//                 tiles: S^T = K Q^T, dP^T = V dO^T (the warp's keys are the rows of the mma), dV += P~^T dO,
//                 dK += dS^T Q; P~^T and dS^T go from the mma's accumulator fragments straight into A fragments
//                 (no shared-memory round trip); dO and Q as B operands come from ldmatrix.trans of their
//                 row-major tiles. With kAccumulateDq (the default) each warp also stages its dS^T in shared
//                 memory, and after the tile's last slice the block multiplies the tile's dS (kQ queries x 64
//                 keys, A fragments by ldmatrix.trans) by its K tile and adds the result to the fp32 workspace
//                 dq_accum with vector atomics (red.global.add.v2.f32 on sm_90): FlashAttention-2's 5 tile
//                 products, at the price of summing dQ over key blocks in the order blocks run.
//   then either dq_convert_kernel: dQ = s dq_accum as T (padding rows zero), one 16-byte chunk per thread;
//   or (torch.use_deterministic_algorithms, args.dq_accum null) dq_kernel: a block owns 64 queries (16 per warp)
//                 and loops over key tiles: S = Q K^T, dP = dO V^T, dQ += dS K (K through ldmatrix.trans). It
//                 recomputes S and dP: 7 tile products instead of 5 (1.4x the useful FLOPs), the price of
//                 determinism without atomics or a [key blocks, tokens, heads, D] fp32 scratch (400 MB at Base).
// On compute capability 9.0 in an sm_90a build, dkdv_kernel<.., true> at D = 64 gives way to the wgmma kernel of
// attention_backward_hopper_device.cuh (same math and element-wise step, all five products on wgmma).
// The dQ workspace at Base is [16384 tokens, 12, 64] fp32 = 50 MB next to the 75 MB gradient. Each dQ entry gets
//   T / 64 additions (8 at T = 512; FlashAttention-2's 128-key blocks make 4): 100 M at Base, 50 M v2
//   reductions. Per block and 32-query tile at D = 64 that is 1,024 reductions against 320 mma, 3.2 per mma,
//   as many instructions as FlashAttention-2's sm80 code issues (8,192 scalar atomics per 2,560 mma).
//
// Napkin math (bf16, H100 SXM: ~990 TFLOP/s dense tensor peak, ~3.35 TB/s HBM, 50 MB L2):
//   FLOPs: forward 4 T^2 D per (sequence, head); backward 2.5x that useful, 3.5x executed here.
//   ELECTRA-Small (B=128, T=128, H=4, D=64): forward 2.15 GFLOP, backward 5.4 useful / 7.5 executed GFLOP
//     (~8 us at peak). Bytes: one [tokens, H, D] tensor is 16384 x 256 x 2 = 8.4 MB; kernel 1 reads q, k, v, dO
//     and writes dk, dv, kernel 2 reads q, k, v, dO and writes dq: ~11 tensor passes = 92 MB (~28 us at HBM rate,
//     the second kernel's reads mostly hit L2). Memory and launch bound: 1024 blocks per kernel.
//   ELECTRA-Base (B=32, T=512, H=12, D=64): forward 25.8 GFLOP, backward 64 useful / 90 executed GFLOP
//     (~91 us at peak, ~200 us at a realistic 45% of it); bytes: 25 MB per tensor, ~280 MB (~85 us), and
//     Q/dO (kernel 1) or K/V (kernel 2) are re-read T/64 = 8 times per (sequence, head), from L2 (a head's
//     q, k, v, dO are 256 KB). Compute bound: the tensor pipe's efficiency is what counts.
//   delta_kernel reads dO and out once (50 MB at Base, ~15 us at HBM rate) and writes 0.8 MB; ATen's
//     (dO.float() * out.float()).sum(-1).t().contiguous() took 4-5 kernels and ~150 MB of fp32 temporaries.
//   Shared memory (D=64, 144-byte padded rows): kernel 1 (2 warps) holds K, V (18 KB) and double-buffered Q,
//     dO tiles of 32 rows (18 KB) plus lse/delta/dropout bits (0.5 KB) = 36.5 KB, 4 blocks per SM = 146 KB;
//     kernel 2 holds Q, dO (18 KB) and double-buffered 64-row K, V tiles (36 KB) + 1 KB = 55 KB. D=128:
//     kernel 1 keeps 4 warps and 32-row tiles (68.5 KB), kernel 2 32-row tiles (68.5 KB); D=32: 31 KB each.
//   Registers (ptxas 13.0, sm_90, no spills), D = 64 / 128 / 32: dkdv 243 / 242 / 243 with kAccumulateDq, 235 /
//     244 / 248 without; dq 168 at each D (bounded to 3 blocks per SM); delta 27, dq_convert 21. The dS^T stage
//     adds 5 KB of shared memory per dkdv block (9 KB at D = 32): 41.5 KB at D = 64, still 4 blocks per SM.
//     Registers, not shared memory, cap dkdv's residency at 8 warps per SM, dq's at 12. On an H200 at Base
//     (before kAccumulateDq) both kernels issued on only ~50% of the cycles, stalled on dependent instructions
//     (benchmarks/NOTES.md): the element-wise step, not the tensor cores, set their pace.
//   Shared-memory bandwidth is the next limit (an H100 SM reads 128 B/clock against a ~4096 FLOP/clock
//     tensor peak: 32 FLOP per shared byte to keep up). Kernel 1, D=64, per warp and 16-query slice of its
//     32 keys: 32 ldmatrix.x4 (K and V A fragments 8 + 8, Q and dO as B for S^T and dP^T 4 + 4, transposed
//     for dV and dK 4 + 4) for 64 mma.m16n8k16: 16 FLOP per shared byte; with 16 keys per warp it was 72 per
//     128 mma, 14 FLOP/byte. Each Q/dO fragment now feeds 2 mma's; K and V fragments are re-read per slice
//     because the 128 dK/dV accumulators leave no registers to hold them (64 more). Next steps: split the
//     products' N across warps with P/dS staged in shared memory (FlashAttention-2), or hold K/V in registers
//     at 32-query slices once dK/dV move to shared memory.
//   Why 64-key blocks: the accumulators (dK and dV: 2 x 16 kM x D fp32 per warp) live in registers and a warp
//     owns whole mma rows, so no accumulator is ever shared between warps; 64-row blocks give 8 x 384 = 3072
//     blocks at Base (over 5 waves on 132 SMs) and keep the tail small at Small and with padding.
//   Shared tiles are tiles::PaddedTile, as in the forward: rows padded by 16 bytes, so that ldmatrix's 8 row
//     addresses hit 8 distinct bank groups (unpadded 128-byte rows would be an 8-way conflict), and a fragment's
//     address is a per-lane base plus a compile-time offset. The XOR swizzle used before saved the padding's
//     12% of shared memory but recomputed 4-5 integer instructions per ldmatrix; padded, the sm_90 code has
//     23% (dkdv) and 32% (dq) fewer instructions at D=64 (3152 and 2224 in all, from 4080 and 3256; static
//     counts, no GPU run yet). cp.async fills the tiles without registers, the next tile's copy overlapping the
//     current tile's math.
// Dropout: a tile's keep bits are drawn once per block into shared memory (Philox gives 16 columns per call;
//   each thread draws 32 consecutive columns of one row, one 32-bit word of bits), then read once per row and
//   32 keys by the element-wise step.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/philox.h"
#include "cuda/attention_launch.h"
#include "cuda/attention_tiles.cuh"
#include "simt/primitives.cuh"

namespace electra_ext::ELECTRA_BACKEND::attention_backward_device {

namespace tiles = attention_tiles;

constexpr int kWarpSize = 32;
constexpr int kDkdvBlockKeys = 64;    // keys per dK/dV block (multiple of 32: whole dropout words per row)
constexpr int kDqBlockQueries = 64;  // queries per dQ block
constexpr int kDqWarps = 4;          // dq_kernel: 16 queries (the mma's M) per warp (32 measured no faster on an H200)
constexpr float kLog2e = 1.4426950408889634f;

// dkdv_kernel's shape per head dim. Each warp owns kM * 16 keys, so every Q or dO fragment it loads from shared
// memory feeds kM mma's; its dK and dV accumulators are 2 x kM x 16 x D fp32 (kM * D per thread: 128 at D=64
// with kM = 2, as at D=128 with kM = 1, the most that fits). A block is kDkdvBlockKeys keys (2 warps at kM = 2),
// looping over tiles of kQ queries, processed kSlice queries at a time: S^T and dP^T of a slice take
// 2 x kM x kSlice / 2 fp32 per thread next to the accumulators. kUnrollK: k-slices of S^T, dP^T unrolled; fully
// unrolled at D=64, ptxas loads later k-slices' fragments ahead and spills (sm_90: 16 bytes).
template <int D>
struct Dkdv {
  static constexpr int kM = D >= 128 ? 1 : 2;
  static constexpr int kWarps = kDkdvBlockKeys / (16 * kM);
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kQ = D >= 64 ? 32 : 64;
  static constexpr int kSlice = kM == 1 ? kQ : kQ / 2;
  static constexpr int kUnrollK = D == 64 ? 2 : D / 16;
};

// Rows of the key tiles dq_kernel loops over.
template <int D>
constexpr int dq_inner_rows() {
  return D >= 128 ? 32 : 64;
}

// Shared tiles are tiles::PaddedTile rows of D elements (cuda/mma_tiles.cuh: rows padded by 16 bytes, so the
// 8 rows one ldmatrix matrix reads fall in 8 different bank groups); only the row stride matters for addressing,
// so one type addresses tiles of any row count.
template <int D>
using Rows = tiles::PaddedTile<kDkdvBlockKeys, D>;

// Element offset of tile row `row` (the first row of a slice, or of the next buffer of a double-buffered tile).
template <int D>
constexpr int row_offset(int row) {
  return row * Rows<D>::kRowStride;
}

__device__ __forceinline__ tiles::SequenceExtent sequence_of(const AttentionShape& s, int b) {
  return tiles::sequence_extent(s.starts, s.seqlens, b, s.max_seqlen, s.tokens);
}

// Head h's rows of the sequence starting at token `start` in one of the gradients.
template <typename T, int D>
__device__ __forceinline__ T* gradient_rows(void* gradient, const AttentionBackwardArgs& args, int64_t start, int h) {
  return static_cast<T*>(gradient) + start * args.grad_token_stride + h * D;
}

// Rows row0 .. row0 + kRows - 1 of a [len, D] matrix (row stride `stride` elements, row 0 at `base`) into a
// padded shared tile; rows >= len are zero-filled and not read. One cp.async group's worth (not committed).
template <int D, int kRows, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t stride, int row0, int len) {
  tiles::load_tile_async<kRows, D, kThreads>(tile, base + row0 * stride, stride, len - row0, threadIdx.x);
}

template <typename T>
__device__ __forceinline__ void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  mma_m16n8k16<T>(d0, a, b0, d0);
  mma_m16n8k16<T>(d1, a, b1, d1);
}

// acc[m][16 x kN] += A (16 x D, rows row0 + 16 m.. of tile_a) * B^T, B's rows n = 0 .. kN - 1 of tile_b (both
// [rows][D]). Each B fragment is loaded once for the kM row slices. kUnroll: k-slices unrolled (see Dkdv).
template <typename T, int D, int kM, int kN, int kUnroll = D / 16>
__device__ __forceinline__ void product_abt(float (&acc)[kM][kN / 8][4], const T* tile_a, int row0,
                                            const T* tile_b) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll(kUnroll)
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[kM][4];
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      ldmatrix<4, false>(a[m], tiles::a_fragment_row<Rows<D>>(tile_a, row0 + 16 * m, 16 * kk, lane));
    }
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t b[4];
      ldmatrix<4, false>(b, tiles::b_fragment_row_nk<Rows<D>>(tile_b, 16 * nn, 16 * kk, lane));
#pragma unroll
      for (int m = 0; m < kM; ++m) mma_pair<T>(acc[m][2 * nn], acc[m][2 * nn + 1], a[m], b);
    }
  }
}

// One k-step of acc[m][16 x kN] += A[m] (16 x 16, as A fragments) * B, B = rows k0 .. k0 + 15 and columns
// col0 .. col0 + kN - 1 of tile_b ([k][D] rows, B fragments by ldmatrix.trans); each B fragment is loaded once
// for the kM row slices.
template <typename T, int D, int kM, int kN>
__device__ __forceinline__ void mma_k_step_kn(float (&acc)[kM][kN / 8][4], const uint32_t (&a)[kM][4],
                                              const T* tile_b, int k0, int col0) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int dn = 0; dn < kN / 16; ++dn) {
    uint32_t b[4];
    ldmatrix<4, true>(b, tiles::b_fragment_row_kn<Rows<D>>(tile_b, k0, col0 + 16 * dn, lane));
#pragma unroll
    for (int m = 0; m < kM; ++m) mma_pair<T>(acc[m][2 * dn], acc[m][2 * dn + 1], a[m], b);
  }
}

// acc[m][16 x D] += X[m] (16 x kK, held as mma accumulator fragments) * B, B = rows 0 .. kK - 1 of tile_b
// ([kK][D]). Accumulator fragments of n-tiles 2j, 2j + 1 are exactly the A fragment of k-slice j.
template <typename T, int D, int kM, int kK>
__device__ __forceinline__ void product_xb(float (&acc)[kM][D / 8][4], const float (&x)[kM][kK / 8][4],
                                           const T* tile_b) {
#pragma unroll
  for (int j = 0; j < kK / 16; ++j) {
    uint32_t a[kM][4];
#pragma unroll
    for (int m = 0; m < kM; ++m) tiles::c_fragments_to_a<T>(a[m], x[m][2 * j], x[m][2 * j + 1]);
    mma_k_step_kn<T, D, kM, D>(acc, a, tile_b, 16 * j, 0);
  }
}

// Dropout keep bits of queries row0 .. row0 + kRows - 1 and keys col0 .. col0 + kCols - 1 (col0 a multiple of 32):
// bit (key % 32) of bits[query * (kCols / 32) + key / 32], one word (two 16-column Philox calls) per thread at a
// time. Positions past the sequence draw harmless bits.
template <int kRows, int kCols, int kThreads>
__device__ __forceinline__ void dropout_bits(uint32_t* bits, uint64_t seed, int b, int h, int row0, int col0,
                                             uint32_t threshold) {
  constexpr int kWordsPerRow = kCols / 32;
  for (int w = threadIdx.x; w < kRows * kWordsPerRow; w += kThreads) {
    const int r = w / kWordsPerRow;
    const auto chunk = static_cast<uint32_t>((col0 + 32 * (w % kWordsPerRow)) / philox::kDropoutColumnsPerCall);
    uint32_t word = 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const philox::Words x = philox::attention_dropout_words(seed, uint32_t(b), uint32_t(h), uint32_t(row0 + r),
                                                              chunk + half);
      word |= philox::dropout_keep_bits(x, threshold) << (16 * half);
    }
    bits[w] = word;
  }
}

// The element-wise steps of both kernels. Whether the tile has dropout and whether some of its keys lie past the
// sequence are uniform over a tile, so they are template switches and the common tile (no dropout, every key
// inside) runs no per-element test: an FFMA and one MUFU.EX2 for P (exp2_ftz: exp2f's subnormal fix-up would add
// 3 FP32 instructions per score, for P entries below 2^-126 that no sum can see), then 2 for dS. The keep bits of
// a row are read once per tile (one 32-bit word per 32 keys). Keys past the sequence are zero rows of K: their P
// is zeroed (exp(-lse) can overflow fp16).

// f(kDropout, kMaskKeys) with the two as std::bool_constant: the tile-uniform switches made compile-time.
template <typename F>
__device__ __forceinline__ void with_tile_switches(bool dropout, bool mask_keys, F&& f) {
  if (dropout) {
    if (mask_keys) f(std::true_type{}, std::true_type{}); else f(std::true_type{}, std::false_type{});
  } else {
    if (mask_keys) f(std::false_type{}, std::true_type{}); else f(std::false_type{}, std::false_type{});
  }
}

// dkdv_kernel, one kSlice-query slice: rows are the warp's keys (slice m: warp_key0 + 16 m + group, + 8),
// columns the queries q1 + 8 n + 2 pair (+ 1). In place: st <- (P o Z~)^T, dpt <- dS^T = P^T o (dP^T o Z~ -
// delta). lse (pre-scaled by log2 e) and delta are per query of the tile; bits: [tile queries][kDkdvBlockKeys /
// 32] words.
template <bool kDropout, bool kMaskKeys, int kM, int kSlice>
__device__ __forceinline__ void dkdv_elementwise(float (&st)[kM][kSlice / 8][4], float (&dpt)[kM][kSlice / 8][4],
                                                 float scale_log2, float dropout_scale, const float* lse,
                                                 const float* delta, const uint32_t* bits, int q1, int warp_key0,
                                                 int valid_keys) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, pair = lane % 4;
#pragma unroll
  for (int n = 0; n < kSlice / 8; ++n) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int query = q1 + 8 * n + 2 * pair + c;
      const float lse_q = lse[query], delta_q = delta[query];
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const int key16 = warp_key0 + 16 * m;  // the slice's first key; its 16 keys share a keep word
        const uint32_t keep =
            kDropout ? bits[query * (kDkdvBlockKeys / 32) + key16 / 32] >> (key16 % 32 + group) : 0u;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 2 * half + c;
          float p = exp2_ftz(st[m][n][i] * scale_log2 - lse_q);
          if (kMaskKeys && key16 + group + 8 * half >= valid_keys) p = 0.0f;
          const float z = kDropout ? ((keep >> (8 * half)) & 1u ? dropout_scale : 0.0f) : 1.0f;
          st[m][n][i] = p * z;
          dpt[m][n][i] = p * (dpt[m][n][i] * z - delta_q);
        }
      }
    }
  }
}

// dq_kernel, one kK-key tile: rows are the warp's 16 queries (the thread's two: warp_query0 + group, + 8, with
// row_lse pre-scaled by log2 e and row_delta), columns the keys 8 n + 2 pair (+ 1). In place: dp <- dS = P o
// (dP o Z~ - delta). bits: [kDqBlockQueries][kK / 32] words.
template <bool kDropout, bool kMaskKeys, int kK>
__device__ __forceinline__ void dq_elementwise(float (&dp)[1][kK / 8][4], const float (&st)[1][kK / 8][4],
                                               float scale_log2, float dropout_scale, const float (&row_lse)[2],
                                               const float (&row_delta)[2], const uint32_t* bits, int warp_query0,
                                               int valid_keys) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, pair = lane % 4;
  uint32_t keep[2][kK / 32];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int w = 0; w < kK / 32; ++w) {
      keep[half][w] = kDropout ? bits[(warp_query0 + group + 8 * half) * (kK / 32) + w] : 0u;
    }
  }
#pragma unroll
  for (int n = 0; n < kK / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = 8 * n + 2 * pair + i % 2, half = i / 2;
      float p = exp2_ftz(st[0][n][i] * scale_log2 - row_lse[half]);
      if (kMaskKeys && key >= valid_keys) p = 0.0f;
      const float z = kDropout ? ((keep[half][key / 32] >> (key % 32)) & 1u ? dropout_scale : 0.0f) : 1.0f;
      dp[0][n][i] = p * (dp[0][n][i] * z - row_delta[half]);
    }
  }
}

// A warp's accumulator fragments acc[m][n] (rows row0 + 16 m + group and + 8, columns col0 + 8 n + 2 pair and
// + 1), times `scale`, as T into the padded tile `tile` (Tile's row stride).
template <typename Tile, typename T, int kM, int kN>
__device__ __forceinline__ void store_c_fragments(const float (&acc)[kM][kN][4], float scale, T* tile, int row0,
                                                  int col0) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, pair = lane % 4;
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        T* const entry = Tile::at(tile, row0 + 16 * m + group + 8 * half, col0 + 8 * n + 2 * pair);
        *reinterpret_cast<uint32_t*>(entry) =
            tiles::float2_to_pair<T>(acc[m][n][2 * half] * scale, acc[m][n][2 * half + 1] * scale);
      }
    }
  }
}

// Writes rows 0 .. kRows - 1 of the per-warp accumulators (warp w: rows 16 kM w .. + 16 kM - 1, slice m
// of them in acc[m]), times `scale`, as T into the tile `stage` (Tile layout), then (after a barrier) rows
// row0 + r < len to dst (row stride `stride`) with 16-byte stores, and rows len <= row0 + r < rows (the padded
// layout's padding) as zeros. The caller's last barrier must precede (stage may alias tiles still being read).
template <typename T, int D, int kM, int kThreads, typename Tile = Rows<D>>
__device__ __forceinline__ void store_rows(const float (&acc)[kM][D / 8][4], float scale, T* stage, T* dst,
                                           int64_t stride, int row0, int len, int rows) {
  store_c_fragments<Tile>(acc, scale, stage, 16 * kM * (threadIdx.x / kWarpSize), 0);
  __syncthreads();
  constexpr int kRows = kThreads / kWarpSize * 16 * kM, kChunks = D / 8;
  const uint4 zero = {0u, 0u, 0u, 0u};
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    if (row0 + r < rows) {
      *reinterpret_cast<uint4*>(dst + int64_t(row0 + r) * stride + c * 8) =
          row0 + r < len ? *reinterpret_cast<const uint4*>(Tile::at(stage, r, 8 * c)) : zero;
    }
  }
}

// Adds a warp's dQ sums for queries query0 + group and + 8 (those < len), columns col0 + 8 n + 2 pair and + 1,
// to dq_rows (row stride `stride` floats) with vector atomics.
template <int kN>
__device__ __forceinline__ void add_dq_rows(const float (&dq)[kN][4], float* dq_rows, int64_t stride, int query0,
                                            int col0, int len) {
  const int lane = threadIdx.x % kWarpSize, group = lane / 4, pair = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int query = query0 + group + 8 * half;
    if (query >= len) continue;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      red_add_f32x2(dq_rows + query * stride + col0 + 8 * n + 2 * pair, dq[n][2 * half], dq[n][2 * half + 1]);
    }
  }
}

// dkdv_kernel<.., kAccumulateDq = true>: the block's dS^T of one query tile, [keys][kQ queries] as T, staged
// for the dQ product (80-byte rows at kQ = 32: a lane quad's 4-byte stores of 8 rows hit 32 distinct banks).
template <int D>
using DsTile = tiles::PaddedTile<kDkdvBlockKeys, Dkdv<D>::kQ>;

// dQ of the tile's queries q0 .. q0 + kQ - 1 from the block's keys, dS (kQ x keys, read transposed from the
// DsTile) times K (keys x D), added to dq_rows (row stride `stride` floats; rows q0 + r < len only) with vector
// atomics; dq_convert_kernel applies softmax_scale when it converts the sums. The kQ / 16 query tiles and
// D columns are split over the block's warps so that each warp holds 16 x 64 or 32 x 32 sums (32 registers).
template <typename T, int D>
__device__ __forceinline__ void accumulate_dq(const T* ds_t, const T* k_tile, float* dq_rows, int64_t stride, int q0,
                                              int len) {
  constexpr int kWarps = Dkdv<D>::kWarps, kQTiles = Dkdv<D>::kQ / 16;
  constexpr int kWarpsPerQTile = kWarps > kQTiles ? kWarps / kQTiles : 1;
  constexpr int kQTilesPerWarp = kQTiles * kWarpsPerQTile / kWarps;
  constexpr int kCols = D / kWarpsPerQTile;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int qtile0 = warp / kWarpsPerQTile * kQTilesPerWarp, col0 = warp % kWarpsPerQTile * kCols;
  float dq[kQTilesPerWarp][kCols / 8][4] = {};
#pragma unroll
  for (int kk = 0; kk < kDkdvBlockKeys / 16; ++kk) {
    uint32_t a[kQTilesPerWarp][4];
#pragma unroll
    for (int i = 0; i < kQTilesPerWarp; ++i) {
      ldmatrix<4, true>(a[i], tiles::a_fragment_row_km<DsTile<D>>(ds_t, 16 * kk, 16 * (qtile0 + i), lane));
    }
    mma_k_step_kn<T, D, kQTilesPerWarp, kCols>(dq, a, k_tile, 16 * kk, col0);
  }
#pragma unroll
  for (int i = 0; i < kQTilesPerWarp; ++i) add_dq_rows(dq[i], dq_rows, stride, q0 + 16 * (qtile0 + i), col0, len);
}

// Dynamic shared memory of either kernel with kOwn rows of its own and inner tiles of kInner rows.
template <int D, int kOwn, int kInner>
constexpr size_t shared_bytes() {
  return size_t(2) * row_offset<D>(kOwn) * 2      // the block's own two tiles (K, V or Q, dO)
         + size_t(4) * row_offset<D>(kInner) * 2  // two double-buffered inner tiles
         + size_t(2) * kInner * sizeof(float)     // lse, delta of the inner tile (kernel 1)
         + size_t(kOwn) * kInner / 8;             // dropout bits
}

template <int D, bool kAccumulateDq>
constexpr size_t dkdv_shared_bytes() {
  return shared_bytes<D, kDkdvBlockKeys, Dkdv<D>::kQ>() + (kAccumulateDq ? size_t(DsTile<D>::kElements) * 2 : 0);
}

template <int D>
constexpr size_t dq_shared_bytes() {
  return shared_bytes<D, kDqBlockQueries, dq_inner_rows<D>()>();
}

// delta_kernel and dq_convert_kernel: D / 8 threads per row (token), one 16-byte chunk each, kDeltaTokens<D> rows
// per block; grid (row blocks, heads, batch).
constexpr int kDeltaThreads = 256;
template <int D>
constexpr int kDeltaTokens = kDeltaThreads / (D / 8);

// Such a thread's row (token of sequence blockIdx.z, head blockIdx.y) and chunk; `offset` is the chunk's element
// offset in a contiguous [tokens, heads, D] tensor.
struct RowChunk {
  tiles::SequenceExtent seq;
  int h, first_token, token, chunk;  // first_token: the block's first row
  int64_t offset;
};

template <int D>
__device__ __forceinline__ RowChunk row_chunk(const AttentionShape& s) {
  RowChunk t;
  t.seq = sequence_of(s, blockIdx.z);
  t.h = blockIdx.y;
  t.first_token = blockIdx.x * kDeltaTokens<D>;
  t.token = t.first_token + threadIdx.x / (D / 8);
  t.chunk = threadIdx.x % (D / 8);
  t.offset = (t.seq.start + t.token) * int64_t(s.heads) * D + t.h * D + t.chunk * 8;
  return t;
}

// Kernel 0: delta = rowsum(dO o out) in fp32 for the tokens blockIdx.x * kDeltaTokens<D> .. of sequence
// blockIdx.z, head blockIdx.y. The D / 8 lanes of a row reduce with shuffles; a block's writes are kDeltaTokens
// consecutive floats of delta's row h.
template <typename T, int D>
__global__ void __launch_bounds__(kDeltaThreads) delta_kernel(const AttentionBackwardArgs args) {
  constexpr int kChunks = D / 8;
  const AttentionShape& s = args.shape;
  const RowChunk t = row_chunk<D>(s);
  const tiles::SequenceExtent& seq = t.seq;
  if (t.first_token >= seq.length) return;  // whole blocks only: the shuffles below take every lane
  const int64_t offset = t.offset;
  float sum = 0.0f;
  if (t.token < seq.length) {
    const uint4 d = *reinterpret_cast<const uint4*>(static_cast<const T*>(args.grad_out) + offset);
    const uint4 o = *reinterpret_cast<const uint4*>(static_cast<const T*>(args.out) + offset);
    if (args.dq_accum != nullptr) {  // the rows dkdv_kernel adds dQ to start at zero (no fill kernel)
      const uint4 zero = {0u, 0u, 0u, 0u};
      reinterpret_cast<uint4*>(args.dq_accum + offset)[0] = zero;
      reinterpret_cast<uint4*>(args.dq_accum + offset)[1] = zero;
    }
    const uint32_t dw[4] = {d.x, d.y, d.z, d.w}, ow[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      sum += element_to_float(pair_element<T>(dw[i / 2], i % 2)) *
             element_to_float(pair_element<T>(ow[i / 2], i % 2));
    }
  }
#pragma unroll
  for (int lanes = kChunks / 2; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
  if (t.token < seq.length && t.chunk == 0) args.delta[int64_t(t.h) * s.tokens + seq.start + t.token] = sum;
}

// ---- Pieces shared with the Hopper (wgmma) dK/dV kernel of attention_backward_hopper_device.cuh. ----

// A dK/dV block whose first key lies past the sequence: padding keys at most (padded layout), whose dK and dV
// rows are written as zeros. Returns whether the block is such a one (then it is done).
template <typename T, int D, int kThreads>
__device__ __forceinline__ bool write_padding_keys(const AttentionBackwardArgs& args, const tiles::SequenceExtent& seq,
                                                   int h, int key0) {
  if (key0 < seq.length) return false;
  const int last = key0 + kDkdvBlockKeys < seq.rows ? key0 + kDkdvBlockKeys : seq.rows;
  tiles::zero_rows<D, kThreads>(gradient_rows<T, D>(args.grad_k, args, seq.start, h), args.grad_token_stride, key0,
                                last, threadIdx.x);
  tiles::zero_rows<D, kThreads>(gradient_rows<T, D>(args.grad_v, args, seq.start, h), args.grad_token_stride, key0,
                                last, threadIdx.x);
  return true;
}

// Head h's rows of the sequence in q, k, v, grad_out (row stride dout_stride), lse and delta.
template <typename T>
struct HeadRows {
  const T *q, *k, *v, *dout;
  int64_t dout_stride;
  const float *lse, *delta;
};

template <typename T, int D>
__device__ __forceinline__ HeadRows<T> head_rows(const AttentionBackwardArgs& args, const tiles::SequenceExtent& seq,
                                                 int h) {
  const AttentionShape& s = args.shape;
  HeadRows<T> r;
  r.q = static_cast<const T*>(args.q.data) + seq.start * args.q.token_stride + h * args.q.head_stride;
  r.k = static_cast<const T*>(args.k.data) + seq.start * args.k.token_stride + h * args.k.head_stride;
  r.v = static_cast<const T*>(args.v.data) + seq.start * args.v.token_stride + h * args.v.head_stride;
  r.dout_stride = int64_t(s.heads) * D;
  r.dout = static_cast<const T*>(args.grad_out) + seq.start * r.dout_stride + h * D;
  r.lse = args.lse + int64_t(h) * s.tokens + seq.start;
  r.delta = args.delta + int64_t(h) * s.tokens + seq.start;
  return r;
}

// One query's lse and delta as read from global memory by thread threadIdx.x of a dK/dV kernel (query q0 +
// threadIdx.x of a tile; threads past the tile or the sequence read nothing). Loaded a tile ahead of
// stage_query_tile, which is their first use: an L2 hit costs ~300 cycles, which every tile's start would
// otherwise wait for (the block's warps all stage and then meet at a barrier), and which the loads in flight now
// spend under the previous tile's products.
struct QueryValues {
  float lse = 0.0f, delta = 0.0f;
  bool valid = false;
};

template <int kQ, int kThreads, typename T>
__device__ __forceinline__ QueryValues load_query_values(const HeadRows<T>& rows, int q0, int len) {
  static_assert(kQ <= kThreads, "one query per thread");
  QueryValues v;
  const int q = q0 + static_cast<int>(threadIdx.x);
  v.valid = threadIdx.x < kQ && q < len;
  if (v.valid) {  // predicated loads into zeroed registers: nothing waits for them until stage_query_tile
    v.lse = rows.lse[q];
    v.delta = rows.delta[q];
  }
  return v;
}

// A dK/dV kernel's per-query-tile values in shared memory: lse (times log2 e; +inf past the sequence, so that P is
// 0 there) and delta of queries q0 .. q0 + kQ - 1 from `v` (load_query_values of this tile), and with dropout the
// keep bits of those queries and the block's kDkdvBlockKeys keys from key0. Read after the caller's next barrier.
template <int kQ, int kThreads>
__device__ __forceinline__ void stage_query_tile(float* s_lse, float* s_delta, uint32_t* s_bits, const QueryValues& v,
                                                 const AttentionShape& s, uint64_t seed, int b, int h, int q0,
                                                 int key0) {
  if (threadIdx.x < kQ) {
    s_lse[threadIdx.x] = v.valid ? v.lse * kLog2e : INFINITY;
    s_delta[threadIdx.x] = v.valid ? v.delta : 0.0f;
  }
  if (s.dropout_threshold > 0) {
    dropout_bits<kQ, kDkdvBlockKeys, kThreads>(s_bits, seed, b, h, q0, key0, s.dropout_threshold);
  }
}

// Kernel 1: dK and dV of keys blockIdx.x * kDkdvBlockKeys .. of sequence blockIdx.z, head blockIdx.y; with
// kAccumulateDq also these keys' part of dQ, added to args.dq_accum.
template <typename T, int D, bool kAccumulateDq>
__global__ void __launch_bounds__(Dkdv<D>::kThreads) dkdv_kernel(const AttentionBackwardArgs args) {
  constexpr int kM = Dkdv<D>::kM, kQ = Dkdv<D>::kQ, kSlice = Dkdv<D>::kSlice, kThreads = Dkdv<D>::kThreads;
  const AttentionShape& s = args.shape;
  const int b = blockIdx.z, h = blockIdx.y, key0 = blockIdx.x * kDkdvBlockKeys;
  const tiles::SequenceExtent seq = sequence_of(s, b);
  if (write_padding_keys<T, D, kThreads>(args, seq, h, key0)) return;
  const int len = seq.length;

  ELECTRA_DYNAMIC_SHARED(uint4, attention_shared);
  T* sK = reinterpret_cast<T*>(attention_shared);
  T* sV = sK + row_offset<D>(kDkdvBlockKeys);
  T* sQ = sV + row_offset<D>(kDkdvBlockKeys);  // [2][kQ] rows
  T* sdO = sQ + row_offset<D>(2 * kQ);     // [2][kQ] rows
  T* sdS = sdO + row_offset<D>(2 * kQ);    // DsTile, with kAccumulateDq
  float* sLse = reinterpret_cast<float*>(sdS + (kAccumulateDq ? DsTile<D>::kElements : 0));
  float* sDelta = sLse + kQ;
  uint32_t* sBits = reinterpret_cast<uint32_t*>(sDelta + kQ);  // [kQ][64 / 32]

  const HeadRows<T> rows = head_rows<T, D>(args, seq, h);
  const int64_t row_stride = rows.dout_stride;

  load_tile<D, kDkdvBlockKeys, kThreads>(sK, rows.k, args.k.token_stride, key0, len);
  load_tile<D, kDkdvBlockKeys, kThreads>(sV, rows.v, args.v.token_stride, key0, len);
  load_tile<D, kQ, kThreads>(sQ, rows.q, args.q.token_stride, 0, len);
  load_tile<D, kQ, kThreads>(sdO, rows.dout, row_stride, 0, len);
  cp_async_commit();

  const bool dropout = s.dropout_threshold > 0;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*s.seed) : 0;
  const float dropout_scale = dropout ? s.dropout_scale : 1.0f;
  const float scale_log2 = s.softmax_scale * kLog2e;

  const int warp = threadIdx.x / kWarpSize;
  // The warp's keys (rows of its fragments): slice m holds 16 (kM warp + m) + group and + 8; past the sequence
  // (the sequence's last block only) their P is zeroed.
  const int warp_key0 = 16 * kM * warp;
  const int valid_keys = len - key0;

  float dv[kM][D / 8][4] = {}, dk[kM][D / 8][4] = {};
  const int tiles = (len + kQ - 1) / kQ;
  QueryValues next_values = load_query_values<kQ, kThreads>(rows, 0, len);
  for (int t = 0; t < tiles; ++t) {
    const int q0 = t * kQ;
    const QueryValues values = next_values;
    next_values = load_query_values<kQ, kThreads>(rows, q0 + kQ, len);
    if (t + 1 < tiles) {
      load_tile<D, kQ, kThreads>(sQ + row_offset<D>(((t + 1) & 1) * kQ), rows.q, args.q.token_stride, q0 + kQ, len);
      load_tile<D, kQ, kThreads>(sdO + row_offset<D>(((t + 1) & 1) * kQ), rows.dout, row_stride, q0 + kQ, len);
    }
    cp_async_commit();
    stage_query_tile<kQ, kThreads>(sLse, sDelta, sBits, values, s, seed, b, h, q0, key0);
    cp_async_wait<1>();
    __syncthreads();

    const T* cQ = sQ + row_offset<D>((t & 1) * kQ);
    const T* cdO = sdO + row_offset<D>((t & 1) * kQ);
    // kSlice queries at a time (see Dkdv): S^T and dP^T (rows = the warp's keys, columns = queries), then
    // dS^T = P^T o (dP^T o Z~ - delta), dV += (P^T o Z~) dO and dK += dS^T Q. Rows q1 + r of a tile keep their
    // swizzle (q1 is a multiple of 16): a slice is a tile of its own.
#pragma unroll
    for (int q1 = 0; q1 < kQ; q1 += kSlice) {
      float st[kM][kSlice / 8][4] = {}, dpt[kM][kSlice / 8][4] = {};
      product_abt<T, D, kM, kSlice, Dkdv<D>::kUnrollK>(st, sK, warp_key0, cQ + row_offset<D>(q1));
      product_abt<T, D, kM, kSlice, Dkdv<D>::kUnrollK>(dpt, sV, warp_key0, cdO + row_offset<D>(q1));
      with_tile_switches(dropout, valid_keys < kDkdvBlockKeys, [&](auto with_dropout, auto mask_keys) {
        dkdv_elementwise<decltype(with_dropout)::value, decltype(mask_keys)::value, kM, kSlice>(
            st, dpt, scale_log2, dropout_scale, sLse, sDelta, sBits, q1, warp_key0, valid_keys);
      });
      // dS^T of the slice (the warp's keys x queries q1 ..) into the block's DsTile, rounded as the dK product
      // rounds it.
      if constexpr (kAccumulateDq) store_c_fragments<DsTile<D>>(dpt, 1.0f, sdS, warp_key0, q1);
      product_xb<T, D, kM, kSlice>(dv, st, cdO + row_offset<D>(q1));
      product_xb<T, D, kM, kSlice>(dk, dpt, cQ + row_offset<D>(q1));
    }
    __syncthreads();
    // The tile's dS^T is complete. The next tile's slices overwrite it only after the barrier at its top, which
    // every warp reaches after this product.
    if constexpr (kAccumulateDq) {
      accumulate_dq<T, D>(sdS, sK, args.dq_accum + seq.start * row_stride + h * D, row_stride, q0, len);
    }
  }
  if constexpr (kAccumulateDq) __syncthreads();  // store_rows stages dK in sK, which the last dQ product reads

  store_rows<T, D, kM, kThreads>(dk, s.softmax_scale, sK, gradient_rows<T, D>(args.grad_k, args, seq.start, h),
                                 args.grad_token_stride, key0, len, seq.rows);
  store_rows<T, D, kM, kThreads>(dv, 1.0f, sV, gradient_rows<T, D>(args.grad_v, args, seq.start, h),
                                 args.grad_token_stride, key0, len, seq.rows);
}

// Kernel 2: dQ of queries blockIdx.x * 64 .. + 63 of sequence blockIdx.z, head blockIdx.y.
// 3 resident blocks per SM (167 registers at D = 64 without the bound; 168 is the cap): on the H200 the dQ kernel
// at 177 registers, 2 blocks per SM, took 271 us at Base, and 231 us when bounded to 3.
template <typename T, int D>
__global__ void __launch_bounds__(kDqWarps * kWarpSize, 3) dq_kernel(const AttentionBackwardArgs args) {
  constexpr int kK = dq_inner_rows<D>(), kThreads = kDqWarps * kWarpSize;
  const AttentionShape& s = args.shape;
  const int b = blockIdx.z, h = blockIdx.y, query0 = blockIdx.x * kDqBlockQueries;
  const tiles::SequenceExtent seq = sequence_of(s, b);
  if (query0 >= seq.length) {  // padding queries at most (padded layout): their dQ rows are zeros
    const int last = query0 + kDqBlockQueries < seq.rows ? query0 + kDqBlockQueries : seq.rows;
    tiles::zero_rows<D, kThreads>(gradient_rows<T, D>(args.grad_q, args, seq.start, h), args.grad_token_stride,
                                  query0, last, threadIdx.x);
    return;
  }
  const int len = seq.length;

  ELECTRA_DYNAMIC_SHARED(uint4, attention_shared);
  T* sQ = reinterpret_cast<T*>(attention_shared);
  T* sdO = sQ + row_offset<D>(kDqBlockQueries);
  T* sK = sdO + row_offset<D>(kDqBlockQueries);  // [2][kK] rows
  T* sV = sK + row_offset<D>(2 * kK);       // [2][kK] rows
  uint32_t* sBits = reinterpret_cast<uint32_t*>(sV + row_offset<D>(2 * kK));  // [64][kK / 32]

  const HeadRows<T> rows = head_rows<T, D>(args, seq, h);

  load_tile<D, kDqBlockQueries, kThreads>(sQ, rows.q, args.q.token_stride, query0, len);
  load_tile<D, kDqBlockQueries, kThreads>(sdO, rows.dout, rows.dout_stride, query0, len);
  load_tile<D, kK, kThreads>(sK, rows.k, args.k.token_stride, 0, len);
  load_tile<D, kK, kThreads>(sV, rows.v, args.v.token_stride, 0, len);
  cp_async_commit();

  const bool dropout = s.dropout_threshold > 0;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*s.seed) : 0;
  const float dropout_scale = dropout ? s.dropout_scale : 1.0f;
  const float scale_log2 = s.softmax_scale * kLog2e;

  const int warp = threadIdx.x / kWarpSize, group = threadIdx.x % kWarpSize / 4;
  // The thread's two query rows: 16 warp + group and + 8 (past the sequence: lse = +inf, P = 0).
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = query0 + 16 * warp + group + 8 * half;
    const bool valid = row < len;
    row_lse[half] = valid ? rows.lse[row] * kLog2e : INFINITY;
    row_delta[half] = valid ? rows.delta[row] : 0.0f;
  }

  float dq[1][D / 8][4] = {};
  const int tiles = (len + kK - 1) / kK;
  for (int t = 0; t < tiles; ++t) {
    const int k0 = t * kK;
    if (t + 1 < tiles) {
      load_tile<D, kK, kThreads>(sK + row_offset<D>(((t + 1) & 1) * kK), rows.k, args.k.token_stride, k0 + kK, len);
      load_tile<D, kK, kThreads>(sV + row_offset<D>(((t + 1) & 1) * kK), rows.v, args.v.token_stride, k0 + kK, len);
    }
    cp_async_commit();
    if (dropout) dropout_bits<kDqBlockQueries, kK, kThreads>(sBits, seed, b, h, query0, k0, s.dropout_threshold);
    cp_async_wait<1>();
    __syncthreads();

    const T* cK = sK + row_offset<D>((t & 1) * kK);
    const T* cV = sV + row_offset<D>((t & 1) * kK);
    float st[1][kK / 8][4] = {}, dp[1][kK / 8][4] = {};  // S and dP: rows = the warp's 16 queries, columns = keys
    product_abt<T, D, 1, kK>(st, sQ, 16 * warp, cK);
    product_abt<T, D, 1, kK>(dp, sdO, 16 * warp, cV);
    const int valid_keys = len - k0;
    with_tile_switches(dropout, valid_keys < kK, [&](auto with_dropout, auto mask_keys) {
      dq_elementwise<decltype(with_dropout)::value, decltype(mask_keys)::value, kK>(
          dp, st, scale_log2, dropout_scale, row_lse, row_delta, sBits, 16 * warp, valid_keys);
    });
    product_xb<T, D, 1, kK>(dq, dp, cK);
    __syncthreads();
  }

  store_rows<T, D, 1, kThreads>(dq, s.softmax_scale, sQ, gradient_rows<T, D>(args.grad_q, args, seq.start, h),
                                args.grad_token_stride, query0, len, seq.rows);
}

// Kernel 2 with args.dq_accum (replacing dq_kernel): dQ = softmax_scale * dq_accum as T into grad_q, the padded
// layout's padding rows as zeros; threads laid out as delta_kernel's, one 16-byte chunk of a row each.
template <typename T, int D>
__global__ void __launch_bounds__(kDeltaThreads) dq_convert_kernel(const AttentionBackwardArgs args) {
  const AttentionShape& s = args.shape;
  const RowChunk t = row_chunk<D>(s);
  if (t.token >= t.seq.rows) return;
  uint4 packed = {0u, 0u, 0u, 0u};
  if (t.token < t.seq.length) {
    const uint4* sums = reinterpret_cast<const uint4*>(args.dq_accum + t.offset);
    float x[8];
    const uint4 low = sums[0], high = sums[1];
    std::memcpy(x, &low, 16);
    std::memcpy(x + 4, &high, 16);
    packed = {tiles::float2_to_pair<T>(x[0] * s.softmax_scale, x[1] * s.softmax_scale),
              tiles::float2_to_pair<T>(x[2] * s.softmax_scale, x[3] * s.softmax_scale),
              tiles::float2_to_pair<T>(x[4] * s.softmax_scale, x[5] * s.softmax_scale),
              tiles::float2_to_pair<T>(x[6] * s.softmax_scale, x[7] * s.softmax_scale)};
  }
  *reinterpret_cast<uint4*>(gradient_rows<T, D>(args.grad_q, args, t.seq.start, t.h) +
                            t.token * args.grad_token_stride + t.chunk * 8) = packed;
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_backward_device
