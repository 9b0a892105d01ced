// Host launcher of the fused attention forward kernels (torch-free; design and napkin math in
// attention_forward_device.cuh, mma.sync, and attention_forward_hopper_device.cuh, wgmma). Compiled by nvcc for the
// GPU (namespace cuda) and by the host compiler for the SIMT emulation (namespace emulated, through
// csrc/emulated/attention_forward.cpp).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/attention_forward_device.cuh"
#include "cuda/attention_forward_hopper_device.cuh"
#include "cuda/attention_launch.h"

namespace electra_ext::ELECTRA_BACKEND {
namespace {

namespace dev = attention_forward_device;

constexpr int kMaxGridY = 65535;

// cp.async moves 16-byte chunks of head_dim rows: every row of q, k, v must start 16-byte aligned.
bool rows_aligned(const AttentionTensor& t) {
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.token_stride % 8 == 0 && t.head_stride % 8 == 0;
}

// m16 query-row tiles per warp: 2 (32 rows, 128 per block) where the registers allow it without spills, D = 32
// and 64; D = 128 would need 64 Q + 128 O + 64 S/P registers per lane, past the 255 limit, and keeps 1.
template <int kHeadDim>
constexpr int kRowTiles = kHeadDim <= 64 ? 2 : 1;

// Launches `kernel` over (query blocks of block_m rows, batch x heads), opting in to `shared` bytes of dynamic
// shared memory above 48 KB (head_dim 64 and 128).
template <typename Kernel>
cudaError_t launch_over_query_blocks(Kernel* kernel, int block_m, int threads, size_t shared,
                                     const AttentionForwardArgs& args, cudaStream_t stream) {
  if (shared > 48 * 1024) {
    if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
        err != cudaSuccess) {
      return err;
    }
  }
  const int64_t heads = int64_t(args.shape.batch) * args.shape.heads;
  const unsigned query_blocks = static_cast<unsigned>((int64_t(args.shape.max_seqlen) + block_m - 1) / block_m);
  const unsigned grid_y = static_cast<unsigned>(heads < kMaxGridY ? heads : kMaxGridY);
  const unsigned grid_z = static_cast<unsigned>((heads + grid_y - 1) / grid_y);
  launch_kernel(kernel, dim3(query_blocks, grid_y, grid_z), dim3(threads), shared, stream, args);
  return cudaGetLastError();
}

template <typename T, int kHeadDim>
cudaError_t launch(const AttentionForwardArgs& args, cudaStream_t stream) {
  using L = dev::Layout<kHeadDim, kRowTiles<kHeadDim>>;
  return launch_over_query_blocks(dev::forward_kernel<T, kHeadDim, kRowTiles<kHeadDim>>, L::kBlockM, dev::kThreads,
                                  L::kSharedBytes, args, stream);
}

namespace hopper = attention_forward_hopper_device;

template <typename T, int kHeadDim>
cudaError_t launch_hopper(const AttentionForwardArgs& args, cudaStream_t stream) {
  return launch_over_query_blocks(hopper::forward_kernel<T, kHeadDim>, hopper::kBlockM, hopper::kThreads,
                                  hopper::Layout<kHeadDim>::kSharedBytes, args, stream);
}

template <typename T>
cudaError_t launch_typed(const AttentionForwardArgs& args, cudaStream_t stream) {
  const bool wgmma = attention_kernels(args.shape.head_dim) == AttentionKernels::kWgmma;
  switch (args.shape.head_dim) {
    case 32: return launch<T, 32>(args, stream);
    case 64: return wgmma ? launch_hopper<T, 64>(args, stream) : launch<T, 64>(args, stream);
    case 128: return wgmma ? launch_hopper<T, 128>(args, stream) : launch<T, 128>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// The wgmma kernels need compute capability 9.0 (sm_90a code runs there only) and a _C built with sm_90a code:
// setup.py defines ELECTRA_EXT_SM90A when TORCH_CUDA_ARCH_LIST names 9.0a. The emulation runs both kinds; its
// device reports the compute capability that ELECTRA_EXT_EMULATED_SM names (default 90). ELECTRA_EXT_WGMMA="0"
// keeps every device on the mma.sync kernels, which an sm_90a build holds too: a fallback, and the way to time
// both kinds side by side from one build. Read at every launch (one getenv, under a microsecond), so
// that a process can switch.
AttentionKernels attention_kernels(int head_dim) {
#if defined(__CUDACC__) && !defined(ELECTRA_EXT_SM90A)
  (void)head_dim;
  return AttentionKernels::kMmaSync;
#else
  const char* wgmma_setting = std::getenv("ELECTRA_EXT_WGMMA");
  if (wgmma_setting != nullptr && std::strcmp(wgmma_setting, "0") == 0) return AttentionKernels::kMmaSync;
  int device = 0;
  const bool hopper = cudaGetDevice(&device) == cudaSuccess &&
                      device_attribute(cudaDevAttrComputeCapabilityMajor, device) == 9;
  return hopper && (head_dim == 64 || head_dim == 128) ? AttentionKernels::kWgmma : AttentionKernels::kMmaSync;
#endif
}

// cudaErrorInvalidValue for a head_dim other than 32, 64, 128, a dtype other than fp16/bf16, or q, k, v rows
// (or out) that are not 16-byte aligned (the caller makes the tensors contiguous then).
cudaError_t attention_forward(const AttentionForwardArgs& args, cudaStream_t stream) {
  const AttentionShape& shape = args.shape;
  if (shape.batch <= 0 || shape.heads <= 0 || shape.max_seqlen <= 0 || shape.tokens <= 0) return cudaSuccess;
  if (!rows_aligned(args.q) || !rows_aligned(args.k) || !rows_aligned(args.v) ||
      reinterpret_cast<uintptr_t>(args.out) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  if (shape.dropout_threshold > 0 && shape.seed == nullptr) return cudaErrorInvalidValue;
  if (int64_t(shape.batch) * shape.heads > int64_t(kMaxGridY) * kMaxGridY) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case FloatType::kFloat16: return launch_typed<__half>(args, stream);
    case FloatType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace electra_ext::ELECTRA_BACKEND
