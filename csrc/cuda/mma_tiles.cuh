// Warp- and block-level building blocks over the tensor-core fragments of simt/primitives.cuh (whose header
// documents the layouts), shared by the fused attention and generator-head kernels: torch-free device code
// built by nvcc and, against the SIMT emulation, by the host compiler (simt/simt.cuh).
//   - shared-memory tiles of rows of 16-bit elements, padded by 16 bytes per row (no ldmatrix bank conflicts),
//   - cp.async loads of a tile from rows in global memory, zero-filled past the valid rows and columns, and a
//     pipeline of such loads over shared-memory stages,
//   - ldmatrix addressing for A fragments from [m][k] storage (row-major) and from [k][m] storage (.trans),
//     B fragments from [n][k] storage and from [k][n] storage (.trans),
//   - the register-only conversion of two fp32 C fragments (16x8) into one 16-bit A fragment (16x16),
//   - the Philox words of the four elements a lane holds in a C fragment, one Philox call per 4 columns.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/philox.h"
#include "simt/primitives.cuh"

namespace electra_ext::ELECTRA_BACKEND::mma_tiles {

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
// aligned, unit stride along the row) into `tile`; rows >= valid_rows and the 8-element chunks of columns >=
// valid_cols (a multiple of 8) are zero-filled without any global read (so a tile past the end of a sequence or
// of a matrix reads nothing out of range). Called by all kThreads threads of the block; the caller commits,
// waits and synchronises. `Tile` is the shared layout: PaddedTile, or the wgmma kernels' SwizzledTile.
template <int kRows, int kCols, int kThreads, typename T, typename Tile = PaddedTile<kRows, kCols>>
__device__ __forceinline__ void load_tile_async(T* tile, const T* global, int64_t row_stride, int valid_rows,
                                                int thread, int valid_cols = kCols) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  constexpr int kChunksPerRow = kCols / kChunkElements;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = thread + i * kThreads;
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * kChunkElements;
    const bool valid = row < valid_rows && col < valid_cols;
    // An invalid chunk copies nothing; its source is the tile's start, a valid address all the same.
    const T* source = valid ? global + row * row_stride + col : global;
    cp_async_16_or_zero(Tile::at(tile, row, col), source, valid);
  }
}

// A cp.async pipeline of kStages shared-memory stages: load(stage) issues stage's copies (every thread of the
// block), compute(stage) reads them; loads run kStages - 1 stages ahead of compute. One commit group per stage,
// empty past the last, so that waiting for all but the newest kStages - 2 groups always covers `stage`; the
// barrier before each load also means every thread is done with the buffer it refills (stage - 1's).
template <int kStages, typename Load, typename Compute>
__device__ __forceinline__ void cp_async_pipeline(int stages, Load& load, Compute& compute) {
  static_assert(kStages >= 2, "at least double buffering");
  for (int ahead = 0; ahead < kStages - 1; ++ahead) {
    if (ahead < stages) load(ahead);
    cp_async_commit();
  }
  for (int stage = 0; stage < stages; ++stage) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (stage + kStages - 1 < stages) load(stage + kStages - 1);
    cp_async_commit();
    compute(stage);
  }
}

// ldmatrix.x4 addresses (lane's row pointer), tiles in PaddedTile layout:
// A fragment of rows row0 .. row0 + 15, columns col0 .. col0 + 15 (a[0..3] in the mma's order).
template <typename Tile, typename T>
__device__ __forceinline__ const T* a_fragment_row(const T* tile, int row0, int col0, int lane) {
  return Tile::at(tile, row0 + lane % 16, col0 + 8 * (lane / 16));
}
// The same A fragment from a tile stored [k][m] (row = k), with ldmatrix.trans: matrix i = lane / 8 holds
// rows m0 + 8 (i % 2) .. + 7 and columns k0 + 8 (i / 2) .. + 7 of A, i.e. stored rows k0 + 8 (i / 2) + lane % 8.
template <typename Tile, typename T>
__device__ __forceinline__ const T* a_fragment_row_km(const T* tile, int k0, int m0, int lane) {
  return Tile::at(tile, k0 + lane % 8 + 8 * (lane / 16), m0 + 8 * ((lane / 8) % 2));
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

// The Philox words of the four elements (c[0..3]) a lane holds in a 16x8 C fragment whose columns are numbered
// from a multiple of 4, when each row's group of 4 consecutive columns shares one Philox call (4 words):
// `words_of_row(r)` returns the 4 words of this lane's column group (columns 2 (pair / 2) * 2 .. of the fragment,
// shared by lanes 2q and 2q + 1) for fragment row group + r, r in {0, 8}. Lanes 2q and 2q + 1 need the same two
// calls, so each makes one (the even lane for row group, the odd lane for row group + 8) and they trade the two
// words the other needs: one Philox call per 4 elements, the minimum. Full-warp collective.
template <typename WordsOfRow>
__device__ __forceinline__ void c_fragment_words(uint32_t (&out)[4], int lane, const WordsOfRow& words_of_row) {
  const bool odd = (lane % 4 & 1) != 0;
  const philox::Words w = words_of_row(odd ? 8 : 0);
  // The even lane holds columns 4q, 4q + 1 (words 0, 1), the odd lane 4q + 2, 4q + 3 (words 2, 3); the even lane
  // gives words 2, 3 of row group, the odd lane words 0, 1 of row group + 8.
  const uint32_t give0 = odd ? w.x[0] : w.x[2];
  const uint32_t give1 = odd ? w.x[1] : w.x[3];
  const uint32_t got0 = __shfl_xor_sync(0xffffffffu, give0, 1);
  const uint32_t got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
  out[0] = odd ? got0 : w.x[0];  // row group
  out[1] = odd ? got1 : w.x[1];
  out[2] = odd ? w.x[2] : got0;  // row group + 8
  out[3] = odd ? w.x[3] : got1;
}

}  // namespace electra_ext::ELECTRA_BACKEND::mma_tiles
