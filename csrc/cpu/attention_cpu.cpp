// STUB header: the CPU attention kernels (tiled online softmax) replace the two *_aten functions below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "cpu/emulated_call.h"
#if defined(ELECTRA_EXT_WITH_EMULATION)
#include "cpu/attention_emulated.h"
#endif

namespace electra_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& starts, const at::Tensor& seqlens,
                                                  int64_t max_seqlen, double dropout_p, double softmax_scale,
                                                  const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(false, "attention: CPU kernel not written yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_aten(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& starts, const at::Tensor& seqlens, int64_t max_seqlen,
    double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(false, "attention_backward: CPU kernel not written yet");
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& starts, const at::Tensor& seqlens,
                                                 int64_t max_seqlen, double dropout_p, double softmax_scale,
                                                 const c10::optional<at::Tensor>& seed, bool emulated) {
  if (!emulated) return attention_aten(q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed);
  ELECTRA_EXT_EMULATED("attention",
                       attention_emulated(q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& starts, const at::Tensor& seqlens, int64_t max_seqlen,
    double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed, bool emulated) {
  if (!emulated) {
    return attention_backward_aten(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen, dropout_p,
                                   softmax_scale, seed);
  }
  ELECTRA_EXT_EMULATED("attention_backward",
                       attention_backward_emulated(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen,
                                                   dropout_p, softmax_scale, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace electra_ext
