// Tile helpers specific to the fused attention kernels (forward and backward), on top of the shared tensor-core
// building blocks of cuda/mma_tiles.cuh (re-exported here): exp2, Philox attention dropout applied to one
// C fragment of P (common/philox.h keys), and the clamped extent of a sequence.
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

// Attention dropout of one 16x8 C fragment whose element (r, c) is (row0 + r, col0 + c) of the (batch, head)
// attention matrix (positions inside the sequence; col0 a multiple of 8): zeroes the dropped entries (the caller
// applies 1 / (1 - p)). Lane (group, pair) holds columns 2 pair, 2 pair + 1 of column group col0 / 4 + pair / 2;
// one Philox call per 4 entries (c_fragment_words). Full-warp collective.
__device__ __forceinline__ void dropout_c_fragment(float (&c)[4], uint64_t seed, uint32_t batch, uint32_t head,
                                                   int row0, int col0, uint32_t threshold, int lane) {
  const int group = lane / 4, pair = lane % 4;
  uint32_t words[4];
  c_fragment_words(words, lane, [&](int r) {
    return philox::attention_dropout_words(seed, batch, head, static_cast<uint32_t>(row0 + group + r),
                                           static_cast<uint32_t>(col0 / 4 + pair / 2));
  });
#pragma unroll
  for (int i = 0; i < 4; ++i) c[i] = words[i] >= threshold ? c[i] : 0.0f;
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
