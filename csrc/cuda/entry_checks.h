// Shared by the CUDA entry points (csrc/cuda/*_cuda.cpp): what makes a call the caller's mistake, named as such,
// before any kernel is launched.
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace electra_ext {

// The kernels are built for sm_80 and sm_90 (and compute_90 PTX, which newer GPUs compile at load time): their
// mma.sync bf16 tiles and cp.async copies need compute capability 8.0, so an older GPU (V100 7.0, T4 7.5) has
// no code to run. electra_ext.ops takes the PyTorch reference there (ops/backend.py); this is for direct
// torch.ops.electra_ext calls, which would otherwise fail at launch with "no kernel image is available".
constexpr int kMinComputeCapabilityMajor = 8;

// emulated=True asks for the CUDA kernels' device code run on CPU tensors by the SIMT emulation, so with CUDA
// tensors it is a mistake too.
inline void check_cuda_call(const char* op, bool emulated, const c10::Device& device) {
  TORCH_CHECK_VALUE(!emulated, op, ": emulated=True runs the CUDA kernels on the CPU and needs CPU tensors, got "
                                   "CUDA tensors");
  if (!device.is_cuda()) return;  // the device glue names the tensor on another device
  int major = 0;  // an attribute query, not cudaGetDeviceProperties (which reads them all) on every call
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  if (major >= kMinComputeCapabilityMajor) return;
  cudaDeviceProp properties{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&properties, device.index()));
  TORCH_CHECK_VALUE(false, op, ": electra_ext's CUDA kernels need compute capability 8.0 or newer (A100, RTX 30xx "
                    "and later); ", device, " is ", properties.name, " (", properties.major, ".", properties.minor,
                    "). electra_ext.ops runs the PyTorch reference there");
}

}  // namespace electra_ext
