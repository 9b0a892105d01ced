// Argument checks and layout preparation shared by every attention kernel (CPU, CUDA, emulated CUDA), so that
// all reject the same inputs with the same messages (ValueError/TypeError in Python), and the views every
// kernel reads (see csrc/cuda/attention_launch.h for the layout).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "common/philox.h"

namespace electra_ext {

struct AttentionInputs {
  at::Tensor q, k, v;         // [tokens, heads, head_dim], unit stride along head_dim
  // [batch] int32, contiguous. starts undefined (until the CPU path makes it): the padded layout, sequence b at
  // tokens b * max_seqlen .., tokens = batch * max_seqlen, where every backend writes every row of its outputs
  // (padding as zeros), so they are allocated uninitialised. seqlens undefined (padded layout only, until the CPU
  // path makes it): every sequence is max_seqlen tokens long.
  at::Tensor starts, seqlens;
  int64_t batch;
  bool padded_layout;
  bool batch_layout;           // q (k, v) given as [batch, max_seqlen, ...]: outputs go back in that shape
  int64_t max_seqlen;
  double softmax_scale;
  uint32_t dropout_threshold;  // common/philox.h dropout_threshold(p), 0 .. 255; 0: no dropout
  float dropout_scale;         // 256 / (256 - dropout_threshold)
  uint64_t seed;               // read from a CPU seed tensor (0 otherwise or without dropout)
  c10::optional<at::Tensor> seed_tensor;  // int64 [1] on q's device when dropout is on
};

inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline void check_attention_sequences(const char* op, const at::Tensor& q, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " must be on q's device (", q.device(), "), got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be an int32 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D [batch], got shape ", t.sizes());
}

struct QkvViews {
  at::Tensor q, k, v;
  bool batch_layout;
};

// q, k, v as given, or, with k and v None, the three [tokens, heads, head_dim] views of q = [tokens, 3, heads,
// head_dim] (a fused QKV projection's output, which the backward's gradient then matches: no copy either way).
// The padded layout also takes them as [batch, max_seqlen, ...] (one more dimension), viewed here as tokens: the
// caller then needs no view op on either side of the op, whose autograd nodes cost more host time per call than
// the op's own glue (benchmarks/NOTES.md, "Host time").
inline QkvViews qkv_views(const char* op, const at::Tensor& q, const c10::optional<at::Tensor>& k,
                          const c10::optional<at::Tensor>& v, bool padded_layout, int64_t max_seqlen) {
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), op,
                    ": k and v must both be tensors, or both None with q packing q, k, v as [tokens, 3, heads, "
                    "head_dim]");
  const bool packed = !k.has_value();
  const bool batch_layout = q.dim() == (packed ? 5 : 4);
  if (batch_layout) {
    TORCH_CHECK_VALUE(padded_layout, op, ": q as [batch, max_seqlen, ...] is the padded layout: starts must be None");
    TORCH_CHECK_VALUE(q.size(1) == max_seqlen, op, ": q as [batch, max_seqlen, ...] needs max_seqlen = ", q.size(1),
                      ", got ", max_seqlen);
    TORCH_CHECK_VALUE(packed || (k->sizes() == q.sizes() && v->sizes() == q.sizes()), op,
                      ": k and v must have q's shape ", q.sizes(), ", got ", k->sizes(), " and ", v->sizes());
  }
  // A fused QKV projection's output keeps its token stride (3 heads head_dim) as (batch, max_seqlen) flatten: a
  // view, no copy.
  const auto tokens = [&](const at::Tensor& t) { return batch_layout ? t.flatten(0, 1) : t; };
  if (!packed) return {tokens(q), tokens(*k), tokens(*v), batch_layout};
  const at::Tensor qkv = tokens(q);
  TORCH_CHECK_VALUE(qkv.dim() == 4 && qkv.size(1) == 3, op,
                    ": with k and v None, q must be [tokens, 3, heads, head_dim] (or [batch, max_seqlen, 3, heads, "
                    "head_dim]), got shape ", q.sizes());
  return {qkv.select(1, 0), qkv.select(1, 1), qkv.select(1, 2), batch_layout};
}

