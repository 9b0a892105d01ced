// The generator-head CUDA kernels run on CPU tensors through the SIMT emulation (gen_head(..., emulated=True)).
// Built when the CUDA toolkit's headers are available (ELECTRA_EXT_WITH_EMULATION).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace electra_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gen_head_emulated(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    const at::Tensor& seed, double temperature, bool disallow_correct, int64_t ignore_index);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_head_backward_emulated(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index);

}  // namespace electra_ext
