// Generator head on the CPU (issue 7): logits = h weightᵀ + bias on the masked rows, the mean cross-entropy over
// rows whose target is not ignore_index, each row's log-sum-exp and argmax, and one Gumbel-max sample of
// softmax(logits / temperature) per row, without ever holding the [M, V] logits; the backward recomputes them.
//
// Napkin math (ELECTRA-Small generator: M = 0.15 * 128 * 128 = 2458 masked rows, E = 128, V = 30522):
//   logits   M V = 75 M floats = 300 MB (Base, M = 19660: 2.4 GB): never stored. Each 128 x 1024 float32 tile
//            (512 KB, in L2) is consumed by the epilogue right after its GEMM.
//   forward  one GEMM pass, 2 M V E = 19 GFLOP (Base, E = 768: 0.92 TFLOP). The epilogue costs per logit a quarter
//            of a Philox call (10 rounds give 4 words), two float32 logs for the Gumbel noise, one exp for the
//            softmax and a few compares. Measured on one core (AMD EPYC, AVX2) per 128 x 1024 tile: GEMM 0.39 ms at
//            E = 128, Philox 0.28 ms, the two logs 0.33 ms, the exp 0.13 ms, the compare loop ~0.3 ms: at E = 128
//            the epilogue costs ~2.5x the GEMM (at E = 768 ~0.4x). The logs and the exp are therefore ATen's
//            vectorized ones run on the whole tile (the reference calls the same ones, which also makes its noise
//            bitwise equal: glibc's logf differs from them in ~20% of inputs by an ulp), and only the compares
//            are a scalar loop.
//   backward recomputes each tile (one GEMM pass), G = (softmax - onehot) * grad_loss / counted rows, then
//            dh += G W_tile and dW_tile += Gᵀ h_tile: three GEMM passes, 3 x 19 GFLOP.
//
// Tiles: 128 rows x 1024 vocabulary columns. 128 rows keep the GEMMs' M large enough for MKL's blocked kernels and
// still give the Small batch 20 row tiles to share among threads; 1024 columns is a multiple of 4, so a tile
// starts at a Philox word group, and 30522 columns make 30 tiles. Peak extra memory per thread: forward two
// float32 tiles (logits, noise) = 1 MiB, backward one = 512 KB, plus for bfloat16/float16 inputs float32 copies
// of the h and weight rows of the tile, (128 + 1024) E floats = 0.6 MB at E = 128, 3.5 MB at E = 768. The
// backward also accumulates grad_h [M, E] and grad_weight [V, E] in float32: for float32 inputs those are the
// outputs themselves, for 16-bit inputs one float32 copy of each gradient.
//
// Determinism (same bits for any thread count): the forward runs each row tile on one thread, its vocabulary
// tiles in order; the backward walks the (row tile, vocabulary tile) grid by anti-diagonals, so the tiles of
// one diagonal own distinct rows of dh and distinct rows of dW and every accumulator sums its tiles in a fixed
// order, while a diagonal's tiles run in parallel. The Gumbel noise of (row, column) depends only on the seed
// (csrc/common/philox.h). Every GEMM runs on one thread (SingleThreadedBlas): with another BLAS than MKL, whether a
// GEMM's bits depend on the thread count is up to that BLAS.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/philox.h"
#include "cpu/cpu_isa.h"
#include "cpu/emulated_call.h"
#include "gen_head_checks.h"
#if defined(ELECTRA_EXT_WITH_EMULATION)
#include "cpu/gen_head_emulated.h"
#endif