inline AttentionInputs prepare_attention_inputs(const char* op, const at::Tensor& q_in,
                                                const c10::optional<at::Tensor>& k_in,
                                                const c10::optional<at::Tensor>& v_in,
                                                const c10::optional<at::Tensor>& starts,
                                                const c10::optional<at::Tensor>& seqlens, int64_t max_seqlen,
                                                double dropout_p, double softmax_scale,
                                                const c10::optional<at::Tensor>& seed) {
  const auto [q, k, v, batch_layout] = qkv_views(op, q_in, k_in, v_in, !starts.has_value(), max_seqlen);
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [tokens, heads, head_dim] (or [batch, max_seqlen, heads, "
                    "head_dim]), got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape ",
                    q.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(q.size(2) > 0 && q.size(1) > 0, op, ": q must have heads > 0 and head_dim > 0, got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= 0 && max_seqlen <= INT32_MAX, op, ": max_seqlen must be in [0, 2^31), got ",
                    max_seqlen);
  int64_t batch = 0;
  if (seqlens.has_value()) {
    check_attention_sequences(op, q, *seqlens, "seqlens");
    batch = seqlens->size(0);
  } else {
    TORCH_CHECK_VALUE(!starts.has_value(), op,
                      ": seqlens None (no padding) needs starts None (the padded layout, sequence b at token b * "
                      "max_seqlen)");
    TORCH_CHECK_VALUE(max_seqlen > 0 ? q.size(0) % max_seqlen == 0 : q.size(0) == 0, op,
                      ": with starts and seqlens None, q must hold whole sequences of max_seqlen = ", max_seqlen,
                      " tokens, got ", q.size(0));
    batch = batch_layout ? q_in.size(0) : max_seqlen > 0 ? q.size(0) / max_seqlen : 0;
  }
  TORCH_CHECK_VALUE(!batch_layout || batch == q_in.size(0), op, ": seqlens must have one entry per sequence of q (",
                    q_in.size(0), "), got ", batch);
  if (starts.has_value()) {
    check_attention_sequences(op, q, *starts, "starts");
    TORCH_CHECK_VALUE(starts->size(0) == batch, op, ": starts and seqlens must have one entry per sequence, got ",
                      starts->size(0), " and ", batch);
  } else {
    TORCH_CHECK_VALUE(q.size(0) == batch * max_seqlen, op,
                      ": with starts None (the padded layout), q must hold batch * max_seqlen = ", batch, " * ",
                      max_seqlen, " tokens, got ", q.size(0));
  }
  TORCH_CHECK_VALUE(q.size(0) < INT32_MAX, op, ": at most 2^31 - 1 tokens, got ", q.size(0));
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  // The mask draws one byte per entry (common/philox.h): p is rounded to a multiple of 1/256, so 0 < p < 1/512
  // would silently mean no dropout and p >= 511/512 would drop everything.
  const uint32_t threshold = philox::dropout_threshold(float(dropout_p));
  TORCH_CHECK_VALUE(dropout_p == 0.0 || (threshold > 0 && threshold < 256), op,
                    ": dropout_p must be 0 or in [1/512, 511/512) (the mask's resolution is 1/256), got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0.0, op,
                    ": softmax_scale must be a positive number, got ", softmax_scale);
  AttentionInputs in{unit_last_stride(q),
                     unit_last_stride(k),
                     unit_last_stride(v),
                     starts.has_value() ? starts->contiguous() : at::Tensor(),
                     seqlens.has_value() ? seqlens->contiguous() : at::Tensor(),
                     batch,
                     !starts.has_value(),
                     batch_layout,
                     max_seqlen,
                     softmax_scale,
                     threshold,
                     philox::dropout_scale(threshold),
                     0,
                     c10::nullopt};
  // Each sequence inside [0, max_seqlen] and inside the tokens: read where that costs no device synchronisation
  // (CPU tensors: the CPU kernel and the emulated CUDA kernels reject the same inputs); the CUDA kernels clamp
  // instead (tiles::sequence_extent), so a bad entry there can never reach memory outside q, k, v.
  if (q.device().is_cpu() && in.seqlens.defined()) {  // without seqlens: whole sequences, checked above
    const int32_t* start = in.starts.defined() ? in.starts.data_ptr<int32_t>() : nullptr;
    const int32_t* length = in.seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < in.batch; ++b) {
      TORCH_CHECK_VALUE(length[b] >= 0 && length[b] <= max_seqlen, op, ": seqlens[", b, "] = ", length[b],
                        " is outside [0, max_seqlen = ", max_seqlen, "]");
      const int64_t first = start != nullptr ? start[b] : b * max_seqlen;
      TORCH_CHECK_VALUE(length[b] == 0 || (first >= 0 && first + length[b] <= q.size(0)), op, ": sequence ", b,
                        " (tokens ", first, " .. ", first + length[b] - 1, ") is outside the ", q.size(0),
                        " tokens");
    }
  }
  if (in.dropout_threshold > 0) {
    TORCH_CHECK_VALUE(seed.has_value(), op, ": dropout_p > 0 needs a seed tensor");
    TORCH_CHECK_VALUE(seed->device() == q.device() && seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                      ": seed must be an int64 tensor with one element on q's device (", q.device(), "), got ",
                      seed->scalar_type(), " ", seed->sizes(), " on ", seed->device());
    in.seed_tensor = seed->reshape({1}).contiguous();
    if (q.device().is_cpu()) in.seed = static_cast<uint64_t>(in.seed_tensor->item<int64_t>());
  }
  return in;
}

// t ([batch, max_seqlen, heads, head_dim] in the batch layout) as [tokens, heads, head_dim].
inline at::Tensor token_rows(const AttentionInputs& in, const at::Tensor& t) {
  return in.batch_layout && t.dim() == 4 ? t.flatten(0, 1) : t;
}

// grad_out and out as the kernels read them ([tokens, heads, head_dim]), checked against q.
inline std::tuple<at::Tensor, at::Tensor> attention_backward_rows(const char* op, const AttentionInputs& in,
                                                                  const at::Tensor& grad_out_in,
                                                                  const at::Tensor& out_in, const at::Tensor& lse) {
  const at::Tensor& q = in.q;
  const at::Tensor grad_out = token_rows(in, grad_out_in), out = token_rows(in, out_in);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": grad_out and out must have the shape of q's rows ", q.sizes(), ", got ", grad_out_in.sizes(),
                    " and ", out_in.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(1) &&
                        lse.size(1) == q.size(0),
                    op, ": lse must be float32 [heads, tokens] = [", q.size(1), ", ", q.size(0), "], got ",
                    lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    op, ": grad_out, out and lse must be on q's device (", q.device(), ")");
  return {grad_out, out};
}

