// Discriminator head on the CPU: logits = gelu(x) @ w + b per row, mean BCE over valid rows, and the
// backward dx = dz * w * gelu'(x), dw = sum_rows dz * gelu(x), db = sum_rows dz.
//
// Napkin math (ELECTRA-Base, N = 256*512 rows, H = 768, fp32): x is 400 MB; forward reads it once (plus N
// flags, writes N logits), backward reads it once more and writes dx (another 400 MB). Each element costs one
// erf (forward) or one erf and one exp (backward), about 20-40 cycles, so on a few cores this is compute
// bound on the transcendental functions rather than on memory.
//
// Determinism: rows are cut into fixed chunks of kRowsPerChunk, each chunk reduces its own partial loss and
// dw, and the partials are added in chunk order, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/disc_head_math.h"
#include "disc_head_checks.h"

namespace electra_ext {
namespace {

namespace math = disc_head_math;

constexpr int64_t kRowsPerChunk = 64;

int64_t num_chunks(int64_t rows) { return (rows + kRowsPerChunk - 1) / kRowsPerChunk; }

template <typename scalar_t>
float row_logit(const scalar_t* x_row, const float* w, int64_t hidden, float bias) {
  float dot = 0.0f;
  for (int64_t j = 0; j < hidden; ++j) dot += math::gelu(static_cast<float>(x_row[j])) * w[j];
  return dot + bias;
}

std::tuple<at::Tensor, at::Tensor> disc_head_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                                 const at::Tensor& b_in, const at::Tensor& labels_in,
                                                 const at::Tensor& valid_in) {
  check_disc_head_inputs(x_in, w_in, labels_in, valid_in);
  check_disc_head_bias(x_in, b_in);
  const at::Tensor x = rows_with_unit_stride(x_in);
  const at::Tensor w = as_contiguous_float(w_in);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor valid = valid_in.contiguous();
  const int64_t rows = x.size(0), hidden = x.size(1), stride = row_stride(x);
  const float bias = b_in.item<float>();

  at::Tensor logits = at::empty({rows}, x.options().dtype(at::kFloat));
  std::vector<double> chunk_loss(num_chunks(rows), 0.0);
  std::vector<int64_t> chunk_valid(num_chunks(rows), 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "disc_head_cpu", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    const float* w_ptr = w.data_ptr<float>();
    const bool* label_ptr = labels.data_ptr<bool>();
    const bool* valid_ptr = valid.data_ptr<bool>();
    float* logit_ptr = logits.data_ptr<float>();
    at::parallel_for(0, num_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        double loss = 0.0;
        int64_t count = 0;
        const int64_t row_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
        for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
          const float z = row_logit(x_ptr + row * stride, w_ptr, hidden, bias);
          logit_ptr[row] = z;
          if (valid_ptr[row]) {
            loss += math::bce_with_logits(z, label_ptr[row] ? 1.0f : 0.0f);
            ++count;
          }
        }
        chunk_loss[chunk] = loss;
        chunk_valid[chunk] = count;
      }
    });
  });

  double loss_sum = 0.0;
  int64_t valid_count = 0;
  for (size_t chunk = 0; chunk < chunk_loss.size(); ++chunk) {
    loss_sum += chunk_loss[chunk];
    valid_count += chunk_valid[chunk];
  }
  const float loss = valid_count > 0 ? static_cast<float>(loss_sum / valid_count) : 0.0f;
  return {logits, at::scalar_tensor(loss, x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_cpu(
    const c10::optional<at::Tensor>& grad_logits_in, const at::Tensor& grad_loss, const at::Tensor& x_in,
    const at::Tensor& w_in, const at::Tensor& logits_in, const at::Tensor& labels_in,
    const at::Tensor& valid_in) {
  check_disc_head_backward_inputs(grad_logits_in, grad_loss, x_in, w_in, logits_in, labels_in, valid_in);
  const at::Tensor x = rows_with_unit_stride(x_in);
  const at::Tensor w = as_contiguous_float(w_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor valid = valid_in.contiguous();
  const c10::optional<at::Tensor> grad_logits =
      grad_logits_in.has_value() ? c10::optional<at::Tensor>(as_contiguous_float(*grad_logits_in)) : c10::nullopt;
  const int64_t rows = x.size(0), hidden = x.size(1), stride = row_stride(x);
  const int64_t valid_count = valid.sum().item<int64_t>();
  // d loss / d z_i = grad_loss * (sigmoid(z_i) - y_i) / valid_count on valid rows (the loss is their mean).
  const float loss_scale = valid_count > 0 ? grad_loss.item<float>() / static_cast<float>(valid_count) : 0.0f;

  at::Tensor grad_x = at::empty({rows, hidden}, x.options());
  at::Tensor chunk_grad_w = at::zeros({num_chunks(rows), hidden}, x.options().dtype(at::kFloat));
  std::vector<double> chunk_grad_b(num_chunks(rows), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "disc_head_backward_cpu", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    const float* w_ptr = w.data_ptr<float>();
    const float* logit_ptr = logits.data_ptr<float>();
    const float* grad_logit_ptr = grad_logits.has_value() ? grad_logits->data_ptr<float>() : nullptr;
    const bool* label_ptr = labels.data_ptr<bool>();
    const bool* valid_ptr = valid.data_ptr<bool>();
    scalar_t* grad_x_ptr = grad_x.data_ptr<scalar_t>();
    float* grad_w_ptr = chunk_grad_w.data_ptr<float>();
    at::parallel_for(0, num_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        float* grad_w_acc = grad_w_ptr + chunk * hidden;
        double grad_b_acc = 0.0;
        const int64_t row_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
        for (int64_t row = chunk * kRowsPerChunk; row < row_end; ++row) {
          float dz = grad_logit_ptr != nullptr ? grad_logit_ptr[row] : 0.0f;
          if (valid_ptr[row]) {
            dz += loss_scale * math::bce_with_logits_grad(logit_ptr[row], label_ptr[row] ? 1.0f : 0.0f);
          }
          grad_b_acc += dz;
          const scalar_t* x_row = x_ptr + row * stride;
          scalar_t* grad_x_row = grad_x_ptr + row * hidden;
          for (int64_t j = 0; j < hidden; ++j) {
            const float xv = static_cast<float>(x_row[j]);
            grad_x_row[j] = static_cast<scalar_t>(dz * w_ptr[j] * math::gelu_grad(xv));
            grad_w_acc[j] += dz * math::gelu(xv);
          }
        }
        chunk_grad_b[chunk] = grad_b_acc;
      }
    });
  });

  double grad_b = 0.0;
  for (double partial : chunk_grad_b) grad_b += partial;
  // Chunk partials added in chunk order, columns in parallel: the same sum whatever the thread count.
  at::Tensor grad_w = at::empty({hidden}, chunk_grad_w.options());
  const float* partial_ptr = chunk_grad_w.data_ptr<float>();
  float* grad_w_ptr = grad_w.data_ptr<float>();
  const int64_t chunks = chunk_grad_w.size(0);
  at::parallel_for(0, hidden, 256, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t j = col_begin; j < col_end; ++j) {
      float sum = 0.0f;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial_ptr[chunk * hidden + j];
      grad_w_ptr[j] = sum;
    }
  });
  return {grad_x, grad_w, at::full({1}, grad_b, grad_w.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CPU, m) {
  m.impl("disc_head", &disc_head_cpu);
  m.impl("disc_head_backward", &disc_head_backward_cpu);
}

}  // namespace electra_ext
