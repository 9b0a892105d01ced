// The generator-head CUDA kernels and launchers, built by the host compiler against the SIMT emulation: the same
// source as the GPU build, running on the CPU (namespace electra_ext::emulated).
#include "cuda/gen_head.cu"
