// Argument checks shared by the gen_head kernels (CPU, CUDA and its emulation), so that all reject the same inputs
// with the same messages (ValueError/TypeError in Python).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace electra_ext {

inline void check_gen_head_device(const char* op, const at::Tensor& h, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == h.device(), op, ": ", name, " must be on h's device (", h.device(), "), got ",
                    t.device());
}

inline void check_gen_head_float(const char* op, const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, op, ": ", name,
                   " must be float32, bfloat16 or float16 (float64 runs the reference), got ", type);
}

// h [M, E], weight [V, E], bias [V], targets [M] int64, all on h's device. Returns V.
inline int64_t check_gen_head_tensors(const char* op, const at::Tensor& h, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(h.dim() == 2, op, ": h must be 2-D [M, E], got shape ", h.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == h.size(1), op, ": weight must be [V, E] with h's E = ",
                    h.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight must have a vocabulary of V > 0 rows, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must be [V] = [",
                    weight.size(0), "], got shape ", bias.sizes());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == h.size(0), op, ": targets must be [M] = [", h.size(0),
                    "], got shape ", targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  // Philox counters hold the row and the column group in 32 bits.
  TORCH_CHECK_VALUE(h.size(0) <= UINT32_MAX, op, ": h must have fewer than 2^32 rows, got ", h.size(0));
  check_gen_head_float(op, h, "h");
  check_gen_head_float(op, weight, "weight");
  check_gen_head_float(op, bias, "bias");
  check_gen_head_device(op, h, weight, "weight");
  check_gen_head_device(op, h, bias, "bias");
  check_gen_head_device(op, h, targets, "targets");
  return weight.size(0);
}

// Every target in [0, vocab) or equal to ignore_index, read from a CPU tensor before any kernel touches memory
// at a target's column; returns the number of counted rows (target != ignore_index).
inline int64_t check_gen_head_targets(const char* op, const at::Tensor& targets, int64_t vocab,
                                      int64_t ignore_index) {
  const at::Tensor contiguous = targets.contiguous();
  const int64_t* target = contiguous.data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t row = 0; row < contiguous.numel(); ++row) {
    if (target[row] == ignore_index) continue;
    TORCH_CHECK_VALUE(target[row] >= 0 && target[row] < vocab, op, ": targets must lie in [0, V = ", vocab,
                      ") or equal ignore_index (", ignore_index, "), got ", target[row], " at row ", row);
    ++counted;
  }
  return counted;
}

inline void check_gen_head_seed(const char* op, const at::Tensor& h, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.device() == h.device() && seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                    ": seed must be an int64 tensor with one element on h's device (", h.device(), "), got ",
                    seed.scalar_type(), " ", seed.sizes(), " on ", seed.device());
}

// The seed of a CPU tensor (the device kernels read it on the device).
inline uint64_t read_gen_head_seed(const char* op, const at::Tensor& h, const at::Tensor& seed) {
  check_gen_head_seed(op, h, seed);
  return static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
}

// The backward's grad_loss (a scalar) and lse (float32 [M]) on h's device.
inline void check_gen_head_backward_extras(const char* op, const at::Tensor& h, const at::Tensor& grad_loss,
                                           const at::Tensor& lse) {
  check_gen_head_device(op, h, grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must be a scalar, got shape ", grad_loss.sizes());
  check_gen_head_device(op, h, lse, "lse");
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == h.size(0) && lse.scalar_type() == at::kFloat, op,
                    ": lse must be float32 [M] = [", h.size(0), "], got ", lse.scalar_type(), " ", lse.sizes());
}

inline void check_gen_head_options(const char* op, int64_t vocab, double temperature, bool disallow_correct) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be a positive number, got ", temperature);
  TORCH_CHECK_VALUE(!disallow_correct || vocab >= 2, op,
                    ": disallow_correct needs a vocabulary of at least 2 tokens, got V = ", vocab);
}

}  // namespace electra_ext
