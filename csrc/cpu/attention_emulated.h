// The attention CUDA kernels run on CPU tensors through the SIMT emulation (attention(..., emulated=True)).
// Built when the CUDA toolkit's headers are available (ELECTRA_EXT_WITH_EMULATION).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace electra_ext {

std::tuple<at::Tensor, at::Tensor> attention_emulated(const at::Tensor& q, const c10::optional<at::Tensor>& k,
                                                      const c10::optional<at::Tensor>& v,
                                                      const c10::optional<at::Tensor>& starts,
                                                      const c10::optional<at::Tensor>& seqlens, int64_t max_seqlen,
                                                      double dropout_p, double softmax_scale,
                                                      const c10::optional<at::Tensor>& seed);

at::Tensor attention_backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& q, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& starts, const c10::optional<at::Tensor>& seqlens,
    int64_t max_seqlen, double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed);

}  // namespace electra_ext
