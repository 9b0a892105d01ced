// Tensor-side entry of the discriminator-head device kernels, shared by the GPU (csrc/cuda/disc_head_cuda.cpp)
// and the SIMT emulation on the CPU (csrc/cpu/disc_head_emulated.cpp): argument checks, layout, workspace,
// dtype mapping, then the torch-free launchers of cuda/disc_head_launch.h.
//
// `Launchers` supplies forward_blocks, backward_blocks, disc_head_forward, disc_head_backward (the launcher
// namespace's functions), stream() and check(cudaError_t).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cuda/disc_head_launch.h"
#include "disc_head_checks.h"

namespace electra_ext {

inline FloatType float_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "disc_head: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

template <typename Launchers>
std::tuple<at::Tensor, at::Tensor> disc_head_on_device(const at::Tensor& x_in, const at::Tensor& w_in,
                                                       const at::Tensor& b_in, const at::Tensor& labels_in,
                                                       const at::Tensor& valid_in) {
  // References, not structured bindings: C++17 lambdas cannot capture those (torch < 2.14 builds as C++17).
  const DiscHeadInputs in = prepare_disc_head_inputs(x_in, w_in, b_in, labels_in, valid_in);
  const at::Tensor &x = in.x, &w = in.w, &b = in.b, &labels = in.labels, &valid = in.valid;
  const int64_t rows = x.size(0);
  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor logits = at::empty({rows}, float_options);
  at::Tensor loss = at::zeros({}, float_options);
  if (rows == 0) return {logits, loss};

  const int blocks = Launchers::forward_blocks(rows);
  at::Tensor block_loss = at::empty({blocks}, float_options);
  at::Tensor block_valid = at::empty({blocks}, x.options().dtype(at::kInt));
  const DiscHeadForwardArgs args{float_type(x),
                                 x.data_ptr(),
                                 rows,
                                 x.size(1),
                                 row_stride(x),
                                 w.data_ptr<float>(),
                                 b.data_ptr<float>(),
                                 labels.data_ptr<bool>(),
                                 valid.data_ptr<bool>(),
                                 logits.data_ptr<float>(),
                                 loss.data_ptr<float>(),
                                 block_loss.data_ptr<float>(),
                                 block_valid.data_ptr<int32_t>()};
  Launchers::check(Launchers::disc_head_forward(args, Launchers::stream()));
  return {logits, loss};
}

template <typename Launchers>
std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_on_device(
    const c10::optional<at::Tensor>& grad_logits_in, const at::Tensor& grad_loss, const at::Tensor& x_in,
    const at::Tensor& w_in, const at::Tensor& logits_in, const at::Tensor& labels_in,
    const at::Tensor& valid_in) {
  const DiscHeadBackwardInputs in =
      prepare_disc_head_backward_inputs(grad_logits_in, grad_loss, x_in, w_in, logits_in, labels_in, valid_in);
  const c10::optional<at::Tensor>& grad_logits = in.grad_logits;
  const at::Tensor &x = in.x, &w = in.w, &logits = in.logits, &labels = in.labels, &valid = in.valid;
  const int64_t rows = x.size(0), hidden = x.size(1);
  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty({rows, hidden}, x.options());
  at::Tensor grad_w = at::zeros({hidden}, float_options);
  at::Tensor grad_b = at::zeros({1}, float_options);
  if (rows == 0) return {grad_x, grad_w, grad_b};

  const int blocks = Launchers::backward_blocks(rows, hidden, x.is_cuda() ? x.get_device() : 0);
  TORCH_CHECK_VALUE(blocks > 0, "disc_head_backward: H = ", hidden,
                    " is too large: one row of float32 dw accumulators must fit in shared memory");
  // The loss is the mean over valid rows: d loss / d z_i = grad_loss * (sigmoid(z_i) - y_i) / valid rows.
  const at::Tensor loss_scale = grad_loss.reshape({}).to(at::kFloat) / valid.sum().clamp_min(1).to(at::kFloat);
  at::Tensor block_grad_wb = at::empty({blocks, hidden + 1}, float_options);
  const DiscHeadBackwardArgs args{float_type(x),
                                  grad_logits.has_value() ? grad_logits->data_ptr<float>() : nullptr,
                                  loss_scale.data_ptr<float>(),
                                  x.data_ptr(),
                                  rows,
                                  hidden,
                                  row_stride(x),
                                  w.data_ptr<float>(),
                                  logits.data_ptr<float>(),
                                  labels.data_ptr<bool>(),
                                  valid.data_ptr<bool>(),
                                  grad_x.data_ptr(),
                                  grad_w.data_ptr<float>(),
                                  grad_b.data_ptr<float>(),
                                  block_grad_wb.data_ptr<float>()};
  Launchers::check(Launchers::disc_head_backward(args, blocks, Launchers::stream()));
  return {grad_x, grad_w, grad_b};
}

}  // namespace electra_ext
