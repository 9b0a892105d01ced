// Scalar math of the discriminator head, shared by the CPU kernel and the CUDA device code so both compute
// the same function: GELU in erf form (ELECTRA's, not the tanh approximation) and BCE-with-logits.
// Torch-free: this header is compiled by g++ and nvcc alike.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ELECTRA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ELECTRA_HOST_DEVICE inline
#endif

namespace electra_ext::disc_head_math {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// gelu(x) = x * Phi(x), Phi the standard normal CDF.
ELECTRA_HOST_DEVICE float gelu(float x) { return 0.5f * x * (1.0f + erff(x * kInvSqrt2)); }

// d gelu / dx = Phi(x) + x * phi(x).
ELECTRA_HOST_DEVICE float gelu_grad(float x) {
  return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

// BCE-with-logits in the overflow-free form max(z, 0) - z*y + log(1 + exp(-|z|)).
ELECTRA_HOST_DEVICE float bce_with_logits(float z, float y) {
  return fmaxf(z, 0.0f) - z * y + log1pf(expf(-fabsf(z)));
}

// d BCE / dz = sigmoid(z) - y, with sigmoid evaluated so that exp never overflows.
ELECTRA_HOST_DEVICE float bce_with_logits_grad(float z, float y) {
  const float e = expf(-fabsf(z));
  const float sigmoid = z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return sigmoid - y;
}

}  // namespace electra_ext::disc_head_math
