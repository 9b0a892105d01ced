// Tile helpers of the fused attention kernels (forward and backward): torch-free device code built by nvcc and,
// against the SIMT emulation, by the host compiler (simt/simt.cuh). Everything here is warp- or block-level
// building blocks over the tensor-core fragments of simt/primitives.cuh (whose header documents the layouts):
//   - shared-memory tiles of rows of 16-bit elements, padded by 16 bytes per row (no ldmatrix bank conflicts),
//   - cp.async loads of a tile from rows of [tokens, heads, head_dim] with zero fill past the valid rows,
//   - ldmatrix addressing for A fragments, B fragments from [n][k] storage (K in S = Q K^T) and from [k][n]
//     storage (V in O = P V, with .trans),
//   - the register-only conversion of two fp32 C fragments (16x8) into one 16-bit A fragment (16x16),
//   - Philox attention dropout applied to one C fragment of P (common/philox.h keys).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/philox.h"
#include "simt/primitives.cuh"

namespace electra_ext::ELECTRA_BACKEND::attention_tiles {

constexpr int kWarpSize = 32;
constexpr int kChunkElements = 8;  // 16 bytes of a 16-bit type: one cp.async, one ldmatrix row

// Shared-memory tile of kRows x kCols 16-bit elements, row-major, each row padded by one 16-byte chunk.
// ldmatrix reads 8 rows at one column chunk: with a row stride of (kCols + 8) * 2 bytes = (kCols / 8 + 1)
// chunks, an odd number of 16-byte chunks for kCols = 32, 64, 128, the 8 rows land on 8 different 16-byte
// bank groups (conflict-free); unpadded, rows 128 or 256 bytes apart would all hit the same 4 banks (8-way).
template <int kRows, int kCols>
struct PaddedTile {
  static_assert(kCols % 16 == 0, "whole 16x16 fragments per row");
  static constexpr int kRowStride = kCols + kChunkElements;  // elements
  static constexpr int kElements = kRows * kRowStride;
  template <typename T>
  static constexpr size_t bytes() {
    return size_t(kElements) * sizeof(T);
  }
  template <typename T>
  __device__ __forceinline__ static T* at(T* tile, int row, int col) {
    return tile + row * kRowStride + col;
  }
};

// Issues cp.async copies of rows 0 .. kRows - 1 of a tile whose row r starts at global + r * row_stride (16-byte
// aligned, unit stride along the row) into `tile`; rows >= valid_rows are zero-filled without any global read
// (so a tile past the end of a sequence reads nothing out of range). Called by all kThreads threads of the
// block; the caller commits, waits and synchronises.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* global, int64_t row_stride, int valid_rows,
                                                int thread) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  using Tile = PaddedTile<kRows, kCols>;
  constexpr int kChunksPerRow = kCols / kChunkElements;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = thread + i * kThreads;
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * kChunkElements;
    const bool valid = row < valid_rows;
    // An invalid row copies nothing; its source is the tile's first row, a valid address all the same.
    const T* source = valid ? global + row * row_stride + col : global;
    cp_async_16_or_zero(Tile::at(tile, row, col), source, valid);
  }
}

// ldmatrix.x4 addresses (lane's row pointer), tiles in PaddedTile layout:
// A fragment of rows row0 .. row0 + 15, columns col0 .. col0 + 15 (a[0..3] in the mma's order).
template <typename Tile, typename T>
__device__ __forceinline__ const T* a_fragment_row(const T* tile, int row0, int col0, int lane) {
  return Tile::at(tile, row0 + lane % 16, col0 + 8 * (lane / 16));
}
// B fragments of two n-tiles from a tile stored [n][k] (row = n): n0 .. n0 + 15 by k0 .. k0 + 15, non-transposed
// ldmatrix. r[0], r[1]: b of n-tile n0 .. n0 + 7; r[2], r[3]: b of n-tile n0 + 8 .. n0 + 15.
template <typename Tile, typename T>
__device__ __forceinline__ const T* b_fragment_row_nk(const T* tile, int n0, int k0, int lane) {
  return Tile::at(tile, n0 + lane % 8 + 8 * (lane / 16), k0 + 8 * ((lane / 8) % 2));
}
// B fragments of two n-tiles from a tile stored [k][n] (row = k): k0 .. k0 + 15 by n0 .. n0 + 15, with
// ldmatrix.trans. r[0], r[1]: b of n-tile n0 .. n0 + 7; r[2], r[3]: b of n-tile n0 + 8 .. n0 + 15.
template <typename Tile, typename T>
__device__ __forceinline__ const T* b_fragment_row_kn(const T* tile, int k0, int n0, int lane) {
  return Tile::at(tile, k0 + lane % 8 + 8 * ((lane / 8) % 2), n0 + 8 * (lane / 16));
}

