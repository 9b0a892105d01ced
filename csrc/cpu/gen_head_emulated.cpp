// CPU tensors through the generator-head CUDA kernels under the SIMT emulation (csrc/simt): slow, but the device
// code exactly as written, so CPU-only CI tests it against the same references as the GPU.
#include "cpu/gen_head_emulated.h"

#include "gen_head_device_glue.h"

namespace electra_ext {
namespace {

struct EmulatedLaunchers {
  static GenHeadSplits gen_head_forward_splits(int64_t rows, int64_t vocab, FloatType dtype) {
    return emulated::gen_head_forward_splits(rows, vocab, dtype);
  }
  static int64_t gen_head_grad_h_partial_floats(int64_t chunk_rows, int64_t hidden, FloatType dtype) {
    return emulated::gen_head_grad_h_partial_floats(chunk_rows, hidden, dtype);
  }
  static cudaError_t gen_head_forward(const GenHeadForwardArgs& args, cudaStream_t stream) {
    return emulated::gen_head_forward(args, stream);
  }
  static cudaError_t gen_head_backward(const GenHeadBackwardArgs& args, cudaStream_t stream) {
    return emulated::gen_head_backward(args, stream);
  }
  static cudaStream_t stream() { return nullptr; }
  static void check(cudaError_t error) {
    TORCH_CHECK(error == cudaSuccess, "gen_head: emulated kernel launch failed with cudaError_t ", int(error));
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gen_head_emulated(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    const at::Tensor& seed, double temperature, bool disallow_correct, int64_t ignore_index) {
  return gen_head_forward_on_device<EmulatedLaunchers>(h, weight, bias, targets, seed, temperature, disallow_correct,
                                                       ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_head_backward_emulated(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index) {
  return gen_head_backward_on_device<EmulatedLaunchers>(grad_loss, h, weight, bias, targets, lse, ignore_index);
}

}  // namespace electra_ext
