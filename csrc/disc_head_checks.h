// Argument checks and layout preparation shared by every disc_head kernel (ATen CPU, CUDA, emulated CUDA), so
// that all reject the same inputs with the same messages (ValueError/TypeError in Python).
#pragma once

#include <ATen/ATen.h>

namespace electra_ext {

inline void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "disc_head: ", name, " must be on the same device as x (",
                    x.device(), "), got ", t.device());
}

inline void check_row_flags(const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_same_device(x, t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, "disc_head: ", name, " must be a bool tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), "disc_head: ", name,
                    " must have shape [N] = [", x.size(0), "] to match x, got ", t.sizes());
}

// Checks the forward inputs (and the tensors the backward shares with it).
inline void check_disc_head_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                                   const at::Tensor& valid) {
  TORCH_CHECK_VALUE(x.dim() == 2, "disc_head: x must be 2-D [N, H], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   "disc_head: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) > 0, "disc_head: x must have H > 0 columns, got shape ", x.sizes());
  check_same_device(x, w, "w");
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "disc_head: w must be a floating-point tensor, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1), "disc_head: w must have shape [H] = [", x.size(1),
                    "] to match x, got ", w.sizes());
  check_row_flags(x, labels, "labels");
  check_row_flags(x, valid, "valid");
}

inline void check_disc_head_bias(const at::Tensor& x, const at::Tensor& b) {
  check_same_device(x, b, "b");
  TORCH_CHECK_TYPE(at::isFloatingType(b.scalar_type()), "disc_head: b must be a floating-point tensor, got ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == 1, "disc_head: b must have shape [1], got ", b.sizes());
}

inline void check_disc_head_backward_inputs(const c10::optional<at::Tensor>& grad_logits,
                                            const at::Tensor& grad_loss, const at::Tensor& x,
                                            const at::Tensor& w, const at::Tensor& logits,
                                            const at::Tensor& labels, const at::Tensor& valid) {
  check_disc_head_inputs(x, w, labels, valid);
  check_same_device(x, grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "disc_head_backward: grad_loss must be a scalar, got shape ",
                    grad_loss.sizes());
  check_same_device(x, logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 1 && logits.size(0) == x.size(0) && logits.scalar_type() == at::kFloat,
                    "disc_head_backward: logits must be float32 [N] = [", x.size(0), "], got ",
                    logits.scalar_type(), " ", logits.sizes());
  if (grad_logits.has_value()) {
    check_same_device(x, *grad_logits, "grad_logits");
    TORCH_CHECK_VALUE(grad_logits->dim() == 1 && grad_logits->size(0) == x.size(0),
                      "disc_head_backward: grad_logits must have shape [N] = [", x.size(0), "], got ",
                      grad_logits->sizes());
  }
}

// Kernels read x row by row with unit column stride; a row-strided view (a slice of a wider tensor, every
// other row) is read in place, anything else is copied once.
inline at::Tensor rows_with_unit_stride(const at::Tensor& x) {
  return x.stride(1) == 1 || x.size(1) == 1 ? x : x.contiguous();
}

inline int64_t row_stride(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : x.size(1); }

// Per-row float32 vector (w, grad_logits) or flags, contiguous, for raw-pointer kernels.
inline at::Tensor as_contiguous_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The forward's inputs after the checks, laid out as every kernel reads them: x rows with unit column stride,
// w and b as contiguous float32, the flags contiguous.
struct DiscHeadInputs {
  at::Tensor x, w, b, labels, valid;
};

inline DiscHeadInputs prepare_disc_head_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                               const at::Tensor& labels, const at::Tensor& valid) {
  check_disc_head_inputs(x, w, labels, valid);
  check_disc_head_bias(x, b);
  return {rows_with_unit_stride(x), as_contiguous_float(w), as_contiguous_float(b), labels.contiguous(),
          valid.contiguous()};
}

// The backward's inputs, likewise; grad_logits (when given) as contiguous float32.
struct DiscHeadBackwardInputs {
  c10::optional<at::Tensor> grad_logits;
  at::Tensor x, w, logits, labels, valid;
};

inline DiscHeadBackwardInputs prepare_disc_head_backward_inputs(const c10::optional<at::Tensor>& grad_logits,
                                                                const at::Tensor& grad_loss, const at::Tensor& x,
                                                                const at::Tensor& w, const at::Tensor& logits,
                                                                const at::Tensor& labels, const at::Tensor& valid) {
  check_disc_head_backward_inputs(grad_logits, grad_loss, x, w, logits, labels, valid);
  return {grad_logits.has_value() ? c10::optional<at::Tensor>(as_contiguous_float(*grad_logits)) : c10::nullopt,
          rows_with_unit_stride(x),
          as_contiguous_float(w),
          logits.contiguous(),
          labels.contiguous(),
          valid.contiguous()};
}

}  // namespace electra_ext