// An output: uninitialised in the padded layout, whose every row the backend writes (no fill kernel before the
// kernels: 22 us for the 75 MB gradient at ELECTRA-Base on an H200), zero-filled otherwise, where the kernels
// write the sequences' rows only.
inline at::Tensor attention_output(const AttentionInputs& in, at::IntArrayRef sizes,
                                   const at::TensorOptions& options) {
  return in.padded_layout ? at::empty(sizes, options) : at::zeros(sizes, options);
}

// The backward's result: the gradients of q, k and v as one [tokens, 3, heads, head_dim] tensor, so that a fused
// QKV projection takes it as is; select(1, i) are the three.
inline at::Tensor attention_grad_qkv(const AttentionInputs& in) {
  return attention_output(in, {in.q.size(0), 3, in.q.size(1), in.q.size(2)}, in.q.options());
}

// An output of [tokens, ...] rows as the caller gave q: [batch, max_seqlen, ...] in the batch layout.
inline at::Tensor caller_rows(const AttentionInputs& in, const at::Tensor& t) {
  if (!in.batch_layout) return t;
  std::vector<int64_t> sizes{in.batch, in.max_seqlen};
  sizes.insert(sizes.end(), t.sizes().begin() + 1, t.sizes().end());
  return t.view(sizes);
}

// The CPU kernels read starts[b] and seqlens[b] in either layout: the padded layout's b * max_seqlen, and
// max_seqlen for every sequence without seqlens, made here (CPU tensors).
inline void make_layout_explicit(AttentionInputs& in) {
  const at::TensorOptions options = in.q.options().dtype(at::kInt);
  if (!in.starts.defined()) {
    in.starts = at::arange(in.batch, options).mul_(static_cast<int32_t>(in.max_seqlen));
  }
  if (!in.seqlens.defined()) in.seqlens = at::full({in.batch}, in.max_seqlen, options);
}

}  // namespace electra_ext
