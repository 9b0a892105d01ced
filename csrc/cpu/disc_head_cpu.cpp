// Discriminator head on the CPU: logits = gelu(x) @ w + b per row, mean BCE over valid rows, and the
// backward dx = dz * w * gelu'(x), dw = sum_rows dz * gelu(x), db = sum_rows dz.
//
// Napkin math (ELECTRA-Base, N = 256*512 rows, H = 768, fp32): x is 400 MB; the forward reads it once, the
// backward reads it once more and writes dx (400 MB). Each element costs one erf (and one exp backward): a
// scalar erff is ~10 ns, which made a first, scalar version 3-10x slower than PyTorch's vectorized GELU on
// 2 cores. So each chunk runs ATen's vectorized gelu/gelu_backward and a BLAS matrix-vector product on a
// float32 copy of its rows that stays in L2 (kChunkElements floats = 256 KB), and x is read from memory once.
//
// Determinism: rows are cut into chunks whose size depends only on H; each chunk reduces its own partial loss
// and dw, and the partials are added in chunk order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <vector>

#include "common/disc_head_math.h"
#include "disc_head_checks.h"
#include "cpu/emulated_call.h"
#if defined(ELECTRA_EXT_WITH_EMULATION)
#include "cpu/disc_head_emulated.h"
#endif

