// Torch-free launchers of the fused attention CUDA kernels: raw pointers, sizes, strides and a stream.
// attention_forward.cu and attention_backward.cu implement them twice: for the GPU (namespace cuda, nvcc) and
// for the SIMT emulation on the CPU (namespace emulated, host compiler, via csrc/emulated/attention_*.cpp).
// The glue in csrc/attention_device_glue.h converts tensors.
//
// Layout shared by every attention kernel (CPU ones included, csrc/cpu/attention_cpu.cpp):
// - q, k, v are [tokens, heads, head_dim] with unit stride along head_dim and arbitrary token and head strides
//   (in elements; a [B, T, H, D] batch is viewed as tokens = B * T). Sequence b occupies tokens
//   starts[b] .. starts[b] + seqlens[b] - 1; positions inside a sequence (0 .. seqlens[b] - 1) are the rows and
//   columns of its attention matrix. Tokens outside every sequence (padding) are never read. starts null is the
//   padded layout: starts[b] = b * max_seqlen and tokens = batch * max_seqlen.
// - Non-causal: row i attends to every column j < seqlens[b], with probabilities
//   P = softmax(softmax_scale * q_i . k_j); out_i = sum_j P_ij * dropout_ij * v_j, dropout_ij = keep_ij *
//   dropout_scale where keep_ij is common/philox.h's attention_dropout_keep(seed, b, h, i, j, threshold).
// - lse is [heads, tokens] float32: the natural-log log-sum-exp of row i's scaled scores (before dropout),
//   saved by the forward for the backward.
// - Outputs are [tokens, heads, head_dim] in the inputs' dtype. With starts they arrive zero-filled and kernels
//   write the rows of sequences only; in the padded layout they arrive uninitialised and kernels write every
//   row, the padding rows (and their lse) as zeros, which saves a fill kernel per output (~22 us for the
//   75 MB gradient at ELECTRA-Base on an H200). out is contiguous; grad_q, grad_k and grad_v share a token
//   stride (views of one [tokens, 3, heads, head_dim] gradient).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/float_type.h"

namespace electra_ext {

struct AttentionShape {
  const int32_t* starts;   // [batch] first token of each sequence; null: the padded layout
  const int32_t* seqlens;  // [batch] tokens of each sequence (0 allowed); null (padded layout): max_seqlen each
  int batch, heads, head_dim;
  int max_seqlen;          // >= every seqlens[b] (sizes the grid)
  int64_t tokens;          // rows of out, lse's row stride
  float softmax_scale;
  uint32_t dropout_threshold;  // common/philox.h dropout_threshold(p), a byte threshold; 0: no dropout
  float dropout_scale;         // 256 / (256 - dropout_threshold): 1 / the keep probability
  const int64_t* seed;         // [1] on the kernels' device; read only when dropout_threshold > 0
};

struct AttentionTensor {  // [tokens, heads, head_dim], unit stride along head_dim
  const void* data;
  int64_t token_stride, head_stride;
};

struct AttentionForwardArgs {
  FloatType dtype;  // kFloat16 or kBFloat16 (the CUDA kernels compute q k^T and P v on tensor cores)
  AttentionShape shape;
  AttentionTensor q, k, v;
  void* out;   // [tokens, heads, head_dim] contiguous
  float* lse;  // [heads, tokens]
};

struct AttentionBackwardArgs {
  FloatType dtype;
  AttentionShape shape;
  AttentionTensor q, k, v;
  const void* grad_out;  // [tokens, heads, head_dim] contiguous
  const void* out;       // [tokens, heads, head_dim] contiguous, the forward's output
  const float* lse;      // [heads, tokens], from the forward
  float* delta;          // [heads, tokens] float32 workspace: the launcher writes rowsum(grad_out * out) of the
                         // sequences' rows there (padding tokens' entries are left as they are)
  void* grad_q;          // [tokens, heads, head_dim], unit head stride (head_dim elements) and
  void* grad_k;          // token stride grad_token_stride: the three views of one [tokens, 3, heads, head_dim]
  void* grad_v;          // gradient (grad_token_stride = 3 heads head_dim)
  int64_t grad_token_stride;
  float* dq_accum = nullptr;  // [tokens, heads, head_dim] float32 workspace (contiguous, contents undefined): the
                              // dK/dV kernel adds each key block's part of dQ there with atomics, in whatever
                              // order blocks run. null: the deterministic kernels (a dQ kernel recomputes S, dP)
};

// Head dims the CUDA kernels are instantiated for (the glue checks before launching).
constexpr bool attention_cuda_supports_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// The kernels: mma.sync (sm_80 and newer, every head dim) and wgmma (compute capability 9.0 in a build with
// sm_90a code, head dims 64 and 128: the forward, and at 64 the backward's dK/dV kernel when it adds dQ to the
// workspace). attention_kernels says which the launchers take for a head dim on the current device.
enum class AttentionKernels { kMmaSync, kWgmma };

#define ELECTRA_ATTENTION_LAUNCHERS                                                            \
  cudaError_t attention_forward(const AttentionForwardArgs& args, cudaStream_t stream);        \
  cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream);      \
  AttentionKernels attention_kernels(int head_dim);

namespace cuda {
ELECTRA_ATTENTION_LAUNCHERS
}  // namespace cuda

namespace emulated {
ELECTRA_ATTENTION_LAUNCHERS
}  // namespace emulated

#undef ELECTRA_ATTENTION_LAUNCHERS

}  // namespace electra_ext
