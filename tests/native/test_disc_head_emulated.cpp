// The discriminator-head CUDA kernels, run by the SIMT emulation, against a float64 reference on the host.
// (pytest runs the same kernels through torch with the op's full test suite; this test needs no torch, so it
// runs under AddressSanitizer and UndefinedBehaviorSanitizer.)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/disc_head_launch.h"
#include "native_testing.h"
#include "simt/simt.cuh"

namespace {

using electra_ext::DiscHeadBackwardArgs;
using electra_ext::DiscHeadForwardArgs;
using electra_ext::FloatType;
namespace emulated = electra_ext::emulated;
using native_testing::relative_error;

int failures = 0;

struct Reference {
  std::vector<double> logits, grad_x, grad_w;
  double loss = 0, grad_b = 0;
};

double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_grad(double x) {
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}

// d(loss + sum_i grad_logits_i * logits_i) for the head on float64 copies of the inputs.
Reference reference(const std::vector<double>& x, int rows, int hidden, const std::vector<float>& w, float b,
                    const std::vector<char>& labels, const std::vector<char>& valid,
                    const std::vector<float>& grad_logits) {
  Reference r;
  r.logits.resize(rows);
  r.grad_x.resize(size_t(rows) * hidden);
  r.grad_w.assign(hidden, 0.0);
  int valid_rows = 0;
  for (int i = 0; i < rows; ++i) valid_rows += valid[i];
  for (int i = 0; i < rows; ++i) {
    double z = b;
    for (int j = 0; j < hidden; ++j) z += gelu(x[size_t(i) * hidden + j]) * w[j];
    r.logits[i] = z;
    const double y = labels[i] ? 1.0 : 0.0;
    double dz = grad_logits[i];
    if (valid[i]) {
      r.loss += (std::max(z, 0.0) - z * y + std::log1p(std::exp(-std::fabs(z)))) / valid_rows;
      dz += (1.0 / (1.0 + std::exp(-z)) - y) / valid_rows;
    }
    r.grad_b += dz;
    for (int j = 0; j < hidden; ++j) {
      const double xv = x[size_t(i) * hidden + j];
      r.grad_x[size_t(i) * hidden + j] = dz * w[j] * gelu_grad(xv);
      r.grad_w[j] += dz * gelu(xv);
    }
  }
  return r;
}

void expect_close(double error, double tolerance, const char* what, FloatType dtype, int rows, int hidden) {
  if (!(error <= tolerance)) {  // NaN fails too
    std::printf("FAILED: %s, dtype %d, rows %d, hidden %d: relative error %g > %g\n", what, int(dtype), rows, hidden,
                error, tolerance);
    ++failures;
  }
}

float to_float(float v) { return v; }
float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// x rows are `row_stride` apart (row_stride > hidden: a slice of a wider tensor); `offset` elements of
// padding before the first row misalign it and select the scalar path.
template <typename T>
void check(FloatType dtype, int rows, int hidden, int row_stride, int offset, double tolerance, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::bernoulli_distribution replaced(0.15), not_padding(0.8);
  std::vector<T> storage(offset + size_t(rows) * row_stride + 1);
  std::vector<double> x(size_t(rows) * hidden);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < hidden; ++j) {
      const T value = from_float<T>(normal(rng));
      storage[offset + size_t(i) * row_stride + j] = value;
      x[size_t(i) * hidden + j] = to_float(value);
    }
  }
  std::vector<float> w(hidden), grad_logits(rows);
  for (float& v : w) v = normal(rng) / std::sqrt(float(hidden));
  for (float& v : grad_logits) v = normal(rng);
  const float b = normal(rng);
  std::vector<char> labels(rows), valid(rows);
  for (int i = 0; i < rows; ++i) {
    labels[i] = replaced(rng);
    valid[i] = not_padding(rng);
  }
  const Reference expected = reference(x, rows, hidden, w, b, labels, valid, grad_logits);

  std::vector<float> logits(rows), block_loss(emulated::forward_blocks(rows));
  std::vector<int32_t> block_valid(block_loss.size());
  float loss = NAN;
  const DiscHeadForwardArgs forward{dtype, storage.data() + offset, rows, hidden, row_stride, w.data(), &b,
                                    reinterpret_cast<const bool*>(labels.data()),
                                    reinterpret_cast<const bool*>(valid.data()), logits.data(), &loss,
                                    block_loss.data(), block_valid.data()};
  if (emulated::disc_head_forward(forward, nullptr) != cudaSuccess) {
    std::printf("FAILED: forward launch\n");
    ++failures;
    return;
  }
  expect_close(relative_error(logits, expected.logits), tolerance, "logits", dtype, rows, hidden);
  expect_close(relative_error(std::vector<float>{loss}, {expected.loss}), tolerance, "loss", dtype, rows, hidden);

  int valid_rows = 0;
  for (char v : valid) valid_rows += v;
  const float loss_scale = 1.0f / float(std::max(valid_rows, 1));
  const int blocks = emulated::backward_blocks(rows, hidden, 0);
  std::vector<T> grad_x(size_t(rows) * hidden);
  std::vector<float> grad_w(hidden, NAN), block_grad_wb(size_t(blocks) * (hidden + 1));
  float grad_b = NAN;
  const DiscHeadBackwardArgs backward{dtype, grad_logits.data(), &loss_scale, storage.data() + offset, rows, hidden,
                                      row_stride, w.data(), logits.data(),
                                      reinterpret_cast<const bool*>(labels.data()),
                                      reinterpret_cast<const bool*>(valid.data()), grad_x.data(), grad_w.data(),
                                      &grad_b, block_grad_wb.data()};
  if (emulated::disc_head_backward(backward, blocks, nullptr) != cudaSuccess) {
    std::printf("FAILED: backward launch\n");
    ++failures;
    return;
  }
  std::vector<double> grad_x_values(grad_x.size());
  for (size_t i = 0; i < grad_x.size(); ++i) grad_x_values[i] = to_float(grad_x[i]);
  expect_close(relative_error(grad_x_values, expected.grad_x), tolerance, "grad_x", dtype, rows, hidden);
  expect_close(relative_error(grad_w, expected.grad_w), tolerance, "grad_w", dtype, rows, hidden);
  expect_close(relative_error(std::vector<float>{grad_b}, {expected.grad_b}), tolerance, "grad_b", dtype, rows,
               hidden);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  // float32 within 1e-5 (the project's fp32 standard); bf16 stores dx with 8 mantissa bits (2^-9 relative).
  for (int rows : {1, 7, 67}) {
    for (int hidden : {64, 37, 256}) {
      check<float>(FloatType::kFloat32, rows, hidden, hidden, 0, 1e-5, rng);
      check<float>(FloatType::kFloat32, rows, hidden, hidden + 8, 1, 1e-5, rng);  // strided, unaligned
      check<__nv_bfloat16>(FloatType::kBFloat16, rows, hidden, hidden, 0, 4e-3, rng);
    }
  }
  std::printf("%s: %d failure(s)\n", failures == 0 ? "emulated disc_head passed" : "emulated disc_head FAILED",
              failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
