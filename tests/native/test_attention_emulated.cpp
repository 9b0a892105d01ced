// The fused attention CUDA kernels (forward and backward), run by the SIMT emulation, against a float64 reference
// on the host. (pytest runs the same kernels through torch with the op's full test suite; this test needs no
// torch, so it runs under AddressSanitizer and UndefinedBehaviorSanitizer: every global and shared access of
// the kernels is bounds-checked, with padding, partial tiles, strided q/k/v and dropout.)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "common/philox.h"
#include "cuda/attention_launch.h"
#include "native_testing.h"
#include "simt/simt.cuh"

namespace {

using electra_ext::AttentionBackwardArgs;
using electra_ext::AttentionForwardArgs;
using electra_ext::AttentionShape;
using electra_ext::AttentionTensor;
using electra_ext::FloatType;
namespace emulated = electra_ext::emulated;
using native_testing::DeviceBuffer;
using native_testing::relative_error;
namespace philox = electra_ext::philox;

int failures = 0;

void expect(bool ok, const char* what, int head_dim, float dropout_p) {
  if (!ok) {
    std::printf("FAILED: %s (head_dim %d, dropout %g)\n", what, head_dim, dropout_p);
    ++failures;
  }
}

std::vector<double> to_double(const __nv_bfloat16* values, size_t count) {
  std::vector<double> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = __bfloat162float(values[i]);
  return out;
}

// Two sequences (lengths `lengths`, packed back to back with a gap of padding tokens) of `heads` heads; q, k, v
// are strided views of one fused [tokens, 3, heads, head_dim] projection.
void check(int head_dim, std::vector<int> lengths, float dropout_p, std::mt19937& rng) {
  constexpr int kHeads = 2;
  constexpr int kGap = 3;  // padding tokens between the sequences: never read or written
  constexpr int64_t kSeed = 20261126;
  const int batch = static_cast<int>(lengths.size());
  std::vector<int32_t> starts(batch), seqlens(lengths.begin(), lengths.end());
  int tokens = 0, max_seqlen = 0;
  for (int b = 0; b < batch; ++b) {
    starts[b] = tokens;
    tokens += lengths[b] + kGap;
    max_seqlen = std::max(max_seqlen, lengths[b]);
  }
  const int64_t token_stride = 3 * kHeads * head_dim, head_stride = head_dim;
  std::normal_distribution<float> normal;
  std::vector<__nv_bfloat16> qkv(size_t(tokens) * token_stride), grad_out_values(size_t(tokens) * kHeads * head_dim);
  for (auto& x : qkv) x = __float2bfloat16_rn(normal(rng));
  for (auto& x : grad_out_values) x = __float2bfloat16_rn(normal(rng));
  const float scale = 1.0f / std::sqrt(float(head_dim));
  const uint32_t threshold = philox::dropout_threshold(dropout_p);
  const double keep_scale = 256.0 / (256.0 - threshold);  // 1 / the keep probability of a byte draw

  auto element = [&](int which, int token, int h, int d) {
    return double(__bfloat162float(qkv[size_t(token) * token_stride + (which * kHeads + h) * head_dim + d]));
  };
  const size_t size = size_t(tokens) * kHeads * head_dim;
  std::vector<double> out(size, 0.0), grad_q(size, 0.0), grad_k(size, 0.0), grad_v(size, 0.0);
  for (int b = 0; b < batch; ++b) {
    const int n = lengths[b], t0 = starts[b];
    for (int h = 0; h < kHeads; ++h) {
      std::vector<double> p(size_t(n) * n), keep(size_t(n) * n), dp(size_t(n) * n);
      for (int i = 0; i < n; ++i) {
        double max = -INFINITY;
        for (int j = 0; j < n; ++j) {
          double s = 0;
          for (int d = 0; d < head_dim; ++d) s += element(0, t0 + i, h, d) * element(1, t0 + j, h, d);
          p[size_t(i) * n + j] = s * scale;
          max = std::max(max, s * scale);
          keep[size_t(i) * n + j] = philox::attention_dropout_keep(kSeed, b, h, i, j, threshold) ? keep_scale : 0.0;
        }
        double sum = 0;
        for (int j = 0; j < n; ++j) sum += (p[size_t(i) * n + j] = std::exp(p[size_t(i) * n + j] - max));
        for (int j = 0; j < n; ++j) p[size_t(i) * n + j] /= sum;
      }
      auto at = [&](int token, int d) { return (size_t(token) * kHeads + h) * head_dim + d; };
      for (int i = 0; i < n; ++i) {
        double delta = 0;
        for (int j = 0; j < n; ++j) {
          const double weight = p[size_t(i) * n + j] * keep[size_t(i) * n + j];
          double dot = 0;
          for (int d = 0; d < head_dim; ++d) {
            out[at(t0 + i, d)] += weight * element(2, t0 + j, h, d);
            grad_v[at(t0 + j, d)] += weight * __bfloat162float(grad_out_values[at(t0 + i, d)]);
            dot += __bfloat162float(grad_out_values[at(t0 + i, d)]) * element(2, t0 + j, h, d);
          }
          dp[size_t(i) * n + j] = dot * keep[size_t(i) * n + j];
          delta += p[size_t(i) * n + j] * dp[size_t(i) * n + j];
        }
        for (int j = 0; j < n; ++j) {
          const double ds = p[size_t(i) * n + j] * (dp[size_t(i) * n + j] - delta) * scale;
          for (int d = 0; d < head_dim; ++d) {
            grad_q[at(t0 + i, d)] += ds * element(1, t0 + j, h, d);
            grad_k[at(t0 + j, d)] += ds * element(0, t0 + i, h, d);
          }
        }
      }
    }
  }

  const AttentionShape shape{starts.data(), seqlens.data(), batch, kHeads, head_dim, max_seqlen, tokens, scale,
                             threshold, float(keep_scale), &kSeed};
  const AttentionTensor q{qkv.data(), token_stride, head_stride},
      k{qkv.data() + kHeads * head_dim, token_stride, head_stride},
      v{qkv.data() + 2 * kHeads * head_dim, token_stride, head_stride};
  DeviceBuffer<__nv_bfloat16> out_kernel(size), grad_q_kernel(size), grad_k_kernel(size), grad_v_kernel(size);
  for (auto* buffer : {&out_kernel, &grad_q_kernel, &grad_k_kernel, &grad_v_kernel}) {
    std::fill(buffer->data, buffer->data + size, __float2bfloat16_rn(0.0f));  // the contract: zero-filled
  }
  DeviceBuffer<float> lse(size_t(kHeads) * tokens), delta(size_t(kHeads) * tokens);
  const AttentionForwardArgs forward{FloatType::kBFloat16, shape, q, k, v, out_kernel.data, lse.data};
  expect(emulated::attention_forward(forward, nullptr) == cudaSuccess, "forward launch", head_dim, dropout_p);
  // bfloat16 outputs: 2^-9 relative rounding per entry, plus P and dS rounded for the tensor cores.
  expect(relative_error(to_double(out_kernel.data, size), out) <= 6e-3, "out", head_dim, dropout_p);
  // Both backward paths: dQ added over key blocks into a float32 workspace whose contents start undefined (NaN
  // here: the kernels must zero the rows they add to), and the deterministic dQ kernel (no workspace).
  DeviceBuffer<float> dq_accum(size);
  for (float* workspace : {dq_accum.data, static_cast<float*>(nullptr)}) {
    std::fill(dq_accum.data, dq_accum.data + size, NAN);
    for (auto* buffer : {&grad_q_kernel, &grad_k_kernel, &grad_v_kernel}) {
      std::fill(buffer->data, buffer->data + size, __float2bfloat16_rn(0.0f));
    }
    const AttentionBackwardArgs backward{FloatType::kBFloat16, shape, q, k, v, grad_out_values.data(),
                                         out_kernel.data, lse.data, delta.data, grad_q_kernel.data,
                                         grad_k_kernel.data, grad_v_kernel.data, int64_t(kHeads) * head_dim,
                                         workspace};
    const char* path = workspace != nullptr ? " (dQ workspace)" : " (dQ kernel)";
    const auto what = [&](const char* name) { return std::string(name) + path; };
    expect(emulated::attention_backward(backward, nullptr) == cudaSuccess, what("backward launch").c_str(), head_dim,
           dropout_p);
    expect(relative_error(to_double(grad_q_kernel.data, size), grad_q) <= 1e-2, what("grad_q").c_str(), head_dim,
           dropout_p);
    expect(relative_error(to_double(grad_k_kernel.data, size), grad_k) <= 1e-2, what("grad_k").c_str(), head_dim,
           dropout_p);
    expect(relative_error(to_double(grad_v_kernel.data, size), grad_v) <= 6e-3, what("grad_v").c_str(), head_dim,
           dropout_p);
  }
}

// Whether the launchers take the mma.sync kernels at head dims 64 and 128 under one environment setting.
bool takes_mma_sync_with(const char* variable, const char* value) {
  using electra_ext::AttentionKernels;
  setenv(variable, value, 1);
  const bool mma_sync = emulated::attention_kernels(64) == AttentionKernels::kMmaSync &&
                        emulated::attention_kernels(128) == AttentionKernels::kMmaSync;
  unsetenv(variable);
  return mma_sync;
}

// The emulated device is an sm_90 unless ELECTRA_EXT_EMULATED_SM is "80" or "86": the launchers take the wgmma kernels
// at head dims 64 and 128 there, unless ELECTRA_EXT_WGMMA is "0", and the mma.sync kernels everywhere else (the
// checks below run the sm_90 choice; pytest runs both kinds against the float64 reference).
void check_kernel_choice() {
  using electra_ext::AttentionKernels;
  const bool sm90 = emulated::attention_kernels(32) == AttentionKernels::kMmaSync &&
                    emulated::attention_kernels(64) == AttentionKernels::kWgmma &&
                    emulated::attention_kernels(128) == AttentionKernels::kWgmma;
  expect(sm90, "the emulated sm_90 takes the wgmma kernels at head dims 64 and 128 only", 0, 0.0f);
  expect(takes_mma_sync_with("ELECTRA_EXT_EMULATED_SM", "80"), "the emulated sm_80 takes the mma.sync kernels", 0,
         0.0f);
  expect(takes_mma_sync_with("ELECTRA_EXT_EMULATED_SM", "86"), "the emulated sm_86 takes the mma.sync kernels", 0,
         0.0f);
  expect(takes_mma_sync_with("ELECTRA_EXT_WGMMA", "0"), "ELECTRA_EXT_WGMMA=0 keeps the sm_90 on mma.sync", 0, 0.0f);
  expect(!takes_mma_sync_with("ELECTRA_EXT_WGMMA", "1"), "ELECTRA_EXT_WGMMA=1 takes wgmma, as unset does", 0, 0.0f);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  check_kernel_choice();
  // A full and a partial 64-key tile, an empty sequence, one token; every head dim with dropout, since each takes
  // its own tiling (forward row tiles per warp, dK/dV keys per warp) around the same dropout helpers.
  check(64, {70, 1}, 0.0f, rng);
  check(32, {0, 33}, 0.0f, rng);
  check(64, {65, 20}, 0.2f, rng);
  check(32, {130, 3}, 0.1f, rng);
  check(128, {40, 65}, 0.1f, rng);
  std::printf("%s: %d failure(s)\n", failures == 0 ? "emulated attention passed" : "emulated attention FAILED",
              failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
