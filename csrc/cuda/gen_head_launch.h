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

#include <climits>
#include <cstdint>

#include "common/float_type.h"
#include "common/host_device.h"

namespace electra_ext {

// Rows of h per block (4 warps x 32 rows) and vocabulary columns per tile of every logit-tile kernel.
constexpr int kGenHeadBlockRows = 128;
constexpr int kGenHeadTileColumns = 64;
// Rows and columns are 32-bit in the kernels, a tile's columns past the vocabulary's end included.
constexpr int64_t kGenHeadMaxVocab = INT32_MAX - kGenHeadTileColumns;

// How the vocabulary is split across blocks: a grid of (splits, row blocks) with `tiles_per_split` column tiles
// each (the last split may have fewer), never an empty split.
struct GenHeadSplits {
  int tiles_per_split;
  int splits;
};

// A block's work besides its tiles, in tiles: the first stage's load, which nothing overlaps, and the merge and
// partial writes at the end of its split. Put at one tile, a guess no GPU has checked yet; it also keeps splits
// from shrinking to a tile or two for a modelled gain of a few percent (Base: 53 splits of 9 tiles without it).
constexpr int64_t kGenHeadBlockOverheadTiles = 1;

// Every tile costs about the same, so a logit-tile kernel takes ~ waves x (tiles per split + overhead), with
// waves = ceil(row_blocks x splits / resident_blocks) and resident_blocks the blocks the device runs at once.
// The split with the least of that; ties go to fewer splits. Against the rule before ("enough splits for 2
// blocks per SM"), for V = 30,522 (477 tiles) on an H100/H200 (132 SMs x 3 logit-tile blocks = 396): the Base
// forward (154 row blocks) goes from 2 splits in one wave 78% full (cost 240) to 5 in 2 waves 97% full (194);
// Small (20 row blocks) from 14 splits, 71% full (36), to 19, 96% (27); the backward's 1,024-row chunks (8 row
// blocks) from 32 splits, 65% full (16), to 48, 97% (11). With the forward's 2 blocks per SM before (264), the
// old rule put Base and Small into a second wave under 20% full (cost 480 and 72).
inline GenHeadSplits gen_head_vocab_splits(int64_t row_blocks, int64_t vocab, int64_t resident_blocks) {
  const int64_t tiles = (vocab + kGenHeadTileColumns - 1) / kGenHeadTileColumns;
  const int64_t blocks = row_blocks > 0 ? row_blocks : 1;
  const int64_t resident = resident_blocks > 0 ? resident_blocks : 1;
  GenHeadSplits best{static_cast<int>(tiles), 1};
  int64_t best_cost = -1;
  // Each distinct tiles-per-split value once, from the most (1 split) down: O(sqrt(tiles)) candidates.
  for (int64_t splits = 1; splits <= tiles;) {
    const int64_t per_split = (tiles + splits - 1) / splits;
    const int64_t used_splits = (tiles + per_split - 1) / per_split;  // the fewest splits with this size
    const int64_t waves = (blocks * used_splits + resident - 1) / resident;
    const int64_t cost = waves * (per_split + kGenHeadBlockOverheadTiles);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = GenHeadSplits{static_cast<int>(per_split), static_cast<int>(used_splits)};
    }
    if (per_split == 1) break;
    splits = (tiles + per_split - 2) / (per_split - 1);  // the fewest splits with smaller ones
  }
  return best;
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
  GenHeadSplits splits;  // gen_head_forward_splits(rows, vocab, dtype)
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

// The backward runs over chunks of chunk_rows rows (a multiple of kGenHeadBlockRows). Per chunk one kernel, with
// the vocabulary split for the chunk's row blocks (gen_head_vocab_splits), writes G = softmax(logits) -
// onehot(target) (0 on rows that do not count) as `dtype` into grad_logits, and float32 column sums of G per
// block of 128 rows into grad_bias_partials; two tensor-core GEMMs then give grad_h[chunk] = grad_scale G weight
// and grad_weight += grad_scale Gᵀ h[chunk]. G is kept unscaled so that float16 does not flush it (grad_scale =
// grad_loss / counted rows is ~1e-5 for a Base batch).
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
  void* grad_logits;        // [chunk_rows, gen_head_vocab_padded(vocab)] of dtype, workspace
  float* grad_bias_partials;  // [ceil(rows / kGenHeadBlockRows), vocab], every entry written
  void* grad_h;               // [rows, hidden] contiguous, of dtype
  float* grad_h_partials;     // workspace for the grad_h GEMM's k splits, of grad_h_partial_floats floats:
  int64_t grad_h_partial_floats;  // gen_head_grad_h_partial_floats(chunk_rows, hidden, dtype) (0: no splits)
  float* grad_weight;         // [vocab, hidden] contiguous, zero-filled by the caller, accumulated
};

// gen_head_forward_splits: the forward's split for `rows` rows of `dtype` on the current device
// (gen_head_vocab_splits with the blocks of the forward kernel its SMs hold at once, by occupancy), by which the
// caller sizes the partials. gen_head_grad_h_partial_floats: the size of the backward's grad_h_partials.
#define ELECTRA_GEN_HEAD_LAUNCHERS                                                          \
  GenHeadSplits gen_head_forward_splits(int64_t rows, int64_t vocab, FloatType dtype);      \
  int64_t gen_head_grad_h_partial_floats(int64_t chunk_rows, int64_t hidden, FloatType dtype); \
  cudaError_t gen_head_forward(const GenHeadForwardArgs& args, cudaStream_t stream);        \
  cudaError_t gen_head_backward(const GenHeadBackwardArgs& args, cudaStream_t stream);

namespace cuda {
ELECTRA_GEN_HEAD_LAUNCHERS
}  // namespace cuda

namespace emulated {
ELECTRA_GEN_HEAD_LAUNCHERS
}  // namespace emulated

#undef ELECTRA_GEN_HEAD_LAUNCHERS

}  // namespace electra_ext
