// Device code of the discriminator head: torch-free, built by nvcc and, against the SIMT emulation, by the
// host compiler (simt/simt.cuh).
//
// Napkin math, ELECTRA-Base (N = 256*512 = 131,072 rows, H = 768, bf16), H200 (4.3 TB/s measured copy):
//   forward  reads x once: 201 MB (+0.5 MB logits, 0.3 MB flags)        -> 47 us at the copy rate
//   backward reads x, writes dx: 403 MB (+3 MB of dw partials)            -> 94 us
//   instructions: GELU with one exp and one reciprocal (~20 per element, 2 on the special-function unit):
//   100 M elements are ~50 us of issue on 132 SMs x 4 schedulers, and ~48 us of the 16/clock/SM special
//   function unit: arithmetic and memory are both near the floor, so every instruction per element counts.
// ELECTRA-Small (N = 16,384, H = 256) is 8 MB: it sits in L2 and launch latency dominates.
//
// Layout: one warp per row. Each lane loads 16-byte packs (8 bf16/fp16 or 4 fp32 values), kUnroll of them
// before using any (4 x 16 B in flight per lane: with one at a time the forward ran at a third of the copy
// rate). A warp reduction gives the logit; per-block partial losses are summed by a single-block kernel in a
// fixed order (deterministic, no atomics).
// Backward: each warp accumulates dw for its rows in its own shared-memory row of H floats, stored pack-major
// (element e of pack p at e * packs + p) so that the 32 lanes of a warp hit 32 different banks (column-major
// order would put lanes 8 floats apart: an 8-way bank conflict on every update). Blocks write partials
// [blocks, H + 1] (the last column is db) and a second kernel adds them per column in block order.
#pragma once

#include <cstdint>

#include "common/disc_head_math.h"
#include "simt/simt.cuh"

