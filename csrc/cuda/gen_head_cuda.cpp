// CUDA entry points of gen_head: the device guard and current stream around the shared device glue.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/entry_checks.h"
#include "gen_head_device_glue.h"

namespace electra_ext {
namespace {

struct CudaLaunchers {
  static GenHeadSplits gen_head_forward_splits(int64_t rows, int64_t vocab, FloatType dtype) {
    return cuda::gen_head_forward_splits(rows, vocab, dtype);
  }
  static int64_t gen_head_grad_h_partial_floats(int64_t chunk_rows, int64_t hidden, FloatType dtype) {
    return cuda::gen_head_grad_h_partial_floats(chunk_rows, hidden, dtype);
  }
  static cudaError_t gen_head_forward(const GenHeadForwardArgs& args, cudaStream_t stream) {
    return cuda::gen_head_forward(args, stream);
  }
  static cudaError_t gen_head_backward(const GenHeadBackwardArgs& args, cudaStream_t stream) {
    return cuda::gen_head_backward(args, stream);
  }
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check(cudaError_t error) { C10_CUDA_CHECK(error); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gen_head_cuda(
    const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    const at::Tensor& seed, double temperature, bool disallow_correct, int64_t ignore_index, bool emulated) {
  check_cuda_call("gen_head", emulated, h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  return gen_head_forward_on_device<CudaLaunchers>(h, weight, bias, targets, seed, temperature, disallow_correct,
                                                   ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_head_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index, bool emulated) {
  check_cuda_call("gen_head_backward", emulated, h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  return gen_head_backward_on_device<CudaLaunchers>(grad_loss, h, weight, bias, targets, lse, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(electra_ext, CUDA, m) {
  m.impl("gen_head", &gen_head_cuda);
  m.impl("gen_head_backward", &gen_head_backward_cuda);
}

}  // namespace electra_ext
