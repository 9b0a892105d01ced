// SIMT emulation of CUDA device code on the CPU (included through simt/simt.cuh by a host compiler only).
//
// A launch runs its blocks one after another; the threads of a block run as fibers that take turns on the
// launching host thread, each running until it reaches a barrier or a warp collective (or finishes), then the next
// in line. So barriers, warp shuffles and shared memory behave as on the GPU within a block, and a missing
// __syncthreads shows up as a wrong result: a thread runs as far ahead of the other warps as barriers let it, so
// it reads shared memory that they have not written yet, or overwrites what they have yet to read.
// AddressSanitizer sees out-of-bounds global and shared accesses. Not modelled: timing, occupancy, bank conflicts,
// races between blocks (blocks never overlap) and the GPU's weak memory model. Supported: 1-3 D grids and blocks
// of whole warps (blockDim a multiple of 32, at most 1024 threads), full-warp collectives (mask 0xffffffff,
// width 32), static and dynamic shared memory.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <typeindex>
#include <typeinfo>
#include <type_traits>
#include <utility>

// Kernels carry `#pragma unroll` for nvcc; the host compiler has its own unrolling.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// The CUDA headers define these as attributes for a host compiler; the emulation needs other meanings.
// __shared__ variables are function-local statics: one copy per kernel, shared by the threads of the block
// that runs, and blocks run one at a time.
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace simt {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerBlock = 1024;
// The emulated device: few SMs, so that grids sized "to fill the device" stay small on the CPU, with the compute
// capability and per-SM limits of the GPU that the environment variable ELECTRA_EXT_EMULATED_SM names (read at
// every query): "90" (the default) an H100, "80" an A100 (launchers that pick kernels per architecture then take
// their sm_80 ones), "86" an RTX 3090 or A10, whose 99 KiB of shared memory per block and 1,536 threads per SM
// the RTX 40xx, L4 and RTX 50xx have too: what a kernel must fit to run on the consumer GPUs.
constexpr int kMultiProcessorCount = 2;
constexpr int kDefaultSharedMemoryPerBlock = 48 * 1024;
struct DeviceLimits {
  int major;
  int minor;
  int max_threads_per_multiprocessor;
  int max_shared_memory_per_block_optin;
  int shared_memory_per_multiprocessor;
  int max_blocks_per_multiprocessor;
};
const DeviceLimits& emulated_device();

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// Block-wide and warp-wide synchronisation and data exchange for the calling emulated thread.
void sync_block();
void sync_warp();
// Publishes `bytes` (at most kWarpSlotBytes) of this lane's value, then copies lane `source_lane`'s into
// `out`; warp_gather copies every lane's, lane by lane, into `out` (32 * bytes). All lanes must call.
constexpr std::size_t kWarpSlotBytes = 64;
void warp_exchange(const void* value, void* out, std::size_t bytes, int source_lane);
void warp_gather(const void* value, void* out, std::size_t bytes);
unsigned warp_ballot(bool predicate);
int lane_id();
void* dynamic_shared_memory();
[[noreturn]] void fail(const char* what);

inline void check_full_mask(unsigned mask, int width) {
  if (mask != 0xffffffffu || width != kWarpSize) fail("only full-warp collectives (mask 0xffffffff, width 32)");
}

template <typename T>
T shuffle_from(unsigned mask, T value, int source_lane, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kWarpSlotBytes, "shuffle of a small value");
  check_full_mask(mask, width);
  T out;
  warp_exchange(&value, &out, sizeof(T), source_lane);
  return out;
}

// Asynchronous operations of the calling thread (cp.async, cp.reduce.async.bulk, wgmma.mma_async), one queue per
// kind: an issued operation waits in its commit group and is carried out by the wait that covers the group, the
// latest moment the PTX ISA allows, so that a kernel that rewrites an operation's sources or reads its results
// before that wait computes wrong values. Waiting with operations issued but not committed (they would never be
// waited for), or ending the block with operations not waited for, fails the launch.
enum class AsyncKind : int { kCpAsync = 0, kBulkReduction = 1, kWgmma = 2 };
void async_issue(AsyncKind kind, std::function<void()> operation);
void async_commit_group(AsyncKind kind);
void async_wait_group(AsyncKind kind, int pending);