namespace electra_ext::ELECTRA_BACKEND::disc_head_device {

namespace math = electra_ext::disc_head_math;

constexpr int kWarpSize = 32;
constexpr int kForwardWarps = 8;         // 256 threads: 8 resident blocks fill an SM's 2048 threads
constexpr int kMaxForwardBlocks = 1024;  // one wave on 132 SMs x 8 blocks; each warp then loops over rows
constexpr int kBackwardMaxWarps = 8;
constexpr int kReduceThreads = 256;
constexpr int kUnroll = 4;               // packs per lane loaded before the first is used
// At most 64 registers per thread (65,536 / (4 blocks x 256 threads)): 4 resident blocks of 8 warps per SM,
// each lane with 4 x 16 B loads in flight, ~64 KB per SM, ample for the ~25 KB that Little's law asks at
// 4.3 TB/s and ~1 us latency. Unbounded, the compiler took 72-80 registers and 3 blocks.
constexpr int kMinBlocksPerSm = 4;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kPack consecutive values of T, loaded and stored as one access: 16 bytes (the vectorised path) or a single
// element (the path for unaligned rows or H not a multiple of the pack).
template <typename T, int kPack>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

template <typename T>
constexpr int kVectorPack = 16 / sizeof(T);

// w[kPack * p .. kPack * p + kPack): kPack / 4 16-byte loads when vectorised (a scalar load per element would
// add an instruction per element to a loop limited by instruction issue).
template <int kPack>
__device__ __forceinline__ void load_w(const float* __restrict__ w, int64_t p, float (&wv)[kPack]) {
  if constexpr (kPack % 4 == 0) {
    const float4* w4 = reinterpret_cast<const float4*>(w) + p * (kPack / 4);
#pragma unroll
    for (int q = 0; q < kPack / 4; ++q) {
      const float4 v = w4[q];
      wv[4 * q] = v.x;
      wv[4 * q + 1] = v.y;
      wv[4 * q + 2] = v.z;
      wv[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPack; ++e) wv[e] = w[p * kPack + e];
  }
}

// Visits the packs of one row that belong to `lane` (p = lane, lane + 32, ...), loading kUnroll of them before
// calling f(p, x pack as floats, w values) on each.
template <typename T, int kPack, typename F>
__device__ __forceinline__ void for_each_lane_pack(const T* row, const float* __restrict__ w, int64_t packs,
                                                   int lane, F&& f) {
  const Pack<T, kPack>* row_packs = reinterpret_cast<const Pack<T, kPack>*>(row);
  for (int64_t first = lane; first < packs; first += int64_t(kWarpSize) * kUnroll) {
    Pack<T, kPack> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = first + u * kWarpSize;
      if (p < packs) loaded[u] = row_packs[p];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = first + u * kWarpSize;
      if (p < packs) {
        float xv[kPack], wv[kPack];
#pragma unroll
        for (int e = 0; e < kPack; ++e) xv[e] = to_float(loaded[u].v[e]);
        load_w<kPack>(w, p, wv);
        f(p, xv, wv);
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int kPack>
__global__ void __launch_bounds__(kForwardWarps * kWarpSize, kMinBlocksPerSm)
    forward_kernel(const T* __restrict__ x, int64_t rows, int64_t hidden, int64_t row_stride,
                   const float* __restrict__ w, const float* __restrict__ b, const bool* __restrict__ labels,
                   const bool* __restrict__ valid, float* __restrict__ logits, float* __restrict__ block_loss,
                   int32_t* __restrict__ block_valid) {
  __shared__ float warp_loss[kForwardWarps];
  __shared__ int32_t warp_valid[kForwardWarps];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t packs = hidden / kPack;
  const float bias = *b;
  float loss = 0.0f;
  int32_t valid_rows = 0;
  for (int64_t row = int64_t(blockIdx.x) * kForwardWarps + warp; row < rows;
       row += int64_t(gridDim.x) * kForwardWarps) {
    float dot = 0.0f;
    for_each_lane_pack<T, kPack>(x + row * row_stride, w, packs, lane,
                                 [&](int64_t, const float(&xv)[kPack], const float(&wv)[kPack]) {
#pragma unroll
                                   for (int e = 0; e < kPack; ++e) dot += math::gelu(xv[e]) * wv[e];
                                 });
    const float z = warp_sum(dot) + bias;
    if (lane == 0) {
      logits[row] = z;
      if (valid[row]) {
        loss += math::bce_with_logits(z, labels[row] ? 1.0f : 0.0f);
        ++valid_rows;
      }
    }
  }
  if (lane == 0) {
    warp_loss[warp] = loss;
    warp_valid[warp] = valid_rows;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float block_sum = 0.0f;
    int32_t block_count = 0;
    for (int i = 0; i < kForwardWarps; ++i) {
      block_sum += warp_loss[i];
      block_count += warp_valid[i];
    }
    block_loss[blockIdx.x] = block_sum;
    block_valid[blockIdx.x] = block_count;
  }
}

// One block adds the per-block partials in a fixed order and writes the mean loss.
__global__ void __launch_bounds__(kReduceThreads)
    finish_loss_kernel(const float* __restrict__ block_loss, const int32_t* __restrict__ block_valid, int blocks,
                       float* __restrict__ loss) {
  __shared__ float loss_sum[kReduceThreads];
  __shared__ int32_t valid_sum[kReduceThreads];
  float sum = 0.0f;
  int32_t count = 0;
  for (int i = threadIdx.x; i < blocks; i += kReduceThreads) {
    sum += block_loss[i];
    count += block_valid[i];
  }
  loss_sum[threadIdx.x] = sum;
  valid_sum[threadIdx.x] = count;
  __syncthreads();
  for (unsigned half = kReduceThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      loss_sum[threadIdx.x] += loss_sum[threadIdx.x + half];
      valid_sum[threadIdx.x] += valid_sum[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = valid_sum[0] > 0 ? loss_sum[0] / float(valid_sum[0]) : 0.0f;
}

// Dynamic shared memory: one row of `hidden` floats per warp, its dw accumulator, pack-major (see top).
template <typename T, int kPack>
__global__ void __launch_bounds__(kBackwardMaxWarps * kWarpSize, kMinBlocksPerSm)
    backward_kernel(const float* __restrict__ grad_logits, const float* __restrict__ loss_scale,
                                const T* __restrict__ x, int64_t rows, int64_t hidden, int64_t row_stride,
                                const float* __restrict__ w, const float* __restrict__ logits,
                                const bool* __restrict__ labels, const bool* __restrict__ valid,
                                T* __restrict__ grad_x, float* __restrict__ block_grad_wb) {
  ELECTRA_DYNAMIC_SHARED(float, warp_grad_w);
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t packs = hidden / kPack;
  float* grad_w_acc = warp_grad_w + int64_t(warp) * hidden;
  for (int64_t j = lane; j < hidden; j += kWarpSize) grad_w_acc[j] = 0.0f;
  // Lanes zero other slots than they later update (pack-major layout): without this, a lane could add to a
  // slot before its owner zeroes it (found by the CPU emulation; the GPU's lockstep execution hid it).
  __syncwarp();
  const float scale = *loss_scale;
  float grad_b = 0.0f;
  for (int64_t row = int64_t(blockIdx.x) * warps + warp; row < rows; row += int64_t(gridDim.x) * warps) {
    float dz = grad_logits != nullptr ? grad_logits[row] : 0.0f;
    if (valid[row]) dz += scale * math::bce_with_logits_grad(logits[row], labels[row] ? 1.0f : 0.0f);
    grad_b += dz;
    Pack<T, kPack>* grad_packs = reinterpret_cast<Pack<T, kPack>*>(grad_x + row * hidden);
    for_each_lane_pack<T, kPack>(x + row * row_stride, w, packs, lane,
                                 [&](int64_t p, const float(&xv)[kPack], const float(&wv)[kPack]) {
                                   Pack<T, kPack> grad;
#pragma unroll
                                   for (int e = 0; e < kPack; ++e) {
                                     const math::GeluAndGrad gelu = math::gelu_and_grad(xv[e]);
                                     grad_w_acc[e * packs + p] += dz * gelu.value;
                                     grad.v[e] = from_float<T>(dz * wv[e] * gelu.grad);
                                   }
                                   grad_packs[p] = grad;
                                 });
  }
  __syncthreads();
  // Column `hidden` of the partials row carries db; warp w's db sits in lane 0's register, so stage it.
  float* block_row = block_grad_wb + int64_t(blockIdx.x) * (hidden + 1);
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    const int64_t slot = (j % kPack) * packs + j / kPack;
    float sum = 0.0f;
    for (int i = 0; i < warps; ++i) sum += warp_grad_w[int64_t(i) * hidden + slot];
    block_row[j] = sum;
  }
  __syncthreads();  // every warp's accumulator has been read: reuse the first `warps` floats for db
  if (lane == 0) warp_grad_w[warp] = grad_b;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int i = 0; i < warps; ++i) sum += warp_grad_w[i];
    block_row[hidden] = sum;
  }
}

// Adds the [blocks, hidden + 1] partials over blocks: dw (columns < hidden) and db (column hidden).
// A block owns kReduceColumns columns; its kReduceRowGroups thread rows each add every kReduceRowGroups-th
// partial, then one thread per column adds those sums in order. With ~1000 partials that is ~33 loads per
// thread instead of ~1000 on a handful of SMs (a latency-bound ~100 us tail), and still a fixed order.
constexpr int kReduceColumns = 32;
constexpr int kReduceRowGroups = 32;

__global__ void __launch_bounds__(kReduceColumns * kReduceRowGroups)
    finish_grad_wb_kernel(const float* __restrict__ block_grad_wb, int blocks, int64_t hidden,
                          float* __restrict__ grad_w, float* __restrict__ grad_b) {
  __shared__ float group_sum[kReduceRowGroups][kReduceColumns + 1];  // +1: no bank conflicts on the column read
  const int column_in_block = threadIdx.x % kReduceColumns, group = threadIdx.x / kReduceColumns;
  const int64_t j = int64_t(blockIdx.x) * kReduceColumns + column_in_block;
  float sum = 0.0f;
  if (j <= hidden) {
    for (int i = group; i < blocks; i += kReduceRowGroups) sum += block_grad_wb[int64_t(i) * (hidden + 1) + j];
  }
  group_sum[group][column_in_block] = sum;
  __syncthreads();
  if (group != 0 || j > hidden) return;
  float total = 0.0f;
  for (int g = 0; g < kReduceRowGroups; ++g) total += group_sum[g][column_in_block];
  if (j < hidden) {
    grad_w[j] = total;
  } else {
    *grad_b = total;
  }
}

}  // namespace electra_ext::ELECTRA_BACKEND::disc_head_device
