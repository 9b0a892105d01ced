// Shared by the CUDA entry points (csrc/cuda/*_cuda.cpp): emulated=True asks for the CUDA kernels' device code run
// on CPU tensors by the SIMT emulation, so with CUDA tensors it is the caller's mistake, named as such.
#pragma once

#include <c10/util/Exception.h>

namespace electra_ext {

inline void check_not_emulated(const char* op, bool emulated) {
  TORCH_CHECK_VALUE(!emulated, op, ": emulated=True runs the CUDA kernels on the CPU and needs CPU tensors, got "
                                   "CUDA tensors");
}

}  // namespace electra_ext
