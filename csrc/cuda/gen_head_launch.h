// Torch-free launchers of the generator-head CUDA kernels (issue 7): raw pointers, sizes and a stream.
// gen_head.cu implements them twice: for the GPU (namespace cuda, nvcc) and for the SIMT emulation on the CPU
// (namespace emulated, host compiler, via csrc/emulated/gen_head.cpp). The glue in csrc/gen_head_device_glue.h
// converts tensors, allocates the workspaces sized by the plan functions below, and reduces the per-row results.
//
// Contract (the CPU kernel, csrc/cpu/gen_head_cpu.cpp, computes the same):
// - h [rows, hidden] with unit stride along hidden and row stride h_row_stride; weight [vocab, hidden]
//   contiguous; both of `dtype` (float16 or bfloat16), rows 16-byte aligned, hidden a multiple of 8 (the glue
//   pads with zero columns, which change no product). bias [vocab] float32. targets [rows] int64: a token id in
//   [0, vocab), or ignore_index for a row that does not count.
// - logits = h weightᵀ + bias in float32 (products accumulated in float32, then the bias added as a separate
//   rounding). Per row: lse = log sum exp(logits); the sample = the first column of the maximum of
//   logits * inverse_temperature + gumbel (two roundings, no FMA), gumbel = -log(-log(u)) with u from
//   common/philox.h's gen_head_uniform(gen_head_gumbel_words(seed, row, column / 4).x[column % 4]); with
//   disallow_correct a counted row's target column is never sampled; `top` = the first column of the maximum
//   logit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/float_type.h"
#include "common/host_device.h"

namespace electra_ext {

// Rows of h per block (4 warps x 32 rows) and vocabulary columns per tile of every logit-tile kernel.
constexpr int kGenHeadBlockRows = 128;
constexpr int kGenHeadTileColumns = 64;

// How the vocabulary is split across blocks: a grid of (splits, row blocks) with `tiles_per_split` column tiles
// each (the last split may have fewer). Enough splits for ~2 blocks per SM, never an empty split.
struct GenHeadSplits {
  int tiles_per_split;
  int splits;
};
inline GenHeadSplits gen_head_vocab_splits(int64_t row_blocks, int64_t vocab, int multiprocessors) {
  const int64_t tiles = (vocab + kGenHeadTileColumns - 1) / kGenHeadTileColumns;
  const int64_t blocks = row_blocks > 0 ? row_blocks : 1;
  int64_t wanted = (2 * int64_t(multiprocessors) + blocks - 1) / blocks;
  wanted = wanted < 1 ? 1 : (wanted > tiles ? tiles : wanted);
  const int64_t per_split = (tiles + wanted - 1) / wanted;
  return GenHeadSplits{static_cast<int>(per_split), static_cast<int>((tiles + per_split - 1) / per_split)};
}

struct GenHeadInputs {
  FloatType dtype;  // kFloat16 or kBFloat16
  int64_t rows;
  int64_t vocab;
  int hidden;  // a multiple of 8
  const void* h;
  int64_t h_row_stride;  // elements, a multiple of 8
  const void* weight;    // [vocab, hidden] contiguous
  const float* bias;     // [vocab]
  const int64_t* targets;
  int64_t ignore_index;
};

struct GenHeadForwardArgs {
  GenHeadInputs in;
  const int64_t* seed;  // [1] on the kernels' device
  float inverse_temperature;
  bool disallow_correct;
  GenHeadSplits splits;  // gen_head_vocab_splits(ceil(rows / kGenHeadBlockRows), vocab, ...)
  // Workspace, [splits.splits, rows] each: per (split, row) the running max, the sum of exp(logit - max), the
  // column of the max, the best perturbed score and its column.
  float* partial_max;
  float* partial_sum;
  int32_t* partial_top;
  float* partial_best_score;
  int32_t* partial_best;
  float* target_logit;  // [rows] workspace: written for counted rows by the block that holds the target
  // Outputs, [rows]: lse; the sample; the row's loss lse - target logit (0 when the row does not count, NaN when
  // its target is neither ignore_index nor in [0, vocab)); 1 when the row counts and top == target, else 0.
  float* lse;
  int64_t* samples;
  float* row_loss;
  int32_t* row_correct;
};

// The backward runs over chunks of chunk_rows rows (a multiple of kGenHeadBlockRows): per chunk one kernel writes
// G = softmax(logits) - onehot(target) (0 on rows that do not count) as `dtype` into grad_logits, and float32
// column sums of G per block of 128 rows into grad_bias_partials; two tensor-core GEMMs then give
// grad_h[chunk] = grad_scale G weight and grad_weight += grad_scale Gᵀ h[chunk]. G is kept unscaled so that
// float16 does not flush it (grad_scale = grad_loss / counted rows is ~1e-5 for a Base batch).
ELECTRA_HOST_DEVICE int64_t gen_head_vocab_padded(int64_t vocab) { return (vocab + 7) / 8 * 8; }
inline int64_t gen_head_chunk_rows(int64_t rows, int64_t vocab, int64_t workspace_bytes) {
  const int64_t row_bytes = 2 * gen_head_vocab_padded(vocab);
  int64_t chunk = workspace_bytes / row_bytes / kGenHeadBlockRows * kGenHeadBlockRows;
  chunk = chunk < kGenHeadBlockRows ? kGenHeadBlockRows : chunk;
  const int64_t all = (rows + kGenHeadBlockRows - 1) / kGenHeadBlockRows * kGenHeadBlockRows;
  return chunk < all ? chunk : all;
}

struct GenHeadBackwardArgs {
  GenHeadInputs in;
  const float* lse;         // [rows], from the forward
  const float* grad_scale;  // [1] on the kernels' device: grad_loss / counted rows (0 when none counts)
  int64_t chunk_rows;       // gen_head_chunk_rows(...)
  GenHeadSplits splits;     // gen_head_vocab_splits(chunk_rows / kGenHeadBlockRows, vocab, ...)
  void* grad_logits;        // [chunk_rows, gen_head_vocab_padded(vocab)] of dtype, workspace
  float* grad_bias_partials;  // [ceil(rows / kGenHeadBlockRows), vocab], every entry written
  void* grad_h;               // [rows, hidden] contiguous, of dtype
  float* grad_weight;         // [vocab, hidden] contiguous, zero-filled by the caller, accumulated
};

// multiprocessor_count: SMs of the current device (of the emulated device: a few), for gen_head_vocab_splits.
#define ELECTRA_GEN_HEAD_LAUNCHERS                                                       \
  int multiprocessor_count();                                                            \
  cudaError_t gen_head_forward(const GenHeadForwardArgs& args, cudaStream_t stream);     \
  cudaError_t gen_head_backward(const GenHeadBackwardArgs& args, cudaStream_t stream);

namespace cuda {
ELECTRA_GEN_HEAD_LAUNCHERS
}  // namespace cuda

namespace emulated {
ELECTRA_GEN_HEAD_LAUNCHERS
}  // namespace emulated

#undef ELECTRA_GEN_HEAD_LAUNCHERS

}  // namespace electra_ext
