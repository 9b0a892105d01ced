// The one header that device code includes for CUDA built-ins. Under nvcc it is CUDA itself; under a host
// compiler it is the SIMT emulation of simt/emulation.h, so the same kernel source runs on the CPU.
//
// Kernel sources written against it use, besides ordinary CUDA C++:
//   ELECTRA_BACKEND                        the namespace their host launchers live in (cuda / emulated)
//   ELECTRA_DYNAMIC_SHARED(type, name)     instead of `extern __shared__ type name[]`
//   launch_kernel(kernel, grid, block, shared_bytes, stream, args...)   instead of kernel<<<...>>>(args...)
//   device_attribute(attribute, device)    instead of cudaDeviceGetAttribute
// and, for tests that run on both, device memory: device_alloc / device_free / copy_to_device / copy_to_host
// (cudaMalloc and cudaMemcpy on the GPU, the host heap under the emulation) and check_launch (the launch's
// error, after the device has finished).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__CUDACC__)

#define ELECTRA_BACKEND cuda
#define ELECTRA_BACKEND_NAME "cuda"
#define ELECTRA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

namespace electra_ext::cuda {

template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<KernelArgs>(args)...);
}

inline int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  cudaDeviceGetAttribute(&value, attribute, device);
  return value;
}

inline void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(error));
    std::abort();
  }
}

template <typename T>
T* device_alloc(size_t count) {
  void* pointer = nullptr;
  check_cuda(cudaMalloc(&pointer, count * sizeof(T)), "cudaMalloc");
  return static_cast<T*>(pointer);
}
inline void device_free(void* pointer) { check_cuda(cudaFree(pointer), "cudaFree"); }
inline void copy_to_device(void* device, const void* host, size_t bytes) {
  check_cuda(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}
inline void copy_to_host(void* host, const void* device, size_t bytes) {
  check_cuda(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}
inline void check_launch(const char* what) {
  check_cuda(cudaGetLastError(), what);
  check_cuda(cudaDeviceSynchronize(), what);
}

}  // namespace electra_ext::cuda

#else

#include "simt/emulation.h"

#define ELECTRA_BACKEND emulated
#define ELECTRA_BACKEND_NAME "emulated"
#define ELECTRA_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::simt::dynamic_shared_memory())

namespace electra_ext::emulated {
// The CUDA runtime calls that launchers make, answered by the emulated device (a using-declaration here
// hides the real runtime's declarations, which the CUDA headers bring in, from code in this namespace).
using ::simt::cudaFuncSetAttribute;
using ::simt::cudaGetDevice;
using ::simt::cudaGetLastError;
using ::simt::cudaOccupancyMaxActiveBlocksPerMultiprocessor;
using ::simt::device_attribute;
using ::simt::launch_kernel;

// Filled with 0xFF like cudaMalloc'd memory is filled with whatever was there: never read before written.
template <typename T>
T* device_alloc(size_t count) {
  void* pointer = std::malloc(count * sizeof(T));
  std::memset(pointer, 0xFF, count * sizeof(T));
  return static_cast<T*>(pointer);
}
inline void device_free(void* pointer) { std::free(pointer); }
inline void copy_to_device(void* device, const void* host, size_t bytes) { std::memcpy(device, host, bytes); }
inline void copy_to_host(void* host, const void* device, size_t bytes) { std::memcpy(host, device, bytes); }
inline void check_launch(const char* what) {
  if (::simt::cudaGetLastError() != cudaSuccess) ::simt::fail(what);
}
}  // namespace electra_ext::emulated

#endif
