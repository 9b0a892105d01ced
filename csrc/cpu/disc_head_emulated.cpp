// CPU tensors through the discriminator-head CUDA kernels under the SIMT emulation (csrc/simt): slow, but the
// device code exactly as written, so CPU-only CI tests it against the same references as the GPU.
#include "cpu/disc_head_emulated.h"

#include "disc_head_device_glue.h"

namespace electra_ext {
namespace {

struct EmulatedLaunchers {
  static int forward_blocks(int64_t rows) { return emulated::forward_blocks(rows); }
  static int backward_blocks(int64_t rows, int64_t hidden, int device) {
    return emulated::backward_blocks(rows, hidden, device);
  }
  static cudaError_t disc_head_forward(const DiscHeadForwardArgs& args, cudaStream_t stream) {
    return emulated::disc_head_forward(args, stream);
  }
  static cudaError_t disc_head_backward(const DiscHeadBackwardArgs& args, int blocks, cudaStream_t stream) {
    return emulated::disc_head_backward(args, blocks, stream);
  }
  static cudaStream_t stream() { return nullptr; }
  static void check(cudaError_t error) {
    TORCH_CHECK(error == cudaSuccess, "disc_head: emulated kernel launch failed with cudaError_t ", int(error));
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> disc_head_emulated(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                      const at::Tensor& labels, const at::Tensor& valid) {
  return disc_head_on_device<EmulatedLaunchers>(x, w, b, labels, valid);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> disc_head_backward_emulated(
    const c10::optional<at::Tensor>& grad_logits, const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& valid) {
  return disc_head_backward_on_device<EmulatedLaunchers>(grad_logits, grad_loss, x, w, logits, labels, valid);
}

}  // namespace electra_ext