namespace electra_ext {
namespace {

constexpr int64_t kTileRows = 128;
constexpr int64_t kTileColumns = 1024;
static_assert(kTileColumns % 4 == 0, "a vocabulary tile must start at a Philox word group of 4 columns");

constexpr float kInfinity = std::numeric_limits<float>::infinity();

// One axis (rows or vocabulary columns) cut into tiles of `size`.
struct Axis {
  int64_t length, size;
  int64_t count() const { return (length + size - 1) / size; }
  int64_t begin(int64_t tile) const { return tile * size; }
  int64_t extent(int64_t tile) const { return std::min(size, length - begin(tile)); }
};

// MKL's thread count for the calling thread; libtorch_cpu exports it when torch is built with MKL (x86). Weak, so
// that the extension still loads against a torch built with another BLAS.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

// Keeps MKL on one thread while it lives. torch turns MKL's dynamic adjustment off, so a GEMM called from a
// worker of torch's OpenMP pool still picks its algorithm for torch's whole thread count, and for a small M that
// algorithm splits the reduction: [5 x 256] x [256 x 1024] gives different bits with 1 and 2 threads. Each task
// runs its GEMMs alone on its thread anyway; with a one-thread MKL they give the same bits for any thread count.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: back to MKL's global count
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// Runs body(i) for i in [0, count), each i on one thread of torch's pool with a one-thread BLAS and the caller's
// thread-local state (the dispatcher's "below autograd" keys and grad mode: without them the ATen calls of a
// worker thread would go through autograd and refuse mm(out=) on tensors that require grad). The range is
// padded to two tasks so that, with more than one thread, at::parallel_for always opens its OpenMP region even
// for a single task: ATen's elementwise ops inside then run serially (omp_in_parallel()), whereas run inline
// each op of a tile would fork and join the pool, ~15 ops per 128 x 1024 tile whose wake-ups cost more than the
// ops themselves (measured: 11 ms per op on a loaded 2-core machine, against 20-400 us of work).
template <typename Body>
void for_each_task(int64_t count, const Body& body) {
  if (count == 0) return;
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, std::max<int64_t>(count, 2), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const SingleThreadedBlas blas;
    for (int64_t task = begin; task < std::min(end, count); ++task) body(task);
  });
}

// A [rows, columns] float32 view of the front of a scratch buffer of kTileRows * kTileColumns floats.
at::Tensor tile_view(const at::Tensor& buffer, int64_t rows, int64_t columns) {
  return buffer.narrow(0, 0, rows * columns).view({rows, columns});
}

// logits of one tile: h[rows] weight[columns]ᵀ, then + bias as a separate rounding, the reference's order.
void tile_logits(at::Tensor& logits, const at::Tensor& h_tile, const at::Tensor& weight_tile,
                 const at::Tensor& bias_tile) {
  at::mm_out(logits, h_tile, weight_tile.t());
  logits.add_(bias_tile);
}

#if ELECTRA_EXT_CPU_AVX2
// tile_gumbel's uniforms, 8 Philox calls (32 columns) at a time: the same bits as philox::gen_head_uniform (the
// top 23 bits of a word convert to float exactly). 0.28 ms of scalar Philox per 128 x 1024 tile, next to a
// 0.39 ms GEMM at E = 128, made the noise the forward's largest cost after the logs.
ELECTRA_EXT_AVX2_FUNCTION void gumbel_uniforms_avx2(float* out, int64_t rows, int64_t columns, uint64_t seed,
                                                    int64_t first_row, int64_t first_column) {
  const __m256 half = _mm256_set1_ps(0.5f), unit = _mm256_set1_ps(0x1p-23f);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < columns; j += 32) {
      __m256i words[4];
      cpu_isa::column_group_counters(words, static_cast<uint32_t>((first_column + j) / 4),
                                     static_cast<uint32_t>(first_row + i), philox::kGenHeadStream2,
                                     philox::kGenHeadStream3);
      cpu_isa::philox4x32_10_lanes8(words, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      __m256 uniforms[4];
      for (int w = 0; w < 4; ++w) {
        const __m256 top_bits = _mm256_cvtepi32_ps(_mm256_srli_epi32(words[w], 9));
        uniforms[w] = _mm256_mul_ps(_mm256_add_ps(top_bits, half), unit);
      }
      cpu_isa::store_column_groups(uniforms, out + i * columns + j, columns - j);
    }
  }
}
#endif

// The uniforms u of a [rows, columns] tile from the Philox words of (seed, row, column).
void gumbel_uniforms(float* out, int64_t rows, int64_t columns, uint64_t seed, int64_t first_row,
                     int64_t first_column) {
  for (int64_t i = 0; i < rows; ++i) {
    const auto row = static_cast<uint32_t>(first_row + i);
    for (int64_t j = 0; j < columns; j += 4) {
      const philox::Words words =
          philox::gen_head_gumbel_words(seed, row, static_cast<uint32_t>((first_column + j) / 4));
      for (int64_t k = 0; k < 4 && j + k < columns; ++k) {
        out[i * columns + j + k] = philox::gen_head_uniform(words.x[k]);
      }
    }
  }
}

// The Gumbel noise of a tile, -log(-log(u)).
void tile_gumbel(at::Tensor& noise, uint64_t seed, int64_t first_row, int64_t first_column) {
  const int64_t rows = noise.size(0), columns = noise.size(1);
  float* out = noise.data_ptr<float>();
#if ELECTRA_EXT_CPU_AVX2
  if (cpu_isa::use_avx2()) {
    gumbel_uniforms_avx2(out, rows, columns, seed, first_row, first_column);
  } else {
    gumbel_uniforms(out, rows, columns, seed, first_row, first_column);
  }
#else
  gumbel_uniforms(out, rows, columns, seed, first_row, first_column);
#endif
  at::log_(noise).neg_();
  at::log_(noise).neg_();
}

