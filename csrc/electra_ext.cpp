// Every schema of the electra_ext operator library, in one place. Kernels register beside their code
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cpp for CUDA); autograd and fake kernels are registered in Python
// (electra_ext/ops).
#include <Python.h>
#include <torch/library.h>

// An importable module with no Python functions: importing electra_ext._C runs the static registrations
// below, after which the ops are reachable as torch.ops.electra_ext.*.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(electra_ext, m) {
  // Discriminator head after its H->H dense layer: logits = gelu(x) @ w + b, loss = mean BCE over valid rows.
  // emulated=True (CPU tensors only) runs the CUDA kernels' device code through the SIMT emulation.
  m.def(
      "disc_head(Tensor x, Tensor w, Tensor b, Tensor labels, Tensor valid, *, bool emulated=False) "
      "-> (Tensor logits, Tensor loss)");
  m.def(
      "disc_head_backward(Tensor? grad_logits, Tensor grad_loss, Tensor x, Tensor w, Tensor logits, "
      "Tensor labels, Tensor valid, *, bool emulated=False) -> (Tensor grad_x, Tensor grad_w, Tensor grad_b)");
  // Non-causal multi-head attention over sequences packed in [tokens, heads, head_dim] (layout and dropout:
  // csrc/cuda/attention_launch.h): out (zero outside the sequences) and the float32 row log-sum-exp
  // [heads, tokens] the backward recomputes the probabilities from. seed: int64 [1], used when dropout_p > 0.
  // starts None: the padded layout, sequence b at tokens b * max_seqlen .., tokens = batch * max_seqlen; there,
  // seqlens None means no padding (every sequence max_seqlen tokens long), with no lengths tensor to make per call.
  // k and v None: q is [tokens, 3, heads, head_dim], a fused QKV projection's output. The backward returns the
  // gradients of q, k, v as one [tokens, 3, heads, head_dim] tensor, which such a projection takes as is. The
  // padded layout also takes q, k, v as [batch, max_seqlen, ...]: out and the gradient then come back so shaped.
  m.def(
      "attention(Tensor q, Tensor? k, Tensor? v, Tensor? starts, Tensor? seqlens, int max_seqlen, float dropout_p, "
      "float softmax_scale, Tensor? seed, *, bool emulated=False) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor? k, Tensor? v, Tensor out, Tensor lse, "
      "Tensor? starts, Tensor? seqlens, int max_seqlen, float dropout_p, float softmax_scale, Tensor? seed, *, "
      "bool emulated=False) -> Tensor grad_qkv");
  // ELECTRA's generator head on the masked rows (csrc/cpu/gen_head_cpu.cpp, csrc/cuda/gen_head_launch.h):
  // logits = h weightᵀ + bias [M, V],
  // never stored; loss = mean cross-entropy over rows whose target != ignore_index (0 when none), the rows'
  // float32 log-sum-exp (the backward recomputes the softmax from it), Gumbel-max samples of
  // softmax(logits / temperature) keyed by seed (int64 [1], csrc/common/philox.h), the target excluded when
  // disallow_correct, and the number of counted rows whose argmax is the target. emulated=True runs the CUDA
  // kernels on CPU tensors (float16/bfloat16 h).
  m.def(
      "gen_head(Tensor h, Tensor weight, Tensor bias, Tensor targets, Tensor seed, float temperature, "
      "bool disallow_correct, int ignore_index, *, bool emulated=False) "
      "-> (Tensor loss, Tensor samples, Tensor lse, Tensor num_correct)");
  m.def(
      "gen_head_backward(Tensor grad_loss, Tensor h, Tensor weight, Tensor bias, Tensor targets, Tensor lse, "
      "int ignore_index, *, bool emulated=False) -> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
}
