// CPU tensors through the attention CUDA kernels under the SIMT emulation (csrc/simt): slow, but the device code
// exactly as written, so CPU-only CI tests it against the same references as the GPU.
#include "cpu/attention_emulated.h"

#include "attention_device_glue.h"

namespace electra_ext {
namespace {

struct EmulatedLaunchers {
  static cudaError_t attention_forward(const AttentionForwardArgs& args, cudaStream_t stream) {
    return emulated::attention_forward(args, stream);
  }
  static cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
    return emulated::attention_backward(args, stream);
  }
  static cudaStream_t stream() { return nullptr; }
  static void check(cudaError_t error) {
    TORCH_CHECK(error == cudaSuccess, "attention: emulated kernel launch failed with cudaError_t ", int(error));
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_emulated(const at::Tensor& q, const c10::optional<at::Tensor>& k,
                                                      const c10::optional<at::Tensor>& v,
                                                      const c10::optional<at::Tensor>& starts,
                                                      const c10::optional<at::Tensor>& seqlens, int64_t max_seqlen,
                                                      double dropout_p, double softmax_scale,
                                                      const c10::optional<at::Tensor>& seed) {
  return attention_forward_on_device<EmulatedLaunchers>(q, k, v, starts, seqlens, max_seqlen, dropout_p,
                                                        softmax_scale, seed);
}

at::Tensor attention_backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& q, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& starts, const c10::optional<at::Tensor>& seqlens,
    int64_t max_seqlen, double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed) {
  return attention_backward_on_device<EmulatedLaunchers>(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen,
                                                         dropout_p, softmax_scale, seed);
}

}  // namespace electra_ext
