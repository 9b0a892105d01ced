// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11) shared by the CPU kernels, the CUDA
// kernels and their SIMT emulation, so that every path draws the same bits for the same key. Torch-free.
//
// Attention dropout keys one 32-bit word per (batch, head, query row, key column) of a sequence, all positions
// counted inside that sequence (so the padded and the packed variable-length layouts drop the same entries):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (column / 4, row, head, batch)      -> four words; the entry takes word column % 4.
// An entry is kept when its word >= dropout_threshold(p) = floor(p * 2^32); kept probabilities are scaled by
// 1 / (1 - p).
//
// The generator head's Gumbel noise keys one word per (row, vocabulary column) of the logits, so a sample depends
// only on (seed, row, column), never on tiling or threads:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (column / 4, row, 0xFFFFFFFF, 0x67656E68 "genh") -> four words; the column takes word column % 4.
// c2 = 0xFFFFFFFF is no attention head (heads < 2^16 in practice) and c3 no batch index, so for one seed the
// two streams never share a counter. uniform u = ((word >> 9) + 0.5) * 2^-23 and gumbel = -log(-log(u)), both
// in float32 (gen_head_uniform below says why 23 bits).
// electra_ext/ops/reference.py implements the same functions in PyTorch (the tests' oracle).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace electra_ext::philox {

struct Words {
  uint32_t x[4];
};

ELECTRA_HOST_DEVICE void multiply_high_low(uint32_t a, uint32_t b, uint32_t& high, uint32_t& low) {
  const uint64_t product = uint64_t(a) * uint64_t(b);
  high = static_cast<uint32_t>(product >> 32);
  low = static_cast<uint32_t>(product);
}

// The Random123 constants (also used by the 8-lane CPU version in cpu/cpu_isa.h).
constexpr uint32_t kMultiplier0 = 0xD2511F53u, kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// Philox4x32 with 10 rounds.
ELECTRA_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                        uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    uint32_t high0, low0, high1, low1;
    multiply_high_low(kMultiplier0, c0, high0, low0);
    multiply_high_low(kMultiplier1, c2, high1, low1);
    const uint32_t n0 = high1 ^ c1 ^ k0, n2 = high0 ^ c3 ^ k1;
    c0 = n0;
    c1 = low1;
    c2 = n2;
    c3 = low0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words{{c0, c1, c2, c3}};
}

// floor(p * 2^32) for p in [0, 1): an entry whose word is below it is dropped.
ELECTRA_HOST_DEVICE uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0);
}

// The four words of attention-dropout columns 4 * column_group .. 4 * column_group + 3 of one row.
ELECTRA_HOST_DEVICE Words attention_dropout_words(uint64_t seed, uint32_t batch, uint32_t head, uint32_t row,
                                                  uint32_t column_group) {
  return philox4x32_10(column_group, row, head, batch, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Whether attention dropout keeps entry (batch, head, row, column).
ELECTRA_HOST_DEVICE bool attention_dropout_keep(uint64_t seed, uint32_t batch, uint32_t head, uint32_t row,
                                                uint32_t column, uint32_t threshold) {
  return attention_dropout_words(seed, batch, head, row, column / 4).x[column % 4] >= threshold;
}

// The generator head's counter words c2 and c3 (see the top of this file).
constexpr uint32_t kGenHeadStream2 = 0xFFFFFFFFu, kGenHeadStream3 = 0x67656E68u;

// The four Gumbel-noise words of vocabulary columns 4 * column_group .. 4 * column_group + 3 of one row.
ELECTRA_HOST_DEVICE Words gen_head_gumbel_words(uint64_t seed, uint32_t row, uint32_t column_group) {
  return philox4x32_10(column_group, row, kGenHeadStream2, kGenHeadStream3, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// A word as a uniform number in (0, 1), exact in float32: (k + 0.5) * 2^-23 with k the word's top 23 bits,
// from 2^-24 to 1 - 2^-24. (word + 0.5) * 2^-32 would round to 1.0f for the top 128 words (float32 keeps 24
// bits), and -log(-log(1)) is +inf; 23 bits plus the half keep every value exact, so the CPU, the GPU and
// PyTorch get the same u. The Gumbel noise -log(-log(u)) then lies in [-2.81, 16.6].
ELECTRA_HOST_DEVICE float gen_head_uniform(uint32_t word) {
  return (static_cast<float>(word >> 9) + 0.5f) * 0x1p-23f;
}

}  // namespace electra_ext::philox