namespace electra_ext {
namespace {

namespace math = disc_head_math;

constexpr int64_t kChunkElements = 1 << 16;

struct Chunks {
  int64_t rows_per_chunk, count;
  Chunks(int64_t rows, int64_t hidden)
      : rows_per_chunk(std::max<int64_t>(1, kChunkElements / hidden)),
        count((rows + rows_per_chunk - 1) / rows_per_chunk) {}
  int64_t begin(int64_t chunk) const { return chunk * rows_per_chunk; }
  int64_t length(int64_t chunk, int64_t rows) const { return std::min(rows, begin(chunk) + rows_per_chunk) - begin(chunk); }
};

// Runs body(chunk, first_row, row_count) over all chunks, in parallel, each chunk on one thread.
template <typename Body>
void for_each_chunk(const Chunks& chunks, int64_t rows, const Body& body) {
  // Worker threads take the caller's thread-local state (the dispatcher's "below autograd" keys, grad mode): without
  // it the ATen calls of a chunk would go through autograd and refuse mv(out=) on tensors that require grad.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, chunks.count, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      body(chunk, chunks.begin(chunk), chunks.length(chunk, rows));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> disc_head_aten(const at::Tensor& x_in, const at::Tensor& w_in,
                                                 const at::Tensor& b_in, const at::Tensor& labels_in,
                                                 const at::Tensor& valid_in) {
  // References, not structured bindings: C++17 lambdas cannot capture those (torch < 2.14 builds as C++17).
  const DiscHeadInputs in = prepare_disc_head_inputs(x_in, w_in, b_in, labels_in, valid_in);
  const at::Tensor &x = in.x, &w = in.w, &b = in.b, &labels = in.labels, &valid = in.valid;
  const int64_t rows = x.size(0), hidden = x.size(1);
  const float bias = b.item<float>();
  const Chunks chunks(rows, hidden);

  at::Tensor logits = at::empty({rows}, x.options().dtype(at::kFloat));
  std::vector<double> chunk_loss(chunks.count, 0.0);
  std::vector<int64_t> chunk_valid(chunks.count, 0);
  const bool* label_ptr = labels.data_ptr<bool>();
  const bool* valid_ptr = valid.data_ptr<bool>();
  float* logit_ptr = logits.data_ptr<float>();
  for_each_chunk(chunks, rows, [&](int64_t chunk, int64_t first, int64_t count) {
    at::Tensor chunk_logits = logits.narrow(0, first, count);
    at::mv_out(chunk_logits, at::gelu(x.narrow(0, first, count).to(at::kFloat)), w);
    double loss = 0.0;
    int64_t valid_rows = 0;
    for (int64_t row = first; row < first + count; ++row) {
      logit_ptr[row] += bias;
      if (valid_ptr[row]) {
        loss += math::bce_with_logits(logit_ptr[row], label_ptr[row] ? 1.0f : 0.0f);
        ++valid_rows;
      }
    }
    chunk_loss[chunk] = loss;
    chunk_valid[chunk] = valid_rows;
  });

  double loss_sum = 0.0;
  int64_t valid_count = 0;
  for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
    loss_sum += chunk_loss[chunk];
    valid_count += chunk_valid[chunk];
  }
  const float loss = valid_count > 0 ? static_cast<float>(loss_sum / valid_count) : 0.0f;
  return {logits, at::scalar_tensor(loss, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_aten(
    const c10::optional<at::Tensor>& grad_logits_in, const at::Tensor& grad_loss, const at::Tensor& x_in,
    const at::Tensor& w_in, const at::Tensor& logits_in, const at::Tensor& labels_in,
    const at::Tensor& valid_in) {
  const DiscHeadBackwardInputs in =
      prepare_disc_head_backward_inputs(grad_logits_in, grad_loss, x_in, w_in, logits_in, labels_in, valid_in);
  const c10::optional<at::Tensor>& grad_logits = in.grad_logits;
  const at::Tensor &x = in.x, &w = in.w, &logits = in.logits, &labels = in.labels, &valid = in.valid;
  const int64_t rows = x.size(0), hidden = x.size(1);
  const int64_t valid_count = valid.sum().item<int64_t>();
  // d loss / d z_i = grad_loss * (sigmoid(z_i) - y_i) / valid_count on valid rows (the loss is their mean).
  const float loss_scale = valid_count > 0 ? grad_loss.item<float>() / static_cast<float>(valid_count) : 0.0f;
  // dz starts as grad_logits (or zero) and gains the loss term row by row below.
  at::Tensor grad_z = grad_logits.has_value() ? grad_logits->clone() : at::zeros({rows}, logits.options());
  const Chunks chunks(rows, hidden);

  at::Tensor grad_x = at::empty({rows, hidden}, x.options());
  at::Tensor chunk_grad_w = at::empty({chunks.count, hidden}, x.options().dtype(at::kFloat));
  std::vector<double> chunk_grad_b(chunks.count, 0.0);
  const float* logit_ptr = logits.data_ptr<float>();
  const bool* label_ptr = labels.data_ptr<bool>();
  const bool* valid_ptr = valid.data_ptr<bool>();
  float* grad_z_ptr = grad_z.data_ptr<float>();
  for_each_chunk(chunks, rows, [&](int64_t chunk, int64_t first, int64_t count) {
    double grad_b = 0.0;
    for (int64_t row = first; row < first + count; ++row) {
      if (valid_ptr[row]) {
        grad_z_ptr[row] += loss_scale * math::bce_with_logits_grad(logit_ptr[row], label_ptr[row] ? 1.0f : 0.0f);
      }
      grad_b += grad_z_ptr[row];
    }
    chunk_grad_b[chunk] = grad_b;
    const at::Tensor x_chunk = x.narrow(0, first, count).to(at::kFloat);
    const at::Tensor grad_z_chunk = grad_z.narrow(0, first, count);
    grad_x.narrow(0, first, count).copy_(at::gelu_backward(at::outer(grad_z_chunk, w), x_chunk));
    at::Tensor grad_w_row = chunk_grad_w[chunk];
    at::mv_out(grad_w_row, at::gelu(x_chunk).t(), grad_z_chunk);
  });

  double grad_b = 0.0;
  for (double partial : chunk_grad_b) grad_b += partial;
  // Chunk partials added in chunk order, columns in parallel: the same sum whatever the thread count.
  at::Tensor grad_w = at::empty({hidden}, chunk_grad_w.options());
  const float* partial_ptr = chunk_grad_w.data_ptr<float>();
  float* grad_w_ptr = grad_w.data_ptr<float>();
  at::parallel_for(0, hidden, 256, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t j = col_begin; j < col_end; ++j) {
      float sum = 0.0f;
      for (int64_t chunk = 0; chunk < chunks.count; ++chunk) sum += partial_ptr[chunk * hidden + j];
      grad_w_ptr[j] = sum;
    }
  });
  return {grad_x, grad_w, at::full({1}, grad_b, grad_w.options())};
}

std::tuple<at::Tensor, at::Tensor> disc_head_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                 const at::Tensor& labels, const at::Tensor& valid, bool emulated) {
  if (!emulated) return disc_head_aten(x, w, b, labels, valid);
  ELECTRA_EXT_EMULATED("disc_head", disc_head_emulated(x, w, b, labels, valid));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_cpu(
    const c10::optional<at::Tensor>& grad_logits, const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& valid,
    bool emulated) {
  if (!emulated) return disc_head_backward_aten(grad_logits, grad_loss, x, w, logits, labels, valid);
  ELECTRA_EXT_EMULATED("disc_head_backward",
                       disc_head_backward_emulated(grad_logits, grad_loss, x, w, logits, labels, valid));
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CPU, m) {
  m.impl("disc_head", &disc_head_cpu);
  m.impl("disc_head_backward", &disc_head_backward_cpu);
}

}  // namespace electra_ext
