// Host launchers of the discriminator-head kernels (torch-free; see disc_head_device.cuh for the napkin math).
// Compiled by nvcc for the GPU (namespace cuda) and by the host compiler for the SIMT emulation (namespace
// emulated, through csrc/emulated/disc_head.cpp).
#include <algorithm>

#include "cuda/disc_head_device.cuh"
#include "cuda/disc_head_launch.h"

namespace electra_ext::ELECTRA_BACKEND {
namespace {

namespace dev = disc_head_device;

template <typename T>
bool can_vectorize(const void* x, const float* w, int64_t hidden, int64_t row_stride) {
  constexpr int kPack = dev::kVectorPack<T>;
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
         hidden % kPack == 0 && row_stride % kPack == 0;
}

int backward_warps(int64_t hidden, int device) {
  const int max_shared = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return static_cast<int>(
      std::min<int64_t>(dev::kBackwardMaxWarps, max_shared / (hidden * int64_t(sizeof(float)))));
}

template <typename T>
cudaError_t forward_typed(const DiscHeadForwardArgs& a, cudaStream_t stream) {
  const int blocks = forward_blocks(a.rows);
  const T* x = static_cast<const T*>(a.x);
  constexpr int threads = dev::kForwardWarps * dev::kWarpSize;
  auto kernel = can_vectorize<T>(a.x, a.w, a.hidden, a.row_stride) ? dev::forward_kernel<T, dev::kVectorPack<T>>
                                                                      : dev::forward_kernel<T, 1>;
  launch_kernel(kernel, blocks, threads, 0, stream, x, a.rows, a.hidden, a.row_stride, a.w, a.b, a.labels, a.valid,
                a.logits, a.block_loss, a.block_valid);
  launch_kernel(dev::finish_loss_kernel, 1, dev::kReduceThreads, 0, stream, a.block_loss, a.block_valid, blocks,
                a.loss);
  return cudaGetLastError();
}

template <typename T, int kPack>
cudaError_t launch_backward(const DiscHeadBackwardArgs& a, int blocks, int warps, cudaStream_t stream) {
  auto kernel = dev::backward_kernel<T, kPack>;
  const size_t shared = size_t(warps) * a.hidden * sizeof(float);
  // Above 48 KB of dynamic shared memory a kernel must opt in (H > 1536 with 8 warps).
  if (shared > 48 * 1024) {
    if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
        err != cudaSuccess) {
      return err;
    }
  }
  launch_kernel(kernel, blocks, warps * dev::kWarpSize, shared, stream, a.grad_logits, a.loss_scale,
                static_cast<const T*>(a.x), a.rows, a.hidden, a.row_stride, a.w, a.logits, a.labels, a.valid,
                static_cast<T*>(a.grad_x), a.block_grad_wb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const DiscHeadBackwardArgs& a, int blocks, cudaStream_t stream) {
  int device = 0;
  cudaGetDevice(&device);
  const int warps = backward_warps(a.hidden, device);
  // grad_x is allocated contiguous, so x's alignment decides for both.
  cudaError_t err = can_vectorize<T>(a.x, a.w, a.hidden, a.row_stride)
                        ? launch_backward<T, dev::kVectorPack<T>>(a, blocks, warps, stream)
                        : launch_backward<T, 1>(a, blocks, warps, stream);
  if (err != cudaSuccess) return err;
  const int reduce_blocks = static_cast<int>((a.hidden + 1 + dev::kReduceColumns - 1) / dev::kReduceColumns);
  launch_kernel(dev::finish_grad_wb_kernel, reduce_blocks, dev::kReduceColumns * dev::kReduceRowGroups, 0, stream,
                a.block_grad_wb, blocks, a.hidden, a.grad_w, a.grad_b);
  return cudaGetLastError();
}

}  // namespace

int forward_blocks(int64_t rows) {
  return static_cast<int>(std::clamp<int64_t>((rows + dev::kForwardWarps - 1) / dev::kForwardWarps, 1,
                                              dev::kMaxForwardBlocks));
}

int backward_blocks(int64_t rows, int64_t hidden, int device) {
  const int warps = backward_warps(hidden, device);
  if (warps < 1) return 0;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int max_threads = device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor, device);
  const int64_t resident = int64_t(sms) * std::max(1, max_threads / (warps * dev::kWarpSize));
  return static_cast<int>(std::clamp<int64_t>((rows + warps - 1) / warps, 1, resident));
}

cudaError_t disc_head_forward(const DiscHeadForwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kFloat32: return forward_typed<float>(args, stream);
    case FloatType::kFloat16: return forward_typed<__half>(args, stream);
    case FloatType::kBFloat16: return forward_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t disc_head_backward(const DiscHeadBackwardArgs& args, int blocks, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kFloat32: return backward_typed<float>(args, blocks, stream);
    case FloatType::kFloat16: return backward_typed<__half>(args, blocks, stream);
    case FloatType::kBFloat16: return backward_typed<__nv_bfloat16>(args, blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace electra_ext::ELECTRA_BACKEND
