// Hopper's bulk asynchronous reduction, shared -> global (cp.reduce.async.bulk, the TMA unit's), beside the wgmma
// wrappers and under the same rule: device code uses these wrappers, never inline PTX; under nvcc each is the PTX
// instruction, under the SIMT emulation it does what the PTX ISA specifies. The instruction is sm_90; only the
// sm_90a kernels use it, so it is defined where ELECTRA_WGMMA_AVAILABLE is.
//
// Why: the attention backward adds each query tile's dQ (64 rows x 64 fp32, 16 KB) to a global fp32 workspace
// once per 64-key block: at ELECTRA-Base 8 times per element, 400 MB of additions. As red.global.add.v2.f32 that
// is 16 instructions per thread and tile, each an 8-byte read-modify-write for the L2's atomic units. One bulk
// reduction per 256-byte query row instead is one instruction for 64 additions, carried out by the TMA unit
// while the warps go on (FlashAttention-3 adds its dQ this way).
//
// Ordering, per thread (the emulation checks all but the fence: a source that changes between the issue and the
// wait stops the kernel, as do the last two rules):
// fence_proxy_async_shared() by every thread that wrote the source rows, then a barrier (or __syncwarp) that
// publishes them to the issuing thread; bulk_reduce_add_f32() by the issuing thread; bulk_commit_group(); and
// bulk_wait_group_read<n>() before the source rows are written again, and bulk_wait_group_read<0>() before the
// thread exits (shared memory ends with the block). Waiting with reductions issued but not committed is an error:
// they would never be waited for.
#pragma once

#include <cstdint>
#if !defined(__CUDACC__)
#include <cstring>
#include <vector>
#endif

#include "simt/warpgroup_mma.cuh"

namespace electra_ext::ELECTRA_BACKEND {

#if defined(__CUDACC__)
#if ELECTRA_WGMMA_AVAILABLE

// global[i] += shared[i] for i < count, as one asynchronous bulk operation: both addresses 16-byte aligned, count
// a multiple of 4 (the size a multiple of 16 bytes). Each element's addition is atomic; there is no order among
// them or against other reductions.
__device__ __forceinline__ void bulk_reduce_add_f32(float* global, const float* shared, uint32_t count) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(global),
               "r"(shared_address(shared)), "r"(count * 4)
               : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups still read their shared-memory sources.
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}

#endif  // ELECTRA_WGMMA_AVAILABLE
#else  // the SIMT emulation: each reduction reads its source at the latest moment the PTX ISA allows, the wait
       // that covers its group, and stops the kernel if the source is not what it was at the issue: rewritten too
       // early, or written after the issue by a lane that no barrier ordered before it.

inline void bulk_reduce_add_f32(float* global, const float* shared, uint32_t count) {
  if (reinterpret_cast<uintptr_t>(global) % 16 != 0 || reinterpret_cast<uintptr_t>(shared) % 16 != 0) {
    ::simt::fail("cp.reduce.async.bulk: an address is not 16-byte aligned");
  }
  if (count % 4 != 0) ::simt::fail("cp.reduce.async.bulk: the size is not a multiple of 16 bytes");
  ::simt::check_async_proxy_read(shared, count * sizeof(float), "cp.reduce.async.bulk");
  std::vector<float> at_issue(shared, shared + count);
  ::simt::async_issue(::simt::AsyncKind::kBulkReduction, [=] {
    if (std::memcmp(at_issue.data(), shared, count * sizeof(float)) != 0) {
      ::simt::fail("cp.reduce.async.bulk: the shared source changed between the issue and the wait (written after "
                   "the issue by a thread no barrier ordered before it, or rewritten before the wait)");
    }
    for (uint32_t i = 0; i < count; ++i) atomicAdd(global + i, shared[i]);
  });
}
inline void bulk_commit_group() { ::simt::async_commit_group(::simt::AsyncKind::kBulkReduction); }
template <int kPending>
void bulk_wait_group_read() {
  ::simt::async_wait_group(::simt::AsyncKind::kBulkReduction, kPending);
}

#endif

}  // namespace electra_ext::ELECTRA_BACKEND
