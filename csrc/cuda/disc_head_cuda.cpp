// CUDA entry points of disc_head: the device guard and current stream around the shared device glue.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/entry_checks.h"
#include "disc_head_device_glue.h"

namespace electra_ext {
namespace {

struct CudaLaunchers {
  static int forward_blocks(int64_t rows) { return cuda::forward_blocks(rows); }
  static int backward_blocks(int64_t rows, int64_t hidden, int device) {
    return cuda::backward_blocks(rows, hidden, device);
  }
  static cudaError_t disc_head_forward(const DiscHeadForwardArgs& args, cudaStream_t stream) {
    return cuda::disc_head_forward(args, stream);
  }
  static cudaError_t disc_head_backward(const DiscHeadBackwardArgs& args, int blocks, cudaStream_t stream) {
    return cuda::disc_head_backward(args, blocks, stream);
  }
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check(cudaError_t error) { C10_CUDA_CHECK(error); }
};

std::tuple<at::Tensor, at::Tensor> disc_head_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                  const at::Tensor& labels, const at::Tensor& valid, bool emulated) {
  check_cuda_call("disc_head", emulated, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return disc_head_on_device<CudaLaunchers>(x, w, b, labels, valid);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_cuda(
    const c10::optional<at::Tensor>& grad_logits, const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& valid,
    bool emulated) {
  check_cuda_call("disc_head_backward", emulated, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return disc_head_backward_on_device<CudaLaunchers>(grad_logits, grad_loss, x, w, logits, labels, valid);
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CUDA, m) {
  m.impl("disc_head", &disc_head_cuda);
  m.impl("disc_head_backward", &disc_head_backward_cuda);
}

}  // namespace electra_ext