// One row of a tile: the max logit and its first column, and the best Gumbel score x / temperature + noise and
// its first column, column `excluded` (-1: none) never chosen. NaN never wins a comparison.
struct RowScan {
  float max = -kInfinity;
  int64_t top = 0;
  float best = -kInfinity;
  int64_t best_column = 0;
};

// Columns [begin, width) continuing `scan`.
RowScan scan_row(const float* x, const float* gumbel, int64_t begin, int64_t width, float inverse_temperature,
                 int64_t excluded, RowScan scan) {
  for (int64_t j = begin; j < width; ++j) {
    if (x[j] > scan.max) {
      scan.max = x[j];
      scan.top = j;
    }
    // Two roundings, as the reference computes it (no FMA: ISO C++ mode leaves contraction off).
    const float score = x[j] * inverse_temperature + gumbel[j];
    if (score > scan.best && j != excluded) {
      scan.best = score;
      scan.best_column = j;
    }
  }
  return scan;
}

#if ELECTRA_EXT_CPU_AVX2
// scan_row on 8 lanes, each keeping its first maximum, then the lanes merged (ties to the lowest column) and the
// tail scanned on: the same result. The scalar loop's two data-dependent branches per logit cost ~0.3 ms per
// 128 x 1024 tile, as much as the noise's logs.
ELECTRA_EXT_AVX2_FUNCTION RowScan scan_row_avx2(const float* x, const float* gumbel, int64_t width,
                                                float inverse_temperature, int64_t excluded) {
  const __m256 scale = _mm256_set1_ps(inverse_temperature), minus_infinity = _mm256_set1_ps(-kInfinity);
  const __m256i excluded8 = _mm256_set1_epi32(static_cast<int>(excluded)), eight = _mm256_set1_epi32(8);
  __m256 max8 = minus_infinity, best8 = minus_infinity;
  __m256i column8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), top8 = _mm256_setzero_si256(), best_column8 = top8;
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) {
    const __m256 logit = _mm256_loadu_ps(x + j);
    const __m256 larger = _mm256_cmp_ps(logit, max8, _CMP_GT_OQ);
    max8 = _mm256_blendv_ps(max8, logit, larger);
    top8 = _mm256_blendv_epi8(top8, column8, _mm256_castps_si256(larger));
    __m256 score = _mm256_add_ps(_mm256_mul_ps(logit, scale), _mm256_loadu_ps(gumbel + j));
    score = _mm256_blendv_ps(score, minus_infinity, _mm256_castsi256_ps(_mm256_cmpeq_epi32(column8, excluded8)));
    const __m256 better = _mm256_cmp_ps(score, best8, _CMP_GT_OQ);
    best8 = _mm256_blendv_ps(best8, score, better);
    best_column8 = _mm256_blendv_epi8(best_column8, column8, _mm256_castps_si256(better));
    column8 = _mm256_add_epi32(column8, eight);
  }
  alignas(32) float maxima[8], bests[8];
  alignas(32) int32_t tops[8], best_columns[8];
  _mm256_store_ps(maxima, max8);
  _mm256_store_ps(bests, best8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(tops), top8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(best_columns), best_column8);
  RowScan scan{maxima[0], tops[0], bests[0], best_columns[0]};
  for (int lane = 1; lane < 8; ++lane) {
    if (maxima[lane] > scan.max || (maxima[lane] == scan.max && tops[lane] < scan.top)) {
      scan.max = maxima[lane];
      scan.top = tops[lane];
    }
    if (bests[lane] > scan.best || (bests[lane] == scan.best && best_columns[lane] < scan.best_column)) {
      scan.best = bests[lane];
      scan.best_column = best_columns[lane];
    }
  }
  return scan_row(x, gumbel, j, width, inverse_temperature, excluded, scan);
}
#endif