// Shared-memory writes through the generic proxy that the asynchronous proxy (wgmma's shared-memory operands, bulk
// reductions' sources) reads later: on a GPU the writing thread must follow them with fence.proxy.async before the
// barrier that orders them before the reader, or the async proxy may read the old bytes, a race no result shows.
// The emulation records cp.async copies and stmatrix stores as their thread's unfenced writes (16-byte chunks),
// forgets a thread's at its fence_proxy_async(), and stops a read through the async proxy of a chunk that is still
// unfenced. Plain C++ stores are not seen.
void note_generic_shared_write(const void* address, std::size_t bytes);
void fence_proxy_async();
void check_async_proxy_read(const void* address, std::size_t bytes, const char* reader);

// The T in a state slot, value-initialised on first use.
template <typename T>
T& state_in(std::shared_ptr<void>& slot) {
  if (!slot) slot = std::make_shared<T>();
  return *static_cast<T*>(slot.get());
}

// The calling emulated thread's own T, value-initialised when the thread starts a block: what a primitive's emulation
// keeps per thread (a C++ thread_local would be shared by the fibers of the block).
std::shared_ptr<void>& thread_state_slot(std::type_index type);
template <typename T>
T& thread_state() {
  return state_in<T>(thread_state_slot(std::type_index(typeid(T))));
}

// The running block's own T, value-initialised when the block starts: what a primitive's emulation keeps per block
// (what the threads of a block compare with one another).
std::shared_ptr<void>& block_state_slot(std::type_index type);
template <typename T>
T& block_state() {
  return state_in<T>(block_state_slot(std::type_index(typeid(T))));
}

// Runs `body` for every thread of every block of the grid (see the top of this file).
void run_grid(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes, const std::function<void()>& body);

template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
                   cudaStream_t, Args&&... args) {
  const std::tuple<std::decay_t<KernelArgs>...> bound(static_cast<KernelArgs>(args)...);
  run_grid(grid, block, dynamic_shared_bytes, [&] { std::apply(kernel, bound); });
}

// The CUDA runtime calls that launchers make (they answer for the emulated device above).
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* device);
int device_attribute(cudaDeviceAttr attribute, int device);
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel*, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize &&
      value > emulated_device().max_shared_memory_per_block_optin) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
// The occupancy by threads, dynamic shared memory and the per-SM block limit of the emulated GPU; the emulated
// device has no register file and does not count static shared memory, so a kernel those limit gets more blocks
// here than on the GPU.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel*, int block_size,
                                                          std::size_t dynamic_shared_bytes) {
  const DeviceLimits& device = emulated_device();
  if (block_size <= 0 || block_size > kMaxThreadsPerBlock ||
      dynamic_shared_bytes > std::size_t(device.max_shared_memory_per_block_optin)) {
    return cudaErrorInvalidValue;
  }
  const int by_threads = device.max_threads_per_multiprocessor / block_size;
  const int by_shared = dynamic_shared_bytes == 0
                            ? device.max_blocks_per_multiprocessor
                            : int(std::size_t(device.shared_memory_per_multiprocessor) / dynamic_shared_bytes);
  *blocks = std::min({by_threads, by_shared, device.max_blocks_per_multiprocessor});
  return cudaSuccess;
}

}  // namespace simt

using simt::blockDim;
using simt::blockIdx;
using simt::gridDim;
using simt::threadIdx;

inline void __syncthreads() { simt::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::check_full_mask(mask, simt::kWarpSize);
  simt::sync_warp();
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = simt::kWarpSize) {
  return simt::shuffle_from(mask, value, source_lane % simt::kWarpSize, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = simt::kWarpSize) {
  return simt::shuffle_from(mask, value, (simt::lane_id() ^ lane_mask) % simt::kWarpSize, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = simt::kWarpSize) {
  const int source = simt::lane_id() + static_cast<int>(delta);
  return simt::shuffle_from(mask, value, source < simt::kWarpSize ? source : simt::lane_id(), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = simt::kWarpSize) {
  const int source = simt::lane_id() - static_cast<int>(delta);
  return simt::shuffle_from(mask, value, source >= 0 ? source : simt::lane_id(), width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  simt::check_full_mask(mask, simt::kWarpSize);
  return simt::warp_ballot(predicate != 0);
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0u; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }

// Atomics on the GCC/Clang builtins (std::atomic_ref is C++20; these sources also build as C++17).
template <typename T>
T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  } else {
    T expected;
    __atomic_load(address, &expected, __ATOMIC_SEQ_CST);
    T desired = expected + value;
    while (!__atomic_compare_exchange(address, &expected, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
      desired = expected + value;
    }
    return expected;
  }
}
template <typename T>
T atomicMax(T* address, T value) {
  T expected = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (expected < value && !__atomic_compare_exchange_n(address, &expected, value, false, __ATOMIC_SEQ_CST,
                                                           __ATOMIC_SEQ_CST)) {
  }
  return expected;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
