// Scalar math of the discriminator head: GELU in erf form (ELECTRA's, not the tanh approximation) for the
// device code, and BCE-with-logits for the device code and the CPU kernel (whose GELU is ATen's vectorised
// one). Torch-free: this header is compiled by g++ and nvcc alike (the CPU emulation of the device code too).
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace electra_ext::disc_head_math {

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// exp and 1/x: the hardware's approximate instructions on the GPU (a few ulp), libm on the host.
ELECTRA_HOST_DEVICE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}

ELECTRA_HOST_DEVICE float fast_reciprocal(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, x);
#else
  return 1.0f / x;
#endif
}

// The standard normal CDF Phi(x) and exp(-x^2 / 2), from one exponential.
// erfc(a) = t * P(t) * exp(-a^2), t = 1 / (1 + p a), a >= 0 (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7).
// CUDA's erff branches between a polynomial and an exp-based form and costs ~3x the instructions: on an H200
// a GELU-bound pass over bf16 x then ran at a third of the copy bandwidth, limited by instruction issue.
struct NormalCdfPdf {
  float cdf;           // Phi(x)
  float gaussian;      // exp(-x^2 / 2) = sqrt(2 pi) * phi(x)
};

ELECTRA_HOST_DEVICE NormalCdfPdf normal_cdf_and_gaussian(float x) {
  const float a = fabsf(x) * kInvSqrt2;
  const float t = fast_reciprocal(1.0f + 0.3275911f * a);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                    t * 1.061405429f))));
  const float gaussian = fast_exp(-a * a);
  const float half_erfc = 0.5f * poly * gaussian;  // Phi(-|x|), without the cancellation of 1 - erf
  return {x >= 0.0f ? 1.0f - half_erfc : half_erfc, gaussian};
}

// gelu(x) = x * Phi(x).
ELECTRA_HOST_DEVICE float gelu(float x) { return x * normal_cdf_and_gaussian(x).cdf; }

// gelu(x) and d gelu / dx = Phi(x) + x * phi(x), sharing one exponential.
struct GeluAndGrad {
  float value, grad;
};

ELECTRA_HOST_DEVICE GeluAndGrad gelu_and_grad(float x) {
  const NormalCdfPdf n = normal_cdf_and_gaussian(x);
  return {x * n.cdf, n.cdf + x * kInvSqrt2Pi * n.gaussian};
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
