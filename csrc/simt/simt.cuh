// The one header that device code includes for CUDA built-ins. Under nvcc it is CUDA itself; under a host
// compiler it is the SIMT emulation of simt/emulation.h, so the same kernel source runs on the CPU.
//
// Kernel sources written against it use, besides ordinary CUDA C++:
//   ELECTRA_BACKEND                        the namespace their host launchers live in (cuda / emulated)
//   ELECTRA_DYNAMIC_SHARED(type, name)     instead of `extern __shared__ type name[]`
//   launch_kernel(kernel, grid, block, shared_bytes, stream, args...)   instead of kernel<<<...>>>(args...)
//   device_attribute(attribute, device)    instead of cudaDeviceGetAttribute
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

#if defined(__CUDACC__)

#define ELECTRA_BACKEND cuda
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

}  // namespace electra_ext::cuda

#else

#include "simt/emulation.h"

#define ELECTRA_BACKEND emulated
#define ELECTRA_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::simt::dynamic_shared_memory())

namespace electra_ext::emulated {
// The CUDA runtime calls that launchers make, answered by the emulated device (a using-declaration here
// hides the real runtime's declarations, which the CUDA headers bring in, from code in this namespace).
using ::simt::cudaFuncSetAttribute;
using ::simt::cudaGetDevice;
using ::simt::cudaGetLastError;
using ::simt::device_attribute;
using ::simt::launch_kernel;
}  // namespace electra_ext::emulated

#endif
