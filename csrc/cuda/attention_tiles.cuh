// Tile helpers specific to the fused attention kernels (forward and backward), on top of the shared tensor-core
// building blocks of cuda/mma_tiles.cuh (re-exported here): exp2, Philox attention dropout applied to a
// 16 x 64 block of P's C fragments (common/philox.h keys), and the clamped extent of a sequence.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "cuda/mma_tiles.cuh"

namespace electra_ext::ELECTRA_BACKEND::attention_tiles {

using namespace mma_tiles;

// exp2 on fp32: the GPU's exp2f (MUFU.EX2 plus a denormal fix-up, 2 ulp), libm on the host.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

// Attention dropout of a 16 x 64 block of P held as 8 C fragments, fragment t being columns col0 + 8 t .. + 7
// and the block rows row0 .. row0 + 15 of the (batch, head) attention matrix (positions inside the sequence; col0
// a multiple of 16): zeroes the dropped entries (the caller applies dropout_scale). One Philox call covers 16
// columns of a row (common/philox.h), so the block takes 16 rows x 4 calls, 2 per lane: lane (group, pair) draws
// row group + 8 (pair % 2), chunks pair / 2 and pair / 2 + 2, as two 16-bit keep masks in one word; the 4 lanes
// of a group then read each other's words (4 shuffles) and take the bits of their own columns (8 h + 2 pair + e
// of chunk c for fragment 2 c + h). Per entry ~4 integer instructions of Philox, ~2.5 of byte compares and ~2
// to apply, against ~20 for a 32-bit word per entry. Full-warp collective.
__device__ __forceinline__ void dropout_c_fragments(float (&c)[8][4], uint64_t seed, uint32_t batch, uint32_t head,
                                                    int row0, int col0, uint32_t threshold, int lane) {
  const int group = lane / 4, pair = lane % 4;
  const auto row = static_cast<uint32_t>(row0 + group + 8 * (pair % 2));
  const auto chunk0 = static_cast<uint32_t>(col0 / philox::kDropoutColumnsPerCall + pair / 2);
  const uint32_t mine =
      philox::dropout_keep_bits(philox::attention_dropout_words(seed, batch, head, row, chunk0), threshold) |
      philox::dropout_keep_bits(philox::attention_dropout_words(seed, batch, head, row, chunk0 + 2), threshold)
          << 16;
#pragma unroll
  for (int source = 0; source < 4; ++source) {
    const uint32_t masks = __shfl_sync(0xffffffffu, mine, (lane & ~3) | source);
    const int r = source % 2;  // the source lane's row: group + 8 r
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int chunk = source / 2 + 2 * half;
      const uint32_t mask = masks >> (16 * half);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& entry = c[2 * chunk + h][2 * r + e];
          entry = (mask >> (8 * h + 2 * pair + e)) & 1u ? entry : 0.0f;
        }
      }
    }
  }
}

// Sequence b's tokens, clamped for memory safety: a start outside [0, tokens] makes it empty, and its length
// (max_seqlen when seqlens is null) is clamped to [0, min(max_seqlen, tokens - start)] (grids are sized by
// max_seqlen). `rows`: the output rows its blocks write from its start. That is its length, or, in the padded
// layout (starts null: sequence b at token b * max_seqlen), its whole slot of max_seqlen rows (clamped likewise),
// the padding ones as zeros, so that those outputs need no zero fill beforehand.
struct SequenceExtent {
  int64_t start;
  int length, rows;
};
__device__ __forceinline__ SequenceExtent sequence_extent(const int32_t* starts, const int32_t* seqlens, int b,
                                                          int max_seqlen, int64_t tokens) {
  const int64_t start = starts != nullptr ? starts[b] : int64_t(b) * max_seqlen;
  if (start < 0 || start > tokens) return {0, 0, 0};
  const int64_t room = tokens - start < max_seqlen ? tokens - start : max_seqlen;
  int64_t length = seqlens != nullptr ? seqlens[b] : max_seqlen;
  length = length < 0 ? 0 : length;
  length = length < room ? length : room;
  return {start, static_cast<int>(length), static_cast<int>(starts != nullptr ? length : room)};
}

// Rows first .. last - 1 of a [rows, kCols] matrix of 2-byte elements (row stride `stride` elements, 16-byte
// aligned rows) set to zero with 16-byte stores by kThreads threads: the padded layout's padding rows.
template <int kCols, int kThreads, typename T>
__device__ __forceinline__ void zero_rows(T* base, int64_t stride, int first, int last, int thread) {
  constexpr int kChunks = kCols / kChunkElements;
  const uint4 zero = {0u, 0u, 0u, 0u};
  for (int i = thread; i < (last - first) * kChunks; i += kThreads) {
    *reinterpret_cast<uint4*>(base + int64_t(first + i / kChunks) * stride + (i % kChunks) * kChunkElements) = zero;
  }
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_tiles
