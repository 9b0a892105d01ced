// CUDA entry points of attention: the device guard and current stream around the shared device glue.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_device_glue.h"
#include "cuda/entry_checks.h"

namespace electra_ext {
namespace {

struct CudaLaunchers {
  static cudaError_t attention_forward(const AttentionForwardArgs& args, cudaStream_t stream) {
    return cuda::attention_forward(args, stream);
  }
  static cudaError_t attention_backward(const AttentionBackwardArgs& args, cudaStream_t stream) {
    return cuda::attention_backward(args, stream);
  }
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check(cudaError_t error) { C10_CUDA_CHECK(error); }
};

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const c10::optional<at::Tensor>& k,
                                                  const c10::optional<at::Tensor>& v,
                                                  const c10::optional<at::Tensor>& starts,
                                                  const c10::optional<at::Tensor>& seqlens,
                                                  int64_t max_seqlen, double dropout_p, double softmax_scale,
                                                  const c10::optional<at::Tensor>& seed, bool emulated) {
  check_cuda_call("attention", emulated, q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_forward_on_device<CudaLaunchers>(q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale,
                                                    seed);
}

at::Tensor attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& starts, const c10::optional<at::Tensor>& seqlens,
    int64_t max_seqlen, double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed, bool emulated) {
  check_cuda_call("attention_backward", emulated, q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return attention_backward_on_device<CudaLaunchers>(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen,
                                                     dropout_p, softmax_scale, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace electra_ext
