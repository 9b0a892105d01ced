// The discriminator-head CUDA kernels run on CPU tensors through the SIMT emulation (disc_head(...,
// emulated=True)). Built when the CUDA toolkit's headers are available (ELECTRA_EXT_WITH_EMULATION).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace electra_ext {

std::tuple<at::Tensor, at::Tensor> disc_head_emulated(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                      const at::Tensor& labels, const at::Tensor& valid);

std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_emulated(
    const c10::optional<at::Tensor>& grad_logits, const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& valid);

}  // namespace electra_ext