// What the forward carries for one row across its vocabulary tiles.
struct RowState {
  float max = -kInfinity;    // running max of the logits
  float sum = 0.0f;          // sum of exp(logit - max)
  float target_logit = 0.0f;
  int64_t top = 0;           // first column holding the max
  float best_score = -kInfinity;  // best logit / temperature + gumbel so far
  int64_t best = 0;          // its first column
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gen_head_cpu(
    const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& bias_in, const at::Tensor& targets_in,
    const at::Tensor& seed_in, double temperature, bool disallow_correct, int64_t ignore_index, bool emulated) {
  constexpr const char* op = "gen_head";
  if (emulated) {
    ELECTRA_EXT_EMULATED(op, gen_head_emulated(h_in, weight_in, bias_in, targets_in, seed_in, temperature,
                                               disallow_correct, ignore_index));
  }
  const int64_t vocab = check_gen_head_tensors(op, h_in, weight_in, bias_in, targets_in);
  check_gen_head_options(op, vocab, temperature, disallow_correct);
  check_gen_head_targets(op, targets_in, vocab, ignore_index);
  const uint64_t seed = read_gen_head_seed(op, h_in, seed_in);
  // References, not structured bindings: C++17 lambdas cannot capture those.
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  const at::Tensor &h = h_in, &weight = weight_in;
  const at::TensorOptions float_options = h.options().dtype(at::kFloat);
  const Axis rows{h.size(0), kTileRows}, columns{vocab, kTileColumns};
  const float inverse_temperature = static_cast<float>(1.0 / temperature);

  at::Tensor lse = at::empty({rows.length}, float_options);
  at::Tensor samples = at::empty({rows.length}, targets.options());
  std::vector<double> tile_loss(rows.count(), 0.0);
  std::vector<int64_t> tile_counted(rows.count(), 0), tile_correct(rows.count(), 0);
  const int64_t* target_ptr = targets.data_ptr<int64_t>();
  float* lse_ptr = lse.data_ptr<float>();
  int64_t* sample_ptr = samples.data_ptr<int64_t>();

  for_each_task(rows.count(), [&](int64_t row_tile) {
    const int64_t first_row = rows.begin(row_tile), height = rows.extent(row_tile);
    const at::Tensor h_tile = h.narrow(0, first_row, height).to(at::kFloat);
    const at::Tensor logit_buffer = at::empty({kTileRows * kTileColumns}, float_options);
    const at::Tensor noise_buffer = at::empty({kTileRows * kTileColumns}, float_options);
    at::Tensor new_max = at::empty({height, 1}, float_options);
    float* new_max_ptr = new_max.data_ptr<float>();
    std::vector<RowState> state(height);
    const int64_t* target = target_ptr + first_row;

    for (int64_t column_tile = 0; column_tile < columns.count(); ++column_tile) {
      const int64_t first_column = columns.begin(column_tile), width = columns.extent(column_tile);
      at::Tensor logits = tile_view(logit_buffer, height, width);
      tile_logits(logits, h_tile, weight.narrow(0, first_column, width).to(at::kFloat),
                  bias.narrow(0, first_column, width));
      at::Tensor noise = tile_view(noise_buffer, height, width);
      tile_gumbel(noise, seed, first_row, first_column);
      const float* logit_ptr = logits.data_ptr<float>();
      const float* noise_ptr = noise.data_ptr<float>();
      for (int64_t i = 0; i < height; ++i) {
        RowState& row = state[i];
        const float* x = logit_ptr + i * width;
        const float* gumbel = noise_ptr + i * width;
        const bool counted = target[i] != ignore_index;
        const int64_t local_target = counted ? target[i] - first_column : -1;
        const int64_t excluded = disallow_correct ? local_target : -1;
#if ELECTRA_EXT_CPU_AVX2
        const RowScan scan = cpu_isa::use_avx2() ? scan_row_avx2(x, gumbel, width, inverse_temperature, excluded)
                                                 : scan_row(x, gumbel, 0, width, inverse_temperature, excluded, {});
#else
        const RowScan scan = scan_row(x, gumbel, 0, width, inverse_temperature, excluded, {});
#endif
        if (local_target >= 0 && local_target < width) row.target_logit = x[local_target];
        // Strict comparisons: ties go to the earlier tile, hence to the lowest column, as torch.argmax does.
        if (scan.max > row.max) row.top = first_column + scan.top;
        if (scan.best > row.best_score) {
          row.best_score = scan.best;
          row.best = first_column + scan.best_column;
        }
        new_max_ptr[i] = std::max(row.max, scan.max);
      }
      const at::Tensor tile_sum = logits.sub_(new_max).exp_().sum(1);
      const float* tile_sum_ptr = tile_sum.data_ptr<float>();
      for (int64_t i = 0; i < height; ++i) {
        RowState& row = state[i];
        row.sum = row.sum * std::exp(row.max - new_max_ptr[i]) + tile_sum_ptr[i];
        row.max = new_max_ptr[i];
      }
    }

    double loss = 0.0;
    int64_t counted = 0, correct = 0;
    for (int64_t i = 0; i < height; ++i) {
      const RowState& row = state[i];
      const float row_lse = row.max + std::log(row.sum);
      lse_ptr[first_row + i] = row_lse;
      sample_ptr[first_row + i] = row.best;
      if (target[i] == ignore_index) continue;
      loss += static_cast<double>(row_lse - row.target_logit);
      ++counted;
      correct += row.top == target[i];
    }
    tile_loss[row_tile] = loss;
    tile_counted[row_tile] = counted;
    tile_correct[row_tile] = correct;
  });

  // Row tiles added in order: the same sum whatever the thread count.
  double loss_sum = 0.0;
  int64_t counted = 0, correct = 0;
  for (int64_t tile = 0; tile < rows.count(); ++tile) {
    loss_sum += tile_loss[tile];
    counted += tile_counted[tile];
    correct += tile_correct[tile];
  }
  const float loss = counted > 0 ? static_cast<float>(loss_sum / counted) : 0.0f;
  return {at::scalar_tensor(loss, float_options), samples, lse, at::scalar_tensor(correct, targets.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_head_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const at::Tensor& targets_in, const at::Tensor& lse_in, int64_t ignore_index, bool emulated) {
  constexpr const char* op = "gen_head_backward";
  if (emulated) {
    ELECTRA_EXT_EMULATED(op, gen_head_backward_emulated(grad_loss, h_in, weight_in, bias_in, targets_in, lse_in,
                                                        ignore_index));
  }
  const int64_t vocab = check_gen_head_tensors(op, h_in, weight_in, bias_in, targets_in);
  check_gen_head_backward_extras(op, h_in, grad_loss, lse_in);
  const int64_t counted = check_gen_head_targets(op, targets_in, vocab, ignore_index);
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor &h = h_in, &weight = weight_in;
  const at::TensorOptions float_options = h.options().dtype(at::kFloat);
  const Axis rows{h.size(0), kTileRows}, columns{vocab, kTileColumns};

  at::Tensor grad_h = at::zeros(h.sizes(), float_options);
  at::Tensor grad_weight = at::zeros(weight.sizes(), float_options);
  at::Tensor grad_bias = at::zeros({vocab}, float_options);
  if (counted > 0) {
    // d loss / d logit = grad_loss (softmax - onehot) / counted on counted rows, 0 on ignored ones.
    const float scale = grad_loss.item<float>() / static_cast<float>(counted);
    const at::Tensor row_scale = at::where(targets != ignore_index, at::scalar_tensor(scale, float_options),
                                           at::scalar_tensor(0.0f, float_options));
    const int64_t* target_ptr = targets.data_ptr<int64_t>();
    const int64_t row_tiles = rows.count(), column_tiles = columns.count();
    for (int64_t diagonal = 0; diagonal < row_tiles + column_tiles - 1; ++diagonal) {
      const int64_t first_row_tile = std::max<int64_t>(0, diagonal - (column_tiles - 1));
      const int64_t last_row_tile = std::min(row_tiles - 1, diagonal);
      for_each_task(last_row_tile - first_row_tile + 1, [&](int64_t task) {
        const int64_t row_tile = first_row_tile + task, column_tile = diagonal - row_tile;
        const int64_t first_row = rows.begin(row_tile), height = rows.extent(row_tile);
        const int64_t first_column = columns.begin(column_tile), width = columns.extent(column_tile);
        const at::Tensor h_tile = h.narrow(0, first_row, height).to(at::kFloat);
        const at::Tensor weight_tile = weight.narrow(0, first_column, width).to(at::kFloat);
        at::Tensor grad_logits = at::empty({height, width}, float_options);
        tile_logits(grad_logits, h_tile, weight_tile, bias.narrow(0, first_column, width));
        grad_logits.sub_(lse.narrow(0, first_row, height).unsqueeze(1)).exp_();
        float* grad_ptr = grad_logits.data_ptr<float>();
        for (int64_t i = 0; i < height; ++i) {
          const int64_t target = target_ptr[first_row + i];
          if (target != ignore_index && target >= first_column && target < first_column + width) {
            grad_ptr[i * width + target - first_column] -= 1.0f;
          }
        }
        grad_logits.mul_(row_scale.narrow(0, first_row, height).unsqueeze(1));
        grad_h.narrow(0, first_row, height).addmm_(grad_logits, weight_tile);
        grad_weight.narrow(0, first_column, width).addmm_(grad_logits.t(), h_tile);
        grad_bias.narrow(0, first_column, width).add_(grad_logits.sum(0));
      });
    }
  }
  return {grad_h.to(h.scalar_type()), grad_weight.to(weight.scalar_type()), grad_bias.to(bias_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CPU, m) {
  m.impl("gen_head", &gen_head_cpu);
  m.impl("gen_head_backward", &gen_head_backward_cpu);
}

}  // namespace electra_ext
