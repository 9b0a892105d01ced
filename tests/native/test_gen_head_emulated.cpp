// The generator-head CUDA kernels, run by the SIMT emulation, against a float64 reference on the host. (pytest runs
// the same kernels through torch with the op's full test suite; this test needs no torch, so it runs under
// AddressSanitizer and UndefinedBehaviorSanitizer.) Workspaces come from device_alloc, filled with 0xFF bytes
// (NaN as floats): a kernel that reads a workspace entry nobody wrote shows up as a NaN result.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/philox.h"
#include "cuda/gen_head_launch.h"
#include "native_testing.h"
#include "simt/simt.cuh"

namespace {

using electra_ext::FloatType;
using electra_ext::GenHeadBackwardArgs;
using electra_ext::GenHeadForwardArgs;
using electra_ext::GenHeadInputs;
namespace emulated = electra_ext::emulated;
using native_testing::DeviceBuffer;
using native_testing::relative_error;
namespace philox = electra_ext::philox;

int failures = 0;

void expect(bool ok, const char* what, int rows, int vocab, int hidden) {
  if (!ok) {
    std::printf("FAILED: %s (rows %d, vocab %d, hidden %d)\n", what, rows, vocab, hidden);
    ++failures;
  }
}

// rows of h in bf16 (row stride `h_stride` >= hidden), hidden a multiple of 8; every third target ignored.
void check(int rows, int vocab, int hidden, int h_stride, int64_t chunk_rows, bool disallow_correct,
           std::mt19937& rng) {
  constexpr int64_t kIgnore = -100;
  constexpr uint64_t kSeed = 0x1234567890ABCDEFull;
  constexpr float kTemperature = 0.8f;
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> token(0, vocab - 1);
  std::vector<__nv_bfloat16> h(size_t(rows) * h_stride + 8), weight(size_t(vocab) * hidden);
  std::vector<double> hd(size_t(rows) * hidden), wd(size_t(vocab) * hidden);
  for (int i = 0; i < rows; ++i) {
    for (int e = 0; e < hidden; ++e) {
      h[size_t(i) * h_stride + e] = __float2bfloat16_rn(normal(rng));
      hd[size_t(i) * hidden + e] = __bfloat162float(h[size_t(i) * h_stride + e]);
    }
  }
  for (size_t i = 0; i < weight.size(); ++i) {
    weight[i] = __float2bfloat16_rn(normal(rng) / std::sqrt(float(hidden)));
    wd[i] = __bfloat162float(weight[i]);
  }
  std::vector<float> bias(vocab);
  for (float& b : bias) b = 0.1f * normal(rng);
  std::vector<int64_t> targets(rows);
  int counted = 0;
  for (int i = 0; i < rows; ++i) {
    targets[i] = i % 3 == 1 ? kIgnore : token(rng);
    counted += targets[i] != kIgnore;
  }

  // float64 reference: logits, lse, loss per row, samples, softmax - onehot.
  std::vector<double> logits(size_t(rows) * vocab), lse(rows), row_loss(rows), grad_logits(logits.size());
  std::vector<int64_t> samples(rows);
  for (int i = 0; i < rows; ++i) {
    double max = -INFINITY, best_score = -INFINITY;
    for (int v = 0; v < vocab; ++v) {
      double z = bias[v];
      for (int e = 0; e < hidden; ++e) z += hd[size_t(i) * hidden + e] * wd[size_t(v) * hidden + e];
      logits[size_t(i) * vocab + v] = z;
      max = std::max(max, z);
      const uint32_t word = philox::gen_head_gumbel_words(kSeed, i, v / 4).x[v % 4];
      const double gumbel = -std::log(-std::log(double(philox::gen_head_uniform(word))));
      const double score = z / kTemperature + gumbel;
      if (score > best_score && !(disallow_correct && v == targets[i])) {
        best_score = score;
        samples[i] = v;
      }
    }
    double sum = 0;
    for (int v = 0; v < vocab; ++v) sum += std::exp(logits[size_t(i) * vocab + v] - max);
    lse[i] = max + std::log(sum);
    row_loss[i] = targets[i] == kIgnore ? 0.0 : lse[i] - logits[size_t(i) * vocab + targets[i]];
    for (int v = 0; v < vocab; ++v) {
      grad_logits[size_t(i) * vocab + v] = targets[i] == kIgnore
          ? 0.0 : (std::exp(logits[size_t(i) * vocab + v] - lse[i]) - (v == targets[i])) / std::max(counted, 1);
    }
  }
  std::vector<double> grad_h(size_t(rows) * hidden, 0.0), grad_weight(wd.size(), 0.0), grad_bias(vocab, 0.0);
  for (int i = 0; i < rows; ++i) {
    for (int v = 0; v < vocab; ++v) {
      const double g = grad_logits[size_t(i) * vocab + v];
      grad_bias[v] += g;
      for (int e = 0; e < hidden; ++e) {
        grad_h[size_t(i) * hidden + e] += g * wd[size_t(v) * hidden + e];
        grad_weight[size_t(v) * hidden + e] += g * hd[size_t(i) * hidden + e];
      }
    }
  }

  const GenHeadInputs in{FloatType::kBFloat16, rows,    vocab,          hidden, h.data(), h_stride,
                         weight.data(),        bias.data(), targets.data(), kIgnore};
  const int64_t row_blocks = (rows + electra_ext::kGenHeadBlockRows - 1) / electra_ext::kGenHeadBlockRows;
  const electra_ext::GenHeadSplits splits = emulated::gen_head_forward_splits(rows, vocab, FloatType::kBFloat16);
  const size_t partial = size_t(splits.splits) * rows;
  DeviceBuffer<float> partial_float(3 * partial), target_logit(rows), lse_out(rows), loss_out(rows);
  DeviceBuffer<int32_t> partial_int(2 * partial), correct_out(rows);
  DeviceBuffer<int64_t> samples_out(rows);
  const int64_t seed = static_cast<int64_t>(kSeed);
  const GenHeadForwardArgs forward{in, &seed, 1.0f / kTemperature, disallow_correct, splits, partial_float.data,
                                   partial_float.data + partial, partial_int.data, partial_float.data + 2 * partial,
                                   partial_int.data + partial, target_logit.data, lse_out.data, samples_out.data,
                                   loss_out.data, correct_out.data};
  expect(emulated::gen_head_forward(forward, nullptr) == cudaSuccess, "forward launch", rows, vocab, hidden);
  expect(relative_error(lse_out.data, lse) <= 1e-6, "lse", rows, vocab, hidden);
  expect(relative_error(loss_out.data, row_loss) <= 1e-5, "row loss", rows, vocab, hidden);
  // float32 logits against float64: a sample differs only where two perturbed scores lie within ~1e-6.
  int different = 0;
  for (int i = 0; i < rows; ++i) different += samples_out.data[i] != samples[i];
  expect(different <= 1, "samples", rows, vocab, hidden);

  const float grad_scale = 1.0f / float(std::max(counted, 1));
  const int64_t vocab_padded = electra_ext::gen_head_vocab_padded(vocab);
  DeviceBuffer<__nv_bfloat16> grad_logits_out(size_t(chunk_rows) * vocab_padded), grad_h_out(size_t(rows) * hidden);
  const int64_t grad_h_partial_floats =
      emulated::gen_head_grad_h_partial_floats(chunk_rows, hidden, FloatType::kBFloat16);
  DeviceBuffer<float> bias_partials(size_t(row_blocks) * vocab), grad_weight_out(wd.size()),
      grad_h_partials(grad_h_partial_floats);
  std::fill(grad_weight_out.data, grad_weight_out.data + wd.size(), 0.0f);  // the contract: zero-filled
  const GenHeadBackwardArgs backward{in,
                                     lse_out.data,
                                     &grad_scale,
                                     chunk_rows,
                                     grad_logits_out.data,
                                     bias_partials.data,
                                     grad_h_out.data,
                                     grad_h_partials.data,
                                     grad_h_partial_floats,
                                     grad_weight_out.data};
  expect(emulated::gen_head_backward(backward, nullptr) == cudaSuccess, "backward launch", rows, vocab, hidden);
  std::vector<double> grad_h_values(grad_h.size()), grad_bias_values(vocab, 0.0);
  for (size_t i = 0; i < grad_h.size(); ++i) grad_h_values[i] = __bfloat162float(grad_h_out.data[i]);
  for (int64_t block = 0; block < row_blocks; ++block) {
    for (int v = 0; v < vocab; ++v) grad_bias_values[v] += bias_partials.data[block * vocab + v] * grad_scale;
  }
  // G is rounded to bfloat16 before the GEMMs, grad_h once more on the way out: ~2^-9 relative per entry.
  expect(relative_error(grad_h_values, grad_h) <= 6e-3, "grad_h", rows, vocab, hidden);
  expect(relative_error(grad_weight_out.data, grad_weight) <= 4e-3, "grad_weight", rows, vocab, hidden);
  expect(relative_error(grad_bias_values, grad_bias) <= 1e-5, "grad_bias", rows, vocab, hidden);
}

// gen_head_vocab_splits against every split count: its splits cover the tiles with none empty, and no split
// count has a lower modelled cost (waves x (tiles per split + overhead)) or the same cost with fewer splits.
void check_vocab_splits(int64_t row_blocks, int64_t vocab, int64_t resident) {
  const int64_t tiles = (vocab + electra_ext::kGenHeadTileColumns - 1) / electra_ext::kGenHeadTileColumns;
  const auto cost = [&](int64_t per_split, int64_t splits) {
    return (row_blocks * splits + resident - 1) / resident * (per_split + electra_ext::kGenHeadBlockOverheadTiles);
  };
  const electra_ext::GenHeadSplits got = electra_ext::gen_head_vocab_splits(row_blocks, vocab, resident);
  const bool covers = got.splits >= 1 && got.tiles_per_split >= 1 &&
                      int64_t(got.splits) * got.tiles_per_split >= tiles &&
                      int64_t(got.splits - 1) * got.tiles_per_split < tiles;
  bool least = true;
  for (int64_t splits = 1; splits <= tiles; ++splits) {
    const int64_t per_split = (tiles + splits - 1) / splits;
    if ((splits - 1) * per_split >= tiles) continue;  // an empty split
    const int64_t c = cost(per_split, splits), best = cost(got.tiles_per_split, got.splits);
    least = least && (c > best || (c == best && splits >= got.splits));
  }
  if (!covers || !least) {
    std::printf("FAILED: vocab splits (row blocks %lld, vocab %lld, resident %lld): %d x %d tiles%s%s\n",
                static_cast<long long>(row_blocks), static_cast<long long>(vocab), static_cast<long long>(resident),
                got.splits, got.tiles_per_split, covers ? "" : ", not a cover", least ? "" : ", not the least cost");
    ++failures;
  }
}

void check_vocab_splits_cases() {
  // ELECTRA's vocabulary (477 tiles) on an H100's 132 SMs x 2 and x 3 blocks: Base's 154 row blocks, Small's 20,
  // the backward's 8 a chunk, one; then ragged vocabularies, one tile, a grid bigger than the device.
  for (int64_t resident : {264, 396, 14}) {
    for (int64_t row_blocks : {154, 20, 8, 2, 1}) check_vocab_splits(row_blocks, 30522, resident);
  }
  for (int64_t vocab : {1, 64, 65, 1000, 250002}) check_vocab_splits(3, vocab, 14);
  check_vocab_splits(5000, 30522, 264);
  check_vocab_splits(2, 3 * 64, 3);  // 1 split and 3 cost the same: 1 wave x 4 tiles, 2 waves x 2
  // Row blocks a multiple of what the device holds: splitting only adds waves, so one split.
  const electra_ext::GenHeadSplits whole = electra_ext::gen_head_vocab_splits(528, 30522, 264);
  if (whole.splits != 1) {
    std::printf("FAILED: 528 row blocks on 264 resident took %d splits, not 1\n", whole.splits);
    ++failures;
  }
}

}  // namespace

int main() {
  check_vocab_splits_cases();
  std::mt19937 rng(0);
  // One row; a ragged row block and vocabulary tile with hidden not a multiple of the 32-element chunk; strided
  // rows of h and a backward in two chunks of 128 rows (the second ragged).
  check(1, 50, 16, 16, 128, false, rng);
  check(70, 150, 40, 40, 128, true, rng);
  check(200, 90, 24, 32, 128, false, rng);
  // Chunks of 2 row blocks and 1 (the ragged last one): the grad-logits kernel splits 10 tiles 5 ways, then 10.
  check(260, 600, 16, 16, 256, false, rng);
  std::printf("%s: %d failure(s)\n", failures == 0 ? "emulated gen_head passed" : "emulated gen_head FAILED",
              failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