// Two floats rounded to T (round to nearest even), `low` in the lower half of the register.
template <typename T>
__device__ __forceinline__ uint32_t float2_to_pair(float low, float high);
template <>
__device__ __forceinline__ uint32_t float2_to_pair<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(low, high);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}
template <>
__device__ __forceinline__ uint32_t float2_to_pair<__half>(float low, float high) {
  const __half2 v = __floats2half2_rn(low, high);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

// The A fragment (16x16, k = columns) made of two adjacent C fragments (16x8 each): `left` holds columns 0..7
// and `right` columns 8..15. The C layout of a lane (rows group, group + 8; columns 2 pair, 2 pair + 1) is
// exactly its A layout for that half, so no data moves between lanes (FlashAttention-2's P trick).
template <typename T>
__device__ __forceinline__ void c_fragments_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = float2_to_pair<T>(left[0], left[1]);
  a[1] = float2_to_pair<T>(left[2], left[3]);
  a[2] = float2_to_pair<T>(right[0], right[1]);
  a[3] = float2_to_pair<T>(right[2], right[3]);
}

// exp2 on fp32: the GPU's exp2f (MUFU.EX2 plus a denormal fix-up, 2 ulp), libm on the host.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

// Attention dropout of one 16x8 C fragment whose element (r, c) is (row0 + r, col0 + c) of the (batch, head)
// attention matrix (positions inside the sequence; col0 a multiple of 8): zeroes the dropped entries (the caller
// applies 1 / (1 - p)). Lane (group, pair) holds columns 2 pair, 2 pair + 1, i.e. words 2 (pair % 2) and
// 2 (pair % 2) + 1 of column group col0 / 4 + pair / 2, for rows group and group + 8. Lanes 2q and 2q + 1 need
// the same two Philox draws, so each computes one (the even lane row group, the odd lane row group + 8) and
// they trade the two words the other needs: one Philox per 4 entries, the minimum. Full-warp collective.
__device__ __forceinline__ void dropout_c_fragment(float (&c)[4], uint64_t seed, uint32_t batch, uint32_t head,
                                                   int row0, int col0, uint32_t threshold, int lane) {
  const int group = lane / 4, pair = lane % 4;
  const bool odd = (pair & 1) != 0;
  const philox::Words w = philox::attention_dropout_words(
      seed, batch, head, static_cast<uint32_t>(row0 + group + (odd ? 8 : 0)), static_cast<uint32_t>(col0 / 4 + pair / 2));
  // The even lane gives words 2, 3 of row `group`; the odd lane words 0, 1 of row `group + 8`.
  const uint32_t give0 = odd ? w.x[0] : w.x[2];
  const uint32_t give1 = odd ? w.x[1] : w.x[3];
  const uint32_t got0 = __shfl_xor_sync(0xffffffffu, give0, 1);
  const uint32_t got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
  const uint32_t top0 = odd ? got0 : w.x[0], top1 = odd ? got1 : w.x[1];        // row group
  const uint32_t bottom0 = odd ? w.x[2] : got0, bottom1 = odd ? w.x[3] : got1;  // row group + 8
  c[0] = top0 >= threshold ? c[0] : 0.0f;
  c[1] = top1 >= threshold ? c[1] : 0.0f;
  c[2] = bottom0 >= threshold ? c[2] : 0.0f;
  c[3] = bottom1 >= threshold ? c[3] : 0.0f;
}

// A sequence's tokens, clamped for memory safety: a start outside [0, tokens] makes it empty, and its length is
// clamped to [0, min(max_seqlen, tokens - start)] (grids are sized by max_seqlen).
struct SequenceExtent {
  int64_t start;
  int length;
};
__device__ __forceinline__ SequenceExtent sequence_extent(const int32_t* starts, const int32_t* seqlens, int b,
                                                          int max_seqlen, int64_t tokens) {
  const int64_t start = starts[b];
  if (start < 0 || start > tokens) return {0, 0};
  int64_t length = seqlens[b];
  length = length < 0 ? 0 : length;
  length = length < max_seqlen ? length : max_seqlen;
  length = length < tokens - start ? length : tokens - start;
  return {start, static_cast<int>(length)};
}

}  // namespace electra_ext::ELECTRA_BACKEND::attention_tiles
