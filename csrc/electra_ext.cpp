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
}
