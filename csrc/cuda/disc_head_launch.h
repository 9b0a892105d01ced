// Torch-free launchers of the discriminator-head CUDA kernels: raw pointers, sizes, strides and a stream.
// disc_head.cu implements them twice: for the GPU (namespace cuda, nvcc) and for the SIMT emulation on the
// CPU (namespace emulated, host compiler). The glue in csrc/disc_head_device_glue.h converts tensors; the
// device code lives in disc_head_device.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/float_type.h"

namespace electra_ext {

struct DiscHeadForwardArgs {
  FloatType dtype;
  const void* x;          // [rows, hidden], unit column stride, rows `row_stride` elements apart
  int64_t rows, hidden, row_stride;
  const float* w;         // [hidden]
  const float* b;         // [1]
  const bool* labels;     // [rows]
  const bool* valid;      // [rows]
  float* logits;          // [rows] out
  float* loss;            // [1] out: mean BCE over valid rows, 0 when none
  float* block_loss;      // [forward_blocks(rows)] workspace
  int32_t* block_valid;   // [forward_blocks(rows)] workspace
};

struct DiscHeadBackwardArgs {
  FloatType dtype;
  const float* grad_logits;  // [rows] or nullptr
  const float* loss_scale;   // [1]: grad_loss / max(valid rows, 1)
  const void* x;
  int64_t rows, hidden, row_stride;
  const float* w;
  const float* logits;
  const bool* labels;
  const bool* valid;
  void* grad_x;              // [rows, hidden] contiguous, dtype of x, out
  float* grad_w;             // [hidden] out
  float* grad_b;             // [1] out
  float* block_grad_wb;      // [backward_blocks(...), hidden + 1] workspace
};

// Blocks of the forward grid; the backward grid fills the device once and its size decides the workspace.
#define ELECTRA_DISC_HEAD_LAUNCHERS                                                          \
  int forward_blocks(int64_t rows);                                                          \
  int backward_blocks(int64_t rows, int64_t hidden, int device);                             \
  cudaError_t disc_head_forward(const DiscHeadForwardArgs& args, cudaStream_t stream);       \
  cudaError_t disc_head_backward(const DiscHeadBackwardArgs& args, int blocks, cudaStream_t stream);

namespace cuda {
ELECTRA_DISC_HEAD_LAUNCHERS
}  // namespace cuda

namespace emulated {
ELECTRA_DISC_HEAD_LAUNCHERS
}  // namespace emulated

#undef ELECTRA_DISC_HEAD_LAUNCHERS

}  // namespace electra_ext
