// ELECTRA_HOST_DEVICE: a function that nvcc compiles for host and device and the host compiler as an inline
// function (the CPU kernels and the SIMT emulation of the device code include the same common/ headers).
#pragma once

#if defined(__CUDACC__)
#define ELECTRA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ELECTRA_HOST_DEVICE inline
#endif
