// Tensor-side entry of the generator-head device kernels, shared by the GPU (csrc/cuda/gen_head_cuda.cpp) and the
// SIMT emulation on the CPU (csrc/cpu/gen_head_emulated.cpp): argument checks, layout (16-bit h and weight
// with 16-byte aligned rows and hidden padded to a multiple of 8), workspaces, then the torch-free launchers of
// cuda/gen_head_launch.h, and the reductions of their per-row results into the op's outputs.
//
// `Launchers` supplies gen_head_forward_splits, gen_head_grad_h_partial_floats, gen_head_forward and
// gen_head_backward (the launcher namespace's functions), stream() and check(cudaError_t).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <tuple>

#include "cuda/gen_head_launch.h"
#include "gen_head_checks.h"

namespace electra_ext {

// The backward's G workspace in MiB (ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB, default 64): larger chunks of rows
// give the two GEMMs more blocks; the default is ~3% of the float32 logits an eager head holds for a Base batch.
inline int64_t gen_head_workspace_bytes() {
  const char* value = std::getenv("ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB");
  if (value == nullptr || *value == '\0') return int64_t(64) << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && mib >= 0, "gen_head: ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB must be a number of "
                                              "MiB >= 0, got '", value, "'");
  return static_cast<int64_t>(mib) << 20;
}

// h and weight as the kernels take them: h's dtype (float16 or bfloat16) for both, unit stride along hidden,
// rows 16-byte aligned, hidden padded with zero columns to a multiple of 8 (at least 8).
struct GenHeadDeviceInputs {
  at::Tensor h, weight, bias, targets;
  GenHeadInputs launch;
};

inline GenHeadDeviceInputs gen_head_device_inputs(const char* op, const at::Tensor& h_in, const at::Tensor& weight_in,
                                                  const at::Tensor& bias_in, const at::Tensor& targets_in,
                                                  int64_t ignore_index) {
  const at::ScalarType dtype = h_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": the CUDA kernels take float16 or bfloat16 h (weight is cast to h's dtype), got ", dtype);
  const int64_t hidden = h_in.size(1);
  const int64_t padded = hidden < 8 ? 8 : (hidden + 7) / 8 * 8;
  at::Tensor h = h_in, weight = weight_in.to(dtype);
  if (padded != hidden) {
    h = at::constant_pad_nd(h, {0, padded - hidden});
    weight = at::constant_pad_nd(weight, {0, padded - hidden});
  }
  const bool h_aligned = h.stride(1) == 1 && h.stride(0) % 8 == 0 &&
                         reinterpret_cast<uintptr_t>(h.data_ptr()) % 16 == 0;
  // A fresh copy is aligned; .contiguous() would return a contiguous tensor at an odd storage offset as it is.
  if (!h_aligned) h = h.clone(at::MemoryFormat::Contiguous);
  weight = weight.contiguous();
  if (reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 != 0) weight = weight.clone();
  GenHeadDeviceInputs in{h, weight, bias_in.to(at::kFloat).contiguous(), targets_in.contiguous(), {}};
  in.launch = GenHeadInputs{dtype == at::kHalf ? FloatType::kFloat16 : FloatType::kBFloat16,
                            h.size(0),
                            weight.size(0),
                            static_cast<int>(padded),
                            h.data_ptr(),
                            h.stride(0),
                            weight.data_ptr(),
                            in.bias.data_ptr<float>(),
                            in.targets.data_ptr<int64_t>(),
                            ignore_index};
  return in;
}

// Every check of the CPU kernel, except the targets' values on CUDA tensors: reading them would synchronise the
// device, so there a target outside [0, V) makes the loss NaN instead (the contract in cuda/gen_head_launch.h).
inline int64_t check_gen_head_device_inputs(const char* op, const at::Tensor& h, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& targets, int64_t ignore_index) {
  const int64_t vocab = check_gen_head_tensors(op, h, weight, bias, targets);
  TORCH_CHECK_VALUE(vocab <= kGenHeadMaxVocab, op, ": the CUDA kernels take V <= ", kGenHeadMaxVocab, ", got ", vocab);
  TORCH_CHECK_VALUE((h.size(0) + kGenHeadBlockRows - 1) / kGenHeadBlockRows <= 65535, op,
                    ": the CUDA kernels take at most 65535 x ", kGenHeadBlockRows, " rows, got ", h.size(0));
  if (targets.is_cpu()) check_gen_head_targets(op, targets, vocab, ignore_index);
  return vocab;
}

