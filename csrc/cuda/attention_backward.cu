// Host launcher of the fused attention backward kernels (torch-free; design and napkin math in
// attention_backward_device.cuh, mma.sync, and attention_backward_hopper_device.cuh, the wgmma dK/dV kernel).
// Compiled by nvcc for the GPU (namespace cuda) and by the host compiler for the SIMT emulation (namespace
// emulated, through csrc/emulated/attention_backward.cpp).
#include <cstdint>

#include "cuda/attention_backward_device.cuh"
#include "cuda/attention_backward_hopper_device.cuh"
#include "cuda/attention_launch.h"
#include "simt/simt.cuh"

namespace electra_ext::ELECTRA_BACKEND {
namespace {

namespace dev = attention_backward_device;

template <typename Kernel>
cudaError_t allow_shared(Kernel* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;  // above 48 KB of dynamic shared memory a kernel must opt in
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

namespace hopper = attention_backward_hopper_device;

// The dK/dV kernel over (key blocks of 64, heads, batch): the wgmma one where attention_kernels says so, dQ goes
// to the workspace (there is no deterministic wgmma backward yet) and D = 64 (at D = 128 it spills 120 bytes at
// 255 registers), else the mma.sync one.
template <typename T, int D, bool kAccumulateDq>
cudaError_t launch_dkdv(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  const dim3 key_grid((s.max_seqlen + dev::kDkdvBlockKeys - 1) / dev::kDkdvBlockKeys, s.heads, s.batch);
  if constexpr (kAccumulateDq && D == 64) {
    if (attention_kernels(D) == AttentionKernels::kWgmma) {
      constexpr size_t shared = hopper::Layout<D>::kSharedBytes;
      auto kernel = hopper::dkdv_kernel<T, D>;
      if (cudaError_t err = allow_shared(kernel, shared); err != cudaSuccess) return err;
      launch_kernel(kernel, key_grid, dim3(hopper::kThreads), shared, stream, args);
      return cudaGetLastError();
    }
  }
  constexpr size_t shared = dev::dkdv_shared_bytes<D, kAccumulateDq>();
  auto kernel = dev::dkdv_kernel<T, D, kAccumulateDq>;
  if (cudaError_t err = allow_shared(kernel, shared); err != cudaSuccess) return err;
  launch_kernel(kernel, key_grid, dim3(dev::Dkdv<D>::kThreads), shared, stream, args);
  return cudaGetLastError();
}

// delta (zeroing dq_accum's sequence rows), then dK/dV; with dq_accum the dK/dV kernel also adds dQ there and a
// conversion kernel writes it, otherwise the dQ kernel recomputes S and dP (deterministic, 1.4x the products).
template <typename T, int D, bool kAccumulateDq>
cudaError_t backward_typed(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  const dim3 row_grid((s.max_seqlen + dev::kDeltaTokens<D> - 1) / dev::kDeltaTokens<D>, s.heads, s.batch);
  launch_kernel(dev::delta_kernel<T, D>, row_grid, dim3(dev::kDeltaThreads), 0, stream, args);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (cudaError_t err = launch_dkdv<T, D, kAccumulateDq>(args, stream); err != cudaSuccess) return err;
  if constexpr (kAccumulateDq) {
    launch_kernel(dev::dq_convert_kernel<T, D>, row_grid, dim3(dev::kDeltaThreads), 0, stream, args);
  } else {
    constexpr size_t dq_shared = dev::dq_shared_bytes<D>();
    auto dq = dev::dq_kernel<T, D>;
    if (cudaError_t err = allow_shared(dq, dq_shared); err != cudaSuccess) return err;
    const dim3 query_grid((s.max_seqlen + dev::kDqBlockQueries - 1) / dev::kDqBlockQueries, s.heads, s.batch);
    launch_kernel(dq, query_grid, dim3(dev::kDqWarps * dev::kWarpSize), dq_shared, stream, args);
  }
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t backward_typed(const AttentionBackwardArgs& args, cudaStream_t stream) {
  return args.dq_accum != nullptr ? backward_typed<T, D, true>(args, stream)
                                  : backward_typed<T, D, false>(args, stream);
}

template <typename T>
cudaError_t backward_dim(const AttentionBackwardArgs& args, cudaStream_t stream) {
  switch (args.shape.head_dim) {
    case 32: return backward_typed<T, 32>(args, stream);
    case 64: return backward_typed<T, 64>(args, stream);
    case 128: return backward_typed<T, 128>(args, stream);
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// Every row the kernels copy with 16-byte cp.async or store with 16-byte stores must start 16-byte aligned.
bool rows_aligned(const AttentionTensor& t) {
  return aligned16(t.data) && t.token_stride % 8 == 0 && t.head_stride % 8 == 0;
}

}  // namespace

cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  const AttentionShape& s = args.shape;
  if (s.batch < 0 || s.heads < 0 || s.max_seqlen < 0 || s.tokens < 0) return cudaErrorInvalidValue;
  if (s.batch == 0 || s.heads == 0 || s.max_seqlen == 0 || s.tokens == 0) return cudaSuccess;
  // The grid is (key or query blocks, heads, batch): gridDim.y and .z stop at 65535.
  if (s.batch > 65535 || s.heads > 65535) return cudaErrorInvalidValue;
  if (s.dropout_threshold > 0 && s.seed == nullptr) return cudaErrorInvalidValue;
  if (!rows_aligned(args.q) || !rows_aligned(args.k) || !rows_aligned(args.v) || !aligned16(args.grad_out) ||
      !aligned16(args.out) || !aligned16(args.grad_q) || !aligned16(args.grad_k) || !aligned16(args.grad_v) ||
      args.grad_token_stride % 8 != 0 || !aligned16(args.dq_accum)) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case FloatType::kFloat16: return backward_dim<__half>(args, stream);
    case FloatType::kBFloat16: return backward_dim<__nv_bfloat16>(args, stream);
    case FloatType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace electra_ext::ELECTRA_BACKEND
