// Tensor-side entry of the attention device kernels, shared by the GPU (csrc/cuda/attention_cuda.cpp) and the
// SIMT emulation on the CPU (csrc/cpu/attention_emulated.cpp): argument checks, layout, dtype mapping, then
// the torch-free launchers of cuda/attention_launch.h.
//
// `Launchers` supplies attention_forward, attention_backward (the launcher namespace's functions), stream() and
// check(cudaError_t).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "attention_checks.h"
#include "cuda/attention_launch.h"

namespace electra_ext {

inline FloatType attention_float_type(const char* op, const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": the CUDA kernels take float16 or bfloat16 q, k, v, got ", q.scalar_type());
  }
}

inline AttentionShape attention_shape(const AttentionInputs& in) {
  return AttentionShape{in.padded_layout ? nullptr : in.starts.data_ptr<int32_t>(),
                        in.seqlens.defined() ? in.seqlens.data_ptr<int32_t>() : nullptr,
                        static_cast<int>(in.batch),
                        static_cast<int>(in.q.size(1)),
                        static_cast<int>(in.q.size(2)),
                        static_cast<int>(in.max_seqlen),
                        in.q.size(0),
                        static_cast<float>(in.softmax_scale),
                        in.dropout_threshold,
                        in.dropout_scale,
                        in.seed_tensor.has_value() ? in.seed_tensor->data_ptr<int64_t>() : nullptr};
}

inline AttentionTensor attention_tensor(const at::Tensor& t) {
  return AttentionTensor{t.data_ptr(), t.stride(0), t.stride(1)};
}

// The CUDA kernels copy 16-byte chunks of q, k, v rows (cp.async): every row must start 16-byte aligned, which a
// fused QKV projection's views do (strides of 3HD and D elements). Anything else is copied once into a fresh
// (aligned) allocation: .contiguous() would return a contiguous tensor at an odd storage offset as it is.
inline at::Tensor rows_16_byte_aligned(const at::Tensor& t) {
  const int64_t chunk = 16 / t.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % chunk == 0 &&
                       t.stride(1) % chunk == 0 && t.size(2) % chunk == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// out and grad_out, read with 16-byte loads: contiguous and 16-byte aligned, else copied as above.
inline at::Tensor contiguous_16_byte_aligned(const at::Tensor& t) {
  const bool aligned = t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline void check_cuda_head_dim(const char* op, const at::Tensor& q) {
  TORCH_CHECK_VALUE(attention_cuda_supports_head_dim(static_cast<int>(q.size(2))), op,
                    ": the CUDA kernels support head_dim 32, 64 or 128, got ", q.size(2));
}

template <typename Launchers>
std::tuple<at::Tensor, at::Tensor> attention_forward_on_device(const at::Tensor& q_in,
                                                               const c10::optional<at::Tensor>& k_in,
                                                               const c10::optional<at::Tensor>& v_in,
                                                               const c10::optional<at::Tensor>& starts,
                                                               const c10::optional<at::Tensor>& seqlens,
                                                               int64_t max_seqlen,
                                                               double dropout_p, double softmax_scale,
                                                               const c10::optional<at::Tensor>& seed) {
  constexpr const char* op = "attention";
  const AttentionInputs in =
      prepare_attention_inputs(op, q_in, k_in, v_in, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed);
  const FloatType dtype = attention_float_type(op, in.q);
  check_cuda_head_dim(op, in.q);
  const at::Tensor q = rows_16_byte_aligned(in.q), k = rows_16_byte_aligned(in.k), v = rows_16_byte_aligned(in.v);
  at::Tensor out = attention_output(in, in.q.sizes(), in.q.options());
  at::Tensor lse = attention_output(in, {in.q.size(1), in.q.size(0)}, in.q.options().dtype(at::kFloat));
  if (in.q.size(0) == 0 || in.batch == 0 || in.max_seqlen == 0) return {caller_rows(in, out), lse};
  const AttentionForwardArgs args{dtype,
                                  attention_shape(in),
                                  attention_tensor(q),
                                  attention_tensor(k),
                                  attention_tensor(v),
                                  out.data_ptr(),
                                  lse.data_ptr<float>()};
  Launchers::check(Launchers::attention_forward(args, Launchers::stream()));
  return {caller_rows(in, out), lse};
}

template <typename Launchers>
at::Tensor attention_backward_on_device(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const c10::optional<at::Tensor>& k_in,
    const c10::optional<at::Tensor>& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& starts, const c10::optional<at::Tensor>& seqlens, int64_t max_seqlen,
    double dropout_p, double softmax_scale, const c10::optional<at::Tensor>& seed) {
  constexpr const char* op = "attention_backward";
  const AttentionInputs in =
      prepare_attention_inputs(op, q_in, k_in, v_in, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed);
  const auto [grad_out_rows, out_rows] = attention_backward_rows(op, in, grad_out_in, out_in, lse_in);
  const FloatType dtype = attention_float_type(op, in.q);
  check_cuda_head_dim(op, in.q);
  const at::Tensor q = rows_16_byte_aligned(in.q), k = rows_16_byte_aligned(in.k), v = rows_16_byte_aligned(in.v);
  const at::Tensor grad_out = contiguous_16_byte_aligned(grad_out_rows);
  const at::Tensor out = contiguous_16_byte_aligned(out_rows);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_qkv = attention_grad_qkv(in);
  if (in.q.size(0) == 0 || in.batch == 0 || in.max_seqlen == 0) return caller_rows(in, grad_qkv);
  at::Tensor delta = at::empty({in.q.size(1), in.q.size(0)}, in.q.options().dtype(at::kFloat));
  // dQ summed over key blocks with atomics (cuda/attention_launch.h), unless PyTorch is asked for deterministic
  // algorithms: then the dQ kernel recomputes S and dP instead.
  at::Tensor dq_accum;
  if (!at::globalContext().deterministicAlgorithms()) dq_accum = at::empty(in.q.sizes(), delta.options());
  const AttentionBackwardArgs args{dtype,
                                   attention_shape(in),
                                   attention_tensor(q),
                                   attention_tensor(k),
                                   attention_tensor(v),
                                   grad_out.data_ptr(),
                                   out.data_ptr(),
                                   lse.data_ptr<float>(),
                                   delta.data_ptr<float>(),
                                   grad_qkv.select(1, 0).data_ptr(),
                                   grad_qkv.select(1, 1).data_ptr(),
                                   grad_qkv.select(1, 2).data_ptr(),
                                   grad_qkv.stride(0),
                                   dq_accum.defined() ? dq_accum.data_ptr<float>() : nullptr};
  Launchers::check(Launchers::attention_backward(args, Launchers::stream()));
  return caller_rows(in, grad_qkv);
}

}  // namespace electra_ext