template <typename Launchers>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gen_head_forward_on_device(
    const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& bias_in, const at::Tensor& targets_in,
    const at::Tensor& seed, double temperature, bool disallow_correct, int64_t ignore_index) {
  constexpr const char* op = "gen_head";
  const int64_t vocab = check_gen_head_device_inputs(op, h_in, weight_in, bias_in, targets_in, ignore_index);
  check_gen_head_options(op, vocab, temperature, disallow_correct);
  check_gen_head_seed(op, h_in, seed);
  const GenHeadDeviceInputs in = gen_head_device_inputs(op, h_in, weight_in, bias_in, targets_in, ignore_index);
  const int64_t rows = in.launch.rows;
  const at::TensorOptions float_options = h_in.options().dtype(at::kFloat);
  const at::TensorOptions int_options = h_in.options().dtype(at::kInt);
  const GenHeadSplits splits = Launchers::gen_head_forward_splits(rows, vocab, in.launch.dtype);
  at::Tensor partial_float = at::empty({3, splits.splits, rows}, float_options);
  at::Tensor partial_int = at::empty({2, splits.splits, rows}, int_options);
  at::Tensor target_logit = at::empty({rows}, float_options);
  at::Tensor lse = at::empty({rows}, float_options);
  at::Tensor samples = at::empty({rows}, targets_in.options());
  at::Tensor row_loss = at::empty({rows}, float_options);
  at::Tensor row_correct = at::empty({rows}, int_options);
  const at::Tensor seed_tensor = seed.reshape({1}).contiguous();
  float* partial_float_ptr = partial_float.data_ptr<float>();
  int32_t* partial_int_ptr = partial_int.data_ptr<int32_t>();
  const int64_t partial_size = int64_t(splits.splits) * rows;
  const GenHeadForwardArgs args{in.launch,
                                seed_tensor.data_ptr<int64_t>(),
                                static_cast<float>(1.0 / temperature),
                                disallow_correct,
                                splits,
                                partial_float_ptr,
                                partial_float_ptr + partial_size,
                                partial_int_ptr,
                                partial_float_ptr + 2 * partial_size,
                                partial_int_ptr + partial_size,
                                target_logit.data_ptr<float>(),
                                lse.data_ptr<float>(),
                                samples.data_ptr<int64_t>(),
                                row_loss.data_ptr<float>(),
                                row_correct.data_ptr<int32_t>()};
  Launchers::check(Launchers::gen_head_forward(args, Launchers::stream()));
  // The mean over counted rows, summed in float64 in a fixed order (as the CPU kernel does), on the device.
  const at::Tensor counted = (in.targets != ignore_index).sum();
  const at::Tensor loss = (row_loss.to(at::kDouble).sum() / counted.clamp_min(1)).to(at::kFloat);
  return {loss, samples, lse, row_correct.sum(at::kLong)};
}

template <typename Launchers>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_head_backward_on_device(
    const at::Tensor& grad_loss, const at::Tensor& h_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const at::Tensor& targets_in, const at::Tensor& lse_in, int64_t ignore_index) {
  constexpr const char* op = "gen_head_backward";
  const int64_t vocab = check_gen_head_device_inputs(op, h_in, weight_in, bias_in, targets_in, ignore_index);
  check_gen_head_backward_extras(op, h_in, grad_loss, lse_in);
  const GenHeadDeviceInputs in = gen_head_device_inputs(op, h_in, weight_in, bias_in, targets_in, ignore_index);
  const int64_t rows = in.launch.rows, hidden = in.launch.hidden;
  const at::TensorOptions float_options = h_in.options().dtype(at::kFloat);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor counted = (in.targets != ignore_index).sum();
  const at::Tensor grad_scale = (grad_loss.reshape({1}).to(at::kFloat) / counted.clamp_min(1)).contiguous();
  const int64_t chunk_rows = gen_head_chunk_rows(rows, vocab, gen_head_workspace_bytes());
  at::Tensor grad_logits = at::empty({rows > 0 ? chunk_rows : 0, gen_head_vocab_padded(vocab)}, in.h.options());
  at::Tensor grad_bias_partials =
      at::empty({(rows + kGenHeadBlockRows - 1) / kGenHeadBlockRows, vocab}, float_options);
  at::Tensor grad_h = at::empty({rows, hidden}, in.h.options());
  at::Tensor grad_weight = at::zeros({vocab, hidden}, float_options);
  const int64_t grad_h_partial_floats =
      rows > 0 ? Launchers::gen_head_grad_h_partial_floats(chunk_rows, hidden, in.launch.dtype) : 0;
  at::Tensor grad_h_partials = at::empty({grad_h_partial_floats}, float_options);
  const GenHeadBackwardArgs args{in.launch,
                                 lse.data_ptr<float>(),
                                 grad_scale.data_ptr<float>(),
                                 chunk_rows,
                                 grad_logits.data_ptr(),
                                 grad_bias_partials.data_ptr<float>(),
                                 grad_h.data_ptr(),
                                 grad_h_partials.data_ptr<float>(),
                                 grad_h_partial_floats,
                                 grad_weight.data_ptr<float>()};
  Launchers::check(Launchers::gen_head_backward(args, Launchers::stream()));
  const int64_t original_hidden = h_in.size(1);
  return {grad_h.narrow(1, 0, original_hidden).contiguous(),
          grad_weight.narrow(1, 0, original_hidden).to(weight_in.scalar_type()).contiguous(),
          (grad_bias_partials.sum(0) * grad_scale).to(bias_in.scalar_type())};
}

}  // namespace electra_ext
